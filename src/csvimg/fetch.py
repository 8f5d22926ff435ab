"""The safe image fetcher: aiohttp on asyncio, with an SSRF guard.

A URL taken from an uploaded CSV is hostile until proven otherwise. The
fetcher therefore:

* accepts only ``http`` and ``https`` URLs (`check_url`), and reads the
  legacy numeric IPv4 forms (``2130706433``, ``0177.0.0.1``, ``0x7f.1``) as
  the address they mean, the way browsers and ``getaddrinfo`` do;
* resolves the host itself, checks **every** address it resolves to
  (`resolve_checked`, `is_public_address`) and then connects to exactly
  those addresses: the check lives in the resolver of aiohttp's connector
  (`_GuardedResolver`, DNS cache off), which hands the connector the only
  addresses it may open sockets to, so nothing can resolve the name a
  second time (no DNS rebinding); IP-literal hosts, which aiohttp does not
  resolve, are checked before each request;
* follows redirects by hand, so every hop goes through the same check,
  and stops after `FetchPolicy.max_redirects`;
* streams the body under a byte cap, lets the caller abort after the first
  bytes (magic-number check), and bounds connect, read and total time;
* retries only what may succeed next time, with jittered backoff or the
  server's ``Retry-After``.

Private addresses (loopback, RFC 1918, link-local and cloud metadata ...)
are reachable only when ``CSVIMG_FETCH_ALLOW`` (or `FetchPolicy.allow`) says
so: tests allow their loopback servers that way.

Failures are `csvimg.FetchError` with one of these codes:

==================== ========= ==========================================
code                 retryable meaning
==================== ========= ==========================================
``bad-url``          no        not a URL we can fetch
``bad-scheme``       no        not http/https (also on a redirect hop)
``blocked-address``  no        the host is or resolves to a non-public
                               address that is not allowed
``dns-error``        EAI_AGAIN the host name did not resolve
``connect-error``    yes       the TCP connection failed
``tls-error``        no        the certificate did not verify
``timeout``          yes       connect, read or total deadline passed
``network-error``    yes       the connection broke mid-response
``bad-response``     no        the body could not be decoded
``too-large``        no        the body is over `FetchPolicy.max_bytes`
``too-many-redirects`` no      more hops than `FetchPolicy.max_redirects`
``http-<status>``    408, 429, the server answered with an error status
                     5xx
``not-an-image``     no        ``first_chunk_check`` rejected the start
==================== ========= ==========================================
"""

from __future__ import annotations

import contextlib
import email.utils
import ipaddress
import itertools
import logging
import os
import random
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from importlib import metadata
from types import TracebackType
from typing import Any, Final, Self, TypeAlias
from urllib.parse import SplitResult, urljoin, urlsplit

import aiohttp
import aiohttp.abc
import aiohttp.client
import anyio
import attrs
import httpx
import yarl
from aiohappyeyeballs import AddrInfoType
from aiohttp.abc import ResolveResult
from aiohttp.http_exceptions import ContentEncodingError

from csvimg._errors import ConfigError, FetchError

__all__ = [
    "ENV_ALLOW",
    "ENV_MAX_BYTES",
    "ENV_RETRIES",
    "ENV_TIMEOUT",
    "SNIFF_BYTES",
    "AllowRule",
    "FetchPolicy",
    "Fetched",
    "Fetcher",
    "Resolver",
    "SocketFactory",
    "check_url",
    "is_public_address",
    "parse_allow",
    "resolve_checked",
]

log = logging.getLogger("csvimg.fetch")

ENV_ALLOW: Final = "CSVIMG_FETCH_ALLOW"
"""Environment variable holding the allow-list (see `parse_allow`)."""
ENV_MAX_BYTES: Final = "CSVIMG_FETCH_MAX_BYTES"
"""Environment variable overriding `FetchPolicy.max_bytes`."""
ENV_TIMEOUT: Final = "CSVIMG_FETCH_TIMEOUT"
"""Environment variable overriding `FetchPolicy.total_timeout` (seconds)."""
ENV_RETRIES: Final = "CSVIMG_FETCH_RETRIES"
"""Environment variable overriding `FetchPolicy.retries`."""

SNIFF_BYTES: Final = 32
"""``first_chunk_check`` sees at least this many bytes (or the whole body)."""

IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network

