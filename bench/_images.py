"""Test images made from real photographs, generated at bench time.

The photos are the colour photographs shipped inside scikit-image
(``skimage.data``: astronaut, coffee, chelsea, rocket, motorcycle, ...).
Each test image is a grid of tiles, each tile one of those photos, flipped
at random, scaled to cover its cell (at most about 1.6x, so the detail stays
photographic) and cropped; then a little sensor-like noise is added and the
image is saved as a phone would: JPEG quality 90, 4:2:0. A few PNGs (RGB,
and RGBA with transparency) come from the same tiles.

Generated once into ``bench/_work/images/`` (reused while the recipe
version matches), never committed. Also made here: two decompression bombs
(a valid 100 MP PNG of ~100 kB, and a JPEG whose header declares
60000 x 60000 pixels).
"""

from __future__ import annotations

import importlib
import json
import random
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
from PIL import Image, ImageChops

__all__ = ["SIZES", "ImageSet", "make_images", "make_jpeg_header_bomb", "make_png_bomb"]

RECIPE = 4
"""Bumped when the images change, so an old ``_work`` folder is regenerated."""

# Name -> (width, height). 0.3 MP: a thumbnail-ish upload; 2 MP: a web photo;
# 12 MP: a phone camera (4:3).
SIZES: dict[str, tuple[int, int]] = {
    "0.3MP": (640, 480),
    "2MP": (1632, 1224),
    "12MP": (4000, 3000),
}

_PHOTOS = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "immunohistochemistry",
    "motorcycle_left",  # via stereo_motorcycle
    "hubble_deep_field",
    "retina",
)


@attrs.frozen
class ImageSet:
    """Files of one kind: ``name`` like ``2MP-jpeg``; paths relative to the image root."""

    name: str
    size: str
    fmt: str
    paths: tuple[str, ...]
    width: int
    height: int
    mean_bytes: int

    @property
    def megapixels(self) -> float:
        return self.width * self.height / 1e6


def _skimage_photos() -> list[Image.Image]:
    data: Any = importlib.import_module("skimage.data")
    photos: list[Image.Image] = []
    for name in _PHOTOS:
        if name == "motorcycle_left":
            left, right, _ = data.stereo_motorcycle()
            photos.append(Image.fromarray(left))
            photos.append(Image.fromarray(right))
            continue
        photos.append(Image.fromarray(getattr(data, name)()).convert("RGB"))
    return photos


def _cover(photo: Image.Image, size: tuple[int, int], rng: random.Random) -> Image.Image:
    """Scale *photo* to cover *size* and crop a random window of that size."""
    w, h = size
    scale = max(w / photo.width, h / photo.height)
    if scale > 1.6:  # beyond this, upscaling would smooth the detail away: tile more
        scale = 1.6
    tw, th = max(w, round(photo.width * scale)), max(h, round(photo.height * scale))
    scaled = photo.resize((tw, th), Image.Resampling.LANCZOS)
    x = rng.randint(0, tw - w)
    y = rng.randint(0, th - h)
    return scaled.crop((x, y, x + w, y + h))


def compose(width: int, height: int, photos: Sequence[Image.Image], seed: int) -> Image.Image:
    """A *width* x *height* photo mosaic: cells of about 700 x 525 pixels."""
    rng = random.Random(seed)
    cols = max(1, round(width / 700))
    rows = max(1, round(height / 525))
    canvas = Image.new("RGB", (width, height))
    xs = [round(i * width / cols) for i in range(cols + 1)]
    ys = [round(j * height / rows) for j in range(rows + 1)]
    for j in range(rows):
        for i in range(cols):
            photo = photos[rng.randrange(len(photos))]
            if rng.random() < 0.5:
                photo = photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            cell = (xs[i + 1] - xs[i], ys[j + 1] - ys[j])
            canvas.paste(_cover(photo, cell, rng), (xs[i], ys[j]))
    # Sensor-like noise: real phone photos are never as clean as scaled ones.
    noise = Image.effect_noise((width, height), 3)  # gaussian, centred on 128
    return Image.merge("RGB", [ImageChops.add(c, noise, 1.0, -128) for c in canvas.split()])


