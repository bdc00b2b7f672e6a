"""Matching service: owns the gallery; searches each embedded face 1:N and verifies 1:1 claims.

Stream path: consumes ``sightline.embeddings.v1`` and publishes one ``MatchResult`` per frame to
``sightline.matches.v1``. Match results hold scores and subject ids, never descriptors: a face that matches nobody
leaves nothing behind once the short-retention topics expire. Request path: ``GalleryService`` (enrol, delete, list,
verify, search), which calls detection and embedding over gRPC.
"""

from __future__ import annotations

import re

import grpc
import numpy as np

from sightline.common import codec, telemetry
from sightline.common.config import KafkaSettings
from sightline.common.rpc import InvalidInput, NotFound, rpc_errors
from sightline.common.runtime import Servicer, run_service
from sightline.common.stage import InputEvent, Output, Stage, one_at_a_time
from sightline.common.topics import EMBEDDINGS, MATCHES
from sightline.matching.enrolment import quality_failures, rejection_reason
from sightline.matching.gallery import Gallery
from sightline.matching.peers import FaceClient, PeerUnavailable
from sightline.matching.settings import MatchingSettings
from sightline.matching.store import GalleryStore, SubjectRecord
from sightline.matching.templates import TemplateCipher
from sightline.v1 import events_pb2, gallery_pb2, gallery_pb2_grpc

SERVICE = "matching"
_SUBJECT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$")


def check_subject_id(subject_id: str) -> str:
    if not _SUBJECT_ID.match(subject_id):
        raise InvalidInput(
            f"invalid subject id {subject_id[:40]!r}: use 1-128 letters, digits and . _ : @ - (starting with a letter "
            "or digit)"
        )
    return subject_id


def match_frame(gallery: Gallery, top_k: int, event: InputEvent) -> list[Output]:
    """The stream stage: 1:N candidates for every face, plus a 1:1 verification when the frame carries a claim."""
    embedded = codec.parse(events_pb2.FacesEmbedded, event.value)
    frame = embedded.frame
    result = events_pb2.MatchResult(frame=frame, model_name=embedded.model_name,
                                    model_version=embedded.model_version)  # fmt: skip
    if embedded.faces:
        vectors = np.array([list(face.vector) for face in embedded.faces], dtype=np.float32)
        if vectors.shape[1] != 128:
            raise codec.MalformedEvent(f"descriptors have {vectors.shape[1]} values, expected 128")
        candidates = gallery.search(vectors, top_k, frame.watchlists)
        for face, vector, found in zip(embedded.faces, vectors, candidates, strict=True):
            match = result.faces.add(face_index=face.face_index, box=face.box, quality=face.quality, candidates=found,
                                     landmarks=face.landmarks, detector_keypoints=face.detector_keypoints,
                                     liveness=face.liveness)  # fmt: skip
            if frame.claim_subject_id:
                match.verification.CopyFrom(gallery.verify(vector, frame.claim_subject_id))
    result.matched_at.CopyFrom(codec.now())
    telemetry.END_TO_END_LATENCY.labels(SERVICE).observe(codec.seconds_since(frame.captured_at))
    return [Output(MATCHES, frame.source_id.encode(), result.SerializeToString())]


def subject_proto(record: SubjectRecord) -> gallery_pb2.Subject:
    subject = gallery_pb2.Subject(subject_id=record.subject_id, display_name=record.display_name,
                                  watchlists=sorted(record.watchlists), template_count=record.template_count)  # fmt: skip
    subject.created_at.FromDatetime(record.created_at)
    return subject


