"""Matching service: owns the gallery; searches each embedded face 1:N and verifies 1:1 claims.

Stream path: consumes ``sightline.embeddings.v1`` and publishes one ``MatchResult`` per frame to
``sightline.matches.v1``. Match results hold scores and subject ids, never descriptors: a face that matches nobody
leaves nothing behind once the short-retention topics expire. Stream searches are audited in aggregate
(``stream_audit.py``). Request path: ``GalleryService`` (enrol, delete, erase, list, verify, search), which calls
detection and embedding over gRPC, and ``WatchlistService`` (``watchlists.py``); every call that touches a person's
data is audited (``audit_trail.py``) in the audit chain matching shares with decision, a write's records through the
gallery's audit outbox, committed with the write (``audit_outbox.py``). With a sharded gallery
(``shards.py``) every replica also serves ``ShardService``, through which the other shards' replicas search and verify
on its shard.

Every replica also reads the erasure notices (``erasure_listener.py``) and matches only while in step with the
gallery database (``readiness.py``): otherwise searches are UNAVAILABLE, stream frames fail with ``GalleryUnavailable``
(to be retried, not matched) and gRPC health is NOT_SERVING.
"""

from __future__ import annotations

import logging

import grpc
import numpy as np

from sightline.common import codec
from sightline.common.audit import (
    MAX_DETAIL_CHARS,
    Action,
    AuditLog,
    TopicPublisher,
    audit_topic_publisher,
    principal_of,
)
from sightline.common.config import KafkaSettings
from sightline.common.denials import DenialAudit
from sightline.common.models.descriptor_spec import DESCRIPTOR_SIZE
from sightline.common.rpc import InvalidInput, NotFound, rpc_errors
from sightline.common.runtime import Servicer, run_service
from sightline.common.stage import EventProcessor, InputEvent, Output, Stage
from sightline.common.topics import EMBEDDINGS, MATCHES
from sightline.matching.ann import AnnSettings
from sightline.matching.audit_outbox import AuditEntry, OutboxPolicy
from sightline.matching.audit_trail import (
    DELETE_PURPOSE,
    ENROL_PURPOSE,
    ERASE_PURPOSE,
    MAX_PURPOSE_CHARS,
    SEARCH_PURPOSE,
    VERIFY_PURPOSE,
    GalleryAudit,
    audits_refusals,
    joined_names,
)
from sightline.matching.enrolment import quality_failures, rejection_reason
from sightline.matching.erasure import ErasureNotifier, erasure_notice, erasure_publisher
from sightline.matching.erasure_listener import ErasureListener
from sightline.matching.gallery import Gallery, SnapshotPolicy
from sightline.matching.names import (
    check_enrolled_subject_id,
    check_reference,
    check_subject_id,
    check_watchlist_name,
)
from sightline.matching.peers import FaceClient, PeerUnavailable
from sightline.matching.settings import MatchingSettings
from sightline.matching.shards import RemoteShards, ShardServicer
from sightline.matching.snapshots import SnapshotStore
from sightline.matching.store import Enrolment, GalleryStore, SubjectRecord, SubjectRemoval
from sightline.matching.stream_audit import StreamSearchAudit
from sightline.matching.templates import TemplateCipher
from sightline.matching.watchlists import WatchlistServicer, future_expiry
from sightline.v1 import events_pb2, gallery_pb2, gallery_pb2_grpc

SERVICE = "matching"
MAX_ENROL_WATCHLISTS = 20
log = logging.getLogger(__name__)

__all__ = ["GalleryServicer", "Matcher", "check_subject_id", "main", "open_gallery"]


