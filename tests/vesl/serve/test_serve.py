"""`vesl serve` on loopback, called with a real HTTP client: served rows equal the batch job's rows, every bad
body and broken image gets its 4xx and reason, a burst over the limits gets 200s and 503s only, and an
image_url to a loopback address is refused."""

from __future__ import annotations

import base64
import json
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from tests.conftest import SAMPLE, encode, photo
from vesl.annotate.config import load_config

pytestmark = pytest.mark.slow
LIMITS = ["serve.max_images=4", "serve.max_body_bytes=3000000", "serve.max_ongoing_requests=2",
          "serve.max_queued_requests=2", "serve.stage_max_queued_requests=4", "serve.max_alt_text_chars=5000"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def batch(sample_output):
    """The batch job's rows for the built-in sample (the session's shared OUTPUT, made before the service takes its
    share of the CPUs)."""
    from vesl.shards.read import read_regions

    return read_regions(str(sample_output), explode=False).set_index("image_id").to_dict("index")


@pytest.fixture(scope="module")
def service(ray_local, tiny_dir, batch):
    from ray import serve

    from vesl.serve.job import start

    config = load_config(preset_name="tiny", overrides=[f"serve.port={free_port()}", *LIMITS])
    url = start(config)
    client = httpx.Client(base_url=url, timeout=120)
    assert client.get("/healthz").json() == {"status": "ok"}
    yield client, config
    client.close()
    serve.shutdown()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def sample_items() -> list[dict]:
    rows = [json.loads(line) for line in (SAMPLE / "manifest.jsonl").read_text().splitlines() if line.strip()]
    return [{"id": r["id"], "image_base64": b64((SAMPLE / r["image"]).read_bytes()), "alt_text": r.get("alt_text")}
            for r in rows]


def test_served_rows_equal_the_batch_job_s_rows(service, batch):
    client, config = service
    assert client.get("/v1/config").json()["label_hash"] == config.label_hash() == load_config(
        preset_name="tiny").label_hash()
    items = sample_items()
    served = [client.post("/v1/annotate", json=item) for item in items[:3]]  # one image a request
    answer = client.post("/v1/annotate", json=items[3:])  # several in one
    assert answer.status_code == 200, answer.text
    listed = answer.json()["results"]
    rows = [r.json() for r in served] + listed
    assert [r.status_code for r in served] == [200, 200, 200] and len(rows) == len(batch) == 6
    for row in rows:
        want = batch[row["image_id"]]
        for key in ("width", "height", "alt_text", "caption", "vlm_caption", "caption_source"):
            assert row[key] == want[key], (row["image_id"], key)
        assert row["phrases"] == list(want["phrases"])
        assert len(row["regions"]) == len(want["regions"]), row["image_id"]
        for got, expected in zip(row["regions"], want["regions"]):
            assert (got["phrase"], got["source"]) == (expected["phrase"], expected["source"])
            assert got["score"] == pytest.approx(expected["score"], abs=1e-4)
            assert got["box"] == pytest.approx(list(expected["box"]), abs=1e-4)
            assert [list(s) for s in got["spans"]] == [list(s) for s in expected["spans"]]


@pytest.mark.parametrize("body, status, reason", [
    (b"{not json", 400, "bad_request"),
    (b"{}", 400, "bad_request"),
    (b"[]", 400, "bad_request"),
    (b'"a string"', 400, "bad_request"),
    (json.dumps({"image_base64": "aGk=", "image_url": "https://example.com/a.jpg"}).encode(), 400, "bad_request"),
    (json.dumps({"image_base64": "aGk=", "colour": "red"}).encode(), 400, "bad_request"),
    (json.dumps({"image_base64": "not base64!!"}).encode(), 400, "bad_request"),
    (json.dumps({"image_base64": 42}).encode(), 400, "bad_request"),
    (json.dumps({"id": "", "image_base64": "aGk="}).encode(), 400, "bad_request"),
    (json.dumps([{"image_base64": "aGk="}] * 5).encode(), 413, "too_many_images"),
    (json.dumps({"image_base64": "aGk=", "alt_text": "x" * 6000}).encode(), 413, "alt_text_too_long"),
    (json.dumps({"image_base64": "A" * 3_100_000}).encode(), 413, "body_too_large"),
    (json.dumps({"image_url": "file:///etc/passwd"}).encode(), 422, "url_not_allowed"),
    (json.dumps({"image_url": "/etc/passwd"}).encode(), 422, "url_not_allowed"),
    (json.dumps({"image_url": "http://169.254.169.254/latest/meta-data/"}).encode(), 422, "url_not_allowed"),
    (json.dumps({"image_url": "http://[::1]:8000/a.jpg"}).encode(), 422, "url_not_allowed"),
    (json.dumps({"image_url": "http://localhost:8000/a.jpg"}).encode(), 422, "url_not_allowed"),
    (json.dumps({"image_url": "http://10.0.0.7/a.jpg"}).encode(), 422, "url_not_allowed"),
])
def test_every_bad_body_gets_its_4xx_and_reason(service, body, status, reason):
    client, _ = service
    answer = client.post("/v1/annotate", content=body, headers={"content-type": "application/json"})
    assert answer.status_code == status, answer.text
    assert answer.json()["reason"] == reason and answer.json()["stage"] == "request" and answer.json()["message"]


def test_every_image_of_the_hostile_sample_gets_its_answer(service, tmp_path):
    from vesl.fixtures.hostile import write_hostile_sample

    client, _ = service
    manifest, expected = write_hostile_sample(tmp_path / "hostile")
    rows = [json.loads(line) for line in manifest.read_text().splitlines() if line.startswith('{"')]
    seen = set()
    for row in rows:
        path = tmp_path / "hostile" / str(row.get("image"))
        if row["id"] in seen or not path.is_file():
            continue  # a path, scheme or duplicate id: a reader's case, not a body's
        seen.add(row["id"])
        answer = client.post("/v1/annotate", json={"id": row["id"], "image_base64": b64(path.read_bytes()),
                                                   "alt_text": row.get("alt_text")})
        if len(row.get("alt_text") or "") > 5000:  # the 80 KB alt-text: over this service's limit (LIMITS)
            assert answer.status_code == 413 and answer.json()["reason"] == "alt_text_too_long"
        elif expected[row["id"]] is None:
            assert answer.status_code == 200, (row["id"], answer.text)
            assert answer.json()["image_id"] == row["id"]
        else:
            assert answer.status_code == 422, (row["id"], answer.text)
            assert answer.json()["reason"] == expected[row["id"]] and answer.json()["stage"] == "decode"
    assert {"bomb", "truncated", "zero_bytes", "random_bytes", "html", "text"} <= seen


def test_a_burst_far_over_the_limits_gets_200s_and_503s_only(service):
    client, _ = service
    item = {"image_base64": b64(encode(photo(64, 48, seed=9))), "alt_text": "a red car"}
    with ThreadPoolExecutor(40) as pool, httpx.Client(base_url=str(client.base_url), timeout=120) as burst:
        answers = list(pool.map(lambda k: burst.post("/v1/annotate", json={**item, "id": f"burst-{k}"}), range(80)))
    statuses = [a.status_code for a in answers]
    assert set(statuses) <= {200, 503}, statuses
    assert statuses.count(200) >= 1 and statuses.count(503) >= 1, statuses
    assert all(a.headers.get("retry-after") for a in answers if a.status_code == 503)
    assert client.get("/healthz").status_code == 200
    assert client.post("/v1/annotate", json={**item, "id": "after"}).status_code == 200


class _Images(BaseHTTPRequestHandler):
    hits: list[str] = []

    def do_GET(self):  # noqa: N802 - http.server's name
        _Images.hits.append(self.path)
        data = encode(photo(32, 32))
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_an_image_url_to_a_loopback_address_is_refused_by_default(service):
    client, _ = service
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Images)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        for url in (f"http://127.0.0.1:{port}/a.jpg", f"http://localhost:{port}/a.jpg",
                    f"http://[::ffff:127.0.0.1]:{port}/a.jpg", f"http://127.0.0.2:{port}/a.jpg"):
            answer = client.post("/v1/annotate", json={"image_url": url})
            assert answer.status_code == 422, answer.text
            assert answer.json()["reason"] == "url_not_allowed" and "loopback" in answer.json()["message"]
        assert _Images.hits == []  # not one request reached the server
    finally:
        server.shutdown()

