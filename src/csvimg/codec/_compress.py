"""`compress`: decode with Pillow, re-encode small and clean (see `csvimg.codec`).

The only module of `csvimg.codec` that imports Pillow; `csvimg.codec`
loads it on first use of `compress`, `Compressed` or `output_formats`.
"""

from __future__ import annotations

import functools
import io
import os
import struct
import tempfile
import zlib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import IO, Any

import attrs
from PIL import Image, features

from csvimg._errors import CodecError, ConfigError
from csvimg.codec._limits import CodecLimits
from csvimg.codec._sniff import _describe_non_image, sniff
from csvimg.jobs import ProcessOptions

try:
    from PIL import ImageCms

    _HAVE_CMS = True
except ImportError:  # Pillow built without littlecms: ICC profiles are only stripped
    _HAVE_CMS = False

__all__ = ["Compressed", "compress", "output_formats"]


@attrs.frozen
class Compressed:
    """One compressed image and what it came from.

    ``format`` / ``content_type`` / ``extension`` describe the output
    (``"JPEG"``, ``"image/jpeg"``, ``"jpg"``); ``width`` x ``height`` is the
    output size (after orientation and ``max_dimension``); ``source_*``
    describe the input as sniffed and declared by its header.
    """

    data: bytes = attrs.field(repr=False)
    format: str
    content_type: str
    extension: str
    width: int
    height: int
    source_format: str
    source_width: int
    source_height: int
    bytes_in: int
    bytes_out: int


# ------------------------------------------------------------ capabilities

# Sniffed kind -> the only Pillow decoders allowed to open it ("MPO" is how
# Pillow reports a JPEG with several images, e.g. from cameras).
_DECODERS: Mapping[str, tuple[str, ...]] = {
    "JPEG": ("JPEG", "MPO"),
    "PNG": ("PNG",),
    "GIF": ("GIF",),
    "WEBP": ("WEBP",),
    "BMP": ("BMP",),
    "TIFF": ("TIFF",),
    "AVIF": ("AVIF",),
}
# Kinds that need an optional Pillow feature.
_FEATURES: Mapping[str, str] = {"WEBP": "webp", "AVIF": "avif"}

_OUTPUTS: Mapping[str, tuple[str, str]] = {
    "JPEG": ("image/jpeg", "jpg"),
    "WEBP": ("image/webp", "webp"),
    "AVIF": ("image/avif", "avif"),
}
_ALIASES: Mapping[str, str] = {"JPG": "JPEG"}


@functools.cache
def _has_feature(name: str) -> bool:
    return bool(features.check(name))


def _available(kind: str) -> bool:
    feature = _FEATURES.get(kind)
    return feature is None or _has_feature(feature)


def output_formats() -> frozenset[str]:
    """Return the output formats this installation can write (JPEG always)."""
    return frozenset(fmt for fmt in _OUTPUTS if _available(fmt))


# ---------------------------------------------------------------- compress

# What Pillow's Python-level parsers are known to raise on malformed input
# (not only OSError: struct unpacking, indexing and dict lookups on hostile
# headers leak through). Only the header parse and load() are wrapped, so a
# bug in our own pixel handling is not disguised as a corrupt image.
_DECODE_ERRORS: tuple[type[Exception], ...] = (
    OSError,  # includes UnidentifiedImageError, "image file is truncated"
    SyntaxError,  # Pillow's "not a <format> file"
    ValueError,
    EOFError,
    IndexError,
    KeyError,
    TypeError,
    struct.error,
    zlib.error,
)

# EXIF Orientation -> the transpose that makes the pixels upright.
_ORIENTATION: Mapping[int, Image.Transpose] = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_EXIF_ORIENTATION = 0x0112

