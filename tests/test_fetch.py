"""Tests of csvimg.fetch: the SSRF guard, the allow-list, real downloads."""

from __future__ import annotations

import email.utils
import ipaddress
import logging
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
from aiohappyeyeballs import AddrInfoType
from hypothesis import given, settings
from hypothesis import strategies as st

from csvimg._errors import ConfigError, FetchError
from csvimg._util import parse_retry_after as _parse_retry_after
from csvimg.fetch import (
    SNIFF_BYTES,
    AllowRule,
    Fetched,
    Fetcher,
    FetchPolicy,
    check_url,
    is_public_address,
    parse_allow,
    resolve_checked,
)
from servers import ImageHost, Reply, closed_port, make_image

pytestmark = pytest.mark.anyio

JPEG = make_image("JPEG")
PNG = make_image("PNG")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def host() -> Iterator[ImageHost]:
    with ImageHost() as server:
        yield server


def sniff(head: bytes) -> str | None:
    """Stand-in for csvimg.codec.sniff: JPEG and PNG magic only."""
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    return None


class RecordingBackend:
    """A socket factory that opens sockets only for loopback and records them.

    It sits under the guard (aiohttp calls it with the address it is about
    to connect to): an entry in ``connects`` means the guard let a
    connection through. Anything but loopback is refused with an
    AssertionError, so even a broken guard never sends a packet elsewhere.
    """

    def __init__(self) -> None:
        self.connects: list[tuple[str, int]] = []

    def __call__(self, addr_info: AddrInfoType) -> socket.socket:
        family, type_, proto, _, sockaddr = addr_info
        host, port = str(sockaddr[0]), int(sockaddr[1])
        self.connects.append((host, port))
        assert host in ("127.0.0.1", "::1"), f"the guard let through a connection to {host}"
        return socket.socket(family, type_, proto)


class FakeDNS:
    """A resolver for made-up names; records the lookups."""

    def __init__(self, answers: dict[str, list[str]]) -> None:
        self.answers = answers
        self.lookups: list[tuple[str, int]] = []

    async def __call__(self, host: str, port: int) -> list[str]:
        self.lookups.append((host, port))
        try:
            return self.answers[host.lower()]
        except KeyError:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known") from None


def policy(*allow: str, **changes: Any) -> FetchPolicy:
    """A policy with short timeouts and near-zero backoff, for quick tests."""
    settings: dict[str, Any] = {
        "allow": parse_allow(",".join(allow)),
        "retries": 0,
        "backoff_base": 0.001,
        "backoff_max": 0.01,
        "connect_timeout": 2.0,
        "read_timeout": 2.0,
        "total_timeout": 5.0,
    }
    settings.update(changes)
    return FetchPolicy(**settings)


@pytest.fixture
def backend() -> RecordingBackend:
    return RecordingBackend()


@pytest.fixture
async def make_fetcher(
    backend: RecordingBackend,
) -> AsyncIterator[Callable[..., Fetcher]]:
    """Build Fetchers over the recording backend; all closed at teardown."""
    made: list[Fetcher] = []

    def make(p: FetchPolicy | None = None, **kwargs: Any) -> Fetcher:
        fetcher = Fetcher(p or policy(), socket_factory=backend, **kwargs)
        made.append(fetcher)
        return fetcher

    yield make
    for fetcher in made:
        await fetcher.aclose()


async def fetch_error(fetcher: Fetcher, url: str, **kwargs: Any) -> FetchError:
    with pytest.raises(FetchError) as info:
        await fetcher.fetch(url, **kwargs)
    return info.value


# -- the SSRF table ---------------------------------------------------------

BLOCKED_URLS = [
    "http://127.0.0.1/",
    "http://localhost/",
    "http://LocalHost/x",
    "http://[::1]/",
    "http://0.0.0.0/",
    "http://10.0.0.1/",
    "http://172.16.0.1/",
    "http://192.168.1.1/",
    "http://169.254.169.254/latest/meta-data/",
    "http://100.64.0.1/",
    "http://[::ffff:127.0.0.1]/",
    "http://[::ffff:169.254.169.254]/",
    "http://[fd00::1]/",
    "http://[fe80::1]/",
    "http://[64:ff9b::a9fe:a9fe]/",  # NAT64 of 169.254.169.254
    "http://[2002:7f00:1::]/",  # 6to4 of 127.0.0.1
    "http://2130706433/",
    "http://0177.0.0.1/",
    "http://0x7f.1/",
    "http://127.1/",
    "https://127.0.0.1:443/",
    "http://user:pw@10.1.2.3:8080/x?y=1",
]