class Matcher(EventProcessor):
    """The stream stage's processor: 1:N candidates for every face, plus a 1:1 verification when the frame carries a
    claim. ``stream_audit``: where the searches are counted for the audit log (``stream_audit.py``)."""

    def __init__(self, gallery: Gallery, top_k: int, stream_audit: StreamSearchAudit | None = None) -> None:
        self.gallery = gallery
        self.top_k = top_k
        self.stream_audit = stream_audit

    def process_event(self, event: InputEvent) -> list[Output]:
        embedded = codec.parse(events_pb2.FacesEmbedded, event.value)
        frame = embedded.frame
        if len(frame.source_id) > MAX_DETAIL_CHARS:
            # The stream-search audit record names the source: a search it cannot record must not happen. Capture's
            # API refuses such ids (limits.py); this is for frames some other producer wrote.
            raise codec.MalformedEvent(
                f"the frame's source_id is longer than {MAX_DETAIL_CHARS} characters, too long "
                "to be audited: not searched"
            )
        result = events_pb2.MatchResult(
            frame=frame, model_name=embedded.model_name, model_version=embedded.model_version
        )
        within_threshold = 0
        if embedded.faces:
            vectors = _descriptors(embedded)
            candidates = self.gallery.search(vectors, self.top_k, frame.watchlists)
            for face, vector, found in zip(embedded.faces, vectors, candidates, strict=True):
                match = result.faces.add(
                    face_index=face.face_index,
                    box=face.box,
                    quality=face.quality,
                    candidates=found,
                    landmarks=face.landmarks,
                    detector_keypoints=face.detector_keypoints,
                    liveness=face.liveness,
                    track_id=face.track_id,
                )
                within_threshold += sum(self.gallery.within_threshold(candidate) for candidate in found)
                if frame.claim_subject_id:
                    match.verification.CopyFrom(self.gallery.verify(vector, frame.claim_subject_id))
        if self.stream_audit is not None:
            verifications = len(embedded.faces) if frame.claim_subject_id else 0
            self.stream_audit.count(frame, len(embedded.faces), within_threshold, verifications)
        result.matched_at.CopyFrom(codec.now())
        return [Output(MATCHES, frame.source_id.encode(), result.SerializeToString())]


def _descriptors(embedded: events_pb2.FacesEmbedded) -> np.ndarray:
    """The faces' descriptors as one float32 matrix; MalformedEvent for a descriptor of the wrong length or with a
    value that is not a finite number (NaN would compare as no distance at all and reach decision as one)."""
    for face in embedded.faces:
        if len(face.vector) != DESCRIPTOR_SIZE:
            raise codec.MalformedEvent(
                f"face {face.face_index}'s descriptor has {len(face.vector)} values, expected {DESCRIPTOR_SIZE}"
            )
    vectors = np.array([face.vector for face in embedded.faces], dtype=np.float32)
    if not np.isfinite(vectors).all():
        raise codec.MalformedEvent("a descriptor holds a value that is not a finite number")
    return vectors


def subject_proto(record: SubjectRecord) -> gallery_pb2.Subject:
    subject = gallery_pb2.Subject(
        subject_id=record.subject_id,
        display_name=record.display_name,
        watchlists=sorted(record.watchlists),
        template_count=record.template_count,
    )
    subject.created_at.FromDatetime(record.created_at)
    return subject


