"""Tests of csvimg.manifest: streaming CSV parse and validation."""

from __future__ import annotations

import csv
import io
import time
import tracemalloc
from collections.abc import Iterable, Iterator, Sequence
from typing import BinaryIO
from urllib.parse import urlsplit

import attrs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from csvimg._errors import ConfigError, ManifestError
from csvimg.jobs import Row
from csvimg.manifest import (
    PROBLEM_CODES,
    REQUIRED_COLUMNS,
    Manifest,
    ManifestLimits,
    Problem,
    check_image_url,
    check_url,
    parse_manifest,
    split_urls,
)
from csvimg.manifest import _urls as manifest_urls

HEADER = "S. No.,Product Name,Input Image Urls\n"
URL_A = "https://example.com/a.jpg"
URL_B = "https://example.com/b.jpg"
DEFAULT = ManifestLimits()


def errors_of(source: bytes | str | Iterable[bytes] | BinaryIO,
              limits: ManifestLimits = DEFAULT) -> list[Problem]:
    with pytest.raises(ManifestError) as info:
        parse_manifest(source, limits)
    assert info.value.errors, "a ManifestError must list at least one problem"
    return info.value.errors


def outcome(source: object, limits: ManifestLimits = DEFAULT) -> Manifest | list[Problem]:
    try:
        return parse_manifest(source, limits)  # type: ignore[arg-type]
    except ManifestError as exc:
        return exc.errors


def chunked(data: bytes, cuts: Sequence[int]) -> Iterator[bytes]:
    start = 0
    for cut in sorted(set(cuts)):
        yield data[start:cut]
        start = cut
    yield data[start:]


# ------------------------------------------------------------- happy paths


def test_parses_the_documented_example() -> None:
    data = (
        "S. No.,Product Name,Input Image Urls\n"
        f'1,SKU1,"{URL_A},{URL_B}"\n'
        f"2,SKU2,{URL_A}\n"
    )
    manifest = parse_manifest(data.encode())
    assert manifest.header == REQUIRED_COLUMNS
    assert (manifest.serial_column, manifest.name_column, manifest.url_column) == (0, 1, 2)
    assert manifest.rows == (
        Row(0, 2, ("1", "SKU1", f"{URL_A},{URL_B}"), (URL_A, URL_B)),
        Row(1, 3, ("2", "SKU2", URL_A), (URL_A,)),
    )
    assert manifest.total_urls == 3


def test_accepts_text_binary_files_and_chunk_iterables_alike() -> None:
    data = f'{HEADER}1,Café ☕,"{URL_A}, {URL_B}"\r\n'
    expected = parse_manifest(data)
    assert parse_manifest(data.encode()) == expected
    assert parse_manifest(bytearray(data.encode())) == expected
    assert parse_manifest(io.BytesIO(data.encode())) == expected
    assert parse_manifest(iter([data.encode()[:5], b"", data.encode()[5:]])) == expected
    assert expected.rows[0].cells[1] == "Café ☕"


def test_bom_is_removed_from_the_header_even_when_split_across_chunks() -> None:
    data = ("\ufeff" + HEADER + f"1,a,{URL_A}\n").encode()
    whole = parse_manifest(data)
    assert whole.header[0] == "S. No."
    assert parse_manifest(chunked(data, [1, 2])) == whole


def test_quoted_multi_url_cells_tolerate_spaces_newlines_and_trailing_commas() -> None:
    cell = f" {URL_A} ,\n{URL_B},\r\n,"
    data = HEADER + "1,a," + '"' + cell + '"' + "\n"
    (row,) = parse_manifest(data).rows
    assert row.urls == (URL_A, URL_B)
    assert row.cells[2] == cell, "cells are kept exactly as read"


def test_cells_keep_surrounding_whitespace_but_are_validated_stripped() -> None:
    manifest = parse_manifest(f"{HEADER} 7 ,  Name  , {URL_A} \n")
    assert manifest.rows[0].cells == (" 7 ", "  Name  ", f" {URL_A} ")
    assert manifest.rows[0].urls == (URL_A,)


