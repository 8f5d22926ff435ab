"""The image codec: decode anything reasonable, re-encode it small and clean.

`compress` takes the downloaded bytes of one image and returns a
`Compressed` value (JPEG by default, WebP or AVIF on request), or raises
`~csvimg.CodecError` with a stable ``code``:

====================== =====================================================
``not-an-image``       the magic bytes are not an image's (HTML, text, empty)
``unsupported-format`` an image kind we refuse (HEIF, SVG, PSD ...) or an
                       output format this Pillow cannot write
``too-large``          more input bytes than `CodecLimits.max_input_bytes`
``too-many-pixels``    width x height from the header over
                       `CodecLimits.max_pixels` (decompression bomb)
``corrupt-image``      the data looked like an image but did not decode
====================== =====================================================

None of them is retryable: the same bytes fail the same way.

What the output always is: EXIF orientation applied, every piece of
metadata dropped (EXIF, XMP, comments, ICC; a non-sRGB ICC profile is
first applied, converting the pixels to sRGB), transparency flattened
onto white, the first frame of an animation, 8-bit RGB, or 8-bit
grayscale (``L``) when the source is grayscale and the output is JPEG
(one plane instead of three: less work and smaller files, same look).

Safety: `sniff` decides from the magic bytes which Pillow decoder may
look at the data at all (no guessing among Pillow's ~40 formats), and the
size from the header is checked before any pixel is decoded. Pillow's own
bomb guard (`PIL.Image.MAX_IMAGE_PIXELS`, 89 MP warning / 179 MP error,
process-wide) still applies on top of ours; its error, and its warning
when warnings are turned into errors, become ``too-many-pixels``. This
module changes no global Pillow or warnings state.

Speed (see DESIGN.md, "Where the time goes"): for a 2 MP JPEG the work
is libjpeg-turbo decode + encode, and both run without the GIL here, so
`compress` scales across threads:

- the pixels are decoded with an explicit ``load()`` (saving an unloaded
  image makes Pillow take an extra full copy);
- with ``max_dimension``, JPEG input is decoded at 1/2, 1/4 or 1/8 scale
  by libjpeg (``Image.draft``), then finished with a bicubic resize;
- the output is encoded into an in-memory *file* (``memfd_create``),
  because Pillow keeps the GIL while encoding into `io.BytesIO` but
  releases it for the whole encode into a real file descriptor.

Deployment note: Pillow reads the ``PILLOW_BLOCKS_MAX`` environment
variable (and ``PILLOW_BLOCK_SIZE``) once, when ``PIL.Image`` is first
imported, so this module cannot set it reliably. Setting e.g.
``PILLOW_BLOCKS_MAX=16`` in the worker's environment lets Pillow reuse
freed image memory blocks instead of mapping fresh memory per image,
which makes large images about a quarter faster.

The package holds `_limits` (`CodecLimits`), `_sniff` (`sniff`) and
`_compress` (`compress`, `Compressed`, `output_formats`). Only `_compress`
imports Pillow, and only when one of its names is first asked for.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from csvimg._util import lazy_exports
from csvimg.codec._limits import CodecLimits
from csvimg.codec._sniff import sniff

if TYPE_CHECKING:
    from csvimg.codec._compress import Compressed, compress, output_formats

__all__ = [
    "CodecLimits",
    "Compressed",
    "compress",
    "output_formats",
    "sniff",
]

# Loaded on first use: csvimg.codec._compress imports Pillow.
# Hidden from type checkers, which see the imports above and so still
# report a misspelt name.
if not TYPE_CHECKING:
    __getattr__ = lazy_exports(
        globals(),
        {
            "Compressed": "csvimg.codec._compress",
            "compress": "csvimg.codec._compress",
            "output_formats": "csvimg.codec._compress",
        },
    )
