"""URL checks and checked name resolution: the SSRF rules applied.

`check_url` is the syntax check every URL (and every redirect hop) goes
through; `resolve_checked` turns a host into the addresses a connection may
go to, refusing a host with any address that is neither public nor
allowed by the policy.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Awaitable, Callable, Iterable
from typing import Final, TypeAlias
from urllib.parse import SplitResult, urlsplit

import anyio

from csvimg._errors import FetchError
from csvimg._util import redact_url
from csvimg.fetch._addresses import (
    _HOST_CHARS,
    IPAddress,
    _format_host,
    _ip_literal,
    is_public_address,
)
from csvimg.fetch._policy import ENV_ALLOW, FetchPolicy

__all__ = ["Resolver", "check_url", "resolve_checked"]

Resolver: TypeAlias = Callable[[str, int], Awaitable[Iterable[str]]]
"""``async (host, port) -> addresses``: how host names become IP addresses.

The default asks the system (`anyio.getaddrinfo`). Tests pass their own to
give made-up names made-up addresses without touching DNS.
"""

_MAX_URL_LENGTH: Final = 8192


def _bad_url(url: str, why: str) -> FetchError:
    return FetchError("bad-url", f"{why}: {redact_url(url)}")


def check_url(url: str) -> SplitResult:
    """Check that *url* is an absolute http(s) URL and normalise it.

    The result has a lower-case scheme and host, no fragment, and a legacy
    numeric IPv4 host (``http://2130706433/``) rewritten to the address it
    means (``http://127.0.0.1/``), so that it is judged, and fetched, as that
    address. Use ``.geturl()`` for the string. This is syntax only: the
    address check happens when connecting (`resolve_checked`).

    Raises:
        FetchError: ``bad-scheme`` when the scheme is not http or https,
            ``bad-url`` for anything else unusable.
    """
    if not isinstance(url, str):
        raise FetchError("bad-url", f"expected a URL string, got {type(url).__name__}")
    url = url.strip()
    if len(url) > _MAX_URL_LENGTH:
        raise FetchError("bad-url", f"URL longer than {_MAX_URL_LENGTH} characters")
    if any(ord(c) < 0x20 or c == "\x7f" for c in url):
        raise _bad_url(url, "control character in URL")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise _bad_url(url, f"malformed URL ({exc})") from None
    scheme = parts.scheme.lower()
    if not scheme:
        raise _bad_url(url, "not an absolute URL")
    if scheme not in ("http", "https"):
        raise FetchError("bad-scheme", f"only http and https URLs are fetched, not {scheme}:")
    host = parts.hostname
    if not host:
        raise _bad_url(url, "no host in URL")
    if port == 0:
        raise _bad_url(url, "port 0")
    try:
        ip = _ip_literal(host)
    except ValueError as exc:
        raise _bad_url(url, str(exc)) from None
    if ip is not None:
        if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id:
            raise _bad_url(url, "IPv6 zone identifiers are not supported")
        host = _format_host(ip)
    elif "[" in parts.netloc:
        raise _bad_url(url, "brackets hold an IPv6 address")
    elif not all(c in _HOST_CHARS or ord(c) > 0x7F for c in host) or ".." in host:
        raise _bad_url(url, "invalid character in host")
    userinfo, at, _ = parts.netloc.rpartition("@")
    netloc = f"{userinfo}{at}{host}" + ("" if port is None else f":{port}")
    return SplitResult(scheme, netloc, parts.path or "/", parts.query, "")


async def _system_resolve(host: str, port: int) -> list[str]:
    infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [info[4][0] for info in infos]


def _check_address(ip: IPAddress, port: int, policy: FetchPolicy, host: str) -> None:
    if is_public_address(ip) or any(rule.allows_address(ip, port) for rule in policy.allow):
        return
    shown = host if host == str(ip) else f"{host} ({ip})"
    raise FetchError(
        "blocked-address",
        f"{shown} is not a public address; allow it with {ENV_ALLOW} if this is intended",
    )


def _check_literal(host: str, port: int, policy: FetchPolicy) -> IPAddress | None:
    """Check *host* if it is an IP literal and return its address; None for a name."""
    try:
        literal = _ip_literal(host)
    except ValueError as exc:
        raise FetchError("bad-url", str(exc)) from None
    if literal is not None:
        _check_address(literal, port, policy, host)
    return literal


async def resolve_checked(
    host: str, port: int, policy: FetchPolicy, *, resolver: Resolver | None = None
) -> list[str]:
    """Resolve *host* and check every address; return them, ready to connect.

    An IP literal (including ``2130706433``-style legacy forms) is checked
    without asking DNS. A host name matched by a name rule of
    ``policy.allow`` is trusted with whatever it resolves to. Otherwise each
    resolved address must be public (`is_public_address`) or allowed by a
    network rule: one bad address refuses the whole host, since the
    connection might otherwise go to it.

    Raises:
        FetchError: ``blocked-address``; ``dns-error`` when the name does
            not resolve; ``bad-url`` for a malformed numeric host.
    """
    literal = _check_literal(host, port, policy)
    if literal is not None:
        return [str(literal)]
    trusted = any(rule.allows_name(host, port) for rule in policy.allow)
    try:
        answers = list(await (resolver or _system_resolve)(host, port))
    except (OSError, UnicodeError) as exc:
        retryable = isinstance(exc, socket.gaierror) and exc.errno == socket.EAI_AGAIN
        raise FetchError(
            "dns-error", f"cannot resolve {host}: {exc}", retryable=retryable
        ) from None
    addresses: list[IPAddress] = []
    for answer in answers:
        try:
            ip = ipaddress.ip_address(answer)
        except ValueError:
            raise FetchError("dns-error", f"{host} resolved to {answer!r}") from None
        if not trusted:
            _check_address(ip, port, policy, host)
        if ip not in addresses:
            addresses.append(ip)
    if not addresses:
        raise FetchError("dns-error", f"{host} resolved to no address")
    return [str(ip) for ip in addresses]
