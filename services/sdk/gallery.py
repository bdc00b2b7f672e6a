"""The gallery API (``GalleryService`` on matching): enrol, search (1:N), verify (1:1), subjects, delete, erase.

Enrolment, search and verification analyse the images they are given, so they get ``enroll_timeout_s``; the other
calls get the client's ``timeout_s``. Images are bytes or file paths (``inputs.py``). Listing pages through the
whole gallery (``subjects``), so a caller never handles page tokens.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime

from sightline.sdk.connection import Connection
from sightline.sdk.inputs import Image, image_bytes, timestamp
from sightline.v1 import gallery_pb2, gallery_pb2_grpc

PAGE_SIZE = 200


class GalleryApi:
    """Enrolled subjects and their templates: ``client.gallery``."""

    def __init__(self, connection: Connection, analysis_timeout_s: float) -> None:
        self._connection = connection
        self._analysis_timeout_s = analysis_timeout_s

    def _stub(self) -> gallery_pb2_grpc.GalleryServiceStub:
        return self._connection.stub(gallery_pb2_grpc.GalleryServiceStub)

    def enroll(
        self,
        subject_id: str,
        images: Iterable[Image],
        *,
        watchlists: Sequence[str] = (),
        display_name: str = "",
        purpose: str = "",
        membership_expires_at: datetime | None = None,
    ) -> gallery_pb2.EnrollResponse:
        """Enrol a subject (or add templates to one) from images with one face each; each image's result says
        whether it was accepted, and why not. A watchlist that does not exist yet is created, owned by the caller."""
        request = gallery_pb2.EnrollRequest(
            subject_id=subject_id,
            images=[image_bytes(image) for image in images],
            watchlists=list(watchlists),
            display_name=display_name,
            purpose=purpose,
        )
        if membership_expires_at is not None:
            request.membership_expires_at.CopyFrom(timestamp(membership_expires_at))
        reply: gallery_pb2.EnrollResponse = self._connection.call(
            self._stub(), "Enroll", request, self._analysis_timeout_s
        )
        return reply

    def search(self, probe: Image, *, top_k: int = 5, watchlist: str = "") -> gallery_pb2.SearchResponse:
        """1:N: the enrolled subjects nearest to the face in the probe (within ``watchlist`` when given), best
        first, each with its distance, similarity and false match rate."""
        request = gallery_pb2.SearchRequest(probe_image=image_bytes(probe), top_k=top_k, watchlist=watchlist)
        reply: gallery_pb2.SearchResponse = self._connection.call(
            self._stub(), "Search", request, self._analysis_timeout_s
        )
        return reply

    def verify(self, subject_id: str, probe: Image) -> gallery_pb2.VerifyResponse:
        """1:1: is the face in the probe the subject? ``reply.verification.verified`` with its figures."""
        request = gallery_pb2.VerifyRequest(subject_id=subject_id, probe_image=image_bytes(probe))
        reply: gallery_pb2.VerifyResponse = self._connection.call(
            self._stub(), "Verify", request, self._analysis_timeout_s
        )
        return reply

    def subject(self, subject_id: str) -> gallery_pb2.Subject:
        """One subject; ``NotFound`` when it is not enrolled."""
        reply: gallery_pb2.Subject = self._connection.call(
            self._stub(), "GetSubject", gallery_pb2.GetSubjectRequest(subject_id=subject_id)
        )
        return reply

    def subjects(self, *, watchlist: str = "") -> Iterator[gallery_pb2.Subject]:
        """Every enrolled subject (only those on ``watchlist`` when given), page after page."""
        page = ""
        while True:
            request = gallery_pb2.ListSubjectsRequest(watchlist=watchlist, page_size=PAGE_SIZE, page_token=page)
            reply = self._connection.call(self._stub(), "ListSubjects", request)
            yield from reply.subjects
            page = reply.next_page_token
            if not page:
                return

    def delete(self, subject_id: str) -> gallery_pb2.DeleteSubjectResponse:
        """Delete a subject, its templates and memberships (``reply.deleted`` is False when it was not enrolled).
        For a data subject's erasure request use ``erase``, which is published and audited as one."""
        reply: gallery_pb2.DeleteSubjectResponse = self._connection.call(
            self._stub(), "DeleteSubject", gallery_pb2.DeleteSubjectRequest(subject_id=subject_id)
        )
        return reply

    def erase(self, subject_id: str, reference: str) -> gallery_pb2.EraseSubjectResponse:
        """Right to erasure: the subject gone everywhere, ``SubjectErased`` published on ``sightline.erasures.v1``
        and the request (``reference``, e.g. a case number) audited. Idempotent; cannot be undone."""
        request = gallery_pb2.EraseSubjectRequest(subject_id=subject_id, reference=reference)
        reply: gallery_pb2.EraseSubjectResponse = self._connection.call(self._stub(), "EraseSubject", request)
        return reply
