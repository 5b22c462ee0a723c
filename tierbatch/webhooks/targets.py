"""Where a webhook may go: the URL's form (`check_webhook_url`), the public-address policy
(`TargetPolicy`) and connections pinned to the addresses it checked (`PinnedTransport`).

A tenant names the URL, so it is checked twice against `TargetPolicy`: when it
is given (a 422 naming `webhook_url`) and when each attempt connects. The host is resolved once, every
address is checked (loopback, private, link-local, multicast, reserved, unspecified, shared and
site-local addresses are refused, IPv4 in any spelling and IPv4 inside IPv6 too) and the connection
goes to a checked address, with the original `Host` header and, for https, the hostname as SNI and
for certificate verification: a DNS answer that changes between the check and the connection
(rebinding) cannot send it elsewhere. `[webhooks] allow_private_networks = true` lets operators
use internal receivers. Redirects are not followed (tierbatch/webhooks/delivery.py) and proxies from the
environment are not used.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from tierbatch.base.config import WebhooksConfig
from tierbatch.base.errors import InvalidValue, TierbatchError

MAX_URL_CHARS = 2048

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Sequence[str]]  # (host, port) -> addresses, as text

# IPv4 carried inside IPv6: checked as the IPv4 address it reaches (NAT64, RFC 6052)
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


class BlockedTarget(TierbatchError):
    """The URL's host is not (only) public addresses, or does not resolve."""


def system_resolver(host: str, port: int) -> list[str]:
    return list(dict.fromkeys(str(info[4][0]) for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)))


def literal_address(host: str) -> IPAddress | None:
    """The address a host names by itself: IPv6, dotted IPv4 and the other spellings the C library
    accepts (`127.1`, `2130706433`, `0x7f.1`, `0177.0.0.1`), or None for a name."""
    text = host.strip("[]")
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        pass
    if not text or not all(c.isalnum() or c == "." for c in text):
        return None
    try:
        return ipaddress.IPv4Address(socket.inet_aton(text))
    except OSError:
        return None


def address_problem(ip: IPAddress, allow_private_networks: bool = False) -> str | None:
    """Why a webhook may not go to `ip` (a short phrase), or None."""
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is None and ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            inner = address_problem(embedded, allow_private_networks)
            if inner is not None:
                return f"{inner} (IPv4 {embedded} inside IPv6)"
    if ip.is_unspecified:
        return "an unspecified address"
    if ip.is_multicast:
        return "a multicast address"
    if allow_private_networks:
        return None
    for flag, phrase in (("is_loopback", "a loopback address"), ("is_link_local", "a link-local address"),
                         ("is_private", "a private address"), ("is_reserved", "a reserved address"),
                         ("is_site_local", "a site-local address")):
        if getattr(ip, flag, False):
            return phrase
    if not ip.is_global:
        return "not a public address"
    return None


@dataclass(frozen=True)
class TargetPolicy:
    """Which hosts a webhook may reach; `resolver` is the seam for DNS (tests inject one)."""

    allow_private_networks: bool = False
    resolver: Resolver = system_resolver

    @classmethod
    def from_config(cls, config: WebhooksConfig, resolver: Resolver | None = None) -> TargetPolicy:
        return cls(config.allow_private_networks, resolver or system_resolver)

    def addresses(self, host: str, port: int) -> list[IPAddress]:
        """Resolve `host` once; every address must pass (BlockedTarget), and these are the ones to use."""
        name = host.rstrip(".").lower()
        literal = literal_address(name)
        if literal is not None:
            problem = address_problem(literal, self.allow_private_networks)
            if problem is not None:
                raise BlockedTarget(f"{host} is {problem}")
            return [literal]
        refused = f"{host} does not resolve to public addresses only"
        if not self.allow_private_networks and (name == "localhost" or name.endswith(".localhost")):
            raise BlockedTarget(refused)
        try:
            found = [ipaddress.ip_address(str(a).split("%", 1)[0]) for a in self.resolver(name, port)]
        except (OSError, UnicodeError, ValueError):
            raise BlockedTarget(f"{host} does not resolve") from None
        # the resolved addresses are not named: an error must not map a tenant's view of internal DNS
        if not found or any(address_problem(ip, self.allow_private_networks) for ip in found):
            raise BlockedTarget(refused)
        return found

    def check_url(self, value: Any) -> str | None:
        """A `webhook_url` as given: its form, then where it goes (InvalidInput 422 naming the field)."""
        url = check_webhook_url(value)
        if url is None:
            return None
        parsed = httpx.URL(url)
        try:
            self.addresses(_ascii_host(parsed), parsed.port or (443 if parsed.scheme == "https" else 80))
        except BlockedTarget as exc:
            raise InvalidValue(f"webhook_url: {exc}; webhooks are only sent to public addresses",
                               param="webhook_url") from None
        return url


def _ascii_host(url: httpx.URL) -> str:
    """The host as DNS and TLS see it (IDNA-encoded), without IPv6 brackets."""
    return url.raw_host.decode("ascii")


class PinnedTransport(httpx.AsyncBaseTransport):
    """Connects only to the addresses the policy checked for the request's host, resolved once here.

    The request goes to the address itself; its `Host` header stays the original one, and for https the
    hostname is the SNI name and the name the certificate is verified against (httpcore's
    `sni_hostname` extension)."""

    def __init__(self, policy: TargetPolicy, inner: httpx.AsyncBaseTransport | None = None) -> None:
        self.policy = policy
        self.inner = inner or httpx.AsyncHTTPTransport(retries=0)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        host = _ascii_host(url)
        port = url.port or (443 if url.scheme == "https" else 80)
        addresses = await asyncio.to_thread(self.policy.addresses, host, port)
        last: httpx.ConnectError | None = None
        for ip in addresses:
            extensions = dict(request.extensions)
            if url.scheme == "https" and literal_address(host) is None:
                extensions["sni_hostname"] = host
            pinned = httpx.Request(request.method, url.copy_with(host=str(ip)), headers=request.headers,
                                   stream=request.stream, extensions=extensions)
            try:
                return await self.inner.handle_async_request(pinned)
            except httpx.ConnectError as exc:  # the next checked address, if any
                last = exc
        assert last is not None
        raise last

    async def aclose(self) -> None:
        await self.inner.aclose()


def check_webhook_url(value: Any) -> str | None:
    """A `webhook_url` field: None, or an absolute http(s) URL with a host (InvalidInput naming the field).
    Its form only; `TargetPolicy.check_url` also checks where it goes."""
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise InvalidValue("webhook_url: must be an http(s) URL", param="webhook_url")
    if len(value) > MAX_URL_CHARS:
        raise InvalidValue(f"webhook_url: at most {MAX_URL_CHARS} characters", param="webhook_url")
    if any(c.isspace() or not c.isprintable() for c in value):
        raise InvalidValue("webhook_url: must not contain spaces or control characters (percent-encode them)",
                           param="webhook_url")
    try:
        url = httpx.URL(value)
    except (httpx.InvalidURL, TypeError, ValueError):
        raise InvalidValue(f"webhook_url: {value!r} is not a valid URL", param="webhook_url") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise InvalidValue(f"webhook_url: {value!r} must be an http:// or https:// URL with a host",
                           param="webhook_url")
    return value
