"""Image bytes from a client -> RGB pixels, refusing anything unsafe before it is decoded.

Order of checks: empty, too many bytes, format sniffed from magic bytes (never from a name or a client's
content type), pixel count read from the header (PIL opens lazily), then the full decode. Error messages
are for the client: they name the problem and never hold paths or exception text.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps

from npc_server.errors import InvalidInput, PayloadTooLarge, UnsupportedMedia

ACCEPTED_IMAGE_FORMATS = ("JPEG", "PNG", "WebP")


def sniff_image_format(head: bytes) -> str | None:
    """PIL format name from the first bytes, or None when it is none of ACCEPTED_IMAGE_FORMATS."""
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if len(head) >= 12 and head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    return None


def decode_image(data: bytes, *, max_bytes: int, max_pixels: int, max_side: int | None = None) -> np.ndarray:
    """Encoded JPEG / PNG / WebP -> (H, W, 3) uint8 RGB, upright per its EXIF orientation.

    max_side: when given, shrink so the longer side is at most this many pixels (JPEGs are then decoded
    at a reduced DCT scale, which is much faster than decoding full size and resizing).
    Raises InvalidInput, PayloadTooLarge or UnsupportedMedia.
    """
    if not data:
        raise InvalidInput("image is empty (0 bytes)")
    if len(data) > max_bytes:
        raise PayloadTooLarge(f"image is {len(data)} bytes; the limit is {max_bytes} bytes")
    fmt = sniff_image_format(data[:16])
    if fmt is None:
        raise UnsupportedMedia(f"image format not recognised; accepted formats: {', '.join(ACCEPTED_IMAGE_FORMATS)}")
    try:
        image: Image.Image = Image.open(io.BytesIO(data), formats=[fmt])  # reads the header only
    except Image.DecompressionBombError:
        raise PayloadTooLarge(f"image has too many pixels; the limit is {max_pixels} pixels") from None
    except Exception:  # any parse failure means the client sent a broken file
        raise InvalidInput("image could not be decoded") from None
    width, height = image.size
    if width < 1 or height < 1:
        raise InvalidInput("image could not be decoded")
    if width * height > max_pixels:
        raise PayloadTooLarge(f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels} pixels")
    try:
        if max_side is not None and max(width, height) > max_side:
            scale = max_side / max(width, height)
            target = (max(1, round(width * scale)), max(1, round(height * scale)))
            image.draft("RGB", target)  # JPEG only: decode at 1/2, 1/4 or 1/8 scale, never below target
        image = ImageOps.exif_transpose(image)  # loads the pixels
        if image.mode != "RGB":
            image = image.convert("RGB")
        if max_side is not None and max(image.size) > max_side:
            image.thumbnail((max_side, max_side), Image.Resampling.BILINEAR)
        return np.asarray(image, dtype=np.uint8)
    except Exception:  # truncated or corrupt pixel data
        raise InvalidInput("image could not be decoded") from None
