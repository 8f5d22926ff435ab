"""Streaming parse and validation of the product manifest (the uploaded CSV).

A manifest is a CSV in UTF-8 (a byte-order mark is allowed) whose header
names three required columns, in any order and among any other columns::

    S. No.,Product Name,Input Image Urls
    1,SKU1,"https://example.com/a.jpg,https://example.com/b.jpg"

`parse_manifest` reads it incrementally, chunk by chunk, so memory grows
only with the compact parsed rows, never with a copy of the file, and it
stops reading as soon as a limit (`ManifestLimits`) is crossed. It returns a
`Manifest` or raises `csvimg.ManifestError` whose ``errors`` list every
`Problem` found, each with a stable ``code``:

==================  =====================================================
code                meaning
==================  =====================================================
empty-file          no bytes, or only whitespace / a byte-order mark
not-utf8            the text is not UTF-8 (UTF-16, Latin-1...)
not-csv             binary data (NUL bytes) or malformed CSV quoting
missing-column      a required column is not in the header
duplicate-column    a required column appears more than once
wrong-delimiter     the file is separated by ``;`` or tabs, not commas
extra-cell          a row has more (non-blank) cells than the header
missing-cell        a row has fewer cells than the header
blank-serial        the serial number cell is blank
duplicate-serial    the serial number was already used by an earlier row
blank-product-name  the product name cell is blank
no-urls             the URL cell holds no URL
too-many-urls       the URL cell holds more URLs than allowed
bad-url             a URL is malformed, relative, too long or has spaces
bad-scheme          a URL is absolute but not http or https
no-rows             a header but no data rows
too-many-rows       more data rows than allowed (reading stopped there)
too-large           more bytes than allowed (reading stopped there)
too-many-errors     the list was capped; says how many were left out
==================  =====================================================

Row numbers are what a person sees in a spreadsheet: every CSV record
counts as one row, starting at 1 with the first record of the file (the
header, unless blank lines precede it), and blank records count too although
they are otherwise ignored. A quoted cell that spans several lines is one
record, hence one row, as in a spreadsheet (an editor's line numbers may run
ahead of ours after such a cell).

Tolerated without a problem: blank records anywhere (every cell blank),
trailing blank header cells (dropped: they name no column) and trailing
blank cells beyond the header (dropped, so every `Row` has exactly one cell
per header cell). Anything else that does not fit is reported: a row is
never shifted, padded or dropped silently.
"""

from __future__ import annotations

import codecs
import csv
import ipaddress
import itertools
import os
import re
import unicodedata
from array import array
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import BinaryIO, Final, overload

import attrs

from csvimg._errors import ConfigError, ManifestError
from csvimg.jobs import Row

__all__ = [
    "PROBLEM_CODES",
    "REQUIRED_COLUMNS",
    "Manifest",
    "ManifestLimits",
    "Problem",
    "check_url",
    "parse_manifest",
    "split_urls",
]

REQUIRED_COLUMNS: Final = ("S. No.", "Product Name", "Input Image Urls")
"""Canonical names of the required columns: serial, product name, image URLs."""

PROBLEM_CODES: Final = frozenset(
    {
        "empty-file",
        "not-utf8",
        "not-csv",
        "missing-column",
        "duplicate-column",
        "wrong-delimiter",
        "extra-cell",
        "missing-cell",
        "blank-serial",
        "duplicate-serial",
        "blank-product-name",
        "no-urls",
        "too-many-urls",
        "bad-url",
        "bad-scheme",
        "no-rows",
        "too-many-rows",
        "too-large",
        "too-many-errors",
    }
)
"""Every `Problem.code` that `parse_manifest` and `check_url` may produce."""


