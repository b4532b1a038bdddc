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


RANGES: list[str | None] = []  # the Range headers /whole.jpg was asked with


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
        elif self.path == "/whole.jpg":  # honours a Range header, as S3 and most servers do
            RANGES.append(self.headers.get("Range"))
            start, _, end = (self.headers.get("Range") or "bytes=0-").removeprefix("bytes=").partition("-")
            body = JPEG[int(start):int(end) + 1 if end else None]
            self.send_response(206 if self.headers.get("Range") else 200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
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


def test_read_image_takes_bytes_then_location_then_uri_and_never_falls_back_from_a_location(tmp_path):
    from vesl.core.images import ImageRef, read_image

    (tmp_path / "a.jpg").write_bytes(JPEG)
    (tmp_path / "pack.bin").write_bytes(b"head" + JPEG + b"tail")
    uri = str(tmp_path / "a.jpg")
    assert read_image(ImageRef(data=b"given", location=uri, uri=uri), None, 1 << 20) == b"given"
    assert read_image(ImageRef(location=str(tmp_path / "pack.bin"), offset=4, length=len(JPEG)), None, 1 << 20) == JPEG
    assert read_image(ImageRef(location=uri), None, 1 << 20) == JPEG
    assert read_image(ImageRef(uri=uri), None, 1 << 20) == JPEG
    with pytest.raises(DecodeError) as caught:  # a working image_uri is not a fallback: no second crawl
        read_image(ImageRef(location=str(tmp_path / "moved.jpg"), uri=uri), None, 1 << 20)
    assert caught.value.reason == "not_found" and str(caught.value).startswith("image_location: ")
    with pytest.raises(DecodeError) as caught:
        read_image(ImageRef(location=str(tmp_path / "pack.bin"), offset=4, length=len(JPEG)), None, 100)
    assert caught.value.reason == "file_too_large"
    with pytest.raises(DecodeError) as caught:
        read_image(ImageRef(), None, 100)
    assert caught.value.reason == "missing_input"


def test_relocate_maps_the_longest_matching_prefix():
    from vesl.core.images import parse_relocations, relocate

    moved = parse_relocations(["s3://old/=s3://new/", "s3://old/tars/=/mnt/tars/"])
    assert relocate("s3://old/tars/0001.tar", moved) == "/mnt/tars/0001.tar"
    assert relocate("s3://old/img/a.jpg", moved) == "s3://new/img/a.jpg"
    assert relocate("s3://other/a.jpg", moved) == "s3://other/a.jpg"
    with pytest.raises(ValueError, match="OLD=NEW"):
        parse_relocations(["s3://no-equals-sign"])


def test_a_ranged_read_over_http_asks_for_the_member_only(server):
    from vesl.core.images import fetch_range

    RANGES.clear()
    assert fetch_range(f"{server}/whole.jpg", 10, 200, None, 1 << 20, 5.0) == JPEG[10:210]
    assert RANGES[-1] == "bytes=10-209"
