"""Reading rendered passport data pages: real OCR (rapidocr, PP-OCRv4 ONNX) and the real face detector.

Pages are drawn here with Pillow at 300 dpi like a TD3 data page (125 x 88 mm): a portrait from the sample photos at
the top left, some printed text, and the ICAO 9303 specimen MRZ at the bottom in DejaVu Sans Mono (OCR-B itself is not
obtainable from the registries; see docs/mrz.md). MRZ characters are ~32 px high, ICAO's 2.54 mm pitch.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from sightline.capture.kiosk import document
from sightline.capture.kiosk.document import MRZ_INVALID, NO_MRZ, DocumentReading, read_document

MONO_FONT = Path("/usr/share/fonts/truetype/dejavu/DejaVuSansMono.ttf")
SANS_FONT = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")

PAGE_SIZE = (1476, 1039)  # 125 x 88 mm at 300 dpi
PORTRAIT_BOX = (60, 130, 473, 646)  # ~35 x 44 mm, where the photo is pasted
MRZ_FONT_SIZE = 44  # DejaVu Sans Mono: 26.5 px advance (2.2 mm) and 32 px capitals at this size

LINE1 = "P<UTOERIKSSON<<ANNA<MARIA<<<<<<<<<<<<<<<<<<<"
LINE2 = "L898902C36UTO7408122F1204159ZE184226B<<<<<10"
LINE2_BAD_CHECK = LINE2[:9] + "7" + LINE2[10:]  # document number check digit 7 instead of 6

OCR_TIMES: list[float] = []


def _font(path: Path, size: int) -> ImageFont.FreeTypeFont:
    if not path.is_file():
        pytest.fail(f"font {path} not found: install the Debian package fonts-dejavu-core", pytrace=False)
    return ImageFont.truetype(str(path), size)


def render_page(portrait: Path, mrz: tuple[str, str] | None) -> np.ndarray:
    """A white TD3 data page: portrait top left, printed fields, the MRZ (if any) in the bottom band."""
    page = Image.new("RGB", PAGE_SIZE, "white")
    photo = Image.open(portrait).convert("RGB")
    x1, y1, x2, y2 = PORTRAIT_BOX
    page.paste(photo.resize((x2 - x1, y2 - y1), Image.Resampling.LANCZOS), (x1, y1))
    draw = ImageDraw.Draw(page)
    label, value = _font(SANS_FONT, 26), _font(SANS_FONT, 34)
    draw.text((60, 40), "PASSPORT        UTOPIA", font=value, fill="black")
    for i, (name, text) in enumerate(
        [
            ("Surname", "ERIKSSON"),
            ("Given names", "ANNA MARIA"),
            ("Nationality", "UTOPIAN"),
            ("Date of birth", "12 AUG 1974"),
            ("Date of expiry", "15 APR 2012"),
        ]
    ):
        draw.text((540, 140 + i * 100), name, font=label, fill=(90, 90, 90))
        draw.text((540, 172 + i * 100), text, font=value, fill="black")
    if mrz is not None:
        mono = _font(MONO_FONT, MRZ_FONT_SIZE)
        draw.text((90, PAGE_SIZE[1] - 200), mrz[0], font=mono, fill="black")
        draw.text((90, PAGE_SIZE[1] - 115), mrz[1], font=mono, fill="black")
    return np.asarray(page)


def _read(page: np.ndarray) -> DocumentReading:
    started = time.perf_counter()
    reading = read_document(page)
    OCR_TIMES.append(reading.ocr_seconds)
    print(f"read_document: {time.perf_counter() - started:.2f} s (OCR {reading.ocr_seconds:.2f} s)")
    return reading


@pytest.fixture(scope="module", autouse=True)
def warm_engines(models_dir: Path) -> None:
    """Load OCR and detector once, outside the per-page timings."""
    started = time.perf_counter()
    document.ocr_engine()
    document.face_detector()
    print(f"engines loaded in {time.perf_counter() - started:.2f} s")


@pytest.fixture(scope="module")
def specimen_reading(face_photos: Path) -> DocumentReading:
    return _read(render_page(face_photos / "obama.jpg", (LINE1, LINE2)))


def test_the_specimen_page_gives_the_claim_and_the_portrait(specimen_reading: DocumentReading) -> None:
    reading = specimen_reading
    assert reading.ok, (reading.errors, reading.ocr_lines)
    mrz = reading.mrz
    assert mrz is not None and mrz.valid
    assert reading.claim == "L898902C3"
    assert (mrz.surname, mrz.given_names, mrz.issuing_state, mrz.nationality) == (
        "ERIKSSON",
        "ANNA MARIA",
        "UTO",
        "UTO",
    )
    assert (mrz.birth_date, mrz.sex, mrz.expiry_date, mrz.optional_data) == ("740812", "F", "120415", "ZE184226B")
    assert (mrz.line1, mrz.line2) == (LINE1, LINE2)


def test_the_portrait_box_is_on_the_pasted_face(specimen_reading: DocumentReading) -> None:
    box = specimen_reading.portrait_box
    assert box is not None
    x1, y1, x2, y2 = PORTRAIT_BOX
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    assert x1 < cx < x2 and y1 < cy < y2, box
    # A face, not the whole photo and not a speck: between a quarter and the full width of the pasted photo.
    assert 0.25 * (x2 - x1) < box[2] - box[0] <= 1.05 * (x2 - x1), box
    assert specimen_reading.image.shape == (PAGE_SIZE[1], PAGE_SIZE[0], 3)


def test_a_wrong_check_digit_is_rejected_with_its_reason(face_photos: Path) -> None:
    reading = _read(render_page(face_photos / "obama.jpg", (LINE1, LINE2_BAD_CHECK)))
    assert not reading.ok
    assert reading.error == MRZ_INVALID
    assert reading.claim is None
    assert "document number check digit is 7, computed 6" in reading.errors, reading.errors
    assert reading.portrait_box is not None  # the portrait is still reported, for the operator


def test_a_page_without_mrz_says_so(face_photos: Path) -> None:
    reading = _read(render_page(face_photos / "obama.jpg", None))
    assert reading.error == NO_MRZ, (reading.errors, reading.ocr_lines)
    assert reading.errors == ["no machine readable zone found on the page"]
    assert reading.mrz is None and reading.claim is None


def test_report_ocr_time(capsys: pytest.CaptureFixture[str]) -> None:
    """Not a check: prints the OCR time per page measured above (visible with -s or in the captured output)."""
    assert OCR_TIMES, "the page tests did not run"
    with capsys.disabled():
        print(f"\nOCR seconds per page: {', '.join(f'{t:.2f}' for t in OCR_TIMES)}")