def _at_least_one(instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    if value < 1:
        raise ValueError(f"{attribute.name} must be at least 1, not {value}")


_ENV_VARS: Final = {
    "CSVIMG_MAX_UPLOAD_BYTES": "max_bytes",
    "CSVIMG_MAX_ROWS": "max_rows",
    "CSVIMG_MAX_URLS_PER_ROW": "max_urls_per_row",
    "CSVIMG_MAX_URL_LENGTH": "max_url_length",
}


@attrs.frozen
class ManifestLimits:
    """Bounds that keep one upload from exhausting memory or time.

    ``max_bytes`` caps the size of the file, ``max_rows`` the number of data
    rows, ``max_urls_per_row`` the URLs in one cell, ``max_url_length`` the
    characters of one URL, and ``max_errors`` the problems listed in one
    `ManifestError` (the rest are counted, not listed).
    """

    max_bytes: int = attrs.field(default=64 * 1024 * 1024, validator=_at_least_one)
    max_rows: int = attrs.field(default=1_000_000, validator=_at_least_one)
    max_urls_per_row: int = attrs.field(default=100, validator=_at_least_one)
    max_url_length: int = attrs.field(default=2048, validator=_at_least_one)
    max_errors: int = attrs.field(default=100, validator=_at_least_one)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ManifestLimits:
        """Build limits from ``CSVIMG_MAX_*`` variables, defaults for unset ones.

        Reads ``CSVIMG_MAX_UPLOAD_BYTES``, ``CSVIMG_MAX_ROWS``,
        ``CSVIMG_MAX_URLS_PER_ROW`` and ``CSVIMG_MAX_URL_LENGTH`` from
        *environ* (default: `os.environ`). Each must be a whole number of at
        least 1; anything else raises `csvimg.ConfigError`.
        """
        env = os.environ if environ is None else environ
        values: dict[str, int] = {}
        for var, name in _ENV_VARS.items():
            raw = env.get(var)
            if raw is None or not raw.strip():
                continue
            try:
                value = int(raw)
            except ValueError:
                raise ConfigError(f"{var} must be a whole number, not {raw!r}") from None
            if value < 1:
                raise ConfigError(f"{var} must be at least 1, not {value}")
            values[name] = value
        return cls(**values)


_DEFAULT_LIMITS: Final = ManifestLimits()


@attrs.frozen
class Problem:
    """One thing wrong with an uploaded manifest.

    ``row`` is the row number as a spreadsheet shows it (header = 1), or
    None for a problem of the whole file; ``column`` is the column's header
    text as in the file (for ``missing-column``: the canonical name of the
    missing column), or None; ``code`` is stable and machine-readable (one
    of `PROBLEM_CODES`); ``message`` is for people and names the row.
    """

    row: int | None
    column: str | None
    code: str
    message: str

    def to_dict(self) -> dict[str, object]:
        """Return a JSON-ready dict with keys row, column, code and message."""
        return {"row": self.row, "column": self.column, "code": self.code,
                "message": self.message}


class _Rows(Sequence[Row]):
    """The rows of a parsed manifest, kept compact; `Row` objects made on access.

    A `Row` with its ``urls`` tuple costs about 940 bytes for a row of three
    URLs, half of it the URLs split out of the URL cell. Here a row is its
    line number (in an array) and its cells; its URLs are split again from
    the URL cell when the row is read, which `parse_manifest` guarantees
    gives the same URLs (rows where it would not keep theirs). A 100,000-row
    upload takes about 45 MB instead of 95 MB. Reads as a tuple of `Row`
    (indexing, slices as tuples, iteration, equality with any sequence).
    """

    __slots__ = ("_cells", "_lines", "_odd", "_url_at", "total_urls")

    def __init__(self, url_at: int) -> None:
        self._url_at = url_at
        self._lines = array("l")
        self._cells: list[tuple[str, ...]] = []
        # Rows whose URLs are not simply the URL cell split at commas.
        self._odd: dict[int, tuple[str, ...]] = {}
        self.total_urls = 0
        """The number of URLs over all rows."""

    def _add(self, line: int, cells: tuple[str, ...], urls: list[str], plain: bool) -> None:
        if not plain:
            self._odd[len(self._cells)] = tuple(urls)
        self._lines.append(line)
        self._cells.append(cells)
        self.total_urls += len(urls)

    def _row(self, index: int) -> Row:
        cells = self._cells[index]
        urls = self._odd.get(index) if self._odd else None
        if urls is None:
            urls = tuple(cells[self._url_at].split(","))
        return Row(index, self._lines[index], cells, urls)

    def __len__(self) -> int:
        return len(self._cells)

    @overload
    def __getitem__(self, index: int) -> Row: ...

    @overload
    def __getitem__(self, index: slice) -> tuple[Row, ...]: ...

    def __getitem__(self, index: int | slice) -> Row | tuple[Row, ...]:
        if isinstance(index, slice):
            return tuple(map(self._row, range(len(self._cells))[index]))
        return self._row(range(len(self._cells))[index])

    def __iter__(self) -> Iterator[Row]:
        return map(self._row, range(len(self._cells)))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence) or isinstance(other, (str, bytes)):
            return NotImplemented
        return len(self) == len(other) and all(
            a == b for a, b in zip(self, other, strict=True))

    def __hash__(self) -> int:
        return hash(tuple(self))

    def __repr__(self) -> str:
        return f"<{len(self)} manifest rows>"


