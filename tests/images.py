"""Real test images, generated in memory with Pillow.

Every function returns encoded bytes, is deterministic (same arguments,
same bytes) and fast enough to call per test; the bomb makers are cached.
Tests of the codec, the fetcher and the worker import them, so nothing
here depends on `csvimg`.

Layout conventions the tests rely on:

- `photo_jpeg` has a solid red square in the top-left corner of the
  *stored* pixels, so a test can tell how the image was rotated.
- `png_rgba` and `png_palette_transparent` are opaque on the left half and
  fully transparent on the right half (with black or green under the
  transparency, so "flattened onto white" is visible).
"""

from __future__ import annotations

import functools
import io
import random
import struct
import zlib

from PIL import Image, ImageDraw

__all__ = [
    "EXIF_MAKE",
    "MARKER_RGB",
    "encode",
    "gif_animated",
    "icc_swapped_red_green",
    "jpeg_cmyk",
    "jpeg_header_bomb",
    "photo",
    "photo_jpeg",
    "png_bomb",
    "png_gray16",
    "png_palette_transparent",
    "png_rgb16",
    "png_rgba",
]

MARKER_RGB = (255, 0, 0)
"""Colour of the orientation marker in the top-left corner of `photo`."""

EXIF_MAKE = "csvimg-test-camera"
"""The EXIF ``Make`` written by `photo_jpeg`; it must not survive compression."""


