"""Detection service: frames in, faces out (box, 5 landmarks, quality, aligned chip); also the DetectionService API.

Stream path: consumes ``sightline.frames.v1`` and publishes one ``FacesDetected`` per frame (with no faces when none
were found) to ``sightline.faces.v1``. Request path: ``DetectionService.Detect`` for one image, used by the gallery to
enrol and verify.
"""

from __future__ import annotations

import threading

import numpy as np

from sightline.common import codec, telemetry
from sightline.common.config import KafkaSettings
from sightline.common.images import ImageError, decode_image
from sightline.common.models.pipeline import CHIP_SIZE, AnalyzedFace, FaceAnalyzer
from sightline.common.rpc import InvalidInput, rpc_errors
from sightline.common.runtime import Servicer, run_service
from sightline.common.stage import InputEvent, Output, Stage, StageError, one_at_a_time
from sightline.common.topics import FACES, FRAMES
from sightline.detection.session_liveness import SessionLiveness, traveller
from sightline.detection.settings import DetectionSettings
from sightline.v1 import detection_pb2, detection_pb2_grpc, events_pb2, types_pb2

SERVICE = "detection"


def face_to_proto(face: AnalyzedFace, include_chip: bool) -> types_pb2.DetectedFace:
    return types_pb2.DetectedFace(
        index=face.index,
        box=codec.box_to_proto(face.box),
        score=face.score,
        landmarks=codec.points_to_proto(face.landmarks),
        detector_keypoints=codec.points_to_proto(face.keypoints),
        quality=types_pb2.FaceQuality(**vars(face.quality)),
        chip=face.chip.tobytes() if include_chip else b"",
        chip_size=CHIP_SIZE if include_chip else 0,
    )


class Detection:
    """The detection logic shared by the stream stage and the gRPC API."""

    def __init__(self, settings: DetectionSettings) -> None:
        self.settings = settings
        self.analyzer = FaceAnalyzer(threads=settings.inference_threads, score_threshold=settings.score_threshold)
        self.session_liveness = SessionLiveness(settings.liveness)
        # One onnxruntime session is not meant to be driven from many threads at once for our latency goals.
        self._lock = threading.Lock()

    def analyze(self, image: bytes, max_faces: int) -> tuple[np.ndarray, list[AnalyzedFace]]:
        rgb = decode_image(image, self.settings.max_image_pixels)
        with self._lock, telemetry.timed(telemetry.INFERENCE_SECONDS, service=SERVICE, model="detector+landmarks"):
            faces = self.analyzer.analyze(rgb, max_faces or self.settings.max_faces)
        return rgb, faces

    def process_frame(self, event: InputEvent) -> list[Output]:
        frame = codec.parse(events_pb2.FrameCaptured, event.value)
        try:
            rgb, faces = self.analyze(frame.image, self.settings.max_faces)
        except ImageError as exc:
            raise StageError(exc.reason, str(exc), frame.frame.frame_id) from None
        ref = types_pb2.FrameRef()
        ref.CopyFrom(frame.frame)
        ref.height, ref.width = rgb.shape[:2]
        detected = events_pb2.FacesDetected(
            frame=ref,
            faces=[face_to_proto(face, include_chip=True) for face in faces],
            detector_model=self.analyzer.model_name,
            detected_at=codec.now(),
        )
        self._assess_liveness(ref, faces, detected)
        telemetry.END_TO_END_LATENCY.labels(SERVICE).observe(codec.seconds_since(ref.captured_at))
        return [Output(FACES, ref.source_id.encode(), detected.SerializeToString())]


    def _assess_liveness(self, ref: types_pb2.FrameRef, faces: list[AnalyzedFace], detected: events_pb2.FacesDetected) -> None:  # noqa: E501
        """E-channel frames: the session's liveness verdict so far goes on the traveller's face."""
        face = traveller(faces) if ref.purpose == types_pb2.PURPOSE_ECHANNEL and ref.session_id else None
        if face is not None:
            at = ref.captured_at.seconds + ref.captured_at.nanos / 1e9
            detected.faces[face.index].liveness.CopyFrom(self.session_liveness.observe(ref.session_id, face, at))


class DetectionServicer(detection_pb2_grpc.DetectionServiceServicer):
    def __init__(self, detection: Detection) -> None:
        self._detection = detection

    @rpc_errors
    def Detect(self, request: detection_pb2.DetectRequest, context: object) -> detection_pb2.DetectResponse:
        try:
            rgb, faces = self._detection.analyze(request.image, request.max_faces)
        except ImageError as exc:
            raise InvalidInput(str(exc)) from None
        return detection_pb2.DetectResponse(
            width=rgb.shape[1],
            height=rgb.shape[0],
            faces=[face_to_proto(face, request.include_chips) for face in faces],
            detector_model=self._detection.analyzer.model_name,
        )


def main() -> None:
    settings = DetectionSettings()
    detection = Detection(settings)
    servicer = Servicer(detection_pb2_grpc.add_DetectionServiceServicer_to_server, DetectionServicer(detection),
                        "sightline.v1.DetectionService")  # fmt: skip
    stage = Stage(SERVICE, FRAMES, [FACES], one_at_a_time(detection.process_frame))
    run_service(SERVICE, settings, KafkaSettings(), [servicer], [stage])