@attrs.frozen
class Manifest:
    """A validated manifest: the header and every data row, in file order.

    ``header`` holds the header cells exactly as in the file (byte-order
    mark removed, trailing blank cells dropped); ``serial_column``,
    ``name_column`` and ``url_column`` are 0-based indexes into it; every
    row's ``cells`` has exactly ``len(header)`` entries. ``rows`` reads
    like a tuple of `Row`; from `parse_manifest` it is a compact sequence
    that makes each `Row` when it is read (half the memory).
    """

    header: tuple[str, ...]
    serial_column: int
    name_column: int
    url_column: int
    rows: Sequence[Row]

    @property
    def total_urls(self) -> int:
        """The number of image URLs over all rows (duplicates counted)."""
        if isinstance(self.rows, _Rows):
            return self.rows.total_urls
        return sum(len(row.urls) for row in self.rows)


# --------------------------------------------------------------------- URLs

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


def _shorten(text: str, limit: int = 80) -> str:
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")


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


def check_url(url: str, max_length: int = 2048, *, row: int | None = None,
              column: str | None = None) -> Problem | None:
    """Return the `Problem` with one image URL, or None when it is acceptable.

    Acceptable means: at most *max_length* characters, absolute, scheme http
    or https, a syntactically valid host (name, IPv4 or bracketed IPv6),
    an optional port in 1-65535, and no whitespace, control characters or
    backslashes. Another scheme gives code ``bad-scheme``; anything else
    wrong gives ``bad-url``. *row* and *column* are copied into the problem.
    Whether the host may be fetched (SSRF rules) is decided at fetch time.
    """
    found = _url_problem(url, max_length)
    if found is None:
        return None
    code, reason = found
    where = f"row {row}: " if row is not None else ""
    return Problem(row, column, code, f"{where}URL {_shorten(url)} {reason}")


# ------------------------------------------------------------------- header

_HEADER_NOISE: Final = re.compile(r"[\s._\-]+")
_ALIASES: Final[Mapping[str, int]] = {
    # serial number
    "sno": 0, "serialnumber": 0, "serialno": 0, "serial": 0, "no": 0, "#": 0,
    "srno": 0, "slno": 0,
    # product name
    "productname": 1, "product": 1, "name": 1,
    # image URLs
    "inputimageurls": 2, "inputimageurl": 2, "imageurls": 2, "imageurl": 2,
    "inputurls": 2, "urls": 2, "url": 2,
}


def _canonical(cell: str) -> int | None:
    return _ALIASES.get(_HEADER_NOISE.sub("", cell.lower()))


# -------------------------------------------------------------------- input

_CHUNK: Final = 64 * 1024
# Bytes looked at before anything is parsed, to refuse binary files whole.
_SNIFF: Final = 8 * 1024
# Line breaks `str.splitlines` honours but CSV does not; when present, the
# slower regex split keeps csv.reader from seeing a record end mid-cell.
_ODD_BREAK_CHARS: Final = "\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"
_CSV_LINES: Final = re.compile(r"[^\r\n]*(?:\r\n?|\n)|[^\r\n]+")
# Undecodable bytes come out of the surrogateescape decoder as these.
_ESCAPED_BYTE: Final = re.compile("[\udc80-\udcff]")


