"""Decoding and encoding of images as every stage sees them: RGB uint8, EXIF orientation applied.

Bad input is the normal case at a border gate or on a camera network, so every failure is an ``ImageError`` with a
machine-readable reason (used for dead-letter records and metrics) and a message a person can act on. The pixel
count is checked from the header, before the pixels are decoded, so a decompression bomb costs nothing.
"""

from __future__ import annotations

import io
import warnings

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Our own limit (max_pixels) replaces Pillow's global bomb check, which only warns below twice its limit.
Image.MAX_IMAGE_PIXELS = None

DEFAULT_MAX_PIXELS = 40_000_000

# The leading bytes of the encoded formats a camera, a kiosk or a folder of photos gives us (what capture publishes
# and detection decodes). Only the signature is read: a payload that starts like an image may still be damaged.
_IMAGE_SIGNATURES = (
    b"\xff\xd8\xff",  # JPEG
    b"\x89PNG\r\n\x1a\n",  # PNG
    b"GIF87a",
    b"GIF89a",  # GIF
    b"II*\x00",
    b"MM\x00*",  # TIFF, little- and big-endian
)
# "BM" alone is too common a start for text: a BMP also names one of the known DIB header sizes at byte 14.
_BMP_DIB_HEADER_SIZES = (12, 40, 52, 56, 64, 108, 124)


class ImageError(ValueError):
    """An image that cannot be used, with a machine-readable ``reason``."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def looks_like_image(data: bytes) -> bool:
    """True when the bytes start with the signature of an image format we accept (JPEG, PNG, GIF, TIFF, BMP, WebP,
    PGM/PPM).

    Cheap and decodes nothing: what decides whether bytes of unknown content may be copied anywhere (dead letters).
    """
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return True
    if data[:2] in (b"P5", b"P6") and data[2:3].isspace():  # binary PGM/PPM: magic, then whitespace
        return True
    if data[:2] == b"BM" and len(data) >= 18:
        return int.from_bytes(data[14:18], "little") in _BMP_DIB_HEADER_SIZES
    return data.startswith(_IMAGE_SIGNATURES)


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode encoded image bytes to an HxWx3 RGB uint8 array, applying the EXIF orientation.

    Grayscale, palette, 16-bit, CMYK and RGBA images are converted to RGB (alpha is dropped, as a camera has none).
    """
    if not data:
        raise ImageError("empty_image", "the image is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # An Image, not the ImageFile that open() gives: exif_transpose below returns a plain Image.
            image: Image.Image = Image.open(io.BytesIO(data))
            _check_size(image.size, max_pixels)
            image.load()
            image = ImageOps.exif_transpose(image)
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError("undecodable_image", f"not a recognised image format ({len(data)} bytes)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError("truncated_image", f"the image is damaged or truncated: {exc}") from None
    return _to_rgb(image)


def _check_size(size: tuple[int, int], max_pixels: int) -> None:
    width, height = size
    if width < 1 or height < 1:
        raise ImageError("empty_image", f"the image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise ImageError(
            "image_too_large",
            f"the image is {width}x{height} ({width * height / 1e6:.1f} MP), "
            f"over the limit of {max_pixels / 1e6:.1f} MP",
        )


def _to_rgb(image: Image.Image) -> np.ndarray:
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # Mode I is signed 32-bit: negative values are black (cast to uint8 they would be undefined, not dark).
        wide = np.clip(np.asarray(image, dtype=np.float64), 0.0, None)
        scaled = (wide / max(float(wide.max()), 1.0) * 255.0).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(scaled[:, :, None], 3, axis=2))
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.ascontiguousarray(np.asarray(image, dtype=np.uint8))


def encode_jpeg(rgb: np.ndarray, quality: int = 92) -> bytes:
    """Encode an RGB uint8 array as JPEG (what capture publishes for video frames)."""
    ok, buffer = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ImageError("unencodable_image", "the frame could not be encoded as JPEG")
    return buffer.tobytes()


def downscale_to(rgb: np.ndarray, max_side: int) -> np.ndarray:
    """Shrink so the longer side is at most ``max_side`` (no-op for smaller images)."""
    height, width = rgb.shape[:2]
    scale = max_side / max(height, width)
    if scale >= 1.0:
        return rgb
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
