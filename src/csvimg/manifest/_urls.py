"""The image URL cell: splitting it into URLs and checking each URL's syntax."""

from __future__ import annotations

import ipaddress
import re
import unicodedata
from typing import Final

from csvimg.manifest._problems import Problem, _shorten

__all__ = ["check_image_url", "check_url", "split_urls"]

_URL_SEPARATORS: Final = re.compile(r"[,\r\n]")


def split_urls(cell: str) -> list[str]:
    """Split a URL cell into its URLs, in order.

    URLs are separated by commas (line breaks also separate, as when one URL
    per line is typed into a spreadsheet cell); whitespace around each URL is
    dropped and empty entries (a trailing comma, ``a,,b``) are ignored. A
    comma that belongs inside a URL must be written ``%2C``.
    """
    parts = cell.split(",") if "\n" not in cell and "\r" not in cell else (
        _URL_SEPARATORS.split(cell))
    return [url for part in parts if (url := part.strip())]


# The fast path accepts the common shape (an ASCII host name); anything it
# rejects goes through `_diagnose_url`, which accepts the rest of the valid
# URLs (IPv6 literals, international host names) and explains the others.
# Whatever the fast path accepts, the slow path accepts too (a test checks).
_ASCII_HOST: Final = r"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*\.?"
_USERINFO: Final = r"[A-Za-z0-9._~%!$&'()*+,;=:-]*"
_FAST_URL: Final = re.compile(
    r"[hH][tT][tT][pP][sS]?://"
    rf"(?:{_USERINFO}@)?"
    rf"{_ASCII_HOST}"
    r"(?::(?P<port>[0-9]{1,5}))?"
    r"(?:[/?#][^\s\x00-\x1f\x7f-\x9f\\]*)?\Z"
)
# A whole URL cell of such URLs without a port, comma-separated, nothing
# else (no spaces, no empty entries): one match checks every URL of a row,
# and then ``cell.split(",")`` is exactly what `split_urls` returns. The
# character classes are the fast path's minus the comma, which separates.
_FAST_CELL_URL: Final = (
    r"[hH][tT][tT][pP][sS]?://"
    r"(?:[A-Za-z0-9._~%!$&'()*+;=:-]*@)?"
    rf"{_ASCII_HOST}"
    r"(?:[/?#][^\s\x00-\x1f\x7f-\x9f\\,]*)?"
)
_FAST_CELL: Final = re.compile(rf"{_FAST_CELL_URL}(?:,{_FAST_CELL_URL})*\Z")
_ASCII_HOST_RE: Final = re.compile(_ASCII_HOST + r"\Z")
_USERINFO_RE: Final = re.compile(_USERINFO + r"\Z")
_BAD_URL_CHAR: Final = re.compile(r"[\s\x00-\x1f\x7f-\x9f\\]")
_SCHEME: Final = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):")
_NON_ASCII_HOST_CHAR: Final = re.compile(r"[^\x00-\x9f]")
_BAD_IDN_CHAR: Final = re.compile(r"[^A-Za-z0-9._\-\u00a0-\U0010ffff]")


