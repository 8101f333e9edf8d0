"""What counts as an image in a shard: the extensions (`IMAGE_EXTS`), `check_image` (decodes, or
raises with the reason) for writers, `decode_image` (to RGB) for readers, and `Rejected` (a file
left out, and why).
"""
from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm")


@dataclass(frozen=True)
class Rejected:
    path: str
    reason: str


_DECODE_ERRORS = (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError)


# Pillow's format names -> the extension a shard stores the bytes under (MPO: a JPEG with extra frames)
_FORMAT_EXTS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp", "GIF": "gif",
                "TIFF": "tif", "PPM": "ppm"}


def check_image(data: bytes) -> str | None:
    """Raise ValueError unless `data` decodes as an image (fully: a truncated file is caught);
    return the extension for its format (`jpg`, `png`, ...; None for one read_shard does not take)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return _FORMAT_EXTS.get(im.format)
    except _DECODE_ERRORS as e:
        raise ValueError(f"unreadable image ({e})") from None


def decode_image(data: bytes) -> Image.Image:
    """Decode encoded image bytes to an RGB PIL image (raises ValueError when undecodable)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.convert("RGB")
    except _DECODE_ERRORS as e:
        raise ValueError(f"undecodable image ({e})") from None
