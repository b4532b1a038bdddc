"""Which image_urls the service fetches: schemes, and addresses checked on the URL and on the connection."""

from __future__ import annotations

import asyncio

import pytest

from vesl.serve.guard import UrlNotAllowed, address_refused, check_url, guarded_connector
from vesl.serve.requests import Limits, RequestError, parse_body

SCHEMES = ("http", "https")


@pytest.mark.parametrize("url", [
    "file:///etc/passwd", "/etc/passwd", "etc/passwd", "s3://bucket/a.jpg", "ftp://example.com/a.jpg",
    "http://127.0.0.1/a.jpg", "http://127.1.2.3:8080/a.jpg", "http://[::1]/a.jpg", "http://[::ffff:127.0.0.1]/a",
    "http://169.254.169.254/latest/meta-data/", "http://10.1.2.3/a", "http://192.168.0.1/a", "http://172.16.0.1/a",
    "http://100.64.0.1/a", "http://0.0.0.0/a", "http://224.0.0.1/a", "http://localhost/a", "http://x.localhost/a",
    "http://user:pw@example.com/a.jpg", "http:///a.jpg",
])
def test_internal_and_odd_urls_are_refused(url):
    with pytest.raises(UrlNotAllowed):
        check_url(url, SCHEMES, allow_internal=False)


def test_public_urls_pass_and_config_can_open_the_rest():
    check_url("https://example.com/a.jpg", SCHEMES, allow_internal=False)
    check_url("http://93.184.216.34/a.jpg", SCHEMES, allow_internal=False)
    check_url("http://127.0.0.1/a.jpg", SCHEMES, allow_internal=True)
    check_url("s3://bucket/a.jpg", ("s3",), allow_internal=False)
    assert address_refused("8.8.8.8") is None and "loopback" in address_refused("127.0.0.1")


class Rebinding:
    """A name server that answers a public address first and loopback afterwards (DNS rebinding)."""

    def __init__(self) -> None:
        self.calls = 0

    async def resolve(self, host, port=0, family=0):
        import socket

        self.calls += 1
        address = "93.184.216.34" if self.calls == 1 else "127.0.0.1"
        return [{"hostname": host, "host": address, "port": port, "family": socket.AF_INET, "proto": 0, "flags": 0}]

    async def close(self):
        pass


def test_the_connector_refuses_a_name_that_resolves_to_loopback_when_it_connects():
    import aiohttp

    resolver = Rebinding()
    check_url("http://rebind.example/a.jpg", SCHEMES, allow_internal=False)  # the URL itself looks public
    asyncio.run(resolver.resolve("rebind.example"))  # the first lookup (the checker's) said public

    async def fetch():
        async with aiohttp.ClientSession(connector=guarded_connector(False, resolver=resolver)) as session:
            await session.get("http://rebind.example:9/a.jpg")

    with pytest.raises(aiohttp.ClientConnectionError, match="127.0.0.1 is a loopback address"):
        asyncio.run(fetch())
    assert resolver.calls == 2  # the connection's own lookup was the one checked


LIMITS = Limits(max_body_bytes=10_000, max_images=2, max_image_bytes=300, max_alt_text_chars=50,
                url_schemes=SCHEMES, allow_internal=False)


def test_bodies_become_reader_rows_with_the_batch_job_s_ids():
    from vesl.annotate.sources.rows import derive_image_id

    rows, many = parse_body(b'{"image_base64": "aGk=", "alt_text": "a cat"}', LIMITS)
    assert not many and rows[0]["image_bytes"] == b"hi" and rows[0]["image_id"] == derive_image_id(None, b"hi")
    rows, many = parse_body(b'[{"id": "a", "image_url": "https://example.com/x.jpg"}]', LIMITS)
    assert many and rows[0]["image_id"] == "a" and rows[0]["image_uri"] == "https://example.com/x.jpg"


@pytest.mark.parametrize("body, status", [
    (b"x" * 10_001, 413), (b"[1]", 400), (b'{"image_base64": "' + b"A" * 500 + b'"}', 413),
    (b'[{"image_base64": "aGk="}, {"image_base64": "aGk="}, {"image_base64": "aGk="}]', 413),
    (b'{"image_url": "http://127.0.0.1/a"}', 422), (b'{"alt_text": "x"}', 400),
])
def test_bad_bodies_are_refused_with_their_status(body, status):
    with pytest.raises(RequestError) as e:
        parse_body(body, LIMITS)
    assert e.value.status == status and e.value.body()["stage"] == "request"
