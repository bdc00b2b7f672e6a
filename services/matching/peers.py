"""The matching service's calls to detection and embedding: one probe or enrolment image to one descriptor.

The calls carry matching's own bearer token (``SIGHTLINE_AUTH_TOKEN``, a principal with the operator role) and use
TLS as ``SIGHTLINE_TLS_*`` says: ``rpc.channel`` does both.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc
import numpy as np

from sightline.common import rpc
from sightline.v1 import detection_pb2, detection_pb2_grpc, embedding_pb2, embedding_pb2_grpc, types_pb2


class PeerUnavailable(RuntimeError):
    """Detection or embedding could not be reached; the caller may retry."""


@dataclass(frozen=True)
class ProbeFace:
    face: types_pb2.DetectedFace
    vector: np.ndarray
    model_name: str
    model_version: str


class FaceClient:
    """Turns an encoded image into the descriptor of its largest face, via the detection and embedding APIs."""

    def __init__(self, detection_addr: str, embedding_addr: str, timeout_s: float) -> None:
        self._detection = detection_pb2_grpc.DetectionServiceStub(rpc.channel(detection_addr))
        self._embedding = embedding_pb2_grpc.EmbeddingServiceStub(rpc.channel(embedding_addr))
        self._timeout = timeout_s

    def largest_face(self, image: bytes) -> ProbeFace:
        """InvalidInput when the image is unusable or has no face; PeerUnavailable when a peer is down."""
        detected = self._call(self._detection.Detect, detection_pb2.DetectRequest(image=image, include_chips=True))
        if not detected.faces:
            raise rpc.InvalidInput("no face found in the image")
        face = max(detected.faces, key=lambda f: (f.box.x2 - f.box.x1) * (f.box.y2 - f.box.y1))
        chip = embedding_pb2.FaceChip(rgb=face.chip, size=face.chip_size)
        embedded = self._call(self._embedding.Embed, embedding_pb2.EmbedRequest(chips=[chip]))
        vector = np.asarray(embedded.descriptors[0].vector, dtype=np.float32)
        face.ClearField("chip")  # the chip has served its purpose; keep no face image around
        return ProbeFace(face, vector, embedded.model_name, embedded.model_version)

    def _call(self, method: grpc.UnaryUnaryMultiCallable, request: object) -> object:
        try:
            return method(request, timeout=self._timeout)
        except grpc.RpcError as exc:
            code = exc.code()  # type: ignore[attr-defined]
            if code == grpc.StatusCode.INVALID_ARGUMENT:
                raise rpc.InvalidInput(exc.details()) from None  # type: ignore[attr-defined]
            if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                why = exc.details()  # type: ignore[attr-defined]
                raise PeerUnavailable(
                    f"{code.name}: matching's own credentials were refused ({why}); check its SIGHTLINE_AUTH_TOKEN"
                ) from None
            raise PeerUnavailable(f"{code.name}: {exc.details()}") from None  # type: ignore[attr-defined]