@pytest.mark.parametrize(
    ("serial", "name", "urls"),
    [
        ("S. No.", "Product Name", "Input Image Urls"),
        ("S.No", "Product", "Input Image URLs"),
        ("S No", "Name", "Image Urls"),
        ("SNo", "product name", "Input Urls"),
        ("Serial Number", "PRODUCT_NAME", "URLs"),
        ("Serial No", "product-name", "Urls"),
        ("Serial", "Name", "Image URL"),
        ("No", "Name", "image_urls"),
        ("#", "Name", " input  image  urls "),
    ],
)
def test_header_aliases(serial: str, name: str, urls: str) -> None:
    manifest = parse_manifest(f"{serial},{name},{urls}\n1,a,{URL_A}\n")
    assert manifest.header == (serial, name, urls)
    assert manifest.rows[0].urls == (URL_A,)


def test_columns_in_any_order_with_extra_columns_kept() -> None:
    data = f'Notes,Image URL,Name,Id,S. No.\n"x, y",{URL_A},Widget,,3\n'
    manifest = parse_manifest(data)
    assert (manifest.serial_column, manifest.name_column, manifest.url_column) == (4, 2, 1)
    assert manifest.rows[0].cells == ("x, y", URL_A, "Widget", "", "3")


def test_blank_lines_are_ignored_but_counted_like_a_spreadsheet() -> None:
    data = f"\n\n{HEADER}\n1,a,{URL_A}\n , ,\n,,\n2,b,{URL_B}\n\n"
    manifest = parse_manifest(data)
    assert [(row.index, row.line) for row in manifest.rows] == [(0, 5), (1, 8)]


def test_a_quoted_multi_line_cell_is_one_row() -> None:
    data = f'{HEADER}1,"two\nlines",{URL_A}\n2,b,{URL_A}\n'
    manifest = parse_manifest(data)
    assert [row.line for row in manifest.rows] == [2, 3]
    assert manifest.rows[0].cells[1] == "two\nlines"


@pytest.mark.parametrize("newline", ["\n", "\r\n", "\r"])
def test_any_line_ending(newline: str) -> None:
    data = HEADER.replace("\n", newline) + f"1,a,{URL_A}{newline}2,b,{URL_B}"
    assert [row.urls for row in parse_manifest(data).rows] == [(URL_A,), (URL_B,)]


def test_trailing_blank_header_and_row_cells_are_dropped() -> None:
    data = f"S. No.,Product Name,Input Image Urls,,\n1,a,{URL_A},\n2,b,{URL_B}\n"
    manifest = parse_manifest(data)
    assert manifest.header == REQUIRED_COLUMNS
    assert [row.cells for row in manifest.rows] == [("1", "a", URL_A), ("2", "b", URL_B)]


def test_unicode_line_separators_inside_cells_do_not_split_records() -> None:
    name = "a\x85b\u2028c\x0bd\x1ce"
    manifest = parse_manifest(f"{HEADER}1,{name},{URL_A}\n")
    assert manifest.rows[0].cells[1] == name


# ------------------------------------------------------------ problem codes

LONG_URL = "https://example.com/" + "a" * 3000
BAD_ROWS = "".join(f"{i},,{URL_A}\n" for i in range(1, 11))


@attrs.frozen
class Case:
    code: str
    data: bytes | str
    row: int | None
    column: str | None
    limits: ManifestLimits = DEFAULT


