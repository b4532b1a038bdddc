"""The inference-server client's rules that need no server: endpoint URLs, Retry-After, error messages, the
answers it parses, and the settings the openai backend refuses."""

from __future__ import annotations

import email.utils
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from vesl.core.serving import ChatClient, normalise_endpoint, parse_answer, retry_after_s, server_message
from vesl.errors import EndpointAuthError, EndpointUnavailableError


class Scripted(BaseHTTPRequestHandler):
    """A loopback chat endpoint answering each request with the next (status, body, Retry-After) of its script;
    a request that mentions "poison" always with HTTP 500 (an input that breaks the server)."""

    def log_message(self, *args):
        pass


    def do_POST(self):
        request = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        with self.server.lock:
            if b"poison" in request:
                status, body, retry = 500, {"error": {"message": "cannot identify image file"}}, None
            else:
                status, body, retry = self.server.script.pop(0) if self.server.script else self.server.default
            self.server.seen.append(status)
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        if retry is not None:
            self.send_header("Retry-After", retry)
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def scripted():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Scripted)
    server.script, server.seen, server.lock = [], [], threading.Lock()
    server.default = (200, {"choices": [{"message": {"content": "a dog"}}]}, None)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()


def client_of(server, **kwargs) -> ChatClient:
    return ChatClient([f"http://127.0.0.1:{server.server_address[1]}"], "m", backoff_s=0.01, label="caption",
                      **kwargs)


def test_transient_answers_are_retried_and_a_refusal_is_that_requests_alone(scripted):
    error = {"error": {"message": "prompt too long"}}
    scripted.script = [(429, error, "0"), (503, error, None), (400, error, None)]
    answers = client_of(scripted, max_concurrency=1).complete([{"messages": []}] * 2)
    assert scripted.seen == [429, 503, 400, 200]  # the first request: 429, 503, then refused; the second: served
    assert answers[0].error == "HTTP 400: prompt too long" and answers[0].text is None
    assert answers[1].text == "a dog" and answers[1].error is None


def test_a_server_that_stays_unavailable_stops_the_work(scripted):
    scripted.default = (503, {"error": {"message": "overloaded"}}, None)
    with pytest.raises(EndpointUnavailableError, match="stayed unavailable through 3 tries.*HTTP 503"):
        client_of(scripted, max_retries=2).complete([{"messages": []}])
    assert scripted.seen == [503, 503, 503]


def test_a_request_the_server_fails_on_while_it_answers_is_that_rows_reject(scripted):
    """HTTP 500 on every try of one request while the server answers the others: the input breaks the server,
    so the row is refused (a re-run would stop at it again). Alone, with nothing answered, it is an outage."""
    poison, fine = {"messages": [{"role": "user", "content": "poison"}]}, {"messages": []}
    answers = client_of(scripted, max_retries=2, max_concurrency=4).complete([poison, fine, fine])
    assert answers[0].error == ("HTTP 500 on each of 3 tries while the server answered other requests: "
                                "cannot identify image file")
    assert [a.text for a in answers[1:]] == ["a dog", "a dog"]
    with pytest.raises(EndpointUnavailableError, match="HTTP 500"):
        client_of(scripted, max_retries=2).complete([poison])


def test_a_refused_key_stops_the_work_not_one_row(scripted, monkeypatch):
    monkeypatch.setenv("VESL_TEST_KEY", "sk-never-shown")
    scripted.default = (401, {"error": {"message": "invalid key"}}, None)
    with pytest.raises(EndpointAuthError, match="refused the API key .*VESL_TEST_KEY.*invalid key") as e:
        client_of(scripted, api_key_env="VESL_TEST_KEY").complete([{"messages": []}])
    assert "sk-never-shown" not in str(e.value)


def test_endpoints_are_the_chat_api_base_and_carry_no_secret():
    for url in ("http://h:8000", "http://h:8000/", "http://h:8000/v1", "http://h:8000/v1/",
                "http://h:8000/v1/chat/completions"):
        assert normalise_endpoint(url) == "http://h:8000/v1"
    assert normalise_endpoint("https://api.example.com/openai/v1") == "https://api.example.com/openai/v1"
    for bad in ("http://user:sk-123@h:8000", "http://h:8000/v1?key=sk-123", "ftp://h/v1", "h:8000"):
        with pytest.raises(ValueError) as e:
            normalise_endpoint(bad)
        assert "sk-123" not in str(e.value)