@pytest.mark.parametrize("url", BLOCKED_URLS)
async def test_private_targets_are_refused_before_connecting(
    url: str, make_fetcher: Callable[..., Fetcher], backend: RecordingBackend
) -> None:
    error = await fetch_error(make_fetcher(policy(retries=2)), url)
    assert error.code == "blocked-address"
    assert not error.retryable
    assert backend.connects == []


async def test_send_is_guarded_too(
    make_fetcher: Callable[..., Fetcher], backend: RecordingBackend
) -> None:
    with pytest.raises(FetchError) as info:
        await make_fetcher().send(
            "POST", "http://169.254.169.254/", content=b"{}", headers={}, timeout=1
        )
    assert info.value.code == "blocked-address"
    assert backend.connects == []


async def test_name_resolving_to_any_private_address_is_refused(
    make_fetcher: Callable[..., Fetcher], backend: RecordingBackend
) -> None:
    # One bad address among good ones is enough: the connection could go there.
    dns = FakeDNS({"mixed.test": ["93.184.216.34", "10.0.0.7"], "meta.test": ["169.254.169.254"]})
    fetcher = make_fetcher(resolver=dns)
    for name in ("mixed.test", "meta.test"):
        assert (await fetch_error(fetcher, f"http://{name}/a.jpg")).code == "blocked-address"
    assert backend.connects == []
    assert [name for name, _ in dns.lookups] == ["mixed.test", "meta.test"]


async def test_connection_goes_to_the_checked_address(
    host: ImageHost, make_fetcher: Callable[..., Fetcher], backend: RecordingBackend
) -> None:
    # img.test exists only in the fake DNS: the download can only succeed by
    # connecting to the address the guard resolved and checked.
    host.add("/a.jpg", JPEG, content_type="image/jpeg")
    dns = FakeDNS({"img.test": ["127.0.0.1"]})
    fetcher = make_fetcher(policy("img.test"), resolver=dns)
    fetched = await fetcher.fetch(host.url("/a.jpg", host="IMG.test"), first_chunk_check=sniff)
    assert fetched.data == JPEG
    assert dns.lookups == [("img.test", host.port)]
    assert backend.connects == [("127.0.0.1", host.port)]
    [request] = host.requests
    assert request.header("host") == f"img.test:{host.port}"


async def test_no_dns_cache_lets_an_answer_skip_a_port_rule(
    host: ImageHost, make_fetcher: Callable[..., Fetcher], backend: RecordingBackend
) -> None:
    # img.test is trusted on host.port only. Its answer for that port must
    # not be reused, unchecked, for a connection to another port.
    host.add("/a.jpg", JPEG, content_type="image/jpeg")
    dns = FakeDNS({"img.test": ["127.0.0.1"]})
    fetcher = make_fetcher(policy(f"img.test:{host.port}"), resolver=dns)
    assert (await fetcher.fetch(host.url("/a.jpg", host="img.test"))).data == JPEG
    with ImageHost() as other:
        other.add("/a.jpg", JPEG)
        error = await fetch_error(fetcher, other.url("/a.jpg", host="img.test"))
        assert other.hits["/a.jpg"] == 0
        other_port = other.port
    assert error.code == "blocked-address"
    assert dns.lookups == [("img.test", host.port), ("img.test", other_port)]
    assert backend.connects == [("127.0.0.1", host.port)]


async def test_unknown_name_is_a_dns_error(make_fetcher: Callable[..., Fetcher]) -> None:
    error = await fetch_error(make_fetcher(resolver=FakeDNS({})), "http://nowhere.test/")
    assert (error.code, error.retryable) == ("dns-error", False)


# -- the allow-list at work -------------------------------------------------


async def test_allowing_host_and_port_allows_that_port_only(
    host: ImageHost, make_fetcher: Callable[..., Fetcher], backend: RecordingBackend
) -> None:
    host.add("/a.jpg", JPEG, content_type="image/jpeg")
    fetcher = make_fetcher(policy(host.allow))
    assert (await fetcher.fetch(host.url("/a.jpg"))).data == JPEG
    with ImageHost() as other:
        other.add("/a.jpg", JPEG)
        error = await fetch_error(fetcher, other.url("/a.jpg"))
    assert error.code == "blocked-address"
    assert backend.connects == [("127.0.0.1", host.port)]


