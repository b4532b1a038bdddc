"""Caption and fuse on a real inference server: `transformers serve` on 127.0.0.1 hosting the tiny SmolVLM and
the tiny fuser, a small fault-injecting proxy in front of the server for 429/500 answers, and the server killed
under a run. `vesl annotate` runs on the session's Ray, except where the API key must reach the job's Ray workers
through its environment (a subprocess with its own local Ray, as a user runs it)."""

from __future__ import annotations

import http.client
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.conftest import REPO, SAMPLE, settle_ray
from tests.pipelines import helpers
from tests.pipelines.helpers import read_output

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`transformers serve` on a loopback port, started and killed by the test."""

    def __init__(self, cache: Path, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cache, self.proc = cache, None

    def start(self) -> Server:
        self.cache.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(self.cache)}
        exe = Path(sys.executable).parent / "transformers"
        self.proc = subprocess.Popen([str(exe), "serve", "--host", "127.0.0.1", "--port", str(self.port)], env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.3)
        raise RuntimeError("transformers serve did not start")

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)


class FaultProxy:
    """A loopback HTTP proxy to UPSTREAM that answers the next chat requests of the run (not the preflight's
    one-token probes) with the queued faults (status, Retry-After) instead of forwarding them, and records the
    Authorization headers it sees."""

    def __init__(self, upstream: str, delay_s: float = 0.0) -> None:
        self.upstream = upstream.removeprefix("http://")
        self.delay_s = delay_s  # added to every forwarded chat request: a slower server
        self.faults: list[tuple[int, str] | tuple[int, str, dict]] = []  # (status, Retry-After[, body])
        self.injected: list[int] = []
        self.auth: set[str] = set()
        self.forwarded = 0  # chat requests of the run passed to the server
        self.on_forward = None  # called with the count after each
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), ProxyHandler)
        self.server.proxy = self
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


class ProxyHandler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # quiet
        pass

    def reply(self, status: int, data: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        for name, value in {**headers, "Content-Length": str(len(data))}.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def forward(self, method: str) -> None:
        proxy = self.server.proxy
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        proxy.auth.add(self.headers.get("Authorization") or "")
        chat = self.path.endswith("/chat/completions")
        probe = chat and json.loads(body).get("max_tokens") == 1
        with proxy.lock:
            fault = proxy.faults.pop(0) if chat and not probe and proxy.faults else None
        if fault:
            proxy.injected.append(fault[0])
            payload = fault[2] if len(fault) > 2 else {"error": {"message": f"injected {fault[0]}"}}
            self.reply(fault[0], json.dumps(payload).encode(), {"Retry-After": fault[1]})
            return
        if chat and not probe:
            time.sleep(proxy.delay_s)
            with proxy.lock:
                proxy.forwarded += 1
                count = proxy.forwarded
            if proxy.on_forward:
                proxy.on_forward(count)
        conn = http.client.HTTPConnection(proxy.upstream, timeout=120)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
        try:
            conn.request(method, self.path, body=body or None, headers=headers)
            answer = conn.getresponse()
            data = answer.read()
        except OSError:  # the server is down: so is the connection through the proxy
            self.close_connection = True
            return
        self.reply(answer.status, data, {"Content-Type": answer.getheader("Content-Type") or "application/json"})

    def do_GET(self):
        self.forward("GET")

    def do_POST(self):
        self.forward("POST")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("hf-cache")).start()
    yield s
    s.kill()


def served(tiny_dir: Path, endpoint: str, *extra: str) -> list[str]:
    """--set flags: caption and fuse on ENDPOINT with the tiny SmolVLM and fuser (greedy, no repetition penalty
    or minimum length, which `transformers serve` does not take)."""
    flags = []
    for stage, model in (("caption", "smolvlm"), ("fuse", "fuser")):
        flags += [f"{stage}.backend=openai", f"{stage}.endpoint={endpoint}", f"{stage}.model={tiny_dir / model}",
                  f"{stage}.repetition_penalty=1.0", f"{stage}.min_new_tokens=0"]
    return [x for flag in [*flags, "caption.prompt_style=chat", *extra] for x in ("--set", flag)]


def annotate(out: Path, flags: list[str], env: dict | None = None, manifest: Path = SAMPLE / "manifest.jsonl"):
    """`python pipelines/annotate.py MANIFEST OUT --preset tiny FLAGS` with ENV added: its own process and Ray."""
    cmd = [sys.executable, str(REPO / "pipelines" / "annotate.py"), str(manifest), str(out), "--preset", "tiny",
           *flags]
    return subprocess.run(cmd, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}, text=True,
                          capture_output=True, timeout=600)


def annotate_tiny_here(capfd, out: Path, flags: list[str], manifest: Path = SAMPLE / "manifest.jsonl",
                       preset: tuple[str, ...] = ("--preset", "tiny")):
    """The same job in this process, on the session's Ray: what `annotate` returns (returncode, stdout, stderr)."""
    code, printed, err = helpers.annotate_here(capfd, str(manifest), str(out), *preset, *flags)
    if code != 0:
        settle_ray()  # a pipeline that failed may leave its actors holding the session's CPUs
    return subprocess.CompletedProcess([], code, printed, err)


