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

# The code lives in private submodules, one per concern: _limits
# (ManifestLimits), _problems (Problem, PROBLEM_CODES), _header (required
# columns, their spellings, delimiter detection), _urls (split_urls,
# check_image_url), _input (byte chunks and lines), _manifest (Manifest and
# its compact rows) and _parse (the parser, parse_manifest). Import the
# public names from here.
from csvimg.manifest._header import REQUIRED_COLUMNS
from csvimg.manifest._limits import ManifestLimits
from csvimg.manifest._manifest import Manifest
from csvimg.manifest._parse import parse_manifest
from csvimg.manifest._problems import PROBLEM_CODES, Problem
from csvimg.manifest._urls import check_image_url, check_url, split_urls

__all__ = [
    "PROBLEM_CODES",
    "REQUIRED_COLUMNS",
    "Manifest",
    "ManifestLimits",
    "Problem",
    "check_image_url",
    "check_url",
    "parse_manifest",
    "split_urls",
]