@pytest.mark.parametrize(
    ("allow", "allowed"),
    [
        ("127.0.0.0/8", True),
        ("127.0.0.1", True),
        ("localhost", False),  # a name rule matches the URL's host, not its address
        ("10.0.0.0/8", False),
        ("::1/128", False),
    ],
)
async def test_network_rules(
    host: ImageHost, make_fetcher: Callable[..., Fetcher], allow: str, allowed: bool
) -> None:
    host.add("/a.png", PNG, content_type="image/png")
    fetcher = make_fetcher(policy(allow))
    if allowed:
        assert (await fetcher.fetch(host.url("/a.png"))).data == PNG
    else:
        assert (await fetch_error(fetcher, host.url("/a.png"))).code == "blocked-address"


async def test_name_rule_allows_what_the_name_resolves_to(
    host: ImageHost, make_fetcher: Callable[..., Fetcher]
) -> None:
    host.add("/a.png", PNG, content_type="image/png")
    fetcher = make_fetcher(policy("localhost"))  # the real resolver, /etc/hosts
    assert (await fetcher.fetch(host.url("/a.png", host="localhost"))).data == PNG


@pytest.mark.parametrize(
    "location",
    [
        "http://10.0.0.1/x.jpg",
        "http://127.0.0.2:{port}/x.jpg",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::1]:{port}/x.jpg",
        "http://2130706433/x.jpg",  # 127.0.0.1, but port 80 is not the allowed one
    ],
)
async def test_redirect_to_a_private_address_is_refused(
    host: ImageHost,
    make_fetcher: Callable[..., Fetcher],
    backend: RecordingBackend,
    location: str,
) -> None:
    host.redirect("/r", location.format(port=host.port))
    error = await fetch_error(make_fetcher(policy(host.allow)), host.url("/r"))
    assert error.code == "blocked-address"
    assert backend.connects == [("127.0.0.1", host.port)]  # the first hop only


async def test_redirect_to_another_port_of_an_allowed_address_is_refused(
    host: ImageHost, make_fetcher: Callable[..., Fetcher], backend: RecordingBackend
) -> None:
    with ImageHost() as other:
        other.add("/x.jpg", JPEG)
        host.redirect("/r", other.url("/x.jpg"))
        error = await fetch_error(make_fetcher(policy(host.allow)), host.url("/r"))
        assert other.hits["/x.jpg"] == 0
    assert error.code == "blocked-address"
    assert backend.connects == [("127.0.0.1", host.port)]


@pytest.mark.parametrize(
    "location", ["ftp://example.com/a.jpg", "file:///etc/passwd", "gopher://127.0.0.1:6379/_"]
)
async def test_redirect_to_another_scheme_is_refused(
    host: ImageHost, make_fetcher: Callable[..., Fetcher], location: str
) -> None:
    host.redirect("/r", location)
    error = await fetch_error(make_fetcher(policy(host.allow)), host.url("/r"))
    assert error.code == "bad-scheme"


async def test_tls_verifies_the_host_name_not_the_address(
    make_fetcher: Callable[..., Fetcher], backend: RecordingBackend
) -> None:
    with ImageHost(tls=True, tls_names=["img.test"]) as secure:
        secure.add("/a.png", PNG, content_type="image/png")
        dns = FakeDNS({"img.test": ["127.0.0.1"], "other.test": ["127.0.0.1"]})
        fetcher = make_fetcher(
            policy("img.test", "other.test"),
            resolver=dns,
            ssl_context=secure.client_ssl_context(),
        )
        fetched = await fetcher.fetch(secure.url("/a.png", host="img.test"))
        assert fetched.data == PNG
        # Same address, same port, but the certificate does not name it. The
        # pool must not reuse img.test's verified connection for it either.
        error = await fetch_error(fetcher, secure.url("/a.png", host="other.test"))
        assert (error.code, error.retryable) == ("tls-error", False)
        assert secure.hits["/a.png"] == 1
        assert backend.connects == [("127.0.0.1", secure.port)] * 2


# -- URL syntax -------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "code"),
    [
        ("ftp://example.com/a.jpg", "bad-scheme"),
        ("file:///etc/passwd", "bad-scheme"),
        ("javascript:alert(1)", "bad-scheme"),
        ("gopher://127.0.0.1:70/", "bad-scheme"),
        ("example.com/a.jpg", "bad-url"),
        ("http://", "bad-url"),
        ("http:///a.jpg", "bad-url"),
        ("http://[::1/", "bad-url"),
        ("http://example.com:99999/", "bad-url"),
        ("http://example.com:0/", "bad-url"),
        ("http://1.2.3.999/", "bad-url"),
        ("http://0x1.0x2.0x3.0x4.5/", "bad-url"),
        ("http://ex ample.com/", "bad-url"),
        ("http://exa%6dple.com/", "bad-url"),
        ("http://example.com/\x00", "bad-url"),
        ("http://[fe80::1%25eth0]/", "bad-url"),
        ("http://" + "a" * 9000, "bad-url"),
    ],
)
def test_check_url_refuses(url: str, code: str) -> None:
    with pytest.raises(FetchError) as info:
        check_url(url)
    assert info.value.code == code
    assert not info.value.retryable