CASES = {
    "empty-file": Case("empty-file", b"", None, None),
    "empty-file-bom-and-whitespace": Case("empty-file", b"\xef\xbb\xbf \r\n\t\n", None, None),
    "empty-file-only-commas": Case("empty-file", ",,\n , \n", None, None),
    "not-utf8-latin1": Case("not-utf8", (HEADER + f"1,Caf\xe9,{URL_A}\n").encode("latin-1"), 2,
                            None),
    "not-utf8-in-header": Case("not-utf8", b"S. No.,Product Nam\xe9,Input Image Urls\n", 1, None),
    "not-utf8-truncated-at-end": Case("not-utf8", (HEADER + f"1,a,{URL_A}\n2,\xe2\x82").encode(
        "latin-1"), 3, None),
    "not-utf8-utf16": Case("not-utf8", (HEADER + f"1,a,{URL_A}\n").encode("utf-16"), None, None),
    "not-utf8-lone-surrogate": Case("not-utf8", f"{HEADER}1,\udc80,{URL_A}\n", 2, None),
    "not-csv-binary": Case("not-csv", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00", None,
                           None),
    "not-csv-late-nul": Case("not-csv", HEADER + "".join(f"{i},a,{URL_A}\n" for i in range(3000))
                             + "x,a\x00b,x\n", 3002, None),
    "not-csv-text-after-quote": Case("not-csv", f'{HEADER}1,"a"b,{URL_A}\n', 2, None),
    "not-csv-unclosed-quote": Case("not-csv", f'{HEADER}1,"a,{URL_A}\n2,b,{URL_B}\n', 2, None),
    "not-csv-huge-cell": Case("not-csv", f'{HEADER}1,"{"x" * 200_000}",{URL_A}\n', 2, None),
    "missing-column": Case("missing-column", "S. No.,Product Name\n1,a\n", 1, "Input Image Urls"),
    "duplicate-column": Case("duplicate-column", f"S. No.,Product Name,Name,Urls\n1,a,b,{URL_A}\n",
                             1, "Name"),
    "wrong-delimiter-semicolon": Case("wrong-delimiter", f"S. No.;Product Name;Urls\n1;a;{URL_A}\n",
                                      None, None),
    "wrong-delimiter-tab": Case("wrong-delimiter", f'"S. No."\tName\tImage Urls\n1\ta\t{URL_A}\n',
                                None, None),
    "extra-cell": Case("extra-cell", f"{HEADER}1,a,{URL_A},{URL_B}\n", 2, None),
    "missing-cell": Case("missing-cell", f"{HEADER}1,a\n", 2, "Input Image Urls"),
    "blank-serial": Case("blank-serial", f"{HEADER} ,a,{URL_A}\n", 2, "S. No."),
    "duplicate-serial": Case("duplicate-serial", f"{HEADER}7,a,{URL_A}\n 7 ,b,{URL_B}\n", 3,
                             "S. No."),
    "blank-product-name": Case("blank-product-name", f'{HEADER}1,"  ",{URL_A}\n', 2,
                               "Product Name"),
    "no-urls": Case("no-urls", f'{HEADER}1,a," , ,"\n', 2, "Input Image Urls"),
    "too-many-urls": Case("too-many-urls", f'{HEADER}1,a,"{URL_A},{URL_A},{URL_B}"\n', 2,
                          "Input Image Urls", ManifestLimits(max_urls_per_row=2)),
    "bad-url-relative": Case("bad-url", f"{HEADER}1,a,/images/a.jpg\n", 2, "Input Image Urls"),
    "bad-url-no-scheme": Case("bad-url", f"{HEADER}1,a,www.example.com/a.jpg\n", 2,
                              "Input Image Urls"),
    "bad-url-too-long": Case("bad-url", f"{HEADER}1,a,{LONG_URL}\n", 2, "Input Image Urls"),
    "bad-url-space": Case("bad-url", f"{HEADER}1,a,https://example.com/a b.jpg\n", 2,
                          "Input Image Urls"),
    "bad-scheme": Case("bad-scheme", f"{HEADER}1,a,ftp://example.com/a.jpg\n", 2,
                       "Input Image Urls"),
    "no-rows": Case("no-rows", HEADER + "\n,,\n", None, None),
    "too-many-rows": Case("too-many-rows", f"{HEADER}1,a,{URL_A}\n\n2,b,{URL_A}\n", 4, None,
                          ManifestLimits(max_rows=1)),
    "too-large": Case("too-large", f"{HEADER}1,a,{URL_A}\n", None, None,
                      ManifestLimits(max_bytes=20)),
}


