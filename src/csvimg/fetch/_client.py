"""The HTTP client of the fetcher: aiohttp behind the SSRF guard.

The only module of `csvimg.fetch` that imports aiohttp (and yarl and
aiohappyeyeballs); `csvimg.fetch` loads it on first use of `Fetcher`,
`Fetched` or `SocketFactory`. See `csvimg.fetch` for what the guard does
and the error codes.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import random
import socket
import ssl
from collections.abc import Callable, Iterator, Mapping
from types import TracebackType
from typing import Final, Self, TypeAlias
from urllib.parse import urljoin

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

from csvimg._errors import FetchError
from csvimg._util import parse_retry_after, redact_url
from csvimg.fetch._addresses import _DEC_DIGITS
from csvimg.fetch._policy import SNIFF_BYTES, FetchPolicy
from csvimg.fetch._resolve import Resolver, _check_literal, check_url, resolve_checked

__all__ = ["Fetched", "Fetcher", "SocketFactory"]

log = logging.getLogger("csvimg.fetch")

_REDIRECT_STATUSES: Final = frozenset({301, 302, 303, 307, 308})

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
        raise FetchError("bad-url", f"no host in URL: {redact_url(str(url))}")
    _check_literal(host, port, policy)


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


def _caused_by(exc: BaseException, kind: type[BaseException]) -> bool:
    """Whether *exc*, or an exception in its cause or context chain, is a *kind*."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, kind):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


@contextlib.contextmanager
def _fetch_errors(url: str) -> Iterator[None]:
    """Turn aiohttp's exceptions into `FetchError` with a stable code."""
    where = redact_url(url)
    try:
        yield
    except TimeoutError as exc:  # aiohttp's connect and read timeouts are TimeoutErrors
        raise FetchError("timeout", f"{type(exc).__name__} for {where}", retryable=True) from exc
    except aiohttp.ClientConnectorError as exc:
        if isinstance(exc, aiohttp.ClientConnectorCertificateError) or (
            _caused_by(exc, ssl.SSLCertVerificationError)
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
        if _caused_by(exc, ContentEncodingError):
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


def _http_error(response: aiohttp.ClientResponse, url: str) -> FetchError:
    status = response.status
    retryable = status in (408, 429) or status >= 500
    return FetchError(
        f"http-{status}",
        f"HTTP {status} {response.reason or ''} from {redact_url(url)}".replace("  ", " "),
        retryable=retryable,
        retry_after=parse_retry_after(response.headers.get("retry-after")) if retryable else None,
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
        raise FetchError(
            "too-large", f"{redact_url(url)} declares {declared} bytes, over {max_bytes}"
        )
    chunks: list[bytes] = []
    size = 0
    head: bytes | None = b"" if first_chunk_check is not None else None
    # aiohttp undoes Content-Encoding (we ask for identity, but a server may
    # ignore that), so the cap is on what we keep in memory.
    async for chunk in response.content.iter_any():
        size += len(chunk)
        if size > max_bytes:
            raise FetchError("too-large", f"{redact_url(url)} sends more than {max_bytes} bytes")
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
        raise FetchError("not-an-image", f"{redact_url(url)} does not start like a supported image")


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
                    redact_url(target),
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
                f"no complete response within {self.policy.total_timeout:g} s "
                f"for {redact_url(url)}",
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
                                f"from {redact_url(url)}",
                            )
                        url = check_url(urljoin(url, location)).geturl()
                        log.debug("redirect %d to %s", redirects + 1, redact_url(url))
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
                f"no response within {timeout:g} s from {redact_url(target)}",
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