class GalleryServicer(gallery_pb2_grpc.GalleryServiceServicer):
    def __init__(
        self,
        gallery: Gallery,
        faces: FaceClient,
        settings: MatchingSettings,
        audit: GalleryAudit,
        notify_erased: ErasureNotifier | None = None,
    ) -> None:
        self._gallery = gallery
        self._faces = faces
        self._settings = settings
        self._audit = audit
        self._notify_erased = notify_erased
        audit.outbox_of(gallery)  # the relay of the write records, running from now on

    @rpc_errors
    @audits_refusals(Action.ENROL, ENROL_PURPOSE)
    def Enroll(self, request: gallery_pb2.EnrollRequest, context: grpc.ServicerContext) -> gallery_pb2.EnrollResponse:
        subject_id = check_enrolled_subject_id(request.subject_id, principal_of(context))  # session-*: capture's
        watchlists = [check_watchlist_name(name) for name in dict.fromkeys(request.watchlists)]
        if len(watchlists) > MAX_ENROL_WATCHLISTS:
            raise InvalidInput(f"{len(watchlists)} watchlists; at most {MAX_ENROL_WATCHLISTS} per call")
        if len(request.purpose) > MAX_PURPOSE_CHARS:
            raise InvalidInput(f"purpose is longer than {MAX_PURPOSE_CHARS} characters")
        expires_at = future_expiry(request, "membership_expires_at")
        if expires_at is not None and not watchlists:
            raise InvalidInput("membership_expires_at needs watchlists: it is when the memberships this call adds end")
        if not request.images:
            raise InvalidInput("no images: send at least one image with the subject's face")
        if len(request.images) > self._settings.max_enroll_images:
            raise InvalidInput(f"{len(request.images)} images; at most {self._settings.max_enroll_images} per call")
        response = gallery_pb2.EnrollResponse(subject_id=subject_id)
        vectors, qualities, model = self._templates(request.images, response, context)
        details: dict[str, object] = {
            "images": len(request.images),
            "images_rejected": len(request.images) - len(vectors),
            "watchlists": joined_names(watchlists),
            "membership_expires_at": expires_at.isoformat() if expires_at else "",
        }
        purpose = request.purpose.strip() or ENROL_PURPOSE
        if not vectors:
            result = "rejected: no usable image"
            self._gallery.record_audit([self._audit.entry(context, Action.ENROL, subject_id, purpose, result, details)])
            return response

        def audited(enrolment: Enrolment) -> list[AuditEntry]:
            enrolled = {
                "templates_added": enrolment.templates_added,
                "subject_created": enrolment.created,
                "watchlists_created": joined_names(enrolment.watchlists_created),
            }
            return [self._audit.entry(context, Action.ENROL, subject_id, purpose, "ok", {**details, **enrolled})]

        enrolled = self._gallery.enroll(
            subject_id,
            request.display_name,
            watchlists,
            vectors,
            model,
            qualities,
            expires_at,
            owner=self._audit.caller(context),
            audit=audited,
        )
        response.templates_added = enrolled.templates_added
        return response

    def _templates(
        self, images: list[bytes], response: gallery_pb2.EnrollResponse, context: grpc.ServicerContext
    ) -> tuple[list[np.ndarray], list[float], tuple[str, str]]:
        """The descriptors of the images that pass the quality gate; one result per image in ``response``."""
        vectors, qualities, model = [], [], ("", "")
        for index, image in enumerate(images):
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
        return vectors, qualities, model

    @rpc_errors
    @audits_refusals(Action.DELETE, DELETE_PURPOSE)
    def DeleteSubject(
        self, request: gallery_pb2.DeleteSubjectRequest, context: grpc.ServicerContext
    ) -> gallery_pb2.DeleteSubjectResponse:
        subject_id = check_subject_id(request.subject_id)

        def audited(removal: SubjectRemoval) -> list[AuditEntry]:
            details = {"templates_removed": removal.templates_removed, "watchlists": joined_names(removal.watchlists)}
            result = "deleted" if removal.existed else "not enrolled"
            return [self._audit.entry(context, Action.DELETE, subject_id, DELETE_PURPOSE, result, details)]

        removal = self._gallery.remove(subject_id, audited)
        return gallery_pb2.DeleteSubjectResponse(deleted=removal.existed, templates_removed=removal.templates_removed)

    @rpc_errors
    @audits_refusals(Action.ERASE, ERASE_PURPOSE)
    def EraseSubject(
        self, request: gallery_pb2.EraseSubjectRequest, context: grpc.ServicerContext
    ) -> gallery_pb2.EraseSubjectResponse:
        subject_id = check_subject_id(request.subject_id)
        reference = check_reference(request.reference)

        def audited(removal: SubjectRemoval) -> list[AuditEntry]:
            details = {
                "reference": reference,
                "templates_removed": removal.templates_removed,
                "watchlists": joined_names(removal.watchlists),
            }
            result = "erased" if removal.existed else "nothing enrolled"
            return [self._audit.entry(context, Action.ERASE, subject_id, ERASE_PURPOSE, result, details)]

        removal = self._gallery.remove(subject_id, audited)
        # The notice goes out once the erasure has committed (a replica checks the database on it), so whether it
        # did is a record of its own, after the erasure's.
        unpublished = self._publish_erasure(erasure_notice(subject_id, reference, removal))
        notice = f"notice not published: {unpublished}" if unpublished else "notice published"
        told = self._audit.entry(context, Action.ERASE, subject_id, ERASE_PURPOSE, notice, {"reference": reference})
        self._gallery.record_audit([told])
        if unpublished:
            context.abort(
                grpc.StatusCode.UNAVAILABLE,
                f"subject {subject_id!r} is erased from the gallery, but the erasure notice could not be "
                f"published ({unpublished}); erase it again to publish the notice",
            )
        return gallery_pb2.EraseSubjectResponse(
            erased=removal.existed, templates_removed=removal.templates_removed, watchlists=list(removal.watchlists)
        )

    def _publish_erasure(self, notice: events_pb2.SubjectErased) -> str:
        """Publishes the notice; "" when done, else why not."""
        if self._notify_erased is None:
            return "no publisher configured"
        try:
            self._notify_erased(notice)
        except Exception as error:
            log.warning("could not publish an erasure notice", exc_info=True)
            return f"{type(error).__name__}: {error}"
        return ""

    @rpc_errors
    def GetSubject(self, request: gallery_pb2.GetSubjectRequest, context: grpc.ServicerContext) -> gallery_pb2.Subject:
        subject_id = check_subject_id(request.subject_id)
        record = self._gallery.store.get_subject(subject_id)
        if record is None:
            raise NotFound(f"subject {subject_id!r} is not enrolled")
        return subject_proto(record)

    @rpc_errors
    def ListSubjects(
        self, request: gallery_pb2.ListSubjectsRequest, context: grpc.ServicerContext
    ) -> gallery_pb2.ListSubjectsResponse:
        limit = min(request.page_size or 100, 1000)
        records = self._gallery.store.list_subjects(
            request.watchlist or None, limit=limit + 1, after=request.page_token or None
        )
        response = gallery_pb2.ListSubjectsResponse()
        response.subjects.extend(subject_proto(record) for record in records[:limit])
        if len(records) > limit:
            response.next_page_token = records[limit - 1].subject_id
        return response

    @rpc_errors
    @audits_refusals(Action.VERIFY, VERIFY_PURPOSE)
    def Verify(self, request: gallery_pb2.VerifyRequest, context: grpc.ServicerContext) -> gallery_pb2.VerifyResponse:
        subject_id = check_subject_id(request.subject_id)
        self._gallery.readiness.require()  # before calling detection and embedding for nothing
        if self._gallery.store.get_subject(subject_id) is None:
            raise NotFound(f"subject {subject_id!r} is not enrolled")
        probe = self._probe(request.probe_image, context)
        verification = self._gallery.verify(probe.vector, subject_id)
        self._audit.record(
            context,
            Action.VERIFY,
            subject_id,
            VERIFY_PURPOSE,
            "verified" if verification.verified else "not verified",
            {"distance": round(verification.distance, 4), "threshold": round(self._gallery.max_distance, 4)},
        )
        return gallery_pb2.VerifyResponse(
            verification=verification, probe_box=probe.face.box, threshold_distance=self._gallery.max_distance
        )

    @rpc_errors
    @audits_refusals(Action.SEARCH, SEARCH_PURPOSE)
    def Search(self, request: gallery_pb2.SearchRequest, context: grpc.ServicerContext) -> gallery_pb2.SearchResponse:
        watchlists = [check_watchlist_name(request.watchlist)] if request.watchlist else []
        self._gallery.readiness.require()  # before calling detection and embedding for nothing
        probe = self._probe(request.probe_image, context)
        top_k = request.top_k or self._settings.top_k
        candidates = self._gallery.search(probe.vector[None, :], top_k, watchlists)[0]
        within = [c.subject_id for c in candidates if self._gallery.within_threshold(c)]
        # The record names the best candidate within threshold, so `audit list --subject X` finds searches that
        # pointed at X; every id shown to the caller is in the details.
        self._audit.record(
            context,
            Action.SEARCH,
            within[0] if within else "",
            SEARCH_PURPOSE,
            "ok",
            {
                "watchlist": request.watchlist or "*",
                "top_k": top_k,
                "candidates": len(candidates),
                "within_threshold": len(within),
                "candidate_ids": joined_names(c.subject_id for c in candidates),
            },
        )
        return gallery_pb2.SearchResponse(
            candidates=candidates, probe_box=probe.face.box, threshold_distance=self._gallery.max_distance
        )

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
    # With shards, the other shards' replicas answer this one's searches and verifications (shards.py).
    remote = RemoteShards.from_settings(settings) if settings.shards > 1 else None
    try:
        return Gallery(
            store,
            settings.match_max_distance,
            settings.refresh_interval_s,
            max_staleness_s=settings.max_staleness_s,
            index_settings=AnnSettings(exact_below=settings.exact_below, mask_cache_size=settings.mask_cache_size),
            snapshots=snapshot_policy(settings, store),
            shard=settings.shard,
            shards=settings.shards,
            remote=remote,
        )
    except BaseException:
        if remote is not None:
            remote.close()
        raise