@pytest.mark.parametrize("case", CASES.values(), ids=list(CASES))
def test_each_problem_code(case: Case) -> None:
    (problem,) = errors_of(case.data, case.limits)
    assert (problem.code, problem.row, problem.column) == (case.code, case.row, case.column)
    assert problem.code in PROBLEM_CODES
    if problem.row is not None:
        assert f"row {problem.row}" in problem.message


def test_every_problem_code_is_tested() -> None:
    tested = {case.code for case in CASES.values()} | {"too-many-errors"}
    assert tested == PROBLEM_CODES


def test_too_many_errors_caps_the_list_and_counts_the_rest() -> None:
    problems = errors_of(HEADER + BAD_ROWS, ManifestLimits(max_errors=5))
    assert [p.code for p in problems] == ["blank-product-name"] * 4 + ["too-many-errors"]
    assert [p.row for p in problems[:4]] == [2, 3, 4, 5]
    assert "6 more problems" in problems[-1].message
    assert len(errors_of(HEADER + BAD_ROWS, ManifestLimits(max_errors=10))) == 10


def test_a_fatal_problem_survives_the_cap() -> None:
    problems = errors_of(HEADER + BAD_ROWS, ManifestLimits(max_errors=3, max_rows=8))
    assert [p.code for p in problems] == ["blank-product-name", "too-many-rows",
                                          "too-many-errors"]
    problems = errors_of(HEADER + BAD_ROWS, ManifestLimits(max_errors=3, max_bytes=200))
    assert [p.code for p in problems] == ["too-large", "blank-product-name", "too-many-errors"]


def test_extra_cell_hints_at_quoting_and_never_shifts_columns() -> None:
    (problem,) = errors_of(f"{HEADER}1,a,{URL_A},{URL_B}\n")
    assert "double quotes" in problem.message


def test_duplicate_serial_names_the_first_row() -> None:
    (problem,) = errors_of(f"{HEADER}\n7,a,{URL_A}\n8,b,{URL_A}\n7,c,{URL_B}\n")
    assert (problem.row, problem.code) == (5, "duplicate-serial")
    assert "row 3" in problem.message


def test_serials_are_text_not_numbers() -> None:
    manifest = parse_manifest(f"{HEADER}A-1,a,{URL_A}\n01,b,{URL_A}\n1,c,{URL_A}\n")
    assert [row.cells[0] for row in manifest.rows] == ["A-1", "01", "1"]


def test_missing_and_duplicate_columns_are_all_reported() -> None:
    problems = errors_of("Name,Product,Notes\n1,a,b\n")
    assert [(p.code, p.column) for p in problems] == [
        ("duplicate-column", "Product"),
        ("missing-column", "S. No."),
        ("missing-column", "Input Image Urls"),
    ]


def test_problems_are_ordered_by_row_then_column() -> None:
    data = (
        "Image Urls,Name,S. No.\n"
        "ftp://x.example/a,,\n"
        f"{URL_A},b,1\n"
        "relative.jpg,,1\n"
    )
    problems = errors_of(data)
    assert [(p.row, p.column, p.code) for p in problems] == [
        (2, "Image Urls", "bad-scheme"),
        (2, "Name", "blank-product-name"),
        (2, "S. No.", "blank-serial"),
        (4, "Image Urls", "bad-url"),
        (4, "Name", "blank-product-name"),
        (4, "S. No.", "duplicate-serial"),
    ]


def test_a_comma_inside_a_url_gets_a_hint() -> None:
    (problem,) = errors_of(f'{HEADER}1,a,"https://res.example.com/image/upload/w_100,h_100/a.jpg"\n')
    assert problem.code == "bad-url"
    assert "%2C" in problem.message


def test_problem_to_dict() -> None:
    problem = Problem(3, "Product Name", "blank-product-name", "row 3: blank")
    assert problem.to_dict() == {"row": 3, "column": "Product Name",
                                 "code": "blank-product-name", "message": "row 3: blank"}


def test_manifest_error_is_a_value_error_with_the_first_message() -> None:
    with pytest.raises(ValueError, match="no product rows"):
        parse_manifest(HEADER)


# ------------------------------------------------------------------ limits