@pytest.mark.parametrize(
    ("url", "normal"),
    [
        ("HTTPS://Example.COM", "https://example.com/"),
        ("http://example.com:8080/a b.jpg?x=1#frag", "http://example.com:8080/a b.jpg?x=1"),
        ("  http://u:p@example.com/a  ", "http://u:p@example.com/a"),
        ("http://2130706433/", "http://127.0.0.1/"),
        ("http://0177.0.0.1:81/", "http://127.0.0.1:81/"),
        ("http://0x7f.1/", "http://127.0.0.1/"),
        ("http://127.0.0.1./", "http://127.0.0.1/"),
        ("http://[::FFFF:7f00:1]/", "http://[::ffff:7f00:1]/"),
        ("http://bücher.example/", "http://bücher.example/"),
    ],
)
def test_check_url_normalises(url: str, normal: str) -> None:
    assert check_url(url).geturl() == normal


@given(st.text(max_size=200) | st.text(max_size=200).map(lambda s: "http://" + s))
@settings(max_examples=300, deadline=None)
def test_check_url_raises_only_fetch_errors(text: str) -> None:
    code = None
    try:
        result = check_url(text)
    except FetchError as exc:
        code = exc.code
    else:
        assert result.scheme in ("http", "https")
        assert result.hostname
    assert code in (None, "bad-url", "bad-scheme")


# -- which addresses are public ---------------------------------------------

PRIVATE_V4 = [
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.0.0.0/24",
    "192.0.2.0/24",
    "192.168.0.0/16",
    "198.18.0.0/15",
    "198.51.100.0/24",
    "203.0.113.0/24",
    "224.0.0.0/4",
    "240.0.0.0/4",
]
PRIVATE_V6 = [
    "::/128",
    "::1/128",
    "fc00::/7",
    "fe80::/10",
    "fec0::/10",
    "ff00::/8",
    "2001::/32",
    "2001:db8::/32",
    "100::/64",
    "64:ff9b:1::/48",
]


def addresses_in(networks: list[str]) -> st.SearchStrategy[Any]:
    def pick(net: Any) -> st.SearchStrategy[Any]:
        base = int(net.network_address)
        return st.integers(0, net.num_addresses - 1).map(
            lambda offset: (
                ipaddress.ip_address(base + offset)
                if net.version == 4
                else ipaddress.IPv6Address(base + offset)
            )
        )

    return st.sampled_from([ipaddress.ip_network(n) for n in networks]).flatmap(pick)


@given(addresses_in(PRIVATE_V4))
def test_private_v4_is_never_public_in_any_spelling(ip: ipaddress.IPv4Address) -> None:
    n = int(ip)
    assert not is_public_address(ip)
    assert not is_public_address(ipaddress.IPv6Address(0xFFFF_0000_0000 | n))  # ::ffff:a.b.c.d
    assert not is_public_address(ipaddress.IPv6Address((0x64FF9B << 96) | n))  # NAT64
    assert not is_public_address(ipaddress.IPv6Address((0x2002 << 112) | (n << 80)))  # 6to4


@given(addresses_in(PRIVATE_V6))
def test_private_v6_is_never_public(ip: ipaddress.IPv6Address) -> None:
    assert not is_public_address(ip)


@pytest.mark.parametrize(
    "address",
    [
        "8.8.8.8",
        "1.1.1.1",
        "93.184.216.34",
        "2606:4700:4700::1111",
        "2a00:1450:4001::200e",
        "::ffff:8.8.8.8",
        "64:ff9b::808:808",
        "2002:808:808::1",
    ],
)
def test_public_addresses(address: str) -> None:
    assert is_public_address(ipaddress.ip_address(address))


@given(st.integers(0, 2**32 - 1), st.sampled_from(["dec", "hex", "octal", "a.b", "a.b.c"]))
def test_legacy_numeric_hosts_mean_the_address_glibc_reads(n: int, form: str) -> None:
    a, b, c, d = n.to_bytes(4, "big")
    host = {
        "dec": str(n),
        "hex": hex(n),
        "octal": ".".join(f"0{o:o}" for o in (a, b, c, d)),
        "a.b": f"{a}.{n & 0xFFFFFF}",
        "a.b.c": f"{a}.{b}.{(c << 8) | d}",
    }[form]
    expected = ipaddress.IPv4Address(n)
    assert socket.inet_aton(host) == expected.packed  # the reading we must match
    assert check_url(f"http://{host}/").hostname == str(expected)


