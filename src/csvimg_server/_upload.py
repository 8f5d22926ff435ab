"""Streaming ``multipart/form-data`` reading for the upload endpoint.

Starlette's ``request.form()`` would do, but it only learns a body is too
large after reading it; here every chunk is counted as it arrives, so an
oversized upload is refused at once (with or without ``Content-Length``)
and the file part is spooled to a temporary file (memory up to 1 MiB, then
disk), never held whole in memory.
"""

from __future__ import annotations

import tempfile
from collections.abc import AsyncIterator, Collection
from typing import IO, Final

import attrs
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

__all__ = [
    "DRAIN_BYTES",
    "FIELD_LIMIT",
    "OVERHEAD",
    "SPOOL_BYTES",
    "BadUpload",
    "TooLarge",
    "Upload",
    "check_declared_length",
    "read_upload",
]

SPOOL_BYTES: Final = 1024 * 1024
"""The file part stays in memory up to this size, then moves to a temp file."""

OVERHEAD: Final = 64 * 1024
"""Bytes allowed beyond the file limit for boundaries, part headers and fields."""

FIELD_LIMIT: Final = 8 * 1024
"""The largest value accepted in a non-file form field."""


class BadUpload(ValueError):
    """The request body is not an acceptable form (answer 400)."""


DRAIN_BYTES: Final = 16 * 1024 * 1024
"""A refused body declared at most this large is drained after the 413 (uvicorn
reads and drops the rest), so the client, still sending, reads the answer
rather than a reset connection; one declared larger gets ``Connection: close``."""


class TooLarge(ValueError):
    """The request body or the file in it is over the limit (answer 413).

    ``close`` says the connection should be closed rather than drained.
    """

    def __init__(self, limit: int, *, close: bool = False) -> None:
        self.limit = limit
        self.close = close
        super().__init__(f"the upload is larger than the limit of {limit} bytes")


@attrs.define
class Upload:
    """A parsed upload form: the spooled file part and the other fields."""

    file: IO[bytes] | None = None
    filename: str | None = None
    file_bytes: int = 0
    fields: dict[str, str] = attrs.field(factory=dict)

    def close(self) -> None:
        """Discard the spooled file."""
        if self.file is not None:
            self.file.close()


def boundary_of(content_type: str) -> bytes:
    """Return the multipart boundary of a ``Content-Type``; `BadUpload` if none."""
    kind, params = parse_options_header(content_type)
    if kind != b"multipart/form-data":
        raise BadUpload(
            "expected a multipart/form-data body with the CSV in the 'file' field "
            "(e.g. curl -F file=@products.csv)"
        )
    boundary = params.get(b"boundary")
    if not boundary:
        raise BadUpload("the multipart/form-data Content-Type has no boundary")
    return boundary


def check_declared_length(value: str | None, limit: int) -> None:
    """Refuse a body whose ``Content-Length`` already says it is too large."""
    if value is None:
        return
    try:
        declared = int(value)
    except ValueError:
        raise BadUpload(f"invalid Content-Length {value!r}") from None
    if declared > limit + OVERHEAD:
        raise TooLarge(limit, close=declared > DRAIN_BYTES)