def outbox_policy(settings: MatchingSettings) -> OutboxPolicy:
    return OutboxPolicy(
        poll_s=settings.audit_outbox_poll_s,
        retry_max_s=settings.audit_outbox_retry_max_s,
        wait_s=settings.audit_outbox_wait_s,
    )


def snapshot_policy(settings: MatchingSettings, store: GalleryStore) -> SnapshotPolicy | None:
    if not settings.snapshots:
        return None
    return SnapshotPolicy(
        SnapshotStore(settings.snapshot_root() / store.gallery_id, store.cipher, settings.shard, settings.shards),
        settings.snapshot_interval_s,
        settings.snapshot_after_removal_s,
        settings.change_log_days,
    )


def main() -> None:
    settings, kafka = MatchingSettings(), KafkaSettings()
    gallery = open_gallery(settings)
    publisher = TopicPublisher(kafka)
    audit = AuditLog.open_configured(publish=audit_topic_publisher(publisher))
    trail = GalleryAudit(audit, outbox=outbox_policy(settings))
    stream_audit = StreamSearchAudit(audit, settings.stream_audit_interval_s)
    faces = FaceClient(settings.detection_addr, settings.embedding_addr, settings.peer_timeout_s)
    servicers = [
        Servicer.of(GalleryServicer(gallery, faces, settings, trail, erasure_publisher(publisher))),
        Servicer.of(WatchlistServicer(gallery, trail)),
    ]
    # Refused callers of ShardService are audited like the server's own refusals (repeats aggregated).
    shard_denials = DenialAudit(audit) if settings.shards > 1 else None
    if shard_denials is not None:
        servicers.append(Servicer.of(ShardServicer(gallery, settings.shard, settings.shards, shard_denials)))
    stage = Stage(SERVICE, EMBEDDINGS, [MATCHES], Matcher(gallery, settings.top_k, stream_audit))
    erasures = ErasureListener(kafka, gallery.erased).start()  # every replica hears every erasure notice

    def close() -> None:
        erasures.close()
        stream_audit.close()  # the last stream-search records, before the log closes
        if shard_denials is not None:
            shard_denials.close()
        gallery.close()  # its audit outbox's last pass first, while the audit log is open
        publisher.close()
        audit.close()

    run_service(
        SERVICE,
        settings,
        kafka,
        servicers,
        [stage],
        on_stop=close,
        audit=audit,
        on_serving=lambda server: gallery.readiness.subscribe(server.set_serving),
    )  # NOT_SERVING when behind