def test_limits_from_env() -> None:
    limits = ManifestLimits.from_env({
        "CSVIMG_MAX_UPLOAD_BYTES": "1000",
        "CSVIMG_MAX_ROWS": " 20 ",
        "CSVIMG_MAX_URLS_PER_ROW": "3",
        "CSVIMG_MAX_URL_LENGTH": "",
    })
    assert limits == ManifestLimits(max_bytes=1000, max_rows=20, max_urls_per_row=3)
    assert ManifestLimits.from_env({}) == ManifestLimits()


def test_limits_from_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CSVIMG_MAX_ROWS", "5")
    assert ManifestLimits.from_env().max_rows == 5


@pytest.mark.parametrize("value", ["ten", "1.5", "0", "-3"])
def test_limits_from_env_refuses_bad_values(value: str) -> None:
    with pytest.raises(ConfigError, match="CSVIMG_MAX_ROWS"):
        ManifestLimits.from_env({"CSVIMG_MAX_ROWS": value})


def test_limits_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_rows"):
        ManifestLimits(max_rows=0)


def test_row_cap_refuses_ten_million_rows_quickly_with_bounded_memory() -> None:
    consumed = 0

    def ten_million_rows() -> Iterator[bytes]:
        nonlocal consumed
        yield HEADER.encode()
        for block in range(10_000):
            consumed += 1
            yield "".join(f"{block}-{i},Product,{URL_A}\n" for i in range(1000)).encode()

    tracemalloc.start()
    started = time.perf_counter()
    try:
        problems = errors_of(ten_million_rows(), ManifestLimits(max_rows=1000))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - started < 5
    assert [(p.code, p.row) for p in problems] == [("too-many-rows", 1002)]
    assert consumed <= 3, "reading must stop at the row cap"
    assert peak < 20 * 1024 * 1024


def test_byte_cap_stops_reading_an_endless_stream() -> None:
    def endless() -> Iterator[bytes]:
        yield HEADER.encode()
        i = 0
        while True:
            i += 1
            yield f"{i},p,{URL_A}\n".encode() * 100

    started = time.perf_counter()
    problems = errors_of(endless(), ManifestLimits(max_bytes=1024 * 1024))
    assert time.perf_counter() - started < 5
    assert problems[0].code == "too-large"


def test_byte_cap_stops_reading_a_file() -> None:
    data = (HEADER + "".join(f"{i},p,{URL_A}\n" for i in range(100_000))).encode()
    stream = io.BytesIO(data)
    problems = errors_of(stream, ManifestLimits(max_bytes=100_000))
    assert [p.code for p in problems] == ["too-large"]
    assert stream.tell() <= 100_000 + 64 * 1024


def test_exactly_at_the_limits_is_fine() -> None:
    data = f"{HEADER}1,a,{URL_A}\n2,b,{URL_A}\n".encode()
    limits = ManifestLimits(max_bytes=len(data), max_rows=2, max_url_length=len(URL_A))
    assert len(parse_manifest(data, limits).rows) == 2


# -------------------------------------------------------------------- URLs


@pytest.mark.parametrize(
    ("cell", "urls"),
    [
        ("", []),
        (" , ,", []),
        (URL_A, [URL_A]),
        (f"{URL_A},{URL_B}", [URL_A, URL_B]),
        (f" {URL_A} ,\t{URL_B} ,", [URL_A, URL_B]),
        (f"{URL_A}\n{URL_B}\r\n", [URL_A, URL_B]),
        (f"{URL_A},,{URL_B}", [URL_A, URL_B]),
    ],
)
def test_split_urls(cell: str, urls: list[str]) -> None:
    assert split_urls(cell) == urls


@pytest.mark.parametrize(
    "url",
    [
        "https://example.com/a.jpg",
        "HTTP://EXAMPLE.COM",
        "http://example.com:8080/a.jpg?w=1&h=2#frag",
        "https://user:pass@example.com/a.jpg",
        "https://sub.example.co.uk./x",
        "http://192.0.2.1/a.png",
        "http://[2001:db8::1]:443/a.png",
        "https://例え.jp/画像.jpg",
        "https://example.com/a%20b.jpg",
    ],
)
def test_check_url_accepts(url: str) -> None:
    assert check_url(url) is None


