"""Which addresses a fetch may reach, and how URL hosts spell addresses.

`is_public_address` is the SSRF rule (the IANA special-purpose registries,
with IPv4 embedded in IPv6 judged by the embedded address); `_ip_literal`
reads a URL host as an IP address, the legacy numeric IPv4 forms
(``2130706433``, ``0177.0.0.1``, ``0x7f.1``) included, the way browsers and
``getaddrinfo`` do.
"""

from __future__ import annotations

import ipaddress
from typing import Final, TypeAlias

__all__ = ["IPAddress", "IPNetwork", "is_public_address"]

IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address
"""An IPv4 or IPv6 address."""
IPNetwork: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network
"""An IPv4 or IPv6 network."""

_HOST_CHARS: Final = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-._")
_HEX_DIGITS: Final = frozenset("0123456789abcdefABCDEF")
_DEC_DIGITS: Final = frozenset("0123456789")


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