async def test_resolve_checked_skips_dns_for_literals() -> None:
    dns = FakeDNS({})
    p = FetchPolicy(allow=parse_allow("10.0.0.0/8"))
    assert await resolve_checked("10.1.2.3", 80, p, resolver=dns) == ["10.1.2.3"]
    assert await resolve_checked("[::ffff:10.0.0.1]", 80, p, resolver=dns) == ["::ffff:a00:1"]
    assert await resolve_checked("8.8.8.8", 80, p, resolver=dns) == ["8.8.8.8"]
    with pytest.raises(FetchError, match="blocked-address"):
        await resolve_checked("0x7f.1", 80, p, resolver=dns)
    assert dns.lookups == []


async def test_resolve_checked_checks_every_answer() -> None:
    dns = FakeDNS({"a.test": ["8.8.8.8", "8.8.8.8", "2606:4700::1"], "b.test": ["8.8.8.8", "::1"]})
    p = FetchPolicy()
    assert await resolve_checked("a.test", 443, p, resolver=dns) == ["8.8.8.8", "2606:4700::1"]
    with pytest.raises(FetchError, match="blocked-address"):
        await resolve_checked("b.test", 443, p, resolver=dns)
    # A port-bound name rule trusts the name on that port only.
    p = FetchPolicy(allow=parse_allow("b.test:8443"))
    assert await resolve_checked("B.test", 8443, p, resolver=dns) == ["8.8.8.8", "::1"]
    with pytest.raises(FetchError, match="blocked-address"):
        await resolve_checked("b.test", 443, p, resolver=dns)


# -- parse_allow and the policy ---------------------------------------------


def test_parse_allow() -> None:
    rules = parse_allow(
        " 127.0.0.1:8080, LocalHost ,img.test:443,[::1]:9000, ::1,10.0.0.0/8,fd00::/8,192.168.1.5,,"
    )
    assert [str(r) for r in rules] == [
        "127.0.0.1:8080",
        "localhost",
        "img.test:443",
        "[::1]:9000",
        "::1",
        "10.0.0.0/8",
        "fd00::/8",
        "192.168.1.5",
    ]
    assert rules[0] == AllowRule(network=ipaddress.ip_network("127.0.0.1/32"), port=8080)
    assert rules[1] == AllowRule(name="localhost")
    assert parse_allow("") == parse_allow(" , ") == ()


@pytest.mark.parametrize(
    "spec",
    [
        "10.0.0.1/8",
        "10.0.0.0/33",
        "host:0",
        "host:99999",
        "host:http",
        "[::1",
        "[::1]x",
        "[example.com]",
        "a b",
        "*.example.com",
        "1.2.3.999",
        "ex%61mple.com",
        "bücher.de",
        "::1:80:x",
    ],
)
def test_parse_allow_refuses(spec: str) -> None:
    with pytest.raises(ConfigError):
        parse_allow(spec)


def test_allow_rule_port_semantics() -> None:
    v4 = ipaddress.ip_address("127.0.0.1")
    [with_port, any_port] = parse_allow("127.0.0.1:8080,127.0.0.1")
    assert with_port.allows_address(v4, 8080)
    assert not with_port.allows_address(v4, 8081)
    assert any_port.allows_address(v4, 1)
    assert any_port.allows_address(v4, 65535)
    # The IPv4-mapped spelling of an allowed address is the same address.
    assert any_port.allows_address(ipaddress.ip_address("::ffff:127.0.0.1"), 80)
    assert not any_port.allows_address(ipaddress.ip_address("::1"), 80)


def test_policy_from_env() -> None:
    p = FetchPolicy.from_env(
        {
            "CSVIMG_FETCH_ALLOW": "127.0.0.1:9000",
            "CSVIMG_FETCH_MAX_BYTES": "1000",
            "CSVIMG_FETCH_TIMEOUT": "2.5",
            "CSVIMG_FETCH_RETRIES": "0",
        }
    )
    assert (p.max_bytes, p.total_timeout, p.retries) == (1000, 2.5, 0)
    assert [str(r) for r in p.allow] == ["127.0.0.1:9000"]
    assert FetchPolicy.from_env({}) == FetchPolicy()
    assert FetchPolicy().user_agent.startswith("csvimg/")
    for env in (
        {"CSVIMG_FETCH_MAX_BYTES": "lots"},
        {"CSVIMG_FETCH_MAX_BYTES": "0"},
        {"CSVIMG_FETCH_TIMEOUT": "-1"},
        {"CSVIMG_FETCH_RETRIES": "1.5"},
        {"CSVIMG_FETCH_ALLOW": "10.0.0.1/8"},
    ):
        with pytest.raises(ConfigError):
            FetchPolicy.from_env(env)


