"""Fetching reads whole bodies and never hangs: chunked HTTP responses, endless and trickling streams,
bodies that really end early, and local paths that are not regular files (FIFOs, devices)."""

from __future__ import annotations

import http.server
import os
import threading
import time

import pytest

from tests.conftest import encode, photo
from vesl.core.images import DecodeError, decode_image, fetch_bytes

JPEG = encode(photo(160, 100, seed=3), quality=95)


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # chunked transfer encoding needs 1.1

    def send_chunked(self, pieces, pause_s: float = 0.0) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            for piece in pieces:
                self.wfile.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
                self.wfile.flush()
                time.sleep(pause_s)
            self.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):  # the client stopped reading: what a cap does
            pass

    def do_GET(self):
        if self.path == "/chunked.jpg":  # 500-byte chunks, no Content-Length
            self.send_chunked(JPEG[i:i + 500] for i in range(0, len(JPEG), 500))
        elif self.path == "/endless.jpg":  # never ends
            self.send_chunked(iter(lambda: b"\xff" * 4096, None))
        elif self.path == "/trickle.jpg":  # a byte a tenth of a second, for ever
            self.send_chunked(iter(lambda: b"\xff", None), pause_s=0.1)
        elif self.path == "/short.jpg":  # announces the whole image, sends a fifth of it, hangs up
            self.send_response(200)
            self.send_header("Content-Length", str(len(JPEG)))
            self.end_headers()
            self.wfile.write(JPEG[: len(JPEG) // 5])
            self.wfile.flush()
            self.close_connection = True
        else:
            self.send_error(404)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_a_chunked_response_is_read_whole_and_decodes(server):
    data = fetch_bytes(f"{server}/chunked.jpg", None, max_bytes=1 << 20, timeout_s=10)
    assert data == JPEG and len(JPEG) > 2000  # five or more chunks, not the first one
    assert decode_image(data)[1:] == (160, 100)


def test_an_endless_stream_is_too_large_not_an_image(server):
    with pytest.raises(DecodeError) as e:
        fetch_bytes(f"{server}/endless.jpg", None, max_bytes=100_000, timeout_s=10)
    assert e.value.reason == "file_too_large" and "more than 100000 bytes" in str(e.value)


def test_a_trickling_stream_fails_at_the_whole_fetch_deadline(server):
    started = time.monotonic()
    with pytest.raises(DecodeError) as e:
        fetch_bytes(f"{server}/trickle.jpg", None, max_bytes=1 << 20, timeout_s=2)
    took = time.monotonic() - started
    assert e.value.reason == "fetch_failed", str(e.value)  # not `not_an_image` after its first byte
    assert took < 8, took
    # the storage options' own request timeout is long (60 s) and each read is quick: the whole-fetch deadline ends it
    import aiohttp

    options = {"http": {"client_kwargs": {"timeout": aiohttp.ClientTimeout(total=60, sock_read=5)}}}
    started = time.monotonic()
    with pytest.raises(DecodeError) as e:
        fetch_bytes(f"{server}/trickle.jpg", options, max_bytes=1 << 20, timeout_s=2)
    took = time.monotonic() - started
    assert e.value.reason == "fetch_failed" and "within the fetch deadline" in str(e.value), str(e.value)
    assert 2 <= took < 8, took


def test_a_body_that_really_ends_early_is_not_decoded_as_an_image(server):
    with pytest.raises(DecodeError) as e:
        data = fetch_bytes(f"{server}/short.jpg", None, max_bytes=1 << 20, timeout_s=10)
        decode_image(data)  # a transport that let it through must still not make an image of a fifth of one
    assert e.value.reason in ("fetch_failed", "corrupt_image"), (e.value.reason, str(e.value))


def test_a_fifo_a_device_and_a_folder_are_not_files_and_nothing_blocks(tmp_path):
    fifo = tmp_path / "x.jpg"
    os.mkfifo(fifo)  # nobody ever writes to it: a plain open() + read() would block for ever
    (tmp_path / "dir.jpg").mkdir()
    for path, kind in ((fifo, "a FIFO"), ("/dev/zero", "a device"), (tmp_path / "dir.jpg", "a directory")):
        started = time.monotonic()
        with pytest.raises(DecodeError) as e:
            fetch_bytes(str(path), None, max_bytes=1 << 20)
        assert e.value.reason == "not_a_file" and kind in str(e.value) and str(path) in str(e.value)
        assert time.monotonic() - started < 5
    (tmp_path / "ok.jpg").write_bytes(JPEG)
    (tmp_path / "link.jpg").symlink_to(tmp_path / "ok.jpg")  # a link to a regular file is a file
    assert fetch_bytes(str(tmp_path / "link.jpg"), None, max_bytes=1 << 20) == JPEG