@pytest.mark.parametrize(
    ("url", "code"),
    [
        ("ftp://example.com/a.jpg", "bad-scheme"),
        ("file:///etc/passwd", "bad-scheme"),
        ("data:image/png;base64,AAAA", "bad-scheme"),
        ("javascript:alert(1)", "bad-scheme"),
        ("/a.jpg", "bad-url"),
        ("a.jpg", "bad-url"),
        ("example.com:8080/a.jpg", "bad-url"),
        ("https:example.com/a.jpg", "bad-url"),
        ("https:///a.jpg", "bad-url"),
        ("https://", "bad-url"),
        ("https://example.com:99999/", "bad-url"),
        ("https://example.com:0/", "bad-url"),
        ("https://example.com:/", "bad-url"),
        ("https://exa mple.com/", "bad-url"),
        ("https://example.com/a\tb", "bad-url"),
        ("https://example.com/\x00", "bad-url"),
        ("https://example.com\\@evil.com/", "bad-url"),
        ("https://a@b@example.com/", "bad-url"),
        ("https://exa<mple.com/", "bad-url"),
        ("https://example..com/", "bad-url"),
        ("http://[::zz]/", "bad-url"),
        ("http://[::1/", "bad-url"),
        ("http://[::1]x/", "bad-url"),
        ("http://[::1]:/", "bad-url"),
        ("http://[fe80::1%25eth0]/", "bad-url"),
        ("C:/photos/a.jpg", "bad-url"),
        ("C:\\photos\\a.jpg", "bad-url"),
        ("https://例<.jp/", "bad-url"),
        ("https://" + "a" * 64 + "例.jp/", "bad-url"),
    ],
)
def test_check_url_refuses(url: str, code: str) -> None:
    problem = check_url(url, row=4, column="Urls")
    assert problem is not None
    assert (problem.row, problem.column, problem.code) == (4, "Urls", code)
    assert problem.message.startswith("row 4: URL ")


def test_check_url_is_the_old_name_of_check_image_url() -> None:
    assert check_url is check_image_url


def test_check_url_length() -> None:
    assert check_url("https://example.com/abc", max_length=23) is None
    problem = check_url("https://example.com/abcd", max_length=23)
    assert problem is not None
    assert problem.code == "bad-url"
    assert "23" in problem.message


URL_CHARS = st.characters(codec="utf-8")


@settings(max_examples=300)
@given(st.one_of(
    st.text(URL_CHARS, max_size=40),
    st.builds("{}://{}{}".format,
              st.sampled_from(["http", "https", "HTTPS", "ftp"]),
              st.text(st.sampled_from("ab1.-_:@[]%例<"), max_size=12),
              st.text(st.sampled_from("/?#a%:@ \\"), max_size=6)),
))
def test_accepted_urls_are_absolute_http_urls_with_a_host(url: str) -> None:
    if check_url(url) is not None:
        return
    parts = urlsplit(url)
    assert parts.scheme in ("http", "https")
    assert parts.hostname
    assert parts.port is None or 0 < parts.port < 65536
    assert not any(char.isspace() or ord(char) < 32 for char in url)


@settings(max_examples=300)
@given(st.text(st.sampled_from("htps:/ab1.-_@[]%:?#例"), max_size=30))
def test_fast_path_never_accepts_what_the_slow_path_refuses(url: str) -> None:
    match = manifest_urls._FAST_URL.match(url)
    if match is not None and match.group("port") is None:
        assert manifest_urls._diagnose_url(url) is None


@settings(max_examples=500)
@given(st.lists(st.text(st.sampled_from("htps:/ab1.-_@[]%:?#例, \n"), max_size=24),
                min_size=1, max_size=4).map(",".join))