# -- real downloads -----------------------------------------------------------


async def test_download(host: ImageHost, make_fetcher: Callable[..., Fetcher]) -> None:
    host.add("/a.jpg", JPEG, content_type="image/jpeg; charset=binary")
    fetcher = make_fetcher(policy(host.allow))
    fetched = await fetcher.fetch(host.url("/a.jpg"), first_chunk_check=sniff)
    assert fetched == Fetched(
        url=host.url("/a.jpg"),
        data=JPEG,
        content_type="image/jpeg",
        status_code=200,
        attempts=1,
        redirects=0,
    )
    [request] = host.requests
    assert request.header("user-agent") == fetcher.policy.user_agent
    assert request.header("accept-encoding") == "identity"
    # The pooled connection is reused for the next download.
    await fetcher.fetch(host.url("/a.jpg"))
    assert (host.hits["/a.jpg"], host.connections) == (2, 1)


async def test_http_404_fails_without_retry(
    host: ImageHost, make_fetcher: Callable[..., Fetcher]
) -> None:
    host.add("/gone.jpg", b"no", status=404)
    error = await fetch_error(make_fetcher(policy(host.allow, retries=3)), host.url("/gone.jpg"))
    assert (error.code, error.retryable) == ("http-404", False)
    assert host.hits["/gone.jpg"] == 1


async def test_server_errors_are_retried(
    host: ImageHost, make_fetcher: Callable[..., Fetcher]
) -> None:
    host.add(
        "/flaky.png",
        replies=[Reply(status=500), Reply(status=503), Reply(PNG, content_type="image/png")],
    )
    fetched = await make_fetcher(policy(host.allow, retries=2)).fetch(host.url("/flaky.png"))
    assert (fetched.data, fetched.attempts) == (PNG, 3)
    assert host.hits["/flaky.png"] == 3


async def test_retries_run_out(host: ImageHost, make_fetcher: Callable[..., Fetcher]) -> None:
    host.add("/down", status=502)
    error = await fetch_error(make_fetcher(policy(host.allow, retries=1)), host.url("/down"))
    assert (error.code, error.retryable) == ("http-502", True)
    assert host.hits["/down"] == 2


async def test_429_with_retry_after(host: ImageHost, make_fetcher: Callable[..., Fetcher]) -> None:
    host.add("/busy.jpg", replies=[Reply(status=429, headers={"Retry-After": "0"}), Reply(JPEG)])
    fetched = await make_fetcher(policy(host.allow, retries=1)).fetch(host.url("/busy.jpg"))
    assert (fetched.data, fetched.attempts) == (JPEG, 2)


async def test_long_retry_after_is_left_to_the_caller(
    host: ImageHost, make_fetcher: Callable[..., Fetcher]
) -> None:
    host.add("/later", status=503, headers={"Retry-After": "120"})
    started = time.monotonic()
    error = await fetch_error(make_fetcher(policy(host.allow, retries=3)), host.url("/later"))
    assert (error.code, error.retryable, error.retry_after) == ("http-503", True, 120.0)
    assert host.hits["/later"] == 1
    assert time.monotonic() - started < 1


def test_parse_retry_after() -> None:
    now = time.time()
    in_30s = email.utils.formatdate(now + 30, usegmt=True)
    assert _parse_retry_after("0") == 0
    assert _parse_retry_after(" 7 ") == 7
    assert _parse_retry_after("99999999") == 3600  # capped
    assert _parse_retry_after(in_30s, now=now) == pytest.approx(30, abs=1)
    assert _parse_retry_after(email.utils.formatdate(now - 60, usegmt=True), now=now) == 0
    for junk in (None, "", "soon", "nan", "Mon, 99 Foo 2020"):
        assert _parse_retry_after(junk) is None


