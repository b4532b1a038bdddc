"""Which `image_url`s the service fetches: a service must not be a proxy into the cluster.

A URL is fetched only when its scheme is allowed (http and https by default: never file://, never a
bare path) and every address its host stands for is public: loopback, link-local (cloud metadata at
169.254.169.254), private, shared, multicast, reserved and unspecified addresses are refused unless
config allows them. The check runs twice: on the URL's host before any request, and in the HTTP client's
connector (`guarded_connector`) on the addresses each connection will use, so a name that resolves to a
public address when checked and to 127.0.0.1 when connected (DNS rebinding), or a redirect to an internal
host, is refused too.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit


class UrlNotAllowed(ValueError):
    """An image_url the service will not fetch; the message says why."""


def address_refused(address: str) -> str | None:
    """Why ADDRESS (an IP literal) is internal, or None for a public address."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    for kind, flag in (("loopback", ip.is_loopback), ("link-local", ip.is_link_local),
                       ("private", ip.is_private), ("multicast", ip.is_multicast), ("reserved", ip.is_reserved),
                       ("unspecified", ip.is_unspecified), ("not globally routable", not ip.is_global)):
        if flag:
            return f"{ip} is a {kind} address" if kind != "not globally routable" else f"{ip} is {kind}"
    return None


def check_addresses(host: str, addresses: Iterable[str], allow_internal: bool) -> None:
    if allow_internal:
        return
    for address in addresses:
        why = address_refused(address)
        if why:
            raise UrlNotAllowed(f"image_url host {host!r}: {why}; the service fetches public addresses only "
                                "(serve.allow_internal_addresses)")


def check_url(url: str, schemes: Iterable[str], allow_internal: bool) -> None:
    """UrlNotAllowed unless URL has an allowed scheme and a host that is public (an IP literal is checked
    here; a name is checked again by the resolver when the request connects)."""
    parts = urlsplit(url)
    allowed = {s.lower() for s in schemes}
    if parts.scheme.lower() not in allowed:
        raise UrlNotAllowed(f"image_url scheme {parts.scheme or 'none'!r} is not allowed (allowed: "
                            f"{', '.join(sorted(allowed))}; serve.url_schemes)")
    host = parts.hostname
    if not host:
        raise UrlNotAllowed(f"image_url {url[:200]!r} has no host")
    if parts.username or parts.password:
        raise UrlNotAllowed("image_url must not carry a user or password")
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        if host.lower() in ("localhost", "localhost.localdomain") or host.lower().endswith(".localhost"):
            check_addresses(host, ["127.0.0.1"], allow_internal)
        return
    check_addresses(host, [host], allow_internal)


def guarded_connector(allow_internal: bool, resolver=None):
    """An aiohttp connector that refuses to connect to internal addresses: every host it connects to (a name
    after its lookup, an IP literal, each hop of a redirect) is checked on the addresses it will use.
    RESOLVER: aiohttp's default unless given."""
    import aiohttp

    class GuardedConnector(aiohttp.TCPConnector):
        async def _resolve_host(self, host, port, traces=None):
            found = await super()._resolve_host(host, port, traces=traces)
            try:
                check_addresses(host, [r["host"] for r in found], allow_internal)
            except UrlNotAllowed as e:
                raise aiohttp.ClientConnectionError(str(e)) from None
            return found

    return GuardedConnector(resolver=resolver) if resolver is not None else GuardedConnector()


def http_options(allow_internal: bool) -> dict[str, dict[str, Any]]:
    """fsspec storage options for http and https whose client connects through `guarded_connector`."""
    async def get_client(**kwargs: Any):
        import aiohttp

        return aiohttp.ClientSession(connector=guarded_connector(allow_internal), **kwargs)

    return {"http": {"get_client": get_client}, "https": {"get_client": get_client}}
