"""Detection service: frames in, faces out (box, 5 landmarks, quality, aligned chip); also the DetectionService API.

Stream path: consumes ``sightline.frames.v1`` and publishes one ``FacesDetected`` per frame (with no faces when none
were found) to ``sightline.faces.v1``. Request path: ``DetectionService.Detect`` for one image, used by the gallery to
enrol and verify.

CCTV frames: every face gets its track on its camera (``tracker.py``), and only the faces of a track worth a search
carry their chip on; the others go on with their track id, box and quality but no chip, so embedding skips them
(docs/cctv.md). E-channel frames are not tracked: every face carries its chip, the traveller's its liveness verdict.
"""

from __future__ import annotations

import threading

import numpy as np

from sightline.common import codec, telemetry
from sightline.common.audit import AuditLog
from sightline.common.config import KafkaSettings
from sightline.common.images import ImageError, decode_image
from sightline.common.models.descriptor_spec import CHIP_SIZE
from sightline.common.models.pipeline import AnalyzedFace, FaceAnalyzer
from sightline.common.rpc import InvalidInput, rpc_errors
from sightline.common.runtime import Servicer, run_service
from sightline.common.stage import EventProcessor, InputEvent, Output, Stage, StageError
from sightline.common.topics import FACES, FRAMES
from sightline.detection.scan_plan import PORTRAIT, ScanAreas, ScanPlanner
from sightline.detection.session_liveness import SessionLiveness, traveller
from sightline.detection.settings import DetectionSettings
from sightline.detection.tracker import BestFaces, FaceTracker, Track
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


class Detection(EventProcessor):
    """The detection logic shared by the stream stage (the stage's processor: one frame at a time) and the gRPC API."""

    def __init__(self, settings: DetectionSettings) -> None:
        self.settings = settings
        self.analyzer = FaceAnalyzer(threads=settings.inference_threads, score_threshold=settings.score_threshold)
        self.session_liveness = SessionLiveness(settings.liveness)
        self.tracker = FaceTracker(
            settings.track_min_iou,
            settings.track_min_landmark_similarity,
            settings.track_max_age_s,
            max_speed=settings.track_max_speed,
        )
        self.scan_planner = ScanPlanner(settings.cctv_motion_level)
        self.best_faces = BestFaces(
            settings.search_min_quality, settings.search_first_faces, settings.search_margin, settings.search_max_faces
        )
        # One onnxruntime session is not meant to be driven from many threads at once for our latency goals.
        self._lock = threading.Lock()
        self._tracking_lock = threading.Lock()

    def analyze(self, image: bytes, max_faces: int) -> tuple[np.ndarray, list[AnalyzedFace]]:
        """The decoded image and its faces, looked for at portrait size (the Detect API)."""
        rgb = decode_image(image, self.settings.max_image_pixels)
        return rgb, self._faces(rgb, max_faces, PORTRAIT)

    def _faces(self, rgb: np.ndarray, max_faces: int, areas: ScanAreas) -> list[AnalyzedFace]:
        with self._lock, telemetry.timed(telemetry.INFERENCE_SECONDS, service=SERVICE, model="detector+landmarks"):
            return self.analyzer.analyze(
                rgb, max_faces or self.settings.max_faces, areas.min_face_px, areas.roi, areas.focus
            )

    def process_event(self, event: InputEvent) -> list[Output]:
        """A frame's faces, in one ``FacesDetected``; a frame whose image cannot be decoded is dead-lettered."""
        frame = codec.parse(events_pb2.FrameCaptured, event.value)
        try:
            rgb = decode_image(frame.image, self.settings.max_image_pixels)
        except ImageError as exc:
            raise StageError(exc.reason, str(exc), frame.frame.frame_id) from None
        cctv = frame.frame.purpose != types_pb2.PURPOSE_ECHANNEL  # gates see travellers at arm's length
        faces = self._faces(rgb, self.settings.max_faces, self._scan_areas(frame.frame, rgb) if cctv else PORTRAIT)
        ref = types_pb2.FrameRef()
        ref.CopyFrom(frame.frame)
        ref.height, ref.width = rgb.shape[:2]
        if ref.purpose == types_pb2.PURPOSE_ECHANNEL:
            protos = [face_to_proto(face, include_chip=True) for face in faces]
        else:
            protos = self._track(ref, faces)
        detected = events_pb2.FacesDetected(
            frame=ref, faces=protos, detector_model=self.analyzer.model_name, detected_at=codec.now()
        )
        self._assess_liveness(ref, faces, detected)
        return [Output(FACES, ref.source_id.encode(), detected.SerializeToString())]

    def _scan_areas(self, ref: types_pb2.FrameRef, rgb: np.ndarray) -> ScanAreas:
        """Where to look in a CCTV frame: the camera's scan plan for it (scan_plan.py)."""
        with self._tracking_lock:
            expected = self.tracker.expected_boxes(ref.source_id, codec.seconds(ref.captured_at))
            areas = self.scan_planner.areas(ref.source_id, self.settings.camera_scan(ref.source_id), rgb, expected)
        telemetry.SCANNED_SHARE.labels(SERVICE).observe(areas.scanned_share(rgb.shape[1], rgb.shape[0]))
        return areas

    def _track(self, ref: types_pb2.FrameRef, faces: list[AnalyzedFace]) -> list[types_pb2.DetectedFace]:
        """CCTV faces with their track ids; only those worth a search keep their chip (docs/cctv.md)."""
        at = codec.seconds(ref.captured_at)
        protos = []
        with self._tracking_lock:
            tracks = self.tracker.tracks_of(
                ref.source_id, at, [f.box for f in faces], [f.landmarks for f in faces], size=(ref.height, ref.width)
            )
            for face, track in zip(faces, tracks, strict=True):
                skipped = self._not_searched(track, face)
                if skipped:
                    telemetry.FACES_NOT_SEARCHED.labels(SERVICE, skipped).inc()
                proto = face_to_proto(face, include_chip=skipped is None)
                proto.track_id = track.track_id
                protos.append(proto)
        return protos

    def _not_searched(self, track: Track, face: AnalyzedFace) -> str | None:
        """Why a CCTV face is not searched (the FACES_NOT_SEARCHED reason), or None to search it. A face too small to
        recognise is tracked but never searched, even with search_every_face: it takes no search of its track."""
        if face.quality.inter_eye_px < self.settings.search_min_inter_eye_px:
            return "too_small"
        if self.settings.search_every_face:
            return None
        return self.best_faces.select(track, face.quality.score)

    def _assess_liveness(
        self, ref: types_pb2.FrameRef, faces: list[AnalyzedFace], detected: events_pb2.FacesDetected
    ) -> None:
        """E-channel frames: the session's liveness verdict so far goes on the traveller's face."""
        face = traveller(faces) if ref.purpose == types_pb2.PURPOSE_ECHANNEL and ref.session_id else None
        if face is not None:
            verdict = self.session_liveness.observe(ref.session_id, face, codec.seconds(ref.captured_at), ref.sequence)
            detected.faces[face.index].liveness.CopyFrom(verdict)


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
    servicer = Servicer.of(DetectionServicer(detection))
    stage = Stage(SERVICE, FRAMES, [FACES], detection)
    audit = AuditLog.open_if_configured()  # where refused calls are audited; None: they are logged only
    run_service(
        SERVICE, settings, KafkaSettings(), [servicer], [stage], on_stop=audit.close if audit else None, audit=audit
    )
