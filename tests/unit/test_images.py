"""Image decoding as every stage sees it: EXIF orientation, odd modes, and every kind of bad input."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from sightline.common.images import ImageError, decode_image, downscale_to, encode_jpeg


def encoded(image: Image.Image, fmt: str = "PNG", **kwargs: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def test_rgba_grayscale_palette_and_16_bit_become_rgb() -> None:
    for mode in ("RGBA", "L", "P", "I;16", "CMYK"):
        image = Image.new(mode, (40, 30))
        fmt = "JPEG" if mode == "CMYK" else ("TIFF" if mode == "I;16" else "PNG")
        rgb = decode_image(encoded(image, fmt))
        assert rgb.shape == (30, 40, 3) and rgb.dtype == np.uint8, mode


def test_exif_orientation_is_applied() -> None:
    image = Image.new("RGB", (40, 20), (200, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    rgb = decode_image(encoded(image, "JPEG", exif=exif))
    assert rgb.shape == (40, 20, 3)


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"", "empty_image"),
        (b"this is not an image", "undecodable_image"),
    ],
)
def test_bad_bytes_have_a_reason(payload: bytes, reason: str) -> None:
    with pytest.raises(ImageError) as caught:
        decode_image(payload)
    assert caught.value.reason == reason


def test_truncated_jpeg_is_rejected() -> None:
    whole = encoded(Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 200, 3), np.uint8)), "JPEG")
    with pytest.raises(ImageError) as caught:
        decode_image(whole[: len(whole) // 2])
    assert caught.value.reason == "truncated_image"


def test_huge_image_is_refused_from_its_header_before_decoding() -> None:
    # A 50-megapixel PNG of one colour compresses to a few hundred kilobytes: a decompression bomb in miniature.
    bomb = encoded(Image.new("L", (10_000, 5_000)), "PNG")
    with pytest.raises(ImageError) as caught:
        decode_image(bomb, max_pixels=40_000_000)
    assert caught.value.reason == "image_too_large"
    assert "50.0 MP" in str(caught.value)


def test_jpeg_round_trip_and_downscale() -> None:
    rgb = np.full((100, 300, 3), 128, np.uint8)
    assert decode_image(encode_jpeg(rgb)).shape == (100, 300, 3)
    assert downscale_to(rgb, 150).shape == (50, 150, 3)
    assert downscale_to(rgb, 1000) is rgb
