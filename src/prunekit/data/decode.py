"""Decode one image file to a uint8 (C, H, W) array with Pillow.

>>> import io; from PIL import Image
>>> buf = io.BytesIO(); Image.new("RGB", (5, 3), (255, 0, 0)).save(buf, "PNG")
>>> decode_image(buf.getvalue(), "RGB", None).shape
(3, 3, 5)
"""
from __future__ import annotations

import io
import struct

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
# Pillow modes that hold one grey channel; everything else is decoded as RGB.
_GREY_MODES = ("1", "L", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")
# Pillow's ways to fail on a file that is not a readable image (UnidentifiedImageError is an OSError);
# a damaged header can also surface from a decoder as a TypeError, struct.error, EOFError or lookup error.
PILLOW_ERRORS = (OSError, ValueError, SyntaxError, TypeError, EOFError, struct.error, IndexError, KeyError,
                 Image.DecompressionBombError)


def is_image_name(name: str) -> bool:
    """True for an image file name (by extension), false for hidden files like macOS '._x.jpg'."""
    base = name.rsplit("/", 1)[-1]
    return not base.startswith(".") and base.lower().endswith(IMAGE_EXTENSIONS)


def probe_image(data: bytes | str) -> tuple[str, tuple[int, int]]:
    """(mode "L" or "RGB", (height, width)) from the header only, without decoding pixels; `data`
    is the file's bytes or its path (then only the header is read from disk)."""
    with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as img:
        mode = "L" if img.mode in _GREY_MODES else "RGB"
        return mode, (img.height, img.width)


def decode_image(data: bytes, mode: str, size: tuple[int, int] | None) -> np.ndarray:
    """Decode to uint8 (C, H, W) in `mode` ("L" or "RGB"), resized (bilinear) to `size` if given."""
    with Image.open(io.BytesIO(data)) as img:
        img = _eight_bit(img).convert(mode)
        if size is not None and (img.height, img.width) != tuple(size):
            img = img.resize((size[1], size[0]), Image.BILINEAR)
        array = np.asarray(img, dtype=np.uint8)
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def _eight_bit(img: Image.Image) -> Image.Image:
    """16-bit grey (PNG, TIFF) scaled to 0..255 by its high byte; Pillow's own convert clips it
    at 255, which turns all but the darkest pixels white. Older Pillows open 16-bit PNGs as "I"."""
    if img.mode.startswith("I;16") or (img.mode == "I" and img.format == "PNG"):
        return Image.fromarray((np.asarray(img).astype(np.int64) >> 8).clip(0, 255).astype(np.uint8))
    return img