def test_fast_cell_path_agrees_with_the_url_by_url_path(cell: str) -> None:
    """A cell the whole-cell fast path accepts splits and validates the same way."""
    if manifest_urls._FAST_CELL.match(cell) is None:
        return
    urls = cell.split(",")
    assert split_urls(cell) == urls
    for url in urls:
        assert check_url(url) is None
        match = manifest_urls._FAST_URL.match(url)
        assert match is not None
        assert match.group("port") is None


def test_fast_cell_path_examples() -> None:
    fast = manifest_urls._FAST_CELL.match
    assert fast("https://a.example/1.jpg,http://b.example/x?y=1#z")
    assert fast("https://user:pw@a.example/1.jpg")
    for slow in ("https://a.example/1.jpg,", "https://a.example/1.jpg, https://b.example/",
                 "https://a.example:8080/1.jpg", "https://[::1]/x", "https://例.com/",
                 "ftp://a.example/", "https://a.example/a b", ""):
        assert fast(slow) is None, slow


# -------------------------------------------------------------- properties

HOSTS = st.lists(st.text("abcxyz019-", min_size=1, max_size=8).filter(
    lambda label: not label.startswith("-")), min_size=1, max_size=3).map(".".join)
PATHS = st.text("abcXYZ019._~%-/=&?", max_size=20)
URLS = st.builds("{}://{}{}/{}".format,
                 st.sampled_from(["http", "https"]),
                 HOSTS,
                 st.sampled_from(["", ":8080", ":443"]),
                 PATHS)
TEXT = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=15)
NON_BLANK = TEXT.filter(str.strip)


@st.composite
def valid_manifests(draw: st.DrawFn) -> tuple[list[str], list[list[str]], list[list[str]]]:
    """Header, rows of cells and the URLs of each row, for a valid manifest."""
    order = draw(st.permutations([0, 1, 2]))
    names = [draw(st.sampled_from(aliases)) for aliases in (
        ["S. No.", "Serial No", "#"], ["Product Name", "Name"], ["Input Image Urls", "URLs"])]
    header = [names[i] for i in order]
    serials = draw(st.lists(NON_BLANK, min_size=1, max_size=8, unique_by=str.strip))
    rows = []
    all_urls = []
    for serial in serials:
        urls = draw(st.lists(URLS, min_size=1, max_size=5))
        separator = draw(st.sampled_from([",", ", ", ",\n", " , "]))
        values = [serial, draw(NON_BLANK), separator.join(urls)]
        rows.append([values[i] for i in order])
        all_urls.append(urls)
    return header, rows, all_urls


def to_csv(header: Sequence[str], rows: Sequence[Sequence[str]], newline: str = "\r\n") -> str:
    out = io.StringIO()
    # csv.writer leaves a lone "\r" unquoted when the terminator is "\n",
    # which any reader takes for a line break: quote everything then.
    if newline == "\r\n":
        writer = csv.writer(out, lineterminator=newline)
    else:
        writer = csv.writer(out, lineterminator=newline, quoting=csv.QUOTE_ALL)
    writer.writerow(header)
    writer.writerows(rows)
    return out.getvalue()


@settings(max_examples=150)
@given(valid_manifests(), st.sampled_from(["\r\n", "\n"]), st.booleans())
def test_valid_manifests_round_trip(
    generated: tuple[list[str], list[list[str]], list[list[str]]], newline: str, bom: bool,
) -> None:
    header, rows, urls = generated
    data = ("\ufeff" if bom else "") + to_csv(header, rows, newline)
    manifest = parse_manifest(data.encode())
    assert manifest.header == tuple(header)
    assert manifest.rows == tuple(
        Row(index, index + 2, tuple(cells), tuple(row_urls))
        for index, (cells, row_urls) in enumerate(zip(rows, urls, strict=True))
    )