Resolver: TypeAlias = Callable[[str, int], Awaitable[Iterable[str]]]
"""``async (host, port) -> addresses``: how host names become IP addresses.

The default asks the system (`anyio.getaddrinfo`). Tests pass their own to
give made-up names made-up addresses without touching DNS.
"""

_MAX_URL_LENGTH: Final = 8192
# A Retry-After beyond this is a server mistake or a ban; don't plan on it.
_MAX_RETRY_AFTER: Final = 3600.0
_REDIRECT_STATUSES: Final = frozenset({301, 302, 303, 307, 308})
_HOST_CHARS: Final = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-._")
_HEX_DIGITS: Final = frozenset("0123456789abcdefABCDEF")
_DEC_DIGITS: Final = frozenset("0123456789")


def _default_user_agent() -> str:
    try:
        version = metadata.version("csvimg")
    except metadata.PackageNotFoundError:  # running from a source tree
        version = "0"
    return f"csvimg/{version}"


# --------------------------------------------------------------------------
# Which addresses are public


def _nets(*specs: str) -> tuple[IPNetwork, ...]:
    return tuple(ipaddress.ip_network(s) for s in specs)


# IANA IPv4 Special-Purpose Address Registry, minus the few entries that are
# globally reachable anycast services no image is ever served from anyway.
_V4_DENIED: Final = _nets(
    "0.0.0.0/8",  # "this network", includes the unspecified address
    "10.0.0.0/8",  # private
    "100.64.0.0/10",  # carrier-grade NAT
    "127.0.0.0/8",  # loopback
    "169.254.0.0/16",  # link-local, cloud metadata (169.254.169.254)
    "172.16.0.0/12",  # private
    "192.0.0.0/24",  # IETF protocol assignments
    "192.0.2.0/24",  # documentation TEST-NET-1
    "192.88.99.0/24",  # deprecated 6to4 relay anycast
    "192.168.0.0/16",  # private
    "198.18.0.0/15",  # benchmarking
    "198.51.100.0/24",  # documentation TEST-NET-2
    "203.0.113.0/24",  # documentation TEST-NET-3
    "224.0.0.0/4",  # multicast
    "240.0.0.0/4",  # reserved, includes broadcast 255.255.255.255
)
# IPv6 is judged by allowing only global unicast (2000::/3), which leaves out
# ::, ::1, ::/96 (IPv4-compatible), 100::/64 (discard), fc00::/7 (unique
# local), fe80::/10 (link-local), fec0::/10 (site-local), ff00::/8
# (multicast) and 64:ff9b:1::/48 (local NAT64) at once; then these holes
# inside 2000::/3 are punched.
_V6_GLOBAL: Final = ipaddress.IPv6Network("2000::/3")
_V6_DENIED: Final = _nets(
    "2001::/23",  # IETF protocol assignments: Teredo 2001::/32, benchmarking, ORCHID
    "2001:db8::/32",  # documentation
    "3fff::/20",  # documentation (RFC 9637)
    "5f00::/16",  # SRv6 SIDs
)
_V4_MAPPED: Final = ipaddress.IPv6Network("::ffff:0:0/96")
_NAT64: Final = ipaddress.IPv6Network("64:ff9b::/96")
_SIX_TO_FOUR: Final = ipaddress.IPv6Network("2002::/16")


def is_public_address(ip: IPAddress) -> bool:
    """Whether *ip* is a public unicast address a fetch may connect to.

    False for loopback, private (10/8, 172.16/12, 192.168/16, fc00::/7),
    link-local (169.254/16 with the cloud metadata address, fe80::/10),
    CGNAT 100.64/10, multicast, reserved, unspecified, 0.0.0.0/8,
    benchmarking 198.18/15, documentation ranges, Teredo 2001::/32 and
    site-local fec0::/10. Addresses that embed an IPv4 address
    (IPv4-mapped ``::ffff:a.b.c.d``, NAT64 ``64:ff9b::/96``, 6to4
    ``2002::/16``) are judged by the embedded address, since that is where
    the packets end up.
    """
    if isinstance(ip, ipaddress.IPv4Address):
        return not any(ip in net for net in _V4_DENIED)
    if ip in _V4_MAPPED or ip in _NAT64:
        return is_public_address(ipaddress.IPv4Address(int(ip) & 0xFFFF_FFFF))
    if ip not in _V6_GLOBAL or any(ip in net for net in _V6_DENIED):
        return False
    if ip in _SIX_TO_FOUR:
        embedded = ip.sixtofour
        assert embedded is not None  # every 2002::/16 address has one
        return is_public_address(embedded)
    return True


