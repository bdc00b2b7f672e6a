"""The alert recorder: how the decision stage hands each alert it raises to review, stored and audited once.

Called before the alert is published, so a reviewer can always find an alert an integrator saw; idempotent on the
alert id, so a replay is harmless. The engine's cool-down reads the last stored alert through it (``last``).
"""

from __future__ import annotations

import logging
from datetime import datetime

from sightline.common.audit import Action, AuditLog
from sightline.decision.engine import LastAlert
from sightline.decision.review.store import PENDING, SYSTEM_PRINCIPAL, ErasedSubjectAlert, ReviewStore
from sightline.v1 import events_pb2

log = logging.getLogger(__name__)

ALERT_PURPOSE = "cctv-watchlist"  # what a camera's watchlist search is for, as audited


class AlertRecorder:
    """Called by the decision stage for each alert it raises, before publishing: stores it, audits ALERT once.

    Storing and auditing are two databases, so they are two steps, and either may fail (a locked or unreachable
    database): the failure is raised for the stage to process the input again (a transient error, common/stage.py).
    The store remembers whether the alert's audit record was written (``StoredAlert.audited``), so the retry of an
    alert stored but not audited writes its record then: an alert is never left stored and unaudited (a failure just
    after the audit record is written can at worst write it twice).
    """

    def __init__(self, store: ReviewStore, audit: AuditLog) -> None:
        self._store = store
        self._audit = audit

    def record(
        self, alert: events_pb2.Alert, purpose: str = ALERT_PURPOSE, seen_at: datetime | None = None
    ) -> events_pb2.Alert | None:
        """The alert to publish: the new one, or on a replay the stored one with its current status; None when its
        subject was erased after ``seen_at`` (when its evidence was captured): nothing is stored, audited or to be
        published. ``purpose``: what the search that raised it was for, as audited (a camera's watchlists by
        default)."""
        try:
            stored, _ = self._store.record_alert(alert, seen_at)
        except ErasedSubjectAlert:
            log.info("alert of an erased subject dropped", extra={"alert_id": alert.alert_id})
            return None
        if not stored.audited:
            raised = stored.alert
            self._audit.append(
                SYSTEM_PRINCIPAL,
                Action.ALERT,
                raised.subject_id,
                purpose,
                PENDING,
                {
                    "alert_id": raised.alert_id,
                    "source_id": raised.source_id,
                    "watchlists": ",".join(raised.watchlists),
                    "policy_version": raised.policy_version,
                    "similarity": f"{raised.similarity:.3f}",
                    "evidence_frames": len(raised.evidence_frame_ids),
                },
            )
            self._store.mark_audited(raised.alert_id)
        return stored.alert

    def last(self, source_id: str, subject_id: str) -> LastAlert | None:
        """The last alert stored for the subject on the source, as the engine's cool-down reads it (engine.py)."""
        found = self._store.last_alert(source_id, subject_id)
        if found is None:
            return None
        alert, seen_at = found
        raised_by = alert.evidence_frame_ids[-1] if alert.evidence_frame_ids else ""  # the frame that raised it
        return LastAlert(seen_at.timestamp(), alert.alert_id, raised_by)
