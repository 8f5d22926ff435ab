"""The fetch policy: limits, retries and the allow-list of private addresses.

`FetchPolicy` holds what a `~csvimg.fetch.Fetcher` may do (and is what
`csvimg.Settings` carries); `parse_allow` reads ``CSVIMG_FETCH_ALLOW`` into
`AllowRule` entries. Nothing here does I/O.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from importlib import metadata
from typing import Any, Final, Self

import attrs

from csvimg._errors import ConfigError
from csvimg.fetch._addresses import (
    _DEC_DIGITS,
    _HOST_CHARS,
    IPAddress,
    IPNetwork,
    _format_host,
    _ip_literal,
    _unmapped,
)

__all__ = [
    "ENV_ALLOW",
    "ENV_MAX_BYTES",
    "ENV_RETRIES",
    "ENV_TIMEOUT",
    "SNIFF_BYTES",
    "AllowRule",
    "FetchPolicy",
    "parse_allow",
]

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


def _default_user_agent() -> str:
    try:
        version = metadata.version("csvimg")
    except metadata.PackageNotFoundError:  # running from a source tree
        version = "0"
    return f"csvimg/{version}"


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