def _chunks(
    source: bytes | bytearray | memoryview | str | Iterable[bytes] | BinaryIO,
) -> Iterator[bytes]:
    if isinstance(source, (bytes, bytearray, memoryview)):
        view = memoryview(source).cast("B")
        for start in range(0, len(view), _CHUNK):
            yield view[start:start + _CHUNK].tobytes()
    elif isinstance(source, str):
        # surrogatepass: a lone surrogate becomes bytes the decoder rejects,
        # so it is reported as not-utf8 instead of crashing the encoder.
        for start in range(0, len(source), _CHUNK):
            yield source[start:start + _CHUNK].encode("utf-8", "surrogatepass")
    elif hasattr(source, "read"):
        read = source.read
        while chunk := read(_CHUNK):
            yield chunk
    else:
        yield from source


def _suspect(text: str) -> bool:
    """Whether decoded text may hold a NUL or an undecodable byte."""
    return "\x00" in text or (not text.isascii() and _ESCAPED_BYTE.search(text) is not None)


def _split_lines(text: str) -> list[str]:
    # Eight substring tests (memchr-fast) cost ~4 us per 64 KiB chunk, the
    # character-class regex search it replaces ~470 us.
    for char in _ODD_BREAK_CHARS:
        if char in text:
            return _CSV_LINES.findall(text)
    return text.splitlines(True)


# ------------------------------------------------------------------- parser


class _Stop(Exception):
    """Raised inside the parser to stop reading after a fatal problem."""


