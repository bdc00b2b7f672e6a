"""One bad event in an embedding batch fails alone: the real model embeds the rest of the batch, aligned.

Real chips from the sample photos (the detection service's own analysis), the real descriptor model, and garbage
events of every kind mixed in: not a protobuf, a chip of the wrong size for the model, a chip whose bytes do not
match its size.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sightline.common import codec
from sightline.common.images import decode_image
from sightline.common.models.pipeline import FaceAnalyzer
from sightline.common.stage import InputEvent, Output
from sightline.common.topics import EMBEDDINGS, FACES
from sightline.detection.service import face_to_proto
from sightline.embedding.service import Embedding
from sightline.embedding.settings import EmbeddingSettings
from sightline.v1 import events_pb2, types_pb2


@pytest.fixture(scope="module")
def embedding(models_dir: Path) -> Embedding:
    return Embedding(EmbeddingSettings(models_dir=models_dir))


def detected(photo: Path, frame_id: str) -> events_pb2.FacesDetected:
    """What detection publishes for a photo: every face with its chip."""
    faces = FaceAnalyzer().analyze(decode_image(photo.read_bytes()))
    assert faces, photo
    return events_pb2.FacesDetected(
        frame=types_pb2.FrameRef(frame_id=frame_id, source_id="cam"),
        faces=[face_to_proto(face, include_chip=True) for face in faces],
    )


def event(value: bytes, offset: int) -> InputEvent:
    return InputEvent(key=b"cam", value=value, topic=FACES.name, partition=0, offset=offset)


def vectors(result: list[Output] | BaseException) -> np.ndarray:
    assert not isinstance(result, BaseException), result
    (output,) = result
    assert output.topic == EMBEDDINGS
    return np.array([face.vector for face in events_pb2.FacesEmbedded.FromString(output.value).faces])


def test_a_bad_event_in_a_batch_fails_alone_and_the_others_get_their_descriptors(
    embedding: Embedding, face_photos: Path
) -> None:
    obama, biden = detected(face_photos / "obama.jpg", "f1"), detected(face_photos / "biden.jpg", "f2")
    wrong_size = events_pb2.FacesDetected()
    wrong_size.CopyFrom(obama)
    small = np.zeros((100, 100, 3), dtype=np.uint8)  # bytes that match its stated size, but not the model's
    wrong_size.faces[0].chip, wrong_size.faces[0].chip_size = small.tobytes(), 100
    short = events_pb2.FacesDetected()
    short.CopyFrom(biden)
    short.faces[0].chip = short.faces[0].chip[:-7]
    batch = [
        obama.SerializeToString(),
        wrong_size.SerializeToString(),
        biden.SerializeToString(),
        b"\xff\xfenot a protobuf at all",
        short.SerializeToString(),
    ]

    results = embedding.process([event(value, i) for i, value in enumerate(batch)])

    assert len(results) == len(batch)
    for bad in (1, 3, 4):
        assert isinstance(results[bad], codec.MalformedEvent), results[bad]
    assert "150x150" in str(results[1])
    # The good events' descriptors are the ones each gets alone: the batch kept every face with its own vector.
    for index, alone in ((0, obama), (2, biden)):
        (single,) = embedding.process([event(alone.SerializeToString(), 0)])
        assert vectors(results[index]).shape == (len(alone.faces), 128)
        np.testing.assert_allclose(vectors(results[index]), vectors(single), atol=1e-5)
    assert np.linalg.norm(vectors(results[0])[0] - vectors(results[2])[0]) > 0.6, "two people, two descriptors"