# The downscale filter. Bicubic is Pillow's thumbnail() default; measured on
# these machines, Lanczos costs ~40% more (2 MP -> 1024 px: 19.6 ms against
# 14.0 ms, more than the whole decode + encode of the image) for a difference
# hard to see at the factors left after draft() (below 2).
_RESAMPLE = Image.Resampling.BICUBIC
# Big reductions (PNG, or JPEG beyond draft's 1/8) first box-reduce by an
# integer factor to within this gap of the target, then apply the filter:
# Pillow's guidance for results indistinguishable from the filter alone.
_REDUCING_GAP = 3.0

_DEFAULT_LIMITS = CodecLimits()


def compress(
    data: bytes, options: ProcessOptions, limits: CodecLimits = _DEFAULT_LIMITS
) -> Compressed:
    """Decode *data* and re-encode it according to *options*.

    Synchronous and CPU-bound: call it from a worker thread (it releases
    the GIL for the heavy parts, so threads scale across cores). Raises
    `~csvimg.CodecError` (codes in the module docstring) or
    `~csvimg.ConfigError` for an invalid ``max_dimension``.
    """
    out_format = _ALIASES.get(options.format, options.format)
    if out_format not in _OUTPUTS:
        raise CodecError(
            "unsupported-format",
            f"cannot write {options.format!r}; known output formats: {', '.join(_OUTPUTS)}",
        )
    if not _available(out_format):
        raise CodecError(
            "unsupported-format", f"this installation's Pillow cannot write {out_format}"
        )
    max_dim = options.max_dimension
    if max_dim is not None and max_dim < 1:
        raise ConfigError(f"max_dimension must be a positive integer, not {max_dim!r}")
    if len(data) > limits.max_input_bytes:
        raise CodecError(
            "too-large", f"{len(data)} bytes is over the limit of {limits.max_input_bytes}"
        )

    kind = sniff(data)
    if kind is None:
        raise CodecError("not-an-image", _describe_non_image(data))
    decoders = _DECODERS.get(kind)
    if decoders is None or not _available(kind):
        raise CodecError("unsupported-format", f"{kind} images are not supported")

    with _open(data, kind, decoders, limits) as im:
        src_w, src_h = im.size
        try:
            target = _fit(im.size, max_dim)
            if target is not None and im.format in ("JPEG", "MPO"):
                # libjpeg decodes straight to 1/2, 1/4 or 1/8 scale, never
                # below the target: most of the downscale for free.
                im.draft(None, target)
            im.load()
            orientation = _orientation(im)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            # Some decoders recheck while loading (a GIF frame bigger than its screen).
            raise CodecError("too-many-pixels", f"{kind} image refused: {exc}") from exc
        except _DECODE_ERRORS as exc:
            raise CodecError("corrupt-image", f"cannot decode the {kind} data: {exc}") from exc
        try:
            out = _pixels_for_output(im, target, orientation, out_format)
            encoded = _encode(out, out_format, options.quality)
        except (OSError, ValueError) as exc:
            # Decoded pixels that still cannot be converted or encoded: the
            # source is malformed in a way the decoder let through.
            raise CodecError("corrupt-image", f"cannot convert the {kind} image: {exc}") from exc
        out_w, out_h = out.size

    content_type, extension = _OUTPUTS[out_format]
    return Compressed(
        data=encoded,
        format=out_format,
        content_type=content_type,
        extension=extension,
        width=out_w,
        height=out_h,
        source_format=kind,
        source_width=src_w,
        source_height=src_h,
        bytes_in=len(data),
        bytes_out=len(encoded),
    )


