"""The streaming parser: records from chunks, validation of header and rows."""

from __future__ import annotations

import codecs
import csv
import itertools
from collections.abc import Iterable, Iterator
from typing import BinaryIO

import attrs

from csvimg._errors import ManifestError
from csvimg.manifest._header import REQUIRED_COLUMNS, _canonical, _wrong_delimiter
from csvimg.manifest._input import _ESCAPED_BYTE, _SNIFF, _chunks, _split_lines, _suspect
from csvimg.manifest._limits import _DEFAULT_LIMITS, ManifestLimits
from csvimg.manifest._manifest import Manifest, _Rows
from csvimg.manifest._problems import Problem, _shorten
from csvimg.manifest._urls import _FAST_CELL, _FAST_URL, _SCHEME, check_image_url, split_urls

__all__ = ["parse_manifest"]


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
                    problem = check_image_url(url, max_length, row=row, column=url_name)
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