class GalleryServicer(gallery_pb2_grpc.GalleryServiceServicer):
    def __init__(self, gallery: Gallery, faces: FaceClient, settings: MatchingSettings) -> None:
        self._gallery = gallery
        self._faces = faces
        self._settings = settings

    @rpc_errors
    def Enroll(self, request: gallery_pb2.EnrollRequest, context: grpc.ServicerContext) -> gallery_pb2.EnrollResponse:
        subject_id = check_subject_id(request.subject_id)
        if not request.images:
            raise InvalidInput("no images: send at least one image with the subject's face")
        if len(request.images) > self._settings.max_enroll_images:
            raise InvalidInput(f"{len(request.images)} images; at most {self._settings.max_enroll_images} per call")
        response = gallery_pb2.EnrollResponse(subject_id=subject_id)
        vectors, qualities, model = [], [], ("", "")
        for index, image in enumerate(request.images):
            result = response.results.add(image_index=index)
            try:
                probe = self._faces.largest_face(image)
            except InvalidInput as exc:
                result.reason = str(exc)
                continue
            except PeerUnavailable as exc:
                context.abort(grpc.StatusCode.UNAVAILABLE, f"face services unavailable: {exc}")
            result.quality.CopyFrom(probe.face.quality)
            result.box.CopyFrom(probe.face.box)
            failures = quality_failures(probe.face.quality, self._settings)
            if failures:
                result.reason = rejection_reason(failures)
                continue
            result.accepted = True
            vectors.append(probe.vector)
            qualities.append(probe.face.quality.score)
            model = (probe.model_name, probe.model_version)
        if vectors:
            response.templates_added = self._gallery.enroll(
                subject_id, request.display_name, list(request.watchlists), vectors, model, qualities
            )
        return response

    @rpc_errors
    def DeleteSubject(self, request: gallery_pb2.DeleteSubjectRequest, context: grpc.ServicerContext) -> gallery_pb2.DeleteSubjectResponse:  # noqa: E501
        subject_id = check_subject_id(request.subject_id)
        existed = self._gallery.store.get_subject(subject_id) is not None
        removed = self._gallery.delete(subject_id)
        return gallery_pb2.DeleteSubjectResponse(deleted=existed, templates_removed=removed)

    @rpc_errors
    def GetSubject(self, request: gallery_pb2.GetSubjectRequest, context: grpc.ServicerContext) -> gallery_pb2.Subject:
        subject_id = check_subject_id(request.subject_id)
        record = self._gallery.store.get_subject(subject_id)
        if record is None:
            raise NotFound(f"subject {subject_id!r} is not enrolled")
        return subject_proto(record)

    @rpc_errors
    def ListSubjects(self, request: gallery_pb2.ListSubjectsRequest, context: grpc.ServicerContext) -> gallery_pb2.ListSubjectsResponse:  # noqa: E501
        limit = min(request.page_size or 100, 1000)
        records = self._gallery.store.list_subjects(request.watchlist or None, limit=limit + 1,
                                                    after=request.page_token or None)  # fmt: skip
        response = gallery_pb2.ListSubjectsResponse()
        response.subjects.extend(subject_proto(record) for record in records[:limit])
        if len(records) > limit:
            response.next_page_token = records[limit - 1].subject_id
        return response

    @rpc_errors
    def Verify(self, request: gallery_pb2.VerifyRequest, context: grpc.ServicerContext) -> gallery_pb2.VerifyResponse:
        subject_id = check_subject_id(request.subject_id)
        if self._gallery.store.get_subject(subject_id) is None:
            raise NotFound(f"subject {subject_id!r} is not enrolled")
        probe = self._probe(request.probe_image, context)
        return gallery_pb2.VerifyResponse(verification=self._gallery.verify(probe.vector, subject_id),
                                          probe_box=probe.face.box, threshold_distance=self._gallery.max_distance)  # fmt: skip

    @rpc_errors
    def Search(self, request: gallery_pb2.SearchRequest, context: grpc.ServicerContext) -> gallery_pb2.SearchResponse:
        probe = self._probe(request.probe_image, context)
        watchlists = [request.watchlist] if request.watchlist else []
        candidates = self._gallery.search(probe.vector[None, :], request.top_k or self._settings.top_k, watchlists)[0]
        return gallery_pb2.SearchResponse(candidates=candidates, probe_box=probe.face.box,
                                          threshold_distance=self._gallery.max_distance)  # fmt: skip

    def _probe(self, image: bytes, context: grpc.ServicerContext):  # type: ignore[no-untyped-def]
        if not image:
            raise InvalidInput("probe_image is empty")
        try:
            return self._faces.largest_face(image)
        except PeerUnavailable as exc:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"face services unavailable: {exc}")


def open_gallery(settings: MatchingSettings) -> Gallery:
    old_keys = settings.previous_template_keys.get_secret_value() if settings.previous_template_keys else ""
    cipher = TemplateCipher.from_base64(settings.template_key.get_secret_value(), settings.template_key_id, old_keys)
    store = GalleryStore.open(settings.database_url.get_secret_value(), cipher)
    return Gallery(store, settings.match_max_distance, settings.refresh_interval_s)


def main() -> None:
    settings = MatchingSettings()
    gallery = open_gallery(settings)
    faces = FaceClient(settings.detection_addr, settings.embedding_addr, settings.peer_timeout_s)
    servicer = Servicer(gallery_pb2_grpc.add_GalleryServiceServicer_to_server,
                        GalleryServicer(gallery, faces, settings), "sightline.v1.GalleryService")  # fmt: skip
    stage = Stage(SERVICE, EMBEDDINGS, [MATCHES], one_at_a_time(lambda event: match_frame(gallery, settings.top_k, event)))
    run_service(SERVICE, settings, KafkaSettings(), [servicer], [stage], on_stop=gallery.close)