@attrs.define
class _FormState:
    """Callback state of one multipart parse."""

    max_file_bytes: int
    allowed: Collection[str]
    upload: Upload = attrs.field(factory=Upload)
    header_field: bytearray = attrs.field(factory=bytearray)
    header_value: bytearray = attrs.field(factory=bytearray)
    headers: dict[str, str] = attrs.field(factory=dict)
    name: str | None = None
    value: bytearray = attrs.field(factory=bytearray)
    in_file: bool = False
    ended: bool = False

    # python-multipart calls these synchronously from `parser.write`; an
    # exception raised here propagates out of `write`, which is how a part
    # that grows past its limit stops the parse at once.

    def on_part_begin(self) -> None:
        self.headers.clear()
        self.name = None
        self.value.clear()
        self.in_file = False

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self.header_field += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self.header_value += data[start:end]

    def on_header_end(self) -> None:
        name = self.header_field.decode("latin-1").strip().lower()
        self.headers[name] = self.header_value.decode("latin-1").strip()
        self.header_field.clear()
        self.header_value.clear()

    def on_headers_finished(self) -> None:
        disposition = self.headers.get("content-disposition")
        if disposition is None:
            raise BadUpload("a form part has no Content-Disposition header")
        kind, params = parse_options_header(disposition)
        raw_name = params.get(b"name")
        if kind != b"form-data" or raw_name is None:
            raise BadUpload("a form part has no field name")
        name = raw_name.decode("utf-8", "replace")
        if name not in self.allowed:
            raise BadUpload(
                f"unknown form field {name!r}; expected {', '.join(sorted(self.allowed))}"
            )
        if name == "file":
            if self.upload.file is not None:
                raise BadUpload("more than one 'file' field")
            self.in_file = True
            self.upload.file = tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES)  # noqa: SIM115
            raw_filename = params.get(b"filename")
            if raw_filename:
                self.upload.filename = raw_filename.decode("utf-8", "replace")
        elif name in self.upload.fields:
            raise BadUpload(f"the form field {name!r} is given more than once")
        self.name = name

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self.in_file:
            assert self.upload.file is not None
            self.upload.file_bytes += end - start
            if self.upload.file_bytes > self.max_file_bytes:
                raise TooLarge(self.max_file_bytes)
            self.upload.file.write(data[start:end])
        else:
            self.value += data[start:end]
            if len(self.value) > FIELD_LIMIT:
                raise BadUpload(f"the form field {self.name!r} is longer than {FIELD_LIMIT} bytes")

    def on_part_end(self) -> None:
        if self.in_file or self.name is None:
            return
        try:
            self.upload.fields[self.name] = bytes(self.value).decode("utf-8")
        except UnicodeDecodeError:
            raise BadUpload(f"the form field {self.name!r} is not UTF-8 text") from None

    def on_end(self) -> None:
        self.ended = True


async def read_upload(
    chunks: AsyncIterator[bytes],
    content_type: str,
    *,
    max_file_bytes: int,
    allowed: Collection[str],
) -> Upload:
    """Parse a multipart body from *chunks*, counting bytes as they arrive.

    Raises `TooLarge` as soon as the body passes ``max_file_bytes`` plus
    `OVERHEAD`, or the file part passes ``max_file_bytes``; `BadUpload` for
    anything that is not a well-formed form of the *allowed* fields. On
    success the file (if any) is rewound; the caller must `Upload.close` it.
    """
    boundary = boundary_of(content_type)
    state = _FormState(max_file_bytes=max_file_bytes, allowed=allowed)
    try:
        parser = MultipartParser(
            boundary,
            {
                "on_part_begin": state.on_part_begin,
                "on_part_data": state.on_part_data,
                "on_part_end": state.on_part_end,
                "on_header_field": state.on_header_field,
                "on_header_value": state.on_header_value,
                "on_header_end": state.on_header_end,
                "on_headers_finished": state.on_headers_finished,
                "on_end": state.on_end,
            },
        )
    except FormParserError as exc:
        raise BadUpload(f"invalid multipart boundary: {exc}") from None
    limit = max_file_bytes + OVERHEAD
    received = 0
    try:
        async for chunk in chunks:
            received += len(chunk)
            if received > limit:
                raise TooLarge(max_file_bytes)
            if chunk:
                parser.write(chunk)
        parser.finalize()
        if not state.ended:
            raise BadUpload("the multipart body ended before its closing boundary")
    except FormParserError as exc:
        state.upload.close()
        raise BadUpload(f"malformed multipart body: {exc}") from None
    except BaseException:
        state.upload.close()
        raise
    if state.upload.file is not None:
        state.upload.file.seek(0)
    return state.upload
