"""Embedding service: aligned face chips in, descriptors out; also the EmbeddingService API.

Stream path: consumes ``sightline.faces.v1``, batches the chips of the events that are waiting (up to
``max_batch_events``) into one model call, and publishes one ``FacesEmbedded`` per input event to
``sightline.embeddings.v1``. The chips go no further than this stage. A CCTV face without a chip is one detection
chose not to search (its track has better faces searched, docs/cctv.md): it is not embedded and goes no further.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np

from sightline.common import codec, telemetry
from sightline.common.audit import AuditLog
from sightline.common.config import KafkaSettings
from sightline.common.models.embedder import FaceEmbedder
from sightline.common.models.registry import model_files
from sightline.common.rpc import InvalidInput, rpc_errors
from sightline.common.runtime import Servicer, run_service
from sightline.common.stage import InputEvent, Output, Stage
from sightline.common.topics import EMBEDDINGS, FACES
from sightline.embedding.settings import EmbeddingSettings
from sightline.v1 import embedding_pb2, embedding_pb2_grpc, events_pb2, types_pb2

SERVICE = "embedding"


def searched(detected: events_pb2.FacesDetected) -> list[types_pb2.DetectedFace]:
    """The faces to embed: those with a chip (detection sends none for a CCTV face it chose not to search)."""
    return [face for face in detected.faces if face.chip or face.chip_size]


class Embedding:
    """The descriptor model behind both the stream stage (the stage's ``Processor``: batches) and the gRPC API."""

    def __init__(self, settings: EmbeddingSettings) -> None:
        self.settings = settings
        self.embedder = FaceEmbedder(model_files(settings.models_dir).embedder, threads=settings.inference_threads)
        self._lock = threading.Lock()

    def embed(self, chips: list[np.ndarray]) -> np.ndarray:
        if not chips:
            return np.zeros((0, self.embedder.descriptor_size), dtype=np.float32)
        telemetry.BATCH_SIZE.labels(SERVICE).observe(len(chips))
        with self._lock, telemetry.timed(telemetry.INFERENCE_SECONDS, service=SERVICE, model=self.embedder.model_name):
            return self.embedder.embed(np.stack(chips))

    def process(self, events: Sequence[InputEvent]) -> list[list[Output] | BaseException]:
        """Parse every event, embed all their chips in one call, then build one output per event.

        A bad event (not a FacesDetected, a chip of the wrong length or size) fails alone: it never enters the batch,
        and if the batch call fails anyway, each event's chips are embedded on their own so that only the event
        the model cannot take fails.
        """
        parsed = [self._parse(event) for event in events]
        good = [item for item in parsed if not isinstance(item, BaseException)]
        vectors = iter(self._embed_each([chips for _, chips in good]))
        results: list[list[Output] | BaseException] = []
        for item in parsed:
            if isinstance(item, BaseException):
                results.append(item)
                continue
            descriptors = next(vectors)
            results.append(descriptors if isinstance(descriptors, BaseException) else self._built(item[0], descriptors))
        return results

    def _parse(self, event: InputEvent) -> tuple[events_pb2.FacesDetected, list[np.ndarray]] | BaseException:
        """The event and the chips of its searched faces, or why it cannot be embedded."""
        try:
            detected = codec.parse(events_pb2.FacesDetected, event.value)
            return detected, [self.chip(face.chip, face.chip_size) for face in searched(detected)]
        except codec.MalformedEvent as exc:
            return exc

    def chip(self, data: bytes, size: int) -> np.ndarray:
        """A chip as the model takes it; MalformedEvent when its bytes or its size are not what the model needs."""
        chip = codec.chip_from_bytes(data, size)
        if size != self.embedder.chip_size:
            raise codec.MalformedEvent(
                f"face chip is {size}x{size}; the model takes "
                f"{self.embedder.chip_size}x{self.embedder.chip_size} RGB chips"
            )
        return chip

    def _embed_each(self, per_event: list[list[np.ndarray]]) -> list[np.ndarray | BaseException]:
        """The descriptors of each event's chips: one model call for all, or one per event if that call fails."""
        try:
            stacked = self.embed([chip for chips in per_event for chip in chips])
        except Exception:  # noqa: BLE001 - some event's chips break the batch: find which, alone
            return [self._embed_alone(chips) for chips in per_event]
        bounds = np.cumsum([0, *(len(chips) for chips in per_event)])
        return [stacked[start:end] for start, end in zip(bounds[:-1], bounds[1:], strict=True)]

    def _embed_alone(self, chips: list[np.ndarray]) -> np.ndarray | BaseException:
        try:
            return self.embed(chips)
        except Exception as exc:  # noqa: BLE001 - this event's failure only (dead-lettered, or retried if transient)
            return exc

    def _built(self, detected: events_pb2.FacesDetected, descriptors: np.ndarray) -> list[Output] | BaseException:
        try:
            return self._output(detected, iter(descriptors))
        except Exception as exc:  # noqa: BLE001 - isolated to its event
            return exc

    def _output(self, detected: events_pb2.FacesDetected, descriptors: object) -> list[Output]:
        embedded = events_pb2.FacesEmbedded(
            frame=detected.frame,
            model_name=self.embedder.model_name,
            model_version=self.embedder.model_version,
            embedded_at=codec.now(),
        )
        for face in searched(detected):
            vector = next(descriptors)  # type: ignore[call-overload]
            embedded.faces.add(
                face_index=face.index,
                box=face.box,
                quality=face.quality,
                vector=vector.tolist(),
                landmarks=face.landmarks,
                detector_keypoints=face.detector_keypoints,
                liveness=face.liveness,
                track_id=face.track_id,
            )
        return [Output(EMBEDDINGS, detected.frame.source_id.encode(), embedded.SerializeToString())]


class EmbeddingServicer(embedding_pb2_grpc.EmbeddingServiceServicer):
    def __init__(self, embedding: Embedding) -> None:
        self._embedding = embedding

    @rpc_errors
    def Embed(self, request: embedding_pb2.EmbedRequest, context: object) -> embedding_pb2.EmbedResponse:
        if len(request.chips) > self._embedding.settings.max_chips_per_request:
            raise InvalidInput(
                f"{len(request.chips)} chips in one call; the limit is {self._embedding.settings.max_chips_per_request}"
            )
        try:
            chips = [codec.chip_from_bytes(chip.rgb, chip.size) for chip in request.chips]
        except codec.MalformedEvent as exc:
            raise InvalidInput(str(exc)) from None
        model = self._embedding.embedder
        if any(chip.shape[0] != model.chip_size for chip in chips):
            raise InvalidInput(f"chips must be {model.chip_size}x{model.chip_size} RGB")
        vectors = self._embedding.embed(chips)
        return embedding_pb2.EmbedResponse(
            descriptors=[embedding_pb2.Descriptor(vector=v.tolist()) for v in vectors],
            model_name=model.model_name,
            model_version=model.model_version,
        )


def main() -> None:
    settings = EmbeddingSettings()
    embedding = Embedding(settings)
    servicer = Servicer.of(EmbeddingServicer(embedding))
    stage = Stage(
        SERVICE,
        FACES,
        [EMBEDDINGS],
        embedding,
        max_batch=settings.max_batch_events,
        batch_wait_s=settings.batch_wait_ms / 1000,
    )
    audit = AuditLog.open_if_configured()  # where refused calls are audited; None: they are logged only
    run_service(
        SERVICE, settings, KafkaSettings(), [servicer], [stage], on_stop=audit.close if audit else None, audit=audit
    )