def _diagnose_url(url: str) -> tuple[str, str] | None:
    """Return (code, reason) for a URL the fast path refused, None if valid."""
    bad = _BAD_URL_CHAR.search(url)
    if bad is not None:
        char = bad.group()
        if char == "\\":
            return "bad-url", "contains a backslash (use / in URLs)"
        if char.isspace():
            return "bad-url", (
                "contains whitespace (write a space inside a URL as %20, "
                "and separate URLs with commas)")
        return "bad-url", f"contains the control character {char!r}"
    scheme_match = _SCHEME.match(url)
    if scheme_match is None:
        if "." in url.split("/", 1)[0]:
            return "bad-url", "is missing https:// (or http://) at the start"
        return "bad-url", "is not an absolute URL: it must start with https:// or http://"
    scheme = scheme_match.group(1).lower()
    rest = url[scheme_match.end():]
    if scheme not in ("http", "https"):
        if len(scheme) == 1:  # "C:/photos/a.jpg"
            return "bad-url", "is a file path, not a URL: it must start with https:// or http://"
        if rest[:1].isdigit():  # "example.com:8080/x" has a port, not a scheme
            return "bad-url", "is not an absolute URL: it must start with https:// or http://"
        return "bad-scheme", f"uses the scheme {scheme!r}: only http and https are allowed"
    if not rest.startswith("//"):
        return "bad-url", f"must look like {scheme}://host/path"
    authority = re.split(r"[/?#]", rest[2:], maxsplit=1)[0]
    if authority.count("@") > 1:
        return "bad-url", "has more than one @ before the host"
    userinfo, at, hostport = authority.rpartition("@")
    if at and _USERINFO_RE.match(userinfo) is None:
        return "bad-url", "has invalid characters before the @ of the host"
    if hostport.startswith("["):
        literal, bracket, port = hostport[1:].partition("]")
        if not bracket:
            return "bad-url", "has an unclosed [ in the host"
        try:
            if "%" in literal:  # a zone id means nothing to another host
                raise ValueError(literal)
            ipaddress.IPv6Address(literal)
        except ValueError:
            return "bad-url", f"has an invalid IPv6 address {_shorten(literal)}"
        if port and not port.startswith(":"):
            return "bad-url", "has text after the ] of the host"
        if port == ":":
            return "bad-url", "has an empty port after the host"
        port = port[1:]
        host = literal
    else:
        host, colon, port = hostport.partition(":")
        if colon and not port:
            return "bad-url", "has an empty port after the host"
        if not host:
            return "bad-url", "has no host"
        if _NON_ASCII_HOST_CHAR.search(host) is None:
            if _ASCII_HOST_RE.match(host) is None:
                return "bad-url", f"has an invalid host {_shorten(host)}"
        elif _BAD_IDN_CHAR.search(host) or _BAD_IDN_CHAR.search(
                unicodedata.normalize("NFKC", host)):
            return "bad-url", f"has an invalid host {_shorten(host)}"
        else:
            try:
                host.encode("idna")
            except UnicodeError:
                return "bad-url", f"has an invalid international host name {_shorten(host)}"
    if port and (not port.isascii() or not port.isdigit() or len(port) > 5
                 or not 0 < int(port) <= 65535):
        return "bad-url", f"has an invalid port {_shorten(port)}"
    return None


def _url_problem(url: str, max_length: int) -> tuple[str, str] | None:
    if len(url) > max_length:
        return "bad-url", f"is longer than {max_length} characters"
    match = _FAST_URL.match(url)
    if match is None:
        return _diagnose_url(url)
    port = match.group("port")
    if port is not None and not 0 < int(port) <= 65535:
        return "bad-url", f"has an invalid port {port!r}"
    return None


def check_image_url(url: str, max_length: int = 2048, *, row: int | None = None,
                    column: str | None = None) -> Problem | None:
    """Return the `Problem` with one image URL, or None when it is acceptable.

    Acceptable means: at most *max_length* characters, absolute, scheme http
    or https, a syntactically valid host (name, IPv4 or bracketed IPv6),
    an optional port in 1-65535, and no whitespace, control characters or
    backslashes. Another scheme gives code ``bad-scheme``; anything else
    wrong gives ``bad-url``. *row* and *column* are copied into the problem.
    Whether the host may be fetched (SSRF rules) is decided at fetch time,
    by `csvimg.fetch.check_url` and the fetch policy; this is the syntax
    check `parse_manifest` runs on every URL of a manifest.
    """
    found = _url_problem(url, max_length)
    if found is None:
        return None
    code, reason = found
    where = f"row {row}: " if row is not None else ""
    return Problem(row, column, code, f"{where}URL {_shorten(url)} {reason}")


check_url = check_image_url
"""Old name of `check_image_url`, kept so existing imports work."""