class _Parser:
    def __init__(self, limits: ManifestLimits) -> None:
        self.limits = limits
        self.problems: list[Problem] = []
        self.omitted = 0
        self.fatal: Problem | None = None
        # Set once decoded text holds an undecodable byte or a NUL; from then
        # on each record is checked for one, so the report names its row.
        self.suspect = False
        self.truncated = False
        self.rownum = 0
        self.line = ""  # the last line handed to csv.reader
        self.in_header = True

    # -- problems

    def add(self, problem: Problem) -> None:
        if len(self.problems) < self.limits.max_errors:
            self.problems.append(problem)
        else:
            self.omitted += 1

    def stop(self, problem: Problem) -> _Stop:
        self.fatal = problem
        return _Stop()

    def final_problems(self) -> list[Problem]:
        regular = self.problems
        omitted = self.omitted
        cap = self.limits.max_errors
        fatal = [] if self.fatal is None else [self.fatal]
        if len(regular) + len(fatal) + omitted > cap:
            # At least one real problem is shown, however small the cap.
            keep = max(cap - 1 - len(fatal), 1 - len(fatal))
            omitted += len(regular) - keep
            regular = regular[:keep]
        if self.fatal is not None and self.fatal.row is None:
            result = fatal + regular
        else:
            result = regular + fatal
        if omitted:
            result.append(Problem(None, None, "too-many-errors", (
                f"{omitted} more problem{'s' if omitted != 1 else ''} not listed "
                f"(at most {cap} are shown)")))
        return result

    # -- input

    def limited(self, chunks: Iterator[bytes]) -> Iterator[bytes]:
        """Yield at most ``max_bytes`` bytes; note whether more were offered."""
        remaining = self.limits.max_bytes
        for chunk in chunks:
            if len(chunk) > remaining:
                self.truncated = True
                if remaining:
                    yield chunk[:remaining]
                return
            remaining -= len(chunk)
            if chunk:
                yield chunk

    def sniff(self, head: bytes) -> None:
        """Refuse at once what is evidently not UTF-8 CSV text."""
        if head.startswith((b"\xff\xfe", b"\xfe\xff")):
            raise self.stop(Problem(None, None, "not-utf8", (
                "the file is UTF-16 text, not UTF-8: save it as 'CSV UTF-8'")))
        if b"\x00" in head:
            raise self.stop(Problem(None, None, "not-csv", (
                "the file contains NUL bytes, so it is not CSV text (an image, "
                "an Excel .xlsx file or UTF-16 text?): save it as 'CSV UTF-8'")))

    def lines(self, chunks: Iterator[bytes]) -> Iterator[str]:
        """Decode incrementally and yield CSV lines, each with its line break.

        The outcome must not depend on where the chunks are split, so the
        sniffed head has a fixed size, the byte limit cuts at an exact
        offset, and bad bytes are reported by the record holding them.
        """
        stream = self.limited(chunks)
        head = b""
        for chunk in stream:
            head += chunk
            if len(head) >= _SNIFF:
                break
        self.sniff(head)
        decode = codecs.getincrementaldecoder("utf-8-sig")("surrogateescape").decode
        pending = ""
        for chunk in itertools.chain((head,), stream):
            decoded = decode(chunk)
            if not self.suspect and _suspect(decoded):
                self.suspect = True
            lines = _split_lines(pending + decoded)
            pending = ""
            if lines:
                last = lines[-1]
                # A final "\r" may be the first half of a "\r\n" split
                # across chunks; holding it back keeps one record one line.
                if last[-1] not in "\r\n" or last[-1] == "\r":
                    pending = lines.pop()
            for line in lines:
                self.line = line
                yield line
        if self.truncated:
            # The pending line is cut short by the limit: not a record.
            max_bytes = self.limits.max_bytes
            raise self.stop(Problem(None, None, "too-large", (
                f"the file is larger than {max_bytes} bytes; reading stopped there")))
        decoded = decode(b"", True)
        if _suspect(decoded):
            self.suspect = True
        for line in _split_lines(pending + decoded):
            self.line = line
            yield line

    def records(self, chunks: Iterator[bytes]) -> Iterator[list[str]]:
        """Yield every record, counting rows; stop on malformed quoting."""
        reader = csv.reader(self.lines(chunks), strict=True)
        while True:
            try:
                for record in reader:
                    self.rownum += 1
                    if self.suspect:
                        self.check_decoded(record)
                    yield record
                return
            except csv.Error as exc:
                self.rownum += 1
                self.csv_error(exc)

    def check_decoded(self, record: list[str]) -> None:
        for cell in record:
            if "\x00" in cell:
                raise self.stop(Problem(self.rownum, None, "not-csv", (
                    f"row {self.rownum} contains a NUL character: this is binary "
                    "data, not CSV text")))
        for cell in record:
            if _ESCAPED_BYTE.search(cell):
                raise self.stop(Problem(self.rownum, None, "not-utf8", (
                    f"row {self.rownum} is not UTF-8 text (the file may be "
                    "Latin-1 or Windows-1252): save it as 'CSV UTF-8'")))

    def csv_error(self, exc: csv.Error) -> None:
        row = self.rownum
        text = str(exc)
        if self.in_header:
            # A tab-separated export quotes cells ("S. No."<TAB>...), which
            # is bad CSV quoting; the real mistake is the delimiter.
            self.check_delimiter([self.line.strip()])
        if "expected after" in text and not self.in_header:
            # The reader resumes cleanly at the next line, so keep going and
            # report the other rows too.
            self.add(Problem(row, None, "not-csv", (
                f"row {row}: a quoted cell has text after its closing quote "
                '(a " inside a quoted cell must be written "")')))
            return
        if "end of data" in text:
            raise self.stop(Problem(row, None, "not-csv", (
                f'row {row}: a quoted cell starting here is never closed (missing ")')))
        if "field larger" in text:
            raise self.stop(Problem(row, None, "not-csv", (
                f"row {row}: a cell is longer than {csv.field_size_limit()} characters "
                '(is a " left unclosed?)')))
        if "expected after" in text:
            raise self.stop(Problem(row, None, "not-csv", (
                f"row {row}: a quoted header cell has text after its closing quote")))
        raise self.stop(Problem(row, None, "not-csv", f"row {row}: not valid CSV: {text}"))

    # -- validation

    def header(self, record: list[str]) -> tuple[tuple[str, ...], list[int]] | None:
        """Return the header and its required-column indexes, or None if bad."""
        cells = list(record)
        while cells and not cells[-1].strip():
            cells.pop()
        row = self.rownum
        found: list[int | None] = [None, None, None]
        bad = False
        for index, cell in enumerate(cells):
            which = _canonical(cell)
            if which is None:
                continue
            first = found[which]
            if first is None:
                found[which] = index
                continue
            bad = True
            self.add(Problem(row, cell, "duplicate-column", (
                f"row {row}: column {index + 1} {cell!r} is a second "
                f"{REQUIRED_COLUMNS[which]!r} column (column {first + 1} "
                f"{cells[first]!r} is the first); keep only one")))
        if any(index is None for index in found):
            self.check_delimiter(cells)
            for which, at in enumerate(found):
                if at is None:
                    canonical = REQUIRED_COLUMNS[which]
                    self.add(Problem(row, canonical, "missing-column", (
                        f"row {row}: the header has no {canonical!r} column "
                        f"(found: {', '.join(repr(c) for c in cells) or 'nothing'})")))
            bad = True
        if bad:
            return None
        return tuple(cells), [index for index in found if index is not None]

    def check_delimiter(self, cells: list[str]) -> None:
        delimiter = _wrong_delimiter(cells)
        if delimiter is not None:
            name = "tabs" if delimiter == "\t" else f"{delimiter!r}"
            raise self.stop(Problem(None, None, "wrong-delimiter", (
                f"the file is separated by {name}, not commas: save it as "
                "'CSV (comma delimited)'")))

    def run(self, chunks: Iterator[bytes]) -> Manifest:
        records = self.records(chunks)
        header: tuple[str, ...] | None = None
        columns: list[int] = []
        for record in records:
            if "".join(record).strip():
                parsed = self.header(record)
                if parsed is None:
                    raise _Stop()
                header, columns = parsed
                break
        self.in_header = False
        if header is None:
            raise self.stop(Problem(None, None, "empty-file", (
                "the file is empty: expected a header "
                f"{','.join(REQUIRED_COLUMNS)} and one row per product")))
        rows = self.data(records, header, columns)
        if not rows and not self.problems:
            raise self.stop(Problem(None, None, "no-rows", (
                "the file has a header but no product rows")))
        return Manifest(header, columns[0], columns[1], columns[2], rows)

    def data(self, records: Iterator[list[str]], header: tuple[str, ...],
             columns: list[int]) -> _Rows:
        limits = self.limits
        max_rows = limits.max_rows
        max_urls = limits.max_urls_per_row
        max_length = limits.max_url_length
        width = len(header)
        serial_at, name_at, url_at = columns
        serial_name, name_name, url_name = (header[i] for i in columns)
        fast_url = _FAST_URL.match
        fast_cell = _FAST_CELL.match
        seen: dict[str, int] = {}
        rows = _Rows(url_at)
        add = rows._add
        count = 0
        for record in records:
            row = self.rownum
            if len(record) != width:
                if not "".join(record).strip():
                    continue  # a blank record
                if len(record) > width and not "".join(record[width:]).strip():
                    record = record[:width]
            if len(record) == width:
                serial = record[serial_at].strip()
                name = record[name_at].strip()
                cell = record[url_at]
                if not serial and not name and not cell.strip() and (
                        not "".join(record).strip()):
                    continue
            count += 1
            if count > max_rows:
                raise self.stop(Problem(row, None, "too-many-rows", (
                    f"row {row}: the file has more than {max_rows} product rows; "
                    "reading stopped here")))
            if len(record) != width:
                self.add(self.shape_problem(row, record, header, url_at))
                continue
            found: list[tuple[int, Problem]] = []
            if not serial:
                found.append((serial_at, Problem(row, serial_name, "blank-serial", (
                    f"row {row}: the {serial_name!r} cell is blank"))))
            else:
                first = seen.setdefault(serial, row)
                if first != row:
                    found.append((serial_at, Problem(row, serial_name, "duplicate-serial", (
                        f"row {row}: serial number {_shorten(serial)} is already used "
                        f"in row {first}"))))
            if not name:
                found.append((name_at, Problem(row, name_name, "blank-product-name", (
                    f"row {row}: the {name_name!r} cell is blank"))))
            if len(cell) <= max_length and fast_cell(cell) is not None:
                # Every URL is fine (each is shorter than the cell); only
                # their number is left to check.
                urls = cell.split(",")
                if len(urls) <= max_urls:
                    if found:
                        self.report(found)
                    elif not self.problems:
                        add(row, tuple(record), urls, True)
                    continue
            else:
                urls = split_urls(cell)
            if not urls:
                found.append((url_at, Problem(row, url_name, "no-urls", (
                    f"row {row}: the {url_name!r} cell has no URL"))))
            elif len(urls) > max_urls:
                found.append((url_at, Problem(row, url_name, "too-many-urls", (
                    f"row {row}: {len(urls)} URLs in one cell; at most {max_urls} "
                    "are allowed"))))
            else:
                for position, url in enumerate(urls):
                    match = fast_url(url)
                    if match is not None and len(url) <= max_length and (
                            match.group("port") is None):
                        continue
                    problem = check_url(url, max_length, row=row, column=url_name)
                    if problem is None:
                        continue
                    if position and problem.code == "bad-url" and "." not in (
                            url.split("/", 1)[0]) and not _SCHEME.match(url):
                        problem = attrs.evolve(problem, message=problem.message + (
                            " (if it is part of the previous URL, write that comma as %2C)"))
                    found.append((url_at, problem))
            if found:
                self.report(found)
            elif not self.problems:
                # Once the upload is doomed, rows are no longer kept: the
                # rest is read only to report every problem.
                add(row, tuple(record), urls, urls == cell.split(","))
        return rows

    def report(self, found: list[tuple[int, Problem]]) -> None:
        """Add a row's problems in column order."""
        if len(found) > 1:
            found.sort(key=lambda item: item[0])
        for _, problem in found:
            self.add(problem)

    def shape_problem(self, row: int, record: list[str], header: tuple[str, ...],
                      url_at: int) -> Problem:
        width = len(header)
        got = len(record)
        if got > width:
            return Problem(row, None, "extra-cell", (
                f"row {row} has {got} cells but the header has {width}: if a cell holds "
                "several comma-separated URLs, put the whole cell in double quotes, "
                f'e.g. "https://a.example/1.jpg,https://a.example/2.jpg" in '
                f"{header[url_at]!r}"))
        missing = header[got:]
        return Problem(row, missing[0], "missing-cell", (
            f"row {row} has {got} cell{'s' if got != 1 else ''} but the header has "
            f"{width}: no value for {', '.join(repr(name) for name in missing)}"))


def _wrong_delimiter(cells: list[str]) -> str | None:
    text = ",".join(cells)
    for delimiter in (";", "\t"):
        if delimiter not in text:
            continue
        found = {_canonical(part.strip().strip('"')) for part in text.split(delimiter)}
        if {0, 1, 2} <= found:
            return delimiter
    return None


def parse_manifest(source: bytes | bytearray | memoryview | str | Iterable[bytes] | BinaryIO,
                   limits: ManifestLimits = _DEFAULT_LIMITS) -> Manifest:
    """Parse and validate a manifest, reading *source* incrementally.

    *source* is the whole file as bytes (or text), an iterable of byte
    chunks split anywhere (even inside a UTF-8 character), or a binary file
    object. Reading stops as soon as *limits* are crossed. Returns the
    `Manifest`, or raises `csvimg.ManifestError` whose ``errors`` list every
    `Problem` found, ordered by row then column, at most
    ``limits.max_errors`` of them (then the last, ``too-many-errors``, says
    how many more were found).
    """
    parser = _Parser(limits)
    try:
        manifest = parser.run(_chunks(source))
    except _Stop:
        pass
    else:
        if not parser.problems:
            return manifest
    raise ManifestError(parser.final_problems())