async def test_too_large_by_content_length(
    host: ImageHost, make_fetcher: Callable[..., Fetcher]
) -> None:
    host.add("/big.jpg", JPEG + bytes(5000), content_type="image/jpeg")
    fetcher = make_fetcher(policy(host.allow, retries=2, max_bytes=1000))
    error = await fetch_error(fetcher, host.url("/big.jpg"))
    assert (error.code, error.retryable) == ("too-large", False)
    assert "declares" in error.message
    assert host.hits["/big.jpg"] == 1


async def test_too_large_while_streaming(
    host: ImageHost, make_fetcher: Callable[..., Fetcher]
) -> None:
    host.endless("/endless.jpg", chunk=b"\xff\xd8\xff" + bytes(8000))
    fetcher = make_fetcher(policy(host.allow, max_bytes=200_000))
    error = await fetch_error(fetcher, host.url("/endless.jpg"), first_chunk_check=sniff)
    assert error.code == "too-large"
    assert "more than 200000" in error.message


async def test_chunked_body_within_the_cap(
    host: ImageHost, make_fetcher: Callable[..., Fetcher]
) -> None:
    host.add("/c.png", replies=[Reply(PNG, content_type="image/png", chunked=True)])
    fetched = await make_fetcher(policy(host.allow, max_bytes=len(PNG))).fetch(host.url("/c.png"))
    assert fetched.data == PNG


async def test_trickle_hits_the_read_timeout(
    host: ImageHost, make_fetcher: Callable[..., Fetcher]
) -> None:
    host.trickle("/slow.jpg", JPEG, interval=1.0)
    fetcher = make_fetcher(policy(host.allow, read_timeout=0.4))
    started = time.monotonic()
    error = await fetch_error(fetcher, host.url("/slow.jpg"))
    assert (error.code, error.retryable) == ("timeout", True)
    assert time.monotonic() - started < 1.5


async def test_trickle_hits_the_total_deadline(
    host: ImageHost, make_fetcher: Callable[..., Fetcher]
) -> None:
    # Every byte arrives within the read timeout; the whole never does.
    host.trickle("/slow.jpg", JPEG, interval=0.1)
    fetcher = make_fetcher(policy(host.allow, read_timeout=1.0, total_timeout=0.6))
    started = time.monotonic()
    error = await fetch_error(fetcher, host.url("/slow.jpg"))
    assert (error.code, error.retryable) == ("timeout", True)
    assert "0.6 s" in error.message
    assert 0.5 < time.monotonic() - started < 1.5


async def test_connect_error_is_retried(
    make_fetcher: Callable[..., Fetcher], backend: RecordingBackend
) -> None:
    port = closed_port()
    fetcher = make_fetcher(policy("127.0.0.1", retries=1))
    error = await fetch_error(fetcher, f"http://127.0.0.1:{port}/a.jpg")
    assert (error.code, error.retryable) == ("connect-error", True)
    assert backend.connects == [("127.0.0.1", port)] * 2


async def test_not_an_image_stops_at_the_first_bytes(
    host: ImageHost, make_fetcher: Callable[..., Fetcher]
) -> None:
    host.endless("/page.html", chunk=b"<!doctype html>" + b" " * 100)
    host.add("/tiny.gif", b"GIF89a")
    seen: list[bytes] = []

    def check(head: bytes) -> str | None:
        seen.append(head)
        return sniff(head)

    fetcher = make_fetcher(policy(host.allow, retries=2))
    error = await fetch_error(fetcher, host.url("/page.html"), first_chunk_check=check)
    assert (error.code, error.retryable) == ("not-an-image", False)
    assert len(seen) == 1
    assert len(seen[0]) >= SNIFF_BYTES
    assert host.hits["/page.html"] == 1
    # A body shorter than SNIFF_BYTES is checked whole.
    error = await fetch_error(fetcher, host.url("/tiny.gif"), first_chunk_check=check)
    assert error.code == "not-an-image"
    assert seen[-1] == b"GIF89a"


async def test_first_bytes_are_gathered_across_chunks(
    host: ImageHost, make_fetcher: Callable[..., Fetcher]
) -> None:
    host.trickle("/a.png", PNG[: SNIFF_BYTES + 4], interval=0.005, content_type="image/png")
    seen: list[bytes] = []

    def check(head: bytes) -> str | None:
        seen.append(head)
        return sniff(head)

    fetched = await make_fetcher(policy(host.allow)).fetch(
        host.url("/a.png"), first_chunk_check=check
    )
    assert fetched.data == PNG[: SNIFF_BYTES + 4]
    assert len(seen) == 1
    assert seen[0] == PNG[: len(seen[0])]
    assert len(seen[0]) >= SNIFF_BYTES