def _unmapped(ip: IPAddress) -> IPAddress:
    """``::ffff:a.b.c.d`` as ``a.b.c.d``, so allow rules match either spelling."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


# --------------------------------------------------------------------------
# IP literals, including the legacy numeric IPv4 forms


def _parse_ipv4_number(part: str) -> int:
    """One part of a legacy IPv4 address: decimal, 0x hex or 0 octal."""
    if part[:2] in ("0x", "0X"):
        digits, base, allowed = part[2:], 16, _HEX_DIGITS
    elif len(part) > 1 and part[0] == "0":
        digits, base, allowed = part[1:], 8, frozenset("01234567")
    else:
        digits, base, allowed = part, 10, _DEC_DIGITS
    if not part or not set(digits) <= allowed:
        raise ValueError(f"{part!r} is not an IPv4 number")
    return int(digits, base) if digits else 0


def _ends_in_number(parts: list[str]) -> bool:
    last = parts[-1]
    if last and set(last) <= _DEC_DIGITS:
        return True
    try:
        _parse_ipv4_number(last)
    except ValueError:
        return False
    return True


def _legacy_ipv4(host: str) -> ipaddress.IPv4Address | None:
    """Parse *host* the way the WHATWG URL standard (and glibc) read IPv4.

    ``2130706433``, ``0177.0.0.1``, ``0x7f.1`` and ``127.1`` all mean
    127.0.0.1. Returns None when *host* is a domain name; raises ValueError
    when it looks numeric but is no valid address (``1.2.3.999``), which
    browsers reject too.
    """
    parts = host.split(".")
    if len(parts) > 1 and parts[-1] == "":
        parts.pop()  # a trailing dot is allowed: "127.0.0.1."
    if not _ends_in_number(parts):
        return None
    if len(parts) > 4:
        raise ValueError(f"{host!r} has too many parts for an IPv4 address")
    numbers = [_parse_ipv4_number(p) for p in parts]
    if any(n > 255 for n in numbers[:-1]) or numbers[-1] >= 256 ** (5 - len(numbers)):
        raise ValueError(f"{host!r} is out of range for an IPv4 address")
    value = numbers[-1]
    for i, n in enumerate(numbers[:-1]):
        value += n << (8 * (3 - i))
    return ipaddress.IPv4Address(value)


def _ip_literal(host: str) -> IPAddress | None:
    """Return the address *host* spells (brackets optional), or None for a name."""
    host = host.removeprefix("[").removesuffix("]")
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    if ":" in host:
        raise ValueError(f"{host!r} is not a valid IPv6 address")
    return _legacy_ipv4(host)


def _format_host(ip: IPAddress) -> str:
    return f"[{ip}]" if ip.version == 6 else str(ip)


# --------------------------------------------------------------------------
# The allow-list


@attrs.frozen
class AllowRule:
    """One entry of the allow-list: a host name or a network, maybe a port.

    A *name* rule matches the URL's host (case-insensitive) and then allows
    whatever addresses that name resolves to. A *network* rule allows the
    addresses in it (a single address is a /32 or /128). ``port=None``
    means any port.
    """

    name: str | None = None
    network: IPNetwork | None = None
    port: int | None = None

    def __attrs_post_init__(self) -> None:
        if (self.name is None) == (self.network is None):
            raise ConfigError("an AllowRule needs exactly one of name and network")
        if self.port is not None and not 0 < self.port < 65536:
            raise ConfigError(f"port {self.port} is out of range")

    def allows_name(self, host: str, port: int) -> bool:
        """Whether this is a name rule for *host* (and *port*)."""
        return (
            self.name is not None and self.name == _normal_name(host) and self.port in (None, port)
        )

    def allows_address(self, ip: IPAddress, port: int) -> bool:
        """Whether this is a network rule covering *ip* (and *port*)."""
        ip = _unmapped(ip)
        return (
            self.network is not None
            and self.network.version == ip.version
            and ip in self.network
            and self.port in (None, port)
        )

    def __str__(self) -> str:
        if self.name is not None:
            host = self.name
        else:
            assert self.network is not None
            if self.network.num_addresses > 1:
                host = str(self.network)
            elif self.port is None:
                host = str(self.network.network_address)
            else:
                host = _format_host(self.network.network_address)
        return host if self.port is None else f"{host}:{self.port}"


def _normal_name(host: str) -> str:
    return host.lower().rstrip(".")


def _parse_port(text: str, entry: str) -> int:
    if not text or not set(text) <= _DEC_DIGITS or not 0 < int(text) < 65536:
        raise ConfigError(f"bad port in {ENV_ALLOW} entry {entry!r}")
    return int(text)


def _parse_allow_entry(entry: str) -> AllowRule:
    if "/" in entry:
        try:
            return AllowRule(network=ipaddress.ip_network(entry))
        except ValueError as exc:
            raise ConfigError(f"bad network in {ENV_ALLOW} entry {entry!r}: {exc}") from None
    port: int | None = None
    host = entry
    if entry.startswith("["):
        host, sep, rest = entry[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ConfigError(f"bad {ENV_ALLOW} entry {entry!r}: expected [v6] or [v6]:port")
        if rest:
            port = _parse_port(rest[1:], entry)
    elif entry.count(":") == 1:
        host, _, port_text = entry.partition(":")
        port = _parse_port(port_text, entry)
    try:
        ip = _ip_literal(host)
    except ValueError as exc:
        raise ConfigError(f"bad address in {ENV_ALLOW} entry {entry!r}: {exc}") from None
    if ip is not None:
        return AllowRule(network=ipaddress.ip_network(_unmapped(ip)), port=port)
    if entry.startswith("["):
        raise ConfigError(f"bad {ENV_ALLOW} entry {entry!r}: brackets hold an IPv6 address")
    name = _normal_name(host)
    # Names are compared with the URL's host as aiohttp sends it, which is
    # ASCII (IDNA-encoded): accept the same alphabet, nothing looser.
    if not name or not set(name) <= _HOST_CHARS or ".." in name:
        raise ConfigError(
            f"bad host name in {ENV_ALLOW} entry {entry!r} "
            "(use ASCII; write internationalized names in their xn-- form)"
        )
    return AllowRule(name=name, port=port)


def parse_allow(spec: str) -> tuple[AllowRule, ...]:
    """Parse an allow-list such as the value of ``CSVIMG_FETCH_ALLOW``.

    *spec* is comma-separated; each entry is one of ``host``, ``host:port``,
    ``1.2.3.4``, ``1.2.3.4:port``, ``::1``, ``[::1]``, ``[::1]:port`` or a
    CIDR network (``10.0.0.0/8``, ``fd00::/8``). Blank entries are ignored.

    Raises:
        ConfigError: an entry is malformed (networks with host bits set,
            like ``10.0.0.1/8``, are refused as likely typos).
    """
    return tuple(_parse_allow_entry(entry.strip()) for entry in spec.split(",") if entry.strip())


# --------------------------------------------------------------------------
# The policy


def _check_positive(_: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if not value > 0:
        raise ConfigError(f"FetchPolicy.{attribute.name} must be positive, not {value!r}")


def _check_not_negative(_: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if not value >= 0:
        raise ConfigError(f"FetchPolicy.{attribute.name} must not be negative, not {value!r}")


@attrs.frozen
class FetchPolicy:
    """Limits and permissions of a `Fetcher`.

    ``total_timeout`` bounds one attempt (every redirect hop and the whole
    body); ``retries`` extra attempts may follow a retryable failure, after
    ``random.uniform(0, min(backoff_max, backoff_base * 2**n))`` seconds or
    the server's ``Retry-After``.
    """

    allow: tuple[AllowRule, ...] = ()
    max_bytes: int = attrs.field(default=50 * 1024 * 1024, validator=_check_positive)
    connect_timeout: float = attrs.field(default=10.0, validator=_check_positive)
    read_timeout: float = attrs.field(default=30.0, validator=_check_positive)
    total_timeout: float = attrs.field(default=60.0, validator=_check_positive)
    max_redirects: int = attrs.field(default=5, validator=_check_not_negative)
    retries: int = attrs.field(default=2, validator=_check_not_negative)
    backoff_base: float = attrs.field(default=0.5, validator=_check_not_negative)
    backoff_max: float = attrs.field(default=10.0, validator=_check_not_negative)
    user_agent: str = attrs.field(factory=_default_user_agent)
    max_connections: int = attrs.field(default=100, validator=_check_positive)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Self:
        """Build a policy from the ``CSVIMG_FETCH_*`` environment variables.

        ``CSVIMG_FETCH_ALLOW`` (see `parse_allow`), ``CSVIMG_FETCH_MAX_BYTES``,
        ``CSVIMG_FETCH_TIMEOUT`` (total, seconds) and ``CSVIMG_FETCH_RETRIES``
        are read from *environ* (default `os.environ`). Unset or blank variables keep the defaults.

        Raises:
            ConfigError: a variable holds a bad value.
        """
        env = os.environ if environ is None else environ
        changes: dict[str, Any] = {}
        if allow := env.get(ENV_ALLOW, "").strip():
            changes["allow"] = parse_allow(allow)
        for var, field, kind in (
            (ENV_MAX_BYTES, "max_bytes", int),
            (ENV_TIMEOUT, "total_timeout", float),
            (ENV_RETRIES, "retries", int),
        ):
            if text := env.get(var, "").strip():
                try:
                    changes[field] = kind(text)
                except ValueError:
                    raise ConfigError(f"{var}={text!r} is not a valid {kind.__name__}") from None
        return cls(**changes)


# --------------------------------------------------------------------------
# URL and address checks


def _bad_url(url: str, why: str) -> FetchError:
    return FetchError("bad-url", f"{why}: {_redact(url)}")


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


def _redact(url: str) -> str:
    """*url* without userinfo and query, fit for logs and error messages."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return "<malformed URL>"
    if not parts.scheme or not host:
        return parts.path[:200] or "<empty URL>"
    if ":" in host:
        host = f"[{host}]"
    netloc = host if port is None else f"{host}:{port}"
    path = parts.path if len(parts.path) <= 200 else parts.path[:200] + "..."
    return f"{parts.scheme}://{netloc}{path}" + ("?..." if parts.query else "")


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
    try:
        literal = _ip_literal(host)
    except ValueError as exc:
        raise FetchError("bad-url", str(exc)) from None
    if literal is not None:
        _check_address(literal, port, policy, host)
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