CSVISH = st.lists(st.sampled_from([
    b",", b'"', b"\r", b"\n", b"\r\n", b" ", b";", b"\t", b"\x00", b"\xef\xbb\xbf", b"\xc3\xa9",
    b"\xe2\x82", b"\xac", b"\xff", b"1", b"a", b"S. No.,Product Name,Input Image Urls\n",
    f"{URL_A}".encode(), b"ftp://x", b"\xe2\x80\xa8", b"\xc2\x85",
]), max_size=40).map(b"".join)
SMALL_LIMITS = st.builds(ManifestLimits, max_bytes=st.integers(1, 300),
                         max_rows=st.integers(1, 4), max_urls_per_row=st.integers(1, 3),
                         max_url_length=st.integers(1, 40), max_errors=st.integers(1, 4))


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.binary(max_size=300), CSVISH), st.one_of(st.just(DEFAULT), SMALL_LIMITS))
def test_arbitrary_bytes_never_crash(data: bytes, limits: ManifestLimits) -> None:
    result = outcome(data, limits)
    if isinstance(result, Manifest):
        assert result.rows
        assert all(len(row.cells) == len(result.header) for row in result.rows)
    else:
        assert result
        assert all(problem.code in PROBLEM_CODES for problem in result)
        assert len(result) <= max(limits.max_errors, 2)


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(
    valid_manifests().map(lambda g: to_csv(g[0], g[1]).encode()),
    CSVISH.map(lambda b: b"S. No.,Product Name,Input Image Urls\n" + b),
), st.data(), st.one_of(st.just(DEFAULT), SMALL_LIMITS))
def test_chunked_input_equals_whole_input(data: bytes, draw: st.DataObject,
                                          limits: ManifestLimits) -> None:
    cuts = draw.draw(st.lists(st.integers(0, len(data)), max_size=12))
    whole = outcome(data, limits)
    assert outcome(chunked(data, cuts), limits) == whole
    assert outcome(io.BytesIO(data), limits) == whole


# Cells for the "nothing is dropped or shifted" oracle: each URL cell with
# the problem codes it must produce.
URL_CELLS = {
    URL_A: [],
    f"{URL_A}, {URL_B}": [],
    "": ["no-urls"],
    " , ": ["no-urls"],
    "ftp://example.com/a.jpg": ["bad-scheme"],
    "not a url": ["bad-url"],
    f"{URL_A},b.jpg": ["bad-url"],
}
RECORDS = st.lists(st.one_of(
    st.tuples(st.sampled_from(["1", "2", " 3 ", "", " "]), st.sampled_from(["p", "", "é, \"q\""]),
              st.sampled_from(list(URL_CELLS))).map(list),
    st.lists(st.sampled_from(["", " ", "x", URL_A]), max_size=5),
), max_size=12)


def expected_outcome(records: list[list[str]]) -> tuple[list[Row], set[tuple[int | None, str]]]:
    """An independent, plain statement of the rules the parser must follow."""
    rows: list[Row] = []
    problems: set[tuple[int | None, str]] = set()
    first_row: dict[str, int] = {}
    for number, record in enumerate(records, start=2):
        if not "".join(record).strip():
            continue
        if len(record) > 3 and not "".join(record[3:]).strip():
            record = record[:3]
        if len(record) != 3:
            problems.add((number, "extra-cell" if len(record) > 3 else "missing-cell"))
            continue
        serial, name, cell = record
        before = len(problems)
        if not serial.strip():
            problems.add((number, "blank-serial"))
        elif first_row.setdefault(serial.strip(), number) != number:
            problems.add((number, "duplicate-serial"))
        if not name.strip():
            problems.add((number, "blank-product-name"))
        for code in URL_CELLS.get(cell, ["bad-url"] if "x" in cell else ["no-urls"]):
            problems.add((number, code))
        if len(problems) == before:
            rows.append(Row(len(rows), number, tuple(record), tuple(split_urls(cell))))
    if not rows and not problems:
        problems.add((None, "no-rows"))
    return rows, problems


@settings(max_examples=300)
@given(RECORDS)
def test_no_row_is_ever_dropped_or_shifted_silently(records: list[list[str]]) -> None:
    expected_rows, expected_problems = expected_outcome(records)
    result = outcome(to_csv(REQUIRED_COLUMNS, records).encode())
    if isinstance(result, Manifest):
        assert not expected_problems
        assert list(result.rows) == expected_rows
    else:
        assert {(p.row, p.code) for p in result} == expected_problems
