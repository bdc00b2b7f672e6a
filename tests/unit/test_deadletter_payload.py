"""Dead letters never carry bytes of unknown content: a copy of the input only when it is the topic's own event (and,
for a frame, an image), otherwise just its SHA-256 and size.

Real photos, real encoders (Pillow) and the real detection stage function deciding what is wrong with a frame.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import pytest
from PIL import Image

from sightline.common.images import looks_like_image
from sightline.common.stage import InputEvent, StageError, dead_letter_record, may_copy_payload, source_dead_letter
from sightline.common.topics import FACES, FRAMES
from sightline.v1 import events_pb2, types_pb2


def frame(image: bytes) -> bytes:
    ref = types_pb2.FrameRef(frame_id="cam:1", source_id="cam", sequence=1)
    return events_pb2.FrameCaptured(frame=ref, image=image, media_type="image/jpeg").SerializeToString()


def item(value: bytes, topic: str = FRAMES.name) -> InputEvent:
    return InputEvent(key=b"cam", value=value, topic=topic, partition=2, offset=41)


def encoded(fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 12), (90, 120, 30)).save(buffer, fmt)
    return buffer.getvalue()


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "TIFF", "BMP", "WEBP"])
def test_every_accepted_image_format_is_recognised(fmt: str) -> None:
    assert looks_like_image(encoded(fmt))


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"BM is how this text starts",
        b"%PDF-1.7\n",
        b"#!/bin/sh\nrm -rf /\n",
        b"RIFF\x00\x00\x00\x00WAVEfmt ",
        b"\x00" * 64,
    ],
)
def test_other_content_is_not_an_image(data: bytes) -> None:
    assert not looks_like_image(data)


def test_a_frame_that_is_not_an_image_is_described_never_copied() -> None:
    payload = frame(b"%PDF-1.7\n" + b"anything at all" * 100)
    letter = dead_letter_record("detection", item(payload), StageError("undecodable_image", "not an image", "cam:1"))
    assert letter.payload_withheld and letter.payload == b"" and not letter.payload_truncated
    assert letter.payload_sha256 == hashlib.sha256(payload).digest() and letter.payload_size == len(payload)
    assert (letter.reason, letter.frame_id, letter.input_partition, letter.input_offset) == (
        "undecodable_image",
        "cam:1",
        2,
        41,
    )


def test_a_damaged_photo_is_copied_with_its_hash(face_photos: Path) -> None:
    payload = frame((face_photos / "obama.jpg").read_bytes()[:5000])  # a JPEG cut short: still starts like one
    letter = dead_letter_record("detection", item(payload), StageError("truncated_image", "truncated"))
    assert not letter.payload_withheld and letter.payload == payload
    assert letter.payload_sha256 == hashlib.sha256(payload).digest() and letter.payload_size == len(payload)


def test_a_long_payload_is_truncated_but_hashed_whole(face_photos: Path) -> None:
    payload = frame((face_photos / "obama.jpg").read_bytes())
    letter = dead_letter_record("detection", item(payload), StageError("x", "y"), max_payload=1000)
    assert letter.payload == payload[:1000] and letter.payload_truncated and not letter.payload_withheld
    assert letter.payload_sha256 == hashlib.sha256(payload).digest() and letter.payload_size == len(payload)


def test_what_is_not_the_topics_event_is_withheld(face_photos: Path) -> None:
    photo = (face_photos / "obama.jpg").read_bytes()
    blob = b"arbitrary bytes riding along in a field FrameCaptured does not have"
    tag = bytes([(99 << 3 | 2) & 0x7F | 0x80, (99 << 3 | 2) >> 7])  # field 99, length-delimited, as a varint
    smuggled = frame(photo) + tag + bytes([len(blob)]) + blob
    assert events_pb2.FrameCaptured.FromString(smuggled).image == photo, "it parses: the field is just unknown"
    assert not may_copy_payload(FRAMES.name, smuggled)
    assert not may_copy_payload(FRAMES.name, b"\x0a\xff not protobuf")
    assert not may_copy_payload("/srv/camera/upload.jpg", photo), "capture's inputs are files and URLs"
    assert not may_copy_payload("sightline.unknown.v1", frame(photo))
    assert may_copy_payload(FRAMES.name, frame(photo))
    faces = events_pb2.FacesDetected(frame=types_pb2.FrameRef(frame_id="cam:1"), detector_model="m")
    assert may_copy_payload(FACES.name, faces.SerializeToString())


def test_no_payload_no_hash() -> None:
    letter = source_dead_letter(
        "capture", StageError("unreadable_frame", "gone"), source="rtsp://cam/1", key=b"cam", sequence=3
    )
    assert not letter.payload_withheld and not letter.payload_sha256 and letter.payload_size == 0


def test_the_detection_stage_dead_letters_a_non_image_frame_without_its_bytes(
    models_dir: Path, face_photos: Path
) -> None:
    from sightline.detection.service import Detection
    from sightline.detection.settings import DetectionSettings

    detection = Detection(DetectionSettings(models_dir=models_dir))
    garbage = frame(b"<html>definitely not a photo</html>")
    damaged = frame((face_photos / "obama.jpg").read_bytes()[:5000])
    results = detection.process([item(garbage), item(damaged)])
    letters = [
        dead_letter_record("detection", item(value), error)  # type: ignore[arg-type]
        for value, error in zip((garbage, damaged), results, strict=True)
    ]
    assert [letter.reason for letter in letters] == ["undecodable_image", "truncated_image"]
    assert letters[0].payload_withheld and not letters[0].payload
    assert letters[1].payload == damaged, "a damaged JPEG is still a JPEG: copied, so it can be looked at"
