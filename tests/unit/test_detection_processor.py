"""Detection's processor (``Detection``, an ``EventProcessor``) on real photos and the real models: one
``FacesDetected`` per frame on the faces topic, keyed by source, with the frame's reference, size and faces; a
frame with no face still gets its (empty) result; a frame that cannot be processed fails alone in its batch.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sightline.common import codec
from sightline.common.models.descriptor_spec import CHIP_SIZE
from sightline.common.stage import InputEvent, Output, StageError
from sightline.common.topics import FACES, FRAMES
from sightline.detection.service import Detection
from sightline.detection.settings import DetectionSettings
from sightline.v1 import events_pb2, types_pb2


@pytest.fixture(scope="module")
def detection(models_dir: Path) -> Detection:
    return Detection(DetectionSettings(models_dir=models_dir))


def frame_event(image: bytes, source: str, sequence: int, purpose: int = types_pb2.PURPOSE_CCTV) -> InputEvent:
    ref = types_pb2.FrameRef(
        frame_id=f"{source}:{sequence}",
        source_id=source,
        sequence=sequence,
        purpose=purpose,
        captured_at=codec.now(),
        session_id="s1" if purpose == types_pb2.PURPOSE_ECHANNEL else "",
    )
    value = events_pb2.FrameCaptured(frame=ref, image=image, media_type="image/jpeg").SerializeToString()
    return InputEvent(key=source.encode(), value=value, topic=FRAMES.name, partition=0, offset=sequence)


def blank_jpeg() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (320, 240), (120, 120, 120)).save(out, "JPEG")
    return out.getvalue()


def faces_of(result: list[Output] | BaseException, source: str) -> events_pb2.FacesDetected:
    assert not isinstance(result, BaseException), result
    (output,) = result
    assert (output.topic, output.key) == (FACES, source.encode())
    return events_pb2.FacesDetected.FromString(output.value)


def test_a_batch_of_frames_gives_one_result_each_and_a_bad_frame_fails_alone(
    detection: Detection, face_photos: Path
) -> None:
    obama = (face_photos / "obama.jpg").read_bytes()
    events = [
        frame_event(obama, "cam-a", 1),
        frame_event(b"<html>not a photo</html>", "cam-a", 2),
        frame_event(blank_jpeg(), "cam-b", 1),
        InputEvent(b"cam-c", b"\xff\xfe", FRAMES.name, 0, 9),
        frame_event((face_photos / "biden.jpg").read_bytes(), "gate-1", 1, types_pb2.PURPOSE_ECHANNEL),
    ]

    results = detection.process(events)

    assert len(results) == len(events)
    found = faces_of(results[0], "cam-a")
    width, height = Image.open(face_photos / "obama.jpg").size
    assert (found.frame.frame_id, found.frame.width, found.frame.height) == ("cam-a:1", width, height)
    assert found.detector_model == detection.analyzer.model_name and found.HasField("detected_at")
    (face,) = found.faces
    assert len(face.landmarks) == 5 and face.quality.score > 0 and face.box.x2 > face.box.x1
    assert face.track_id.startswith("cam-a/") and face.chip_size == CHIP_SIZE, "a new track's first face is searched"
    assert len(face.chip) == CHIP_SIZE * CHIP_SIZE * 3

    assert isinstance(results[1], StageError) and results[1].reason == "undecodable_image"
    assert results[1].frame_id == "cam-a:2"
    assert faces_of(results[2], "cam-b").faces == [], "no face: still one result, so the frame is accounted for"
    assert isinstance(results[3], codec.MalformedEvent)

    (gate_face,) = faces_of(results[4], "gate-1").faces
    assert not gate_face.track_id and gate_face.chip_size == CHIP_SIZE, "e-channel faces: untracked, all searched"
    assert gate_face.liveness.frames == 1, "the traveller's face carries the session's liveness so far"


def test_a_face_too_small_to_recognise_is_tracked_but_not_searched(models_dir: Path, face_photos: Path) -> None:
    """Faces of 30 px (eyes ~11 px apart, under search_min_inter_eye_px) are followed on their track and never sent
    for a search; faces of 64 px in the same kind of frame are (the first face of their track)."""
    from test_small_faces import with_faces  # the same real face, shrunk into a 1080p frame

    settings = DetectionSettings(
        models_dir=models_dir, cameras={"street": {"min_face_px": 24}, "plaza": {"min_face_px": 24}}
    )
    detection = Detection(settings)
    obama = np.asarray(Image.open(face_photos / "obama.jpg").convert("RGB"))
    for source, width, searched in (("street", 30, False), ("plaza", 64, True)):
        frame, boxes = with_faces(obama, width, seed=3)
        out = io.BytesIO()
        Image.fromarray(frame).save(out, "JPEG", quality=95)
        detected = faces_of(detection.process([frame_event(out.getvalue(), source, 1)])[0], source)
        assert len(detected.faces) >= len(boxes)
        assert all(face.track_id for face in detected.faces)
        assert all(bool(face.chip) == searched for face in detected.faces), (width, [f.quality for f in detected.faces])
        eyes = [face.quality.inter_eye_px for face in detected.faces]
        assert all((eye >= settings.search_min_inter_eye_px) == searched for eye in eyes), eyes