@contextmanager
def _open(
    data: bytes, kind: str, decoders: tuple[str, ...], limits: CodecLimits
) -> Iterator[Image.Image]:
    """Open *data* with only the decoders for *kind*; check its size; close it."""
    try:
        im = Image.open(io.BytesIO(data), formats=decoders)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Pillow's process-wide guard fired inside open (the warning only
        # arrives as an exception when warnings are errors).
        raise CodecError("too-many-pixels", f"{kind} image refused: {exc}") from exc
    except _DECODE_ERRORS as exc:
        raise CodecError("corrupt-image", f"cannot read the {kind} header: {exc}") from exc
    try:
        width, height = im.size
        # Image.open parsed the header only: nothing is decoded yet.
        if width * height > limits.max_pixels:
            raise CodecError(
                "too-many-pixels",
                f"{kind} image of {width}x{height} = {width * height} pixels "
                f"is over the limit of {limits.max_pixels}",
            )
        if width < 1 or height < 1:
            raise CodecError("corrupt-image", f"{kind} image declares size {width}x{height}")
        yield im
    finally:
        im.close()


def _fit(size: tuple[int, int], max_dim: int | None) -> tuple[int, int] | None:
    """Return the size capping the longer side at *max_dim*, or None to keep it."""
    width, height = size
    if max_dim is None or max(width, height) <= max_dim:
        return None  # never upscale
    if width >= height:
        return max_dim, max(1, round(height * max_dim / width))
    return max(1, round(width * max_dim / height)), max_dim


def _orientation(im: Image.Image) -> int:
    try:
        value = im.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # a broken EXIF block must not fail good pixels
        return 1
    return value if isinstance(value, int) and value in _ORIENTATION else 1


def _pixels_for_output(
    im: Image.Image, target: tuple[int, int] | None, orientation: int, out_format: str
) -> Image.Image:
    """Return upright, resized, flattened sRGB pixels ready for *out_format*.

    The order keeps the expensive steps on the fewest pixels: mode
    normalisation first (Lanczos needs it), then the resize, then alpha,
    colour management and rotation on the small image.
    """
    icc = im.info.get("icc_profile")
    im = _normalise_mode(im)
    if target is not None and im.size != target:
        im = im.resize(target, _RESAMPLE, reducing_gap=_REDUCING_GAP)
    im = _flatten(im)
    im = _to_srgb(im, icc if isinstance(icc, bytes) else None)
    if orientation in _ORIENTATION:
        im = im.transpose(_ORIENTATION[orientation])
    if im.mode != "RGB" and not (im.mode == "L" and out_format == "JPEG"):
        im = im.convert("RGB")
    return im


def _normalise_mode(im: Image.Image) -> Image.Image:
    """Return *im* in one of L, LA, RGB, RGBA or CMYK."""
    mode = im.mode
    has_key = "transparency" in im.info  # palette index or colour-key transparency
    if mode == "P":
        return im.convert("RGBA" if has_key else "RGB")
    if mode in ("RGB", "L") and has_key:
        return im.convert("RGBA" if mode == "RGB" else "LA")
    if mode in ("L", "LA", "RGB", "RGBA", "CMYK"):
        return im
    if mode == "1":
        return im.convert("L")
    if mode in ("PA", "RGBa", "La"):
        return im.convert("LA" if mode == "La" else "RGBA")
    if mode.startswith("I") or mode == "F":
        return _high_depth_to_l(im)
    return im.convert("RGB")  # RGBX, YCbCr, LAB, HSV ...


def _high_depth_to_l(im: Image.Image) -> Image.Image:
    """Scale 16/32-bit integer or float grayscale into 8 bits.

    A plain ``convert("L")`` clips at 255, turning a 16-bit image white.
    """
    if im.mode.startswith("I;16"):
        low, high = 0.0, 65535.0
    else:
        lo, hi = im.getextrema()
        assert isinstance(lo, int | float)
        assert isinstance(hi, int | float)
        low, high = float(lo), float(hi)
        if low >= 0 and high <= 255:
            low, high = 0.0, 255.0
        elif low >= 0 and high <= 65535 and im.mode != "F":
            low, high = 0.0, 65535.0
        elif low >= 0 and high <= 1.0:
            low, high = 0.0, 1.0  # float images are usually 0..1
    scale = 255.0 / (high - low) if high > low else 1.0
    offset = -low * scale
    mode32 = "F" if im.mode == "F" else "I"
    return im.convert(mode32).point(lambda v: v * scale + offset).convert("L")