def test_served_run_matches_local_retries_429_and_500_and_keeps_the_key_secret(tmp_path, tiny_dir, server, ray_local,
                                                                               capfd):
    key = f"sk-vesl-{secrets.token_hex(12)}"
    proxy = FaultProxy(server.url)
    proxy.faults = [(429, "1"), (500, "1"), (503, "0")]  # the run's first three requests
    started = time.time()
    done = annotate(tmp_path / "served", served(tiny_dir, proxy.url, "caption.api_key_env=VESL_TEST_KEY",
                                                "fuse.api_key_env=VESL_TEST_KEY"), env={"VESL_TEST_KEY": key})
    assert done.returncode == 0, done.stderr[-4000:]
    rows, rejects, manifest = read_output(tmp_path / "served")  # every row checked against the schema
    assert len(rows) == 6 and rejects.empty and manifest["counts"]["accounted"]
    assert sorted(proxy.injected) == [429, 500, 503]  # answered, retried, and the run went on
    assert proxy.auth == {f"Bearer {key}"}  # every request carried the key
    assert set(rows["caption_source"]) <= {"fused", "alt_skipped"} and "fused" in set(rows["caption_source"])
    models = manifest["models"]
    for role, model in (("captioner", "smolvlm"), ("fuser", "fuser")):
        assert models[role]["backend"] == "openai" and models[role]["model"] == str(tiny_dir / model)
        assert models[role]["endpoints"] == [proxy.url.removeprefix("http://")]
        assert models[role]["served_model"].startswith(str(tiny_dir / model))  # the server's own name for it
    import pyarrow.parquet as pq

    footer = pq.read_metadata(next((tmp_path / "served" / "data").glob("*.parquet"))).metadata
    assert json.loads(footer[b"vesl.models"])["captioner"]["backend"] == "openai"
    # the key is in no file under OUTPUT, no line the job printed and no Ray log of the run
    texts = [done.stdout, done.stderr] + [p.read_bytes().decode("latin-1") for p in (tmp_path / "served").rglob("*")
                                          if p.is_file()]
    logs = [p for s in Path("/tmp/ray").glob("session_*") if s.stat().st_mtime >= started - 5
            for p in (s / "logs").rglob("*") if p.is_file()]
    texts += [p.read_bytes().decode("latin-1") for p in logs]
    assert logs and not any(key in text for text in texts)
    # the same tiny weights in process, greedy: the served captions are the local ones
    local = annotate_tiny_here(capfd, tmp_path / "local", [x for flag in [
        f"caption.model={tiny_dir / 'smolvlm'}", "caption.prompt_style=chat", "caption.repetition_penalty=1.0",
        "caption.min_new_tokens=0", "caption.processor_kwargs={}", f"fuse.model={tiny_dir / 'fuser'}",
        "fuse.repetition_penalty=1.0", "fuse.min_new_tokens=0"] for x in ("--set", flag)])
    assert local.returncode == 0, local.stderr[-4000:]
    mine, _, local_manifest = read_output(tmp_path / "local")
    both = rows.merge(mine, on="image_id", suffixes=("", "_local"), validate="one_to_one")
    assert (both["vlm_caption"] == both["vlm_caption_local"]).mean() >= 0.9, both[["vlm_caption", "vlm_caption_local"]]
    assert (both["caption"] == both["caption_local"]).mean() >= 0.9
    assert local_manifest["config_hash"] != manifest["config_hash"]  # another backend: another label hash


def sample_of(n: int, root: Path) -> Path:
    """N inputs cycling over the built-in sample's six images, as a manifest of absolute paths."""
    lines = [json.loads(line) for line in (SAMPLE / "manifest.jsonl").read_text().splitlines()]
    manifest = root / "m.jsonl"
    rows = [{**lines[i % 6], "id": f"img-{i}", "image": str(SAMPLE / lines[i % 6]["image"])} for i in range(n)]
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return manifest


@pytest.fixture
def served_chain(monkeypatch):
    """The stage registry for the outage tests: decode, then caption and fuse (on the server), then the model-free
    chain's boxes (tests/pipelines/model_free.py) for phrases and regions: what an outage does to a run is the
    served stages' and the run's, not spaCy's or OWLv2's (the test above runs the whole tiny chain served)."""
    from operators import registry
    from operators.caption import CaptionImages
    from operators.decode import DecodeImages
    from operators.fuse import FuseCaptions
    from tests.pipelines.model_free import BoxesFromPixels

    monkeypatch.setattr(registry, "STAGES", [DecodeImages, CaptionImages, FuseCaptions, BoxesFromPixels])


