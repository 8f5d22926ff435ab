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

The package holds `_addresses` (which addresses are public, IP literals),
`_policy` (`FetchPolicy`, the allow-list), `_resolve` (`check_url`,
`resolve_checked`) and `_client` (`Fetcher` on aiohttp). Only `_client`
imports aiohttp, and only when `Fetcher`, `Fetched` or `SocketFactory` is
first asked for: building a `FetchPolicy` or checking a URL does not load
the HTTP stack.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from csvimg._util import lazy_exports
from csvimg._util import parse_retry_after as _parse_retry_after  # noqa: F401  (old private name)
from csvimg.fetch._addresses import is_public_address
from csvimg.fetch._policy import (
    ENV_ALLOW,
    ENV_MAX_BYTES,
    ENV_RETRIES,
    ENV_TIMEOUT,
    SNIFF_BYTES,
    AllowRule,
    FetchPolicy,
    parse_allow,
)
from csvimg.fetch._resolve import Resolver, check_url, resolve_checked

if TYPE_CHECKING:
    from csvimg.fetch._client import Fetched, Fetcher, SocketFactory

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

# Loaded on first use: csvimg.fetch._client imports aiohttp.
# Hidden from type checkers, which see the imports above and so still
# report a misspelt name.
if not TYPE_CHECKING:
    __getattr__ = lazy_exports(
        globals(),
        {
            "Fetched": "csvimg.fetch._client",
            "Fetcher": "csvimg.fetch._client",
            "SocketFactory": "csvimg.fetch._client",
        },
    )
