"""Right to erasure: the notice matching publishes when a subject is erased, and how it is published.

``GalleryService.EraseSubject`` deletes the subject, its templates and every membership in the gallery database;
this replica drops it from its index at once and every other replica when it sees the gallery version move (within
``refresh_interval_s``). It then publishes ``SubjectErased`` on ``sightline.erasures.v1`` (keyed by subject id, kept
a year) so that integrators holding copies of results about the subject (decisions, alerts) can erase theirs, and
audits the erasure (ERASE) with the request's reference. Erasing an id that is not enrolled still publishes and
audits (``erased=false``): the request was made, and copies elsewhere may still exist.
"""

from __future__ import annotations

from collections.abc import Callable

from sightline.common import codec
from sightline.common.audit import TopicPublisher
from sightline.common.topics import ERASURES
from sightline.matching.store import SubjectRemoval
from sightline.v1 import events_pb2

ErasureNotifier = Callable[[events_pb2.SubjectErased], None]


def erasure_notice(subject_id: str, reference: str, removal: SubjectRemoval) -> events_pb2.SubjectErased:
    return events_pb2.SubjectErased(
        subject_id=subject_id,
        templates_removed=removal.templates_removed,
        watchlists=list(removal.watchlists),
        reference=reference,
        erased_at=codec.now(),
    )


def erasure_publisher(publisher: TopicPublisher) -> ErasureNotifier:
    """Publishes each notice on ``sightline.erasures.v1`` and waits for the broker's acknowledgement (raises if none):
    the caller must know whether integrators were told."""

    def publish(notice: events_pb2.SubjectErased) -> None:
        publisher.send(ERASURES.name, notice.subject_id.encode(), notice.SerializeToString(), wait=True)

    return publish