def _flatten(im: Image.Image) -> Image.Image:
    """Composite RGBA / LA onto white; other modes pass through."""
    if im.mode not in ("RGBA", "LA"):
        return im
    background = Image.new(im.mode[:-1], im.size, 255 if im.mode == "LA" else (255, 255, 255))
    background.paste(im, mask=im.getchannel("A"))
    return background


def _to_srgb(im: Image.Image, icc: bytes | None) -> Image.Image:
    """Return RGB pixels in sRGB: apply a non-sRGB ICC profile, else convert plainly."""
    if im.mode not in ("RGB", "CMYK"):
        return im  # grayscale profiles are near enough to sRGB's tone curve
    transform = _srgb_transform(icc, im.mode) if icc and _HAVE_CMS else None
    if transform is not None:
        converted = ImageCms.applyTransform(im, transform)
        assert converted is not None
        return converted
    return im if im.mode == "RGB" else im.convert("RGB")


@functools.lru_cache(maxsize=32)
def _srgb_transform(icc: bytes, mode: str) -> ImageCms.ImageCmsTransform | None:
    """Return a cached *mode* -> sRGB transform for *icc*, None if not needed.

    Building a transform costs far more than applying it to a resized
    image, and a batch tends to share a few profiles (camera, Display P3).
    lcms2 transforms are safe to share between threads.
    """
    try:
        profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        space = profile.profile.xcolor_space.strip()
        if space != mode:
            return None  # the profile does not describe these pixels: ignore it
        if mode == "RGB" and ImageCms.getProfileDescription(profile).strip().lower().startswith(
            "srgb"
        ):
            return None  # already sRGB: skip the work
        return ImageCms.buildTransform(
            profile, _srgb_profile(), mode, "RGB", ImageCms.Intent.PERCEPTUAL
        )
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError):
        return None  # a broken profile is dropped, like every other metadata


@functools.cache
def _srgb_profile() -> ImageCms.ImageCmsProfile:
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))


def _encode(im: Image.Image, out_format: str, quality: int) -> bytes:
    """Encode *im* without any metadata and return the bytes."""
    # Savers fall back on im.info for some metadata (JPEG comment, AVIF ICC).
    im.info = {}
    params: dict[str, Any] = {"quality": quality}
    if out_format == "JPEG":
        # Huffman optimisation would cost a second pass for a few % of size;
        # progressive output costs more CPU to encode and decode.
        params.update(optimize=False, progressive=False)
    elif out_format == "WEBP":
        # Measured on a 2 MP photo: method 2 is 38 ms and no bigger than
        # Pillow's default 4 (115 ms); 0 is 22 ms but 5% bigger.
        params.update(method=2)
    elif out_format == "AVIF":
        # Pillow's default speed 6 is 350 ms for 2 MP; 8 is 85 ms for 1% more
        # bytes. One thread per image: the worker pool keeps the cores busy.
        params.update(speed=8, max_threads=1)
    with _scratch_file() as fp:
        im.save(fp, format=out_format, **params)
        fp.flush()
        fp.seek(0)
        return fp.read()


@contextmanager
def _scratch_file() -> Iterator[IO[bytes]]:
    """Yield an anonymous real file (memory-backed on Linux) for the encoder.

    Pillow encodes into a file descriptor with the GIL released; into
    `io.BytesIO` it holds the GIL for the whole encode. Where memfd is
    missing (not Linux, old kernel, seccomp), a temporary file is the
    fallback: slower to create, same GIL behaviour.
    """
    fp: IO[bytes]
    try:
        fp = open(os.memfd_create("csvimg-codec", os.MFD_CLOEXEC), "w+b")  # noqa: SIM115
    except (AttributeError, OSError):
        fp = tempfile.TemporaryFile()  # noqa: SIM115
    try:
        yield fp
    finally:
        fp.close()
