"""Image kinds from magic bytes: `sniff`, which needs no Pillow."""

from __future__ import annotations

import struct

__all__ = ["sniff"]

_BMP_HEADER_SIZES = frozenset({12, 16, 40, 52, 56, 64, 108, 124})
_AVIF_BRANDS = frozenset({b"avif", b"avis"})
_HEIF_BRANDS = frozenset({b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1"})


def sniff(data: bytes) -> str | None:
    """Return the kind of image *data* starts with, or None if it is not one.

    Judged from magic bytes only, so the first 64 bytes of a download are
    enough (fewer may miss BMP and the ISO-BMFF kinds). Kinds `compress`
    decodes: ``JPEG``, ``PNG``, ``GIF``, ``WEBP``, ``BMP``, ``TIFF``,
    ``AVIF``. Recognised but refused (``unsupported-format``): ``HEIF``,
    ``JPEG2000``, ``JXL``, ``PSD``, ``SVG``.
    """
    head = bytes(data[:512])
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "TIFF"
    # "BM" alone is too weak (any text may start so): require a known DIB header size.
    if head[:2] == b"BM" and int.from_bytes(head[14:18], "little") in _BMP_HEADER_SIZES:
        return "BMP"
    if head[4:8] == b"ftyp":
        return _sniff_ftyp(head)
    if head.startswith(b"\x00\x00\x00\x0cjP  \r\n\x87\n") or head.startswith(b"\xff\x4f\xff\x51"):
        return "JPEG2000"
    if head.startswith((b"\xff\x0a", b"\x00\x00\x00\x0cJXL \r\n\x87\n")):
        return "JXL"
    if head.startswith(b"8BPS"):
        return "PSD"
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if text.startswith((b"<svg", b"<?xml", b"<!--")) and b"<svg" in text:
        return "SVG"
    return None


def _sniff_ftyp(head: bytes) -> str | None:
    # ISO-BMFF: [size][ftyp][major brand][minor version][compatible brands...]
    (box_size,) = struct.unpack(">I", head[:4])
    end = min(len(head), box_size) if box_size >= 16 else min(len(head), 16)
    brands = {head[8:12]} | {head[i : i + 4] for i in range(16, end - 3, 4)}
    if brands & _AVIF_BRANDS:
        return "AVIF"
    if brands & _HEIF_BRANDS:
        return "HEIF"
    return None  # MP4, MOV, 3GP ...: video, not an image


def _describe_non_image(data: bytes) -> str:
    if not data:
        return "the response was empty"
    head = bytes(data[:256]).lstrip().lower()
    if head.startswith((b"<!doctype html", b"<html")) or b"<html" in head:
        return "the response is an HTML page, not an image"
    if head.startswith((b"{", b"[")):
        return "the response looks like JSON, not an image"
    return f"unrecognised data starting with {bytes(data[:8])!r}"