def test_retry_after_in_seconds_or_as_a_date_is_honoured_up_to_a_cap():
    assert retry_after_s("2") == 2.0 and retry_after_s("0") == 0.0 and retry_after_s(None) is None
    assert retry_after_s("9999") == 300.0 and retry_after_s("soon") is None
    later = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 25 <= retry_after_s(later) <= 31


def test_a_servers_error_message_is_read_from_its_usual_places():
    assert server_message('{"error": {"message": "prompt too long", "code": 400}}') == "prompt too long"
    assert server_message('{"detail": "Unexpected fields in the request: {\'x\'}"}').startswith("Unexpected fields")
    assert server_message("<html>\n bad  gateway </html>") == "<html> bad gateway </html>"
    assert len(server_message("x" * 5000)) == 300


def test_answers_with_and_without_text():
    ok = parse_answer('{"model": "m@main", "choices": [{"message": {"content": " a dog "}}], '
                      '"usage": {"prompt_tokens": 12, "completion_tokens": 3}}')
    assert (ok.text, ok.model, ok.usage, ok.problem) == (" a dog ", "m@main", {"prompt_tokens": 12,
                                                                                "completion_tokens": 3}, None)
    parts = parse_answer('{"choices": [{"message": {"content": [{"type": "text", "text": "a cat"}]}}]}')
    assert parts.text == "a cat"
    for body in ('{"choices": []}', '{"choices": [{"message": {"content": "  "}}]}', "not json", '{"x": 1}'):
        answer = parse_answer(body)
        assert answer.text is None and answer.error is None and answer.problem


def test_a_missing_key_variable_is_refused_naming_the_variable_only(monkeypatch):
    monkeypatch.delenv("VESL_NO_SUCH_KEY", raising=False)
    client = ChatClient(["http://127.0.0.1:9"], "m", api_key_env="VESL_NO_SUCH_KEY", label="caption")
    with pytest.raises(ValueError, match="caption.api_key_env names VESL_NO_SUCH_KEY, which is not set"):
        client.complete([{"messages": []}])


def test_the_openai_backend_refuses_what_it_cannot_honour():
    from operators.caption import CaptionConfig
    from operators.fuse import FuseConfig

    with pytest.raises(ValueError, match="caption.backend openai needs caption.endpoint"):
        CaptionConfig(backend="openai")
    with pytest.raises(ValueError, match="prompt_style must be chat"):
        CaptionConfig(backend="openai", endpoint="http://h:8000", prompt_style="prefix")
    with pytest.raises(ValueError, match="num_beams must be 1"):
        FuseConfig(backend="openai", endpoint=["http://a:8000", "http://b:8000"], num_beams=3)
    fuse = FuseConfig(backend="openai", endpoint="http://h:8000", repetition_penalty=1.05, min_new_tokens=4,
                      request_params={"top_k": 1})
    assert fuse.sampling() == {"max_tokens": 96, "temperature": 0.0, "repetition_penalty": 1.05, "min_tokens": 4,
                               "top_k": 1}
    assert FuseConfig(backend="openai", endpoint="http://h", repetition_penalty=1.0).sampling() == {
        "max_tokens": 96, "temperature": 0.0}


def test_a_local_runs_label_hash_ignores_the_server_settings():
    from vesl.annotate.config import load_config

    base = load_config(None, "tiny", []).label_hash()
    assert load_config(None, "tiny", ["caption.max_concurrency=4", "fuse.timeout_s=5"]).label_hash() == base
    served = load_config(None, "tiny", ["fuse.backend=openai", "fuse.endpoint=http://h:8000"]).label_hash()
    assert served != base
    other_host = load_config(None, "tiny", ["fuse.backend=openai", "fuse.endpoint=http://g:8000"]).label_hash()
    assert other_host != served
    assert load_config(None, "tiny", ["fuse.backend=openai", "fuse.endpoint=http://h:8000",
                                      "fuse.max_concurrency=64", "fuse.api_key_env=K"]).label_hash() == served