def make_images(
    root: Path, *, per_size: int = 6, sizes: Sequence[str] = tuple(SIZES)
) -> dict[str, ImageSet]:
    """Generate (or reuse) the test images under *root*; return the sets by name.

    Sets: ``<size>-jpeg`` for every size in *sizes* (*per_size* files each),
    ``0.3MP-png`` and ``2MP-png`` (RGB, 2 files) and ``0.3MP-png-rgba`` (1 file,
    half transparent).
    """
    root.mkdir(parents=True, exist_ok=True)
    index_path = root / "index.json"
    key = {"recipe": RECIPE, "per_size": per_size}
    sets: dict[str, ImageSet] = {}
    if index_path.exists():
        saved = json.loads(index_path.read_text())
        if saved.get("key") == key:
            sets = {
                k: ImageSet(**{**v, "paths": tuple(v["paths"])})
                for k, v in saved["sets"].items()
                if all((root / p).exists() for p in v["paths"])
            }
    missing = [size for size in sizes if f"{size}-jpeg" not in sets]
    photos = _skimage_photos() if missing else []
    for size in missing:
        sets.update(_make_size(root, size, per_size, photos))
    if "bombs" not in sets:
        bombs = root / "bombs"
        bombs.mkdir(exist_ok=True)
        (bombs / "bomb-100mp.png").write_bytes(make_png_bomb(10_000, 10_000))
        (bombs / "bomb-header.jpg").write_bytes(make_jpeg_header_bomb(60_000, 60_000))
        sets["bombs"] = _set(
            root, "bombs", "bomb", "mixed", ["bombs/bomb-100mp.png", "bombs/bomb-header.jpg"], 0, 0
        )
    index_path.write_text(
        json.dumps({"key": key, "sets": {k: attrs.asdict(v) for k, v in sets.items()}}, indent=1)
    )
    return sets


def _make_size(
    root: Path, size: str, per_size: int, photos: Sequence[Image.Image]
) -> dict[str, ImageSet]:
    w, h = SIZES[size]
    jpegs: list[str] = []
    pngs: list[str] = []
    sets: dict[str, ImageSet] = {}
    (root / size).mkdir(parents=True, exist_ok=True)
    for n in range(per_size):
        im = compose(w, h, photos, seed=1000 * RECIPE + 17 * n + w)
        rel = f"{size}/photo-{n:02d}.jpg"
        im.save(root / rel, "JPEG", quality=90, subsampling="4:2:0")
        jpegs.append(rel)
        if size in ("0.3MP", "2MP") and n < 2:
            rel_png = f"{size}/photo-{n:02d}.png"
            im.save(root / rel_png, "PNG", compress_level=6)
            pngs.append(rel_png)
        if size == "0.3MP" and n == 0:
            rgba = im.convert("RGBA")
            alpha = Image.new("L", im.size, 255)
            alpha.paste(0, (w // 2, 0, w, h))
            rgba.putalpha(alpha)
            rgba.save(root / f"{size}/photo-rgba.png", "PNG")
    sets[f"{size}-jpeg"] = _set(root, f"{size}-jpeg", size, "JPEG", jpegs, w, h)
    if pngs:
        sets[f"{size}-png"] = _set(root, f"{size}-png", size, "PNG", pngs, w, h)
    if size == "0.3MP":
        sets["0.3MP-png-rgba"] = _set(
            root, "0.3MP-png-rgba", size, "PNG", [f"{size}/photo-rgba.png"], w, h
        )
    return sets


def _set(
    root: Path, name: str, size: str, fmt: str, paths: Sequence[str], w: int, h: int
) -> ImageSet:
    total = sum((root / p).stat().st_size for p in paths)
    return ImageSet(
        name=name,
        size=size,
        fmt=fmt,
        paths=tuple(paths),
        width=w,
        height=h,
        mean_bytes=total // max(1, len(paths)),
    )


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data))
        + kind
        + data
        + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


def make_png_bomb(width: int, height: int) -> bytes:
    """A valid grayscale PNG of *width* x *height* black pixels (compresses ~1000:1)."""
    comp = zlib.compressobj(9)
    row = b"\x00" * (width + 1)  # filter byte + pixels
    parts = [comp.compress(row) for _ in range(height)]
    parts.append(comp.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", b"".join(parts))
        + _png_chunk(b"IEND", b"")
    )


def make_jpeg_header_bomb(width: int, height: int) -> bytes:
    """A small real JPEG whose SOF header is rewritten to declare *width* x *height*."""
    import io

    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (90, 120, 200)).save(buf, "JPEG", quality=90)
    data = bytearray(buf.getvalue())
    i = 2
    while i < len(data):
        marker = data[i + 1]
        length = struct.unpack(">H", data[i + 2 : i + 4])[0]
        if marker in (0xC0, 0xC1, 0xC2):
            struct.pack_into(">HH", data, i + 5, height, width)
            break
        i += 2 + length
    return bytes(data)