# --------------------------------------------------------------------------
# The connector: the check sits where the sockets are opened

SocketFactory: TypeAlias = Callable[[AddrInfoType], socket.socket]
"""``(family, type, proto, canonname, sockaddr) -> socket``: opens the sockets.

aiohttp (through aiohappyeyeballs) calls it for every connection attempt,
with an address the guard has already approved, and connects the socket it
returns. Tests pass one that records where connections go.
"""


def _open_socket(addr_info: AddrInfoType) -> socket.socket:
    """The default `SocketFactory`: a plain socket (tests patch this)."""
    family, type_, proto, _, _ = addr_info
    return socket.socket(family=family, type=type_, proto=proto)


def _default_socket_factory(addr_info: AddrInfoType) -> socket.socket:
    # Looked up at call time, so a test's patch reaches Fetchers built earlier.
    return _open_socket(addr_info)


class _GuardedResolver(aiohttp.abc.AbstractResolver):
    """aiohttp's resolver: returns only addresses `resolve_checked` approved.

    aiohttp's connector hands the resolver the URL's host name and port and
    connects to exactly the addresses returned; resolving here, with the DNS
    cache off, leaves no second lookup an attacker's DNS could answer
    differently. The `FetchError` raised for a refused address is no
    `OSError`, so aiohttp lets it through unwrapped.
    """

    def __init__(self, policy: FetchPolicy, resolver: Resolver | None) -> None:
        self._policy = policy
        self._resolver = resolver

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        try:
            with anyio.fail_after(self._policy.connect_timeout):
                addresses = await resolve_checked(host, port, self._policy, resolver=self._resolver)
        except TimeoutError:
            raise FetchError("timeout", f"resolving {host} timed out", retryable=True) from None
        return [
            {
                "hostname": host,
                "host": address,
                "port": port,
                "family": socket.AF_INET6 if ":" in address else socket.AF_INET,
                "proto": 0,
                "flags": socket.AI_NUMERICHOST | socket.AI_NUMERICSERV,
            }
            for address in addresses  # in resolver order, like getaddrinfo users do
        ]

    async def close(self) -> None:
        pass