def photo(width: int, height: int, *, seed: int = 1) -> Image.Image:
    """Return an RGB image with the statistics of a photo, not of flat colour.

    Smooth gradients (sky, skin), shapes with hard edges (objects) and
    fine-grained noise (texture, sensor noise), so JPEG sizes are in the
    range of real photos. The top-left corner holds a solid `MARKER_RGB`
    square (a fifth of the shorter side) for orientation checks.
    """
    size = (width, height)
    # Gradients are made at 256x256 by Pillow and stretched: cheap at any size.
    r = Image.linear_gradient("L").resize(size, Image.Resampling.BILINEAR)
    g = Image.radial_gradient("L").resize(size, Image.Resampling.BILINEAR)
    b = Image.linear_gradient("L").rotate(90).resize(size, Image.Resampling.BILINEAR)
    im = Image.merge("RGB", (r, g, b))

    rng = random.Random(seed)
    draw = ImageDraw.Draw(im)
    for _ in range(12):
        x0, y0 = rng.randrange(width), rng.randrange(height)
        x1 = x0 + rng.randrange(1, max(2, width // 3))
        y1 = y0 + rng.randrange(1, max(2, height // 3))
        colour = (rng.randrange(256), rng.randrange(256), rng.randrange(256))
        if rng.random() < 0.5:
            draw.ellipse((x0, y0, x1, y1), fill=colour)
        else:
            draw.rectangle((x0, y0, x1, y1), fill=colour)

    # Texture: deterministic noise at half resolution, smoothed by the upscale,
    # blended in lightly; pure full-resolution noise would compress far worse
    # than any photo.
    nw, nh = max(1, width // 2), max(1, height // 2)
    noise = Image.frombytes("L", (nw, nh), rng.randbytes(nw * nh))
    noise = noise.resize(size, Image.Resampling.BILINEAR).convert("RGB")
    im = Image.blend(im, noise, 0.12)

    side = max(1, min(width, height) // 5)
    ImageDraw.Draw(im).rectangle((0, 0, side - 1, side - 1), fill=MARKER_RGB)
    return im


def photo_jpeg(
    width: int,
    height: int,
    quality: int = 90,
    progressive: bool = False,
    exif_orientation: int | None = None,
    *,
    metadata: bool = True,
    icc_profile: bytes | None = None,
) -> bytes:
    """Return a photo-like JPEG (see `photo`) of *width* x *height* stored pixels.

    With *metadata* (the default) it carries EXIF (``Make`` =
    `EXIF_MAKE`, plus the Orientation tag when *exif_orientation* is
    given), a JPEG comment and an XMP packet, all of which compression
    must strip. *icc_profile* embeds that ICC profile.
    """
    im = photo(width, height)
    params: dict[str, object] = {"quality": quality, "progressive": progressive}
    if metadata or exif_orientation is not None:
        exif = Image.Exif()
        if metadata:
            exif[0x010F] = EXIF_MAKE  # Make
        if exif_orientation is not None:
            exif[0x0112] = exif_orientation  # Orientation
        params["exif"] = exif
    if metadata:
        params["comment"] = b"csvimg test comment"
        params["xmp"] = (
            b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF '
            b'xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"/></x:xmpmeta>'
        )
    if icc_profile is not None:
        params["icc_profile"] = icc_profile
    return _save(im, "JPEG", **params)


def png_rgba(width: int, height: int) -> bytes:
    """Return an RGBA PNG: opaque blue left half, transparent right half.

    The transparent pixels are black with alpha 0, so a codec that drops
    alpha instead of flattening it onto white shows black there.
    """
    im = Image.new("RGBA", (width, height), (0, 0, 0, 0))
    ImageDraw.Draw(im).rectangle((0, 0, width // 2 - 1, height - 1), fill=(0, 0, 255, 255))
    return _save(im, "PNG")


def png_palette_transparent(width: int, height: int) -> bytes:
    """Return a palette (P) PNG with a tRNS chunk.

    Index 1 (opaque green) fills the left half, index 0 (green too, but
    fully transparent) the right half.
    """
    im = Image.new("P", (width, height), 0)
    im.putpalette([0, 255, 0, 0, 128, 0] + [0, 0, 0] * 254)
    ImageDraw.Draw(im).rectangle((0, 0, width // 2 - 1, height - 1), fill=1)
    return _save(im, "PNG", transparency=0)


def jpeg_cmyk(width: int, height: int, quality: int = 90) -> bytes:
    """Return a CMYK JPEG (Adobe style) of the `photo` pattern."""
    return _save(photo(width, height).convert("CMYK"), "JPEG", quality=quality)


def png_gray16(width: int, height: int) -> bytes:
    """Return a 16-bit grayscale PNG: a left-to-right ramp over 0..65535.

    Pillow opens it as mode ``I;16``; a codec that clips instead of
    scaling turns it almost all white.
    """
    ramp = Image.linear_gradient("L").rotate(90).resize((width, height))
    # x257 maps 0..255 onto 0..65535 exactly.
    im = ramp.convert("I").point(lambda v: v * 257).convert("I;16")
    return _save(im, "PNG")


def png_rgb16(width: int, height: int, rgb16: tuple[int, int, int] = (65535, 32896, 0)) -> bytes:
    """Return a 16-bit-per-channel RGB PNG of one solid colour (default orange).

    Pillow cannot write these, so the file is assembled by hand.
    """
    pixel = struct.pack(">HHH", *rgb16)
    raw = (b"\x00" + pixel * width) * height  # filter byte 0 per row
    ihdr = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(raw))
        + _png_chunk(b"IEND", b"")
    )


def gif_animated(width: int, height: int, frames: int = 3) -> bytes:
    """Return an animated GIF whose first frame is solid red, then green, blue..."""
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    ims = [Image.new("RGB", (width, height), colours[i % 3]) for i in range(frames)]
    return _save(ims[0], "GIF", save_all=True, append_images=ims[1:], duration=100, loop=0)


@functools.lru_cache(maxsize=8)
def png_bomb(width: int, height: int) -> bytes:
    """Return a small, valid PNG that declares *width* x *height* pixels.

    1-bit grayscale zeros, deflated with the RLE strategy: 30000x30000
    (900 MP, 112 MB raw) is about 110 kB and takes ~0.15 s to make
    (cached). Decoding it would cost the full raw size in memory.
    """
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    comp = zlib.compressobj(9, zlib.DEFLATED, 15, 9, zlib.Z_RLE)
    parts = []
    for y in range(0, height, 256):
        parts.append(comp.compress(row * min(256, height - y)))
    parts.append(comp.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", b"".join(parts))
        + _png_chunk(b"IEND", b"")
    )


@functools.lru_cache(maxsize=8)
def jpeg_header_bomb(width: int, height: int) -> bytes:
    """Return a tiny progressive JPEG whose SOF declares *width* x *height*.

    A real 16x16 JPEG with its frame header patched: the scan data does not
    match, so decoding would fail late, after allocating the full frame.
    Both sizes must fit in 16 bits (JPEG's own limit).
    """
    data = bytearray(_save(photo(16, 16), "JPEG", quality=75, progressive=True))
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            raise ValueError("malformed JPEG from Pillow")
        marker = data[i + 1]
        (length,) = struct.unpack(">H", data[i + 2 : i + 4])
        if marker in (0xC0, 0xC1, 0xC2):  # SOF0/1/2: precision, height, width
            struct.pack_into(">HH", data, i + 5, height, width)
            return bytes(data)
        i += 2 + length
    raise ValueError("no SOF marker found")


def icc_swapped_red_green() -> bytes:
    """Return an RGB ICC profile whose red and green primaries are sRGB's swapped.

    A minimal ICC v2 matrix/TRC display profile (gamma 2.2) built by hand,
    since Pillow can only create sRGB, LAB and XYZ profiles. A pixel that
    is pure red in this space is pure green in sRGB, so a test can see
    whether a codec applied the profile or ignored it.
    """
    # sRGB colorants adapted to D50, as in the usual sRGB profiles.
    red, green, blue = (0.4361, 0.2225, 0.0139), (0.3851, 0.7169, 0.0971), (0.1431, 0.0606, 0.7141)
    d50 = (0.9642, 1.0, 0.8249)

    def xyz(v: tuple[float, float, float]) -> bytes:
        return b"XYZ \0\0\0\0" + b"".join(struct.pack(">i", round(c * 65536)) for c in v)

    text = b"csvimg swapped red/green\0"
    desc = (
        b"desc\0\0\0\0" + struct.pack(">I", len(text)) + text
        + struct.pack(">IIHB", 0, 0, 0, 0) + b"\0" * 67
    )
    curve = b"curv\0\0\0\0" + struct.pack(">IH", 1, 0x0233) + b"\0\0"  # u8Fixed8 2.2
    tags = [
        (b"desc", desc),
        (b"wtpt", xyz(d50)),
        (b"rXYZ", xyz(green)),  # the swap
        (b"gXYZ", xyz(red)),
        (b"bXYZ", xyz(blue)),
        (b"rTRC", curve),
        (b"gTRC", curve),
        (b"bTRC", curve),
    ]
    offset = 128 + 4 + 12 * len(tags)
    table, body = b"", b""
    for sig, data in tags:
        data += b"\0" * (-len(data) % 4)
        table += sig + struct.pack(">II", offset + len(body), len(data))
        body += data
    size = offset + len(body)
    header = (
        struct.pack(">I", size) + b"\0" * 4 + struct.pack(">I", 0x02100000)
        + b"mntrRGB XYZ " + b"\0" * 12 + b"acsp" + b"\0" * 24
        + struct.pack(">I", 0)  # rendering intent
        + b"".join(struct.pack(">i", round(c * 65536)) for c in d50)
    )
    header += b"\0" * (128 - len(header))
    return header + struct.pack(">I", len(tags)) + table + body


def encode(im: Image.Image, fmt: str, **params: object) -> bytes:
    """Return *im* encoded as *fmt* with Pillow's *params* (for ad-hoc images)."""
    return _save(im, fmt, **params)


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    crc = zlib.crc32(kind + body) & 0xFFFFFFFF
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)


def _save(im: Image.Image, fmt: str, **params: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **params)
    return buf.getvalue()
