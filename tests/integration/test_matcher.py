"""Matching's processor (``Matcher``, an ``EventProcessor``) over a real gallery (SQLite store, encrypted templates,
the in-memory index) and real descriptors: photos go through detection's and embedding's processors first, each
processor's outputs the next one's inputs, as the stages hand them on through the topics.

One ``MatchResult`` per frame on the matches topic, keyed by source: the candidates of every face, a 1:1
verification when the frame carries a claim; a frame that cannot be searched fails alone in its batch.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from test_matching_readiness import database, enrol, replicas  # noqa: F401 - database, replicas: fixtures, shared

from sightline.common import codec
from sightline.common.stage import InputEvent, Output, Processor
from sightline.common.topics import EMBEDDINGS, FACES, FRAMES, MATCHES, TopicSpec
from sightline.detection.service import Detection
from sightline.detection.settings import DetectionSettings
from sightline.embedding.service import Embedding
from sightline.embedding.settings import EmbeddingSettings
from sightline.matching.gallery import Gallery
from sightline.matching.service import Matcher
from sightline.v1 import events_pb2, types_pb2


@pytest.fixture(scope="module")
def upstream(models_dir: Path) -> tuple[Detection, Embedding]:
    return Detection(DetectionSettings(models_dir=models_dir)), Embedding(EmbeddingSettings(models_dir=models_dir))


def through(processor: Processor, events: list[InputEvent], topic: TopicSpec) -> list[InputEvent]:
    """What the next stage consumes: each input's one output on ``topic``, as an input event of that topic."""
    results = processor.process(events)
    outputs: list[Output] = []
    for result in results:
        assert not isinstance(result, BaseException), result
        outputs += result
    assert [o.topic for o in outputs] == [topic] * len(events)
    return [InputEvent(o.key, o.value, topic.name, 0, i) for i, o in enumerate(outputs)]


def embedded(upstream: tuple[Detection, Embedding], photos: dict[str, bytes], claim: str = "") -> list[InputEvent]:
    """Each photo as a frame of its own source, through detection and embedding: the matches stage's inputs."""
    frames = []
    for sequence, (source, image) in enumerate(photos.items(), 1):
        ref = types_pb2.FrameRef(
            frame_id=f"{source}:{sequence}",
            source_id=source,
            sequence=sequence,
            captured_at=codec.now(),
            purpose=types_pb2.PURPOSE_CCTV,
            claim_subject_id=claim,
        )
        value = events_pb2.FrameCaptured(frame=ref, image=image, media_type="image/jpeg").SerializeToString()
        frames.append(InputEvent(source.encode(), value, FRAMES.name, 0, sequence))
    detection, embedding = upstream
    return through(embedding, through(detection, frames, FACES), EMBEDDINGS)


def vector_of(event: InputEvent) -> np.ndarray:
    (face,) = codec.parse(events_pb2.FacesEmbedded, event.value).faces
    return np.array(face.vector, dtype=np.float32)


def matched(result: list[Output] | BaseException, source: str) -> events_pb2.MatchResult:
    assert not isinstance(result, BaseException), result
    (output,) = result
    assert (output.topic, output.key) == (MATCHES, source.encode())
    return events_pb2.MatchResult.FromString(output.value)


def test_the_matcher_finds_and_verifies_real_faces_and_a_bad_frame_fails_alone(
    upstream: tuple[Detection, Embedding],
    replicas: Callable[..., Gallery],
    face_photos: Path,
) -> None:
    gallery = replicas()
    photo = {name: (face_photos / f"{name}.jpg").read_bytes() for name in ("obama", "biden", "obama2")}
    for event, subject in zip(
        embedded(upstream, {"enrol-1": photo["obama"], "enrol-2": photo["biden"]}), ("obama", "biden"), strict=True
    ):
        enrol(gallery, subject, vector_of(event))
    claimed = embedded(upstream, {"cam-1": photo["obama2"], "cam-2": photo["biden"]}, claim="obama")
    short = events_pb2.FacesEmbedded.FromString(claimed[0].value)
    del short.faces[0].vector[64:]  # a descriptor of the wrong length: not searched
    events = [claimed[0], InputEvent(b"cam-3", short.SerializeToString(), EMBEDDINGS.name, 0, 7), claimed[1]]

    results = Matcher(gallery, top_k=2).process(events)

    assert len(results) == 3
    obama = matched(results[0], "cam-1")
    (face,) = obama.faces
    assert [c.subject_id for c in face.candidates] == ["obama", "biden"], "another photo of him: he comes first"
    assert face.candidates[0].distance < gallery.max_distance < face.candidates[1].distance
    assert face.verification.subject_found and face.verification.verified, "the claim is his: verified 1:1"
    assert obama.frame.frame_id == "cam-1:1" and obama.model_name == upstream[1].embedder.model_name
    assert isinstance(results[1], codec.MalformedEvent) and "expected 128" in str(results[1])
    (impostor,) = matched(results[2], "cam-2").faces
    assert impostor.candidates[0].subject_id == "biden"
    assert impostor.verification.subject_found and not impostor.verification.verified, "biden claiming obama"