async def test_redirect_chain(host: ImageHost, make_fetcher: Callable[..., Fetcher]) -> None:
    host.redirect("/start", host.url("/hop/one"), status=301)
    host.redirect("/hop/one", "two?x=1", status=307)  # relative to /hop/
    host.redirect("/hop/two", "/img/final.png", status=308)
    host.add("/img/final.png", PNG, content_type="image/png")
    fetched = await make_fetcher(policy(host.allow)).fetch(host.url("/start"))
    assert (fetched.data, fetched.redirects) == (PNG, 3)
    assert fetched.url == host.url("/img/final.png")
    assert [r.target for r in host.requests] == [
        "/start",
        "/hop/one",
        "/hop/two?x=1",
        "/img/final.png",
    ]


async def test_scheme_relative_redirect(
    host: ImageHost, make_fetcher: Callable[..., Fetcher]
) -> None:
    host.redirect("/r", f"//127.0.0.1:{host.port}/a.png", status=303)
    host.add("/a.png", PNG)
    fetched = await make_fetcher(policy(host.allow)).fetch(host.url("/r"))
    assert (fetched.data, fetched.redirects) == (PNG, 1)


async def test_too_many_redirects(host: ImageHost, make_fetcher: Callable[..., Fetcher]) -> None:
    host.redirect("/loop", "/loop")
    fetcher = make_fetcher(policy(host.allow, max_redirects=3, retries=2))
    error = await fetch_error(fetcher, host.url("/loop"))
    assert (error.code, error.retryable) == ("too-many-redirects", False)
    assert host.hits["/loop"] == 4  # the first request and three hops


async def test_redirect_without_location_is_an_http_error(
    host: ImageHost, make_fetcher: Callable[..., Fetcher]
) -> None:
    host.add("/r", status=302)
    error = await fetch_error(make_fetcher(policy(host.allow)), host.url("/r"))
    assert error.code == "http-302"


async def test_secrets_stay_out_of_logs_and_messages(
    host: ImageHost, make_fetcher: Callable[..., Fetcher], caplog: pytest.LogCaptureFixture
) -> None:
    host.redirect("/r", host.url("/x?token=hunter2"))
    host.add("/x", status=500)
    url = f"http://alice:s3cret@127.0.0.1:{host.port}/r?sig=hunter1"
    caplog.set_level(logging.DEBUG, logger="csvimg.fetch")
    error = await fetch_error(make_fetcher(policy(host.allow, retries=1)), url)
    assert error.code == "http-500"
    assert "retrying" in caplog.text
    for secret in ("s3cret", "hunter1", "hunter2", "alice"):
        assert secret not in caplog.text
        assert secret not in str(error)
    # The credentials were still used, as URLs ask.
    assert (
        host.requests[0].header(
            "authorization",
        )
        == "Basic YWxpY2U6czNjcmV0"
    )


# -- send(), for webhooks -----------------------------------------------------


async def test_send_posts_once_and_returns_any_status(
    host: ImageHost, make_fetcher: Callable[..., Fetcher]
) -> None:
    host.add("/hook", b'{"ok": false}', status=500, content_type="application/json")
    host.add("/moved", status=301, headers={"Location": "/hook"})
    fetcher = make_fetcher(policy(host.allow, retries=3))
    response = await fetcher.send(
        "POST",
        host.url("/hook"),
        content=b'{"type": "done"}',
        headers={"Content-Type": "application/json", "webhook-id": "msg_1"},
        timeout=2,
    )
    assert (response.status_code, response.json()) == (500, {"ok": False})
    [request] = host.wait_for_requests(1)
    assert (request.method, request.json()) == ("POST", {"type": "done"})
    assert request.header("webhook-id") == "msg_1"
    response = await fetcher.send("POST", host.url("/moved"), content=b"", headers={}, timeout=2)
    assert response.status_code == 301
    assert host.hits == {"/hook": 1, "/moved": 1}


async def test_send_timeout(host: ImageHost, make_fetcher: Callable[..., Fetcher]) -> None:
    host.add("/slow-hook", delay=3)
    with pytest.raises(FetchError) as info:
        await make_fetcher(policy(host.allow)).send(
            "POST", host.url("/slow-hook"), content=b"{}", headers={}, timeout=0.3
        )
    assert (info.value.code, info.value.retryable) == ("timeout", True)


async def test_send_refuses_other_schemes(make_fetcher: Callable[..., Fetcher]) -> None:
    with pytest.raises(FetchError) as info:
        await make_fetcher().send("POST", "ftp://example.com/", content=b"", headers={}, timeout=1)
    assert info.value.code == "bad-scheme"