def _check_literal_host(url: yarl.URL, policy: FetchPolicy) -> None:
    """Check an IP-literal host, which aiohttp connects to without resolving.

    No lookup is involved, so checking before the request is as good as
    checking at connect time; host names go through `_GuardedResolver`.
    """
    host, port = url.raw_host, url.port
    if host is None or port is None:
        raise FetchError("bad-url", f"no host in URL: {_redact(str(url))}")
    try:
        literal = _ip_literal(host)
    except ValueError as exc:
        raise FetchError("bad-url", str(exc)) from None
    if literal is not None:
        _check_address(literal, port, policy, host)


# --------------------------------------------------------------------------
# The fetcher


@attrs.frozen
class Fetched:
    """A downloaded body and what is known about it."""

    url: str
    """The final URL, after redirects."""
    data: bytes
    content_type: str | None
    """The media type of ``Content-Type``, lower-case, without parameters."""
    status_code: int
    attempts: int
    """1 when the first attempt succeeded."""
    redirects: int
    """Redirect hops followed in the successful attempt."""


def _is_tls_verification_error(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _is_decoding_error(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ContentEncodingError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


@contextlib.contextmanager
def _fetch_errors(url: str) -> Iterator[None]:
    """Turn aiohttp's exceptions into `FetchError` with a stable code."""
    where = _redact(url)
    try:
        yield
    except TimeoutError as exc:  # aiohttp's connect and read timeouts are TimeoutErrors
        raise FetchError("timeout", f"{type(exc).__name__} for {where}", retryable=True) from exc
    except aiohttp.ClientConnectorError as exc:
        if isinstance(exc, aiohttp.ClientConnectorCertificateError) or (
            _is_tls_verification_error(exc)
        ):
            raise FetchError("tls-error", f"TLS verification failed for {where}: {exc}") from exc
        raise FetchError(
            "connect-error", f"cannot connect for {where}: {exc}", retryable=True
        ) from exc
    except aiohttp.NonHttpUrlClientError as exc:
        raise FetchError("bad-scheme", f"unsupported scheme in {where}") from exc
    except aiohttp.InvalidURL as exc:
        raise FetchError("bad-url", f"invalid URL: {where}") from exc
    except aiohttp.ClientPayloadError as exc:
        if _is_decoding_error(exc):
            raise FetchError("bad-response", f"cannot decode the body of {where}: {exc}") from exc
        raise FetchError(
            "network-error", f"{type(exc).__name__} for {where}: {exc}", retryable=True
        ) from exc
    except aiohttp.ClientError as exc:
        raise FetchError(
            "network-error", f"{type(exc).__name__} for {where}: {exc}", retryable=True
        ) from exc
    except ValueError as exc:  # aiohttp refuses to send a malformed request
        raise FetchError("network-error", f"{exc} for {where}") from exc


def _parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` value (delay or HTTP date)."""
    if value is None or not (value := value.strip()):
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:  # "-0000" dates: HTTP dates are always UTC
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    if seconds != seconds:  # NaN
        return None
    return min(max(seconds, 0.0), _MAX_RETRY_AFTER)


def _http_error(response: aiohttp.ClientResponse, url: str) -> FetchError:
    status = response.status
    retryable = status in (408, 429) or status >= 500
    return FetchError(
        f"http-{status}",
        f"HTTP {status} {response.reason or ''} from {_redact(url)}".replace("  ", " "),
        retryable=retryable,
        retry_after=_parse_retry_after(response.headers.get("retry-after")) if retryable else None,
    )


def _media_type(response: aiohttp.ClientResponse) -> str | None:
    value = response.headers.get("content-type")
    if value is None:
        return None
    return value.split(";", 1)[0].strip().lower() or None


async def _read_capped(
    response: aiohttp.ClientResponse,
    max_bytes: int,
    first_chunk_check: Callable[[bytes], str | None] | None,
    url: str,
) -> bytes:
    """Read the body, refusing more than *max_bytes* and bad first bytes early."""
    declared = response.headers.get("content-length", "")
    if declared and set(declared) <= _DEC_DIGITS and int(declared) > max_bytes:
        raise FetchError("too-large", f"{_redact(url)} declares {declared} bytes, over {max_bytes}")
    chunks: list[bytes] = []
    size = 0
    head: bytes | None = b"" if first_chunk_check is not None else None
    # aiohttp undoes Content-Encoding (we ask for identity, but a server may
    # ignore that), so the cap is on what we keep in memory.
    async for chunk in response.content.iter_any():
        size += len(chunk)
        if size > max_bytes:
            raise FetchError("too-large", f"{_redact(url)} sends more than {max_bytes} bytes")
        chunks.append(chunk)
        if head is not None:
            head += chunk
            if len(head) >= SNIFF_BYTES:
                _first_chunk(first_chunk_check, head, url)
                head = None
    if head is not None:  # the whole body is shorter than SNIFF_BYTES
        _first_chunk(first_chunk_check, head, url)
    return b"".join(chunks)


def _first_chunk(check: Callable[[bytes], str | None] | None, head: bytes, url: str) -> None:
    assert check is not None
    if check(head) is None:
        raise FetchError("not-an-image", f"{_redact(url)} does not start like a supported image")


class Fetcher:
    """Downloads images (and sends webhooks) through the SSRF guard.

    Use as ``async with Fetcher(policy) as fetcher:`` on asyncio; one
    instance holds one aiohttp connection pool (made on first use), shared
    by every concurrent `fetch` and `send`. *resolver*, *ssl_context* and
    *socket_factory* (see `SocketFactory`) are for tests and special
    deployments.

    The pool is aiohttp's `TCPConnector` with `_GuardedResolver` and no DNS
    cache: the URL keeps its host name (so TLS sends SNI for, and verifies
    the certificate against, the name) while the socket goes to an address
    the guard approved. Pooled connections are keyed by scheme, host name
    and port, so a connection is only ever reused for the name it was
    checked and verified for. Redirects are followed here, by hand.
    """

    def __init__(
        self,
        policy: FetchPolicy | None = None,
        *,
        resolver: Resolver | None = None,
        ssl_context: ssl.SSLContext | None = None,
        socket_factory: SocketFactory | None = None,
    ) -> None:
        self.policy = FetchPolicy() if policy is None else policy
        self._resolver = resolver
        self._ssl_context = ssl_context
        self._socket_factory = socket_factory or _default_socket_factory
        # Waiting for a free pooled connection is bounded by the total
        # deadline, not by a pool timeout of its own; resolving is bounded
        # by connect_timeout in `_GuardedResolver`.
        self._timeout = aiohttp.ClientTimeout(
            total=None,
            connect=None,
            sock_connect=self.policy.connect_timeout,
            sock_read=self.policy.read_timeout,
        )
        self._session: aiohttp.ClientSession | None = None
        self._closed = False

    def _client(self) -> aiohttp.ClientSession:
        """The session, made on first use (aiohttp wants a running loop)."""
        if self._session is None:
            if self._closed:
                raise RuntimeError("the Fetcher is closed")
            p = self.policy
            connector = aiohttp.TCPConnector(
                resolver=_GuardedResolver(p, self._resolver),
                # Every new connection resolves and checks again: a cached
                # answer must not skip the check (nor a port-specific rule).
                use_dns_cache=False,
                ssl=self._ssl_context or httpx.create_ssl_context(),
                limit=p.max_connections,
                limit_per_host=0,
                keepalive_timeout=5.0,
                socket_factory=self._socket_factory,
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                # No proxies from the environment (they would connect for
                # us, past the guard) and no credentials from ~/.netrc.
                trust_env=False,
                cookie_jar=aiohttp.DummyCookieJar(),
                headers={"User-Agent": p.user_agent},
                timeout=self._timeout,
            )
        return self._session

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection pool."""
        self._closed = True
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    async def fetch(
        self,
        url: str,
        *,
        first_chunk_check: Callable[[bytes], str | None] | None = None,
    ) -> Fetched:
        """Download *url*, following redirects, retrying what may succeed.

        *first_chunk_check* gets the first `SNIFF_BYTES` bytes or more (or
        the whole body when shorter) and returns a format name, or None to
        abort with ``not-an-image`` before the rest is downloaded.

        A retryable failure is tried again up to ``policy.retries`` times
        after a jittered exponential backoff, or after ``Retry-After`` when
        the server sent one. A ``Retry-After`` longer than
        ``policy.backoff_max`` is not waited for here: the error is raised
        at once with ``retry_after`` set, for the caller to reschedule
        without holding a worker.

        Raises:
            FetchError: see the module docstring for the codes.
        """
        target = check_url(url).geturl()
        for attempt in itertools.count(1):
            try:
                return await self._attempt(target, first_chunk_check, attempt)
            except FetchError as exc:
                if not exc.retryable or attempt > self.policy.retries:
                    raise
                delay = self._backoff(exc, attempt)
                if delay is None:
                    raise
                log.debug(
                    "fetch %s: %s, attempt %d, retrying in %.2f s",
                    _redact(target),
                    exc.code,
                    attempt,
                    delay,
                )
                await anyio.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    def _backoff(self, exc: FetchError, attempt: int) -> float | None:
        p = self.policy
        if exc.retry_after is not None:
            return exc.retry_after if exc.retry_after <= p.backoff_max else None
        return random.uniform(0, min(p.backoff_max, p.backoff_base * 2 ** (attempt - 1)))

    async def _attempt(
        self,
        url: str,
        first_chunk_check: Callable[[bytes], str | None] | None,
        attempt: int,
    ) -> Fetched:
        try:
            with anyio.fail_after(self.policy.total_timeout):
                return await self._follow(url, first_chunk_check, attempt)
        except TimeoutError:
            raise FetchError(
                "timeout",
                f"no complete response within {self.policy.total_timeout:g} s for {_redact(url)}",
                retryable=True,
            ) from None

    def _request(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str],
        data: bytes | None = None,
        timeout: aiohttp.ClientTimeout,
    ) -> aiohttp.client._RequestContextManager:
        """One request, no redirects, through the guard."""
        target = yarl.URL(url)
        _check_literal_host(target, self.policy)
        return self._client().request(
            method,
            target,
            headers=headers,
            data=data,
            allow_redirects=False,  # by hand, so every hop is checked
            timeout=timeout,
        )

    async def _follow(
        self,
        url: str,
        first_chunk_check: Callable[[bytes], str | None] | None,
        attempt: int,
    ) -> Fetched:
        # Images only: identity keeps the byte cap meaningful on the wire.
        headers = {"Accept": "image/*,*/*;q=0.8", "Accept-Encoding": "identity"}
        for redirects in itertools.count():
            with _fetch_errors(url):
                async with self._request(
                    "GET", url, headers=headers, timeout=self._timeout
                ) as response:
                    location = response.headers.get("location")
                    if response.status in _REDIRECT_STATUSES and location:
                        if redirects >= self.policy.max_redirects:
                            raise FetchError(
                                "too-many-redirects",
                                f"more than {self.policy.max_redirects} redirects "
                                f"from {_redact(url)}",
                            )
                        url = check_url(urljoin(url, location)).geturl()
                        log.debug("redirect %d to %s", redirects + 1, _redact(url))
                        continue
                    if not 200 <= response.status < 300:
                        raise _http_error(response, url)
                    data = await _read_capped(
                        response, self.policy.max_bytes, first_chunk_check, url
                    )
            return Fetched(
                url=url,
                data=data,
                content_type=_media_type(response),
                status_code=response.status,
                attempts=attempt,
                redirects=redirects,
            )
        raise AssertionError("unreachable")  # pragma: no cover

    async def send(
        self,
        method: str,
        url: str,
        *,
        content: bytes,
        headers: Mapping[str, str],
        timeout: float,
    ) -> httpx.Response:
        """Make one guarded request, as webhook delivery needs.

        No redirects are followed and nothing is retried; the response is
        returned whatever its status, with its body read (up to
        ``policy.max_bytes``) within *timeout* seconds in all. It is an
        `httpx.Response` over the bytes read.

        Raises:
            FetchError: ``blocked-address``, ``bad-scheme``, ``bad-url``,
                ``timeout``, ``connect-error``, ``too-large``...
        """
        target = check_url(url).geturl()
        request_timeout = aiohttp.ClientTimeout(
            total=None,
            connect=None,
            sock_connect=min(timeout, self.policy.connect_timeout),
            sock_read=timeout,
        )
        try:
            with anyio.fail_after(timeout), _fetch_errors(target):
                async with self._request(
                    method, target, headers=headers, data=content, timeout=request_timeout
                ) as response:
                    data = await _read_capped(response, self.policy.max_bytes, None, target)
        except TimeoutError:
            raise FetchError(
                "timeout",
                f"no response within {timeout:g} s from {_redact(target)}",
                retryable=True,
            ) from None
        # Content-Encoding/Length no longer describe `data`, which is decoded.
        kept = [
            (name, value)
            for name, value in response.raw_headers
            if name.lower() not in (b"content-encoding", b"content-length", b"transfer-encoding")
        ]
        return httpx.Response(
            response.status,
            headers=kept,
            content=data,
            request=httpx.Request(method, target, headers=dict(headers)),
            extensions={
                "http_version": f"HTTP/{response.version.major}.{response.version.minor}".encode()
                if response.version is not None
                else b"HTTP/1.1",
                "reason_phrase": (response.reason or "").encode("latin-1", "replace"),
            },
        )
