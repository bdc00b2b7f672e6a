"""Right to erasure on the decision side: the notices matching publishes when a subject is erased are applied here.

A ``SubjectErased`` notice on ``sightline.erasures.v1`` deletes the subject's alerts with their reviews, its "not this
person" feedback, and the e-channel sessions claiming it; one ERASE audit record names the counts and the request's
reference. The stores remember each erasure for their retention span, so a result still in flight at the erasure
cannot bring the subject back (docs/watchlists.md). No status event goes on the alerts topic: integrators get the
notice itself.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TypeVar

from sightline.common import codec
from sightline.common.audit import Action, AuditLog
from sightline.common.stage import EventProcessor, InputEvent, Output, Stage
from sightline.common.topics import ERASURES
from sightline.decision.echannel.desk import SessionDesk
from sightline.decision.review.store import SYSTEM_PRINCIPAL, ReviewStore
from sightline.v1 import events_pb2

ERASURE_STAGE = "decision-erasures"
ERASURE_PURPOSE = "right to erasure"
ERASURE_ATTEMPTS = 3  # a database blip must not leave a notice unapplied: each step is tried again before giving up
ERASURE_RETRY_SECONDS = 2.0
log = logging.getLogger(__name__)
T = TypeVar("T")


class Eraser(EventProcessor):
    """The erasures stage's processor: applies one right-to-erasure notice at a time."""

    def __init__(self, reviews: ReviewStore, sessions: SessionDesk, audit: AuditLog) -> None:
        self.reviews = reviews
        self.sessions = sessions
        self.audit = audit

    def process_event(self, event: InputEvent) -> list[Output]:
        """Delete the subject's alerts with their reviews, its "not this person" feedback, and the sessions claiming
        it, then write one ERASE audit record with the counts and the reference; nothing is published.

        A replayed notice deletes nothing more (the stores remember the erasures they applied) and is audited again,
        with zero counts: the audit trail shows every time the notice was handled.
        """
        notice = codec.parse(events_pb2.SubjectErased, event.value)
        subject_id = notice.subject_id
        if not subject_id:
            raise codec.MalformedEvent("an erasure notice needs a subject id")
        erased_at = notice.erased_at.ToDatetime(UTC) if notice.HasField("erased_at") else datetime.now(UTC)
        alerts = _persistently("erasing alerts", lambda: self.reviews.erase_subject(subject_id, erased_at))
        sessions_erased = _persistently("erasing sessions", lambda: self.sessions.erase_subject(subject_id, erased_at))
        counts = {
            "alerts": alerts.alerts,
            "reviews": alerts.reviews,
            "suppressions": alerts.suppressions,
            "sessions": sessions_erased,
        }
        result = (
            f"erased: {_count(alerts.alerts, 'alert')}, {_count(alerts.suppressions, 'suppression')}, "
            f"{_count(sessions_erased, 'session')}"
        )
        details = {**counts, "reference": notice.reference[:256], "erased_at": erased_at.isoformat()}
        _persistently(
            "auditing the erasure",
            lambda: self.audit.append(SYSTEM_PRINCIPAL, Action.ERASE, subject_id, ERASURE_PURPOSE, result, details),
        )
        log.info("erasure notice applied", extra=counts)
        return []


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _persistently(what: str, step: Callable[[], T]) -> T:
    """``step``, tried up to ERASURE_ATTEMPTS times: the steps are idempotent. The last failure is raised, never
    swallowed: a database error (its driver's OperationalError) is transient, so the stage processes the notice again
    (common/stage.py) rather than dropping it."""
    for attempt in range(1, ERASURE_ATTEMPTS):
        try:
            return step()
        except Exception:
            log.warning("%s failed; trying again", what, exc_info=True, extra={"attempt": attempt})
            time.sleep(ERASURE_RETRY_SECONDS * attempt)
    return step()


def erasure_stage(reviews: ReviewStore, sessions: SessionDesk, audit: AuditLog) -> Stage:
    """The stage that applies the right-to-erasure notices of ``sightline.erasures.v1`` (it publishes nothing)."""
    return Stage(ERASURE_STAGE, ERASURES, [], Eraser(reviews, sessions, audit))