def annotate_chain_here(capfd, out: Path, flags: list[str], manifest: Path):
    """`annotate_tiny_here` on `served_chain`, with the tiny preset's generation lengths (the preset itself has
    sections for the stages this chain leaves out)."""
    lengths = ["caption.max_new_tokens=12", "fuse.max_new_tokens=16"]
    return annotate_tiny_here(capfd, out, [*flags, *(x for flag in lengths for x in ("--set", flag))], manifest,
                              preset=())


def test_the_server_killed_mid_run_and_started_again(tmp_path, tiny_dir, served_chain, ray_local, capfd):
    """Killed after 6 answers and started again 3 s later, while requests are failing: they are retried and
    the run completes, no row rejected. Killed and left down: the run stops with exit 8 and rejects nothing;
    once the server is back, the same command finishes the rest."""
    server = Server(tmp_path / "hf-cache").start()
    proxy = FaultProxy(server.url)
    manifest = sample_of(12, tmp_path)

    def kill_then_restart(count: int) -> None:
        if count == 6:
            server.kill()
            threading.Timer(3.0, server.start).start()

    try:
        proxy.on_forward = kill_then_restart
        # and one request refused (a 400: that row's reject) and one answered with no text (empty output)
        proxy.faults = [(400, ""), (200, "", {"choices": [{"message": {"role": "assistant", "content": ""}}]})]
        soon = ("caption.backoff_s=0.25", "fuse.backoff_s=0.25")  # retried within a second of the server's return
        done = annotate_chain_here(capfd, tmp_path / "back", served(tiny_dir, proxy.url, "input.unit_rows=2",
                                                                    "caption.max_concurrency=1", *soon),
                                   manifest=manifest)
        assert done.returncode == 0, done.stderr[-4000:]
        rows, rejects, run = read_output(tmp_path / "back")
        assert proxy.forwarded > 6 and len(rows) + len(rejects) == 12 and run["counts"]["accounted"]
        # the two injected answers are the only rejects: none for the outage
        assert sorted(rejects["reason"]) == ["empty_caption", "request_refused"], rejects
        refused = rejects.set_index("reason").loc["request_refused"]
        assert refused["stage"] == "caption" and "HTTP 400: injected 400" in refused["message"]

        proxy.forwarded, proxy.on_forward = 0, lambda count: server.kill() if count == 6 else None
        flags = served(tiny_dir, proxy.url, "input.unit_rows=2", "caption.max_retries=2", "fuse.max_retries=2", *soon)
        first = annotate_chain_here(capfd, tmp_path / "down", flags, manifest=manifest)
        assert first.returncode == 8, first.stderr[-4000:]
        assert "the inference server stayed unavailable through 3 tries" in first.stderr
        assert not list((tmp_path / "down").glob("rejects/*.parquet"))  # no row was rejected for the outage
        proxy.on_forward = None
        server.start()
        second = annotate_chain_here(capfd, tmp_path / "down", flags, manifest=manifest)
        assert second.returncode == 0, second.stderr[-4000:]
        rows, rejects, run = read_output(tmp_path / "down")
        assert len(rows) == 12 and rejects.empty and run["counts"]["accounted"]
    finally:
        server.kill()


def test_a_dead_endpoint_or_an_unserved_model_is_refused_before_any_work(tmp_path, tiny_dir, server, ray_local,
                                                                         capfd):
    dead = f"http://127.0.0.1:{free_port()}"
    done = annotate_tiny_here(capfd, tmp_path / "dead", served(tiny_dir, dead))
    assert done.returncode == 2 and f"caption.endpoint {dead}/v1 is unreachable" in done.stderr
    assert not (tmp_path / "dead" / "data").exists()
    # the server answers, but not for a model it cannot load (transformers serve: HTTP 500 on every try)
    done = annotate_tiny_here(capfd, tmp_path / "unserved", served(tiny_dir, server.url,
                                                                   f"fuse.model={tmp_path / 'no-such-model'}"))
    assert done.returncode == 2, done.stderr[-3000:]
    assert f"fuse.endpoint {server.url}/v1 does not answer a request for '{tmp_path / 'no-such-model'}'" in done.stderr
    # a sampling field this server does not take is found by the preflight, not by every row
    done = annotate_tiny_here(capfd, tmp_path / "penalty", served(tiny_dir, server.url, "fuse.repetition_penalty=1.05"))
    assert done.returncode == 2 and "repetition_penalty" in done.stderr
