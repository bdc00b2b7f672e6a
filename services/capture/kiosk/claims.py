"""A gate session's claim: the subject the traveller's frames are verified against, and the gallery calls it needs.

A kiosk claims an enrolled traveller (checked in the gallery), or gives the chip's portrait or a photographed data
page (whose MRZ gives the document number): the portrait is then enrolled as a session-scoped subject,
``session-<session id>`` (common/subjects.py), a prefix matching reserves for capture, deleted when the session ends.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc
import numpy as np

from sightline.common.images import ImageError, decode_image, encode_jpeg
from sightline.common.rpc import InvalidInput, Unavailable, channel
from sightline.common.subjects import SESSION_SUBJECT_PREFIX, is_session_subject, session_subject_id
from sightline.v1 import gallery_pb2, gallery_pb2_grpc, session_pb2

PORTRAIT_MARGIN = 0.35  # of the portrait's size, kept around it when it is cut out of the page


@dataclass(frozen=True)
class Claim:
    kind: int  # session_pb2.ClaimKind
    subject_id: str
    document_number: str = ""
    session_scoped: bool = False  # a template enrolled for this session only, deleted when it ends


class SessionGallery:
    """The gallery calls a session needs: check a subject, enrol and delete session-scoped templates."""

    def __init__(self, address: str, timeout_s: float, token: str | None = None) -> None:
        """``token``: None sends this process's own (``channel``), as capture's service principal must."""
        self._address = address
        self._timeout = timeout_s
        self._channel = channel(address, token=token)
        self._stub = gallery_pb2_grpc.GalleryServiceStub(self._channel)

    def check_enrolled(self, subject_id: str) -> None:
        try:
            self._stub.GetSubject(gallery_pb2.GetSubjectRequest(subject_id=subject_id), timeout=self._timeout)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                raise InvalidInput(
                    f"subject {subject_id!r} is not enrolled: a subject claim needs an enrolled traveller"
                ) from None
            raise self._error(exc) from None

    def enroll_portrait(self, subject_id: str, image: bytes, session_id: str) -> None:
        """Enrol the session's reference face; InvalidInput naming the gallery's reason when it has no usable face."""
        purpose = f"e-channel session {session_id} (deleted when it ends)"
        request = gallery_pb2.EnrollRequest(subject_id=subject_id, images=[image], purpose=purpose)
        try:
            reply = self._stub.Enroll(request, timeout=self._timeout)
        except grpc.RpcError as exc:
            raise self._error(exc) from None
        if not reply.templates_added:
            reason = reply.results[0].reason if reply.results else "no face found"
            raise InvalidInput(f"no usable face in the portrait: {reason}")

    def delete(self, subject_id: str, timeout_s: float | None = None) -> None:
        request = gallery_pb2.DeleteSubjectRequest(subject_id=subject_id)
        try:
            self._stub.DeleteSubject(request, timeout=self._timeout if timeout_s is None else timeout_s)
        except grpc.RpcError as exc:
            raise self._error(exc) from None

    def session_subjects(self, older_than: float) -> list[str]:
        """Ids of session-scoped subjects created before ``older_than`` (epoch seconds)."""
        found, after = [], SESSION_SUBJECT_PREFIX
        while True:
            # Keyset pagination by subject id (the page token is the last id): starting right after the prefix
            # reads only the session-scoped subjects, however large the gallery.
            request = gallery_pb2.ListSubjectsRequest(page_size=500, page_token=after)
            try:
                reply = self._stub.ListSubjects(request, timeout=self._timeout)
            except grpc.RpcError as exc:
                raise self._error(exc) from None
            for subject in reply.subjects:
                if not is_session_subject(subject.subject_id):
                    return found
                if subject.created_at.ToNanoseconds() / 1e9 < older_than:
                    found.append(subject.subject_id)
            if not reply.next_page_token:
                return found
            after = reply.next_page_token

    def close(self) -> None:
        """Close the channel; a call still running fails at once (CANCELLED)."""
        self._channel.close()

    def _error(self, exc: grpc.RpcError) -> Exception:
        if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
            return InvalidInput(exc.details())
        if exc.code() in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED):
            return Unavailable(
                f"the gallery (matching at {self._address}) refused capture's call: {exc.details()} "
                "(capture's token needs the enroller role for session templates)"
            )
        return Unavailable(f"gallery (matching at {self._address}): {exc.code().name}: {exc.details()}")


def resolve_claim(request: session_pb2.OpenSessionRequest, session_id: str, gallery: SessionGallery) -> Claim:
    """The subject the session's frames are verified against; InvalidInput saying why a claim cannot be used."""
    which = request.WhichOneof("claim")
    scoped_id = session_subject_id(session_id)
    if which == "subject_id":
        gallery.check_enrolled(request.subject_id)
        return Claim(session_pb2.CLAIM_KIND_SUBJECT, request.subject_id)
    if which == "portrait":
        gallery.enroll_portrait(scoped_id, request.portrait, session_id)
        return Claim(session_pb2.CLAIM_KIND_PORTRAIT, scoped_id, session_scoped=True)
    if which == "document_page":
        portrait, document_number = read_document_claim(request.document_page)
        gallery.enroll_portrait(scoped_id, portrait, session_id)
        return Claim(session_pb2.CLAIM_KIND_DOCUMENT, scoped_id, document_number, session_scoped=True)
    raise InvalidInput("no claim: set subject_id, portrait or document_page")


def read_document_claim(page: bytes) -> tuple[bytes, str]:
    """The portrait (cut out of the page, JPEG) and the document number of a photographed data page."""
    from sightline.capture.kiosk.document import read_document  # OCR is heavy: loaded on the first document claim

    try:
        rgb = decode_image(page)
    except ImageError as exc:
        raise InvalidInput(f"document page: {exc}") from None
    try:
        reading = read_document(rgb)
    except RuntimeError as exc:  # rapidocr missing from this install
        raise Unavailable(f"document reading is not available here: {exc}") from None
    if not reading.ok:
        raise InvalidInput(f"document page refused ({reading.error}): {'; '.join(reading.errors)}")
    assert reading.portrait_box is not None and reading.claim is not None
    return encode_jpeg(_portrait_crop(rgb, reading.portrait_box), 95), reading.claim


def _portrait_crop(rgb: np.ndarray, box: tuple[float, float, float, float]) -> np.ndarray:
    """The portrait with some of the page around it (the face detector needs context)."""
    x1, y1, x2, y2 = box
    mx, my = PORTRAIT_MARGIN * (x2 - x1), PORTRAIT_MARGIN * (y2 - y1)
    height, width = rgb.shape[:2]
    return rgb[max(int(y1 - my), 0) : min(int(y2 + my), height), max(int(x1 - mx), 0) : min(int(x2 + mx), width)]
