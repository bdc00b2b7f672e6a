"""The review store and ReviewService rules on real databases: two-person rule, rejection, suppression, closed alerts.

Each test runs on a SQLite file and, marked ``postgres``, on PostgreSQL (a schema of its own).
"""

from __future__ import annotations

import base64
import secrets
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest

from sightline.common.audit import AuditLog
from sightline.common.rpc import InvalidInput, NotFound
from sightline.common.sqlstore import open_backend
from sightline.decision.review.recorder import AlertRecorder
from sightline.decision.review.servicer import ReviewServicer
from sightline.decision.review.store import (
    _PG_MIGRATION_LOCK,
    ERASURE_GRACE,
    MIGRATIONS,
    ErasedSubjectAlert,
    ReviewErasure,
    ReviewRefused,
    ReviewStore,
)
from sightline.v1 import events_pb2, review_pb2


@pytest.fixture()
def store(store_url: str) -> Iterator[ReviewStore]:
    with ReviewStore.open(store_url, suppression_seconds=600) as opened:
        yield opened


@pytest.fixture()
def audit(store_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[AuditLog]:
    # A shared (PostgreSQL) audit log is only written with a keyring from a secret (common/audit_keys.py).
    monkeypatch.setenv("SIGHTLINE_AUDIT_KEYS", f"review-test:{base64.b64encode(secrets.token_bytes(32)).decode()}")
    with AuditLog.open(store_url) as opened:
        yield opened


def alert(alert_id: str = "a1b2c3d4e5f6a7b8", source: str = "cam-1", subject: str = "obama") -> events_pb2.Alert:
    made = events_pb2.Alert(
        alert_id=alert_id,
        decision_id="d1",
        source_id=source,
        subject_id=subject,
        watchlists=["wl"],
        distance=0.35,
        similarity=0.71,
        evidence_frame_ids=["f1", "f2"],
        status=events_pb2.ALERT_STATUS_PENDING_REVIEW,
        policy_version="p1",
    )
    made.raised_at.GetCurrentTime()
    return made


# -- the store ---------------------------------------------------------------------------------------------------


def test_two_person_rule(store: ReviewStore) -> None:
    stored, created = store.record_alert(alert())
    assert created and stored.status == "PENDING_REVIEW" and stored.confirmations == 0
    first, changed = store.review("a1b2c3d4e5f6a7b8", "alice", "CONFIRM", "it is him")
    assert not changed and first.status == "PENDING_REVIEW" and first.confirmations == 1
    with pytest.raises(ReviewRefused, match="alice has already confirmed .* second, different reviewer"):
        store.review("a1b2c3d4e5f6a7b8", "alice", "CONFIRM")
    second, changed = store.review("a1b2c3d4e5f6a7b8", "bob", "CONFIRM")
    assert changed and second.status == "CONFIRMED" and second.confirmations == 2
    assert [(r.reviewer, r.action, r.comment) for r in second.reviews] == [
        ("alice", "CONFIRM", "it is him"),
        ("bob", "CONFIRM", ""),
    ]
    assert second.alert.status == events_pb2.ALERT_STATUS_CONFIRMED
    assert second.alert.similarity == pytest.approx(0.71) and list(second.alert.evidence_frame_ids) == ["f1", "f2"]


@pytest.mark.parametrize("again", ["alice", "Alice", " ALICE ", "ａｌｉｃｅ"])  # the last: fullwidth letters (NFKC)
def test_one_reviewer_under_two_spellings_cannot_confirm_twice(store: ReviewStore, again: str) -> None:
    store.record_alert(alert())
    store.review("a1b2c3d4e5f6a7b8", "alice", "CONFIRM")
    with pytest.raises(ReviewRefused, match="already confirmed"):
        store.review("a1b2c3d4e5f6a7b8", again, "CONFIRM")
    assert store.get("a1b2c3d4e5f6a7b8").status == "PENDING_REVIEW"


def test_confirmations_count_people_not_spellings(store: ReviewStore) -> None:
    """Reviews stored before names were compared case-insensitively count once per person too."""
    store.record_alert(alert())
    with store._tx(write=True) as cur:  # what an earlier version let through: 'Alice' after 'alice'
        for name in ("alice", "Alice"):
            cur.execute(
                "INSERT INTO alert_reviews (alert_id, reviewer, action, comment, not_this_person, at)"
                " VALUES (?, ?, 'CONFIRM', '', 0, ?)",
                ("a1b2c3d4e5f6a7b8", name, store._backend.dialect.to_db_time(datetime.now(UTC))),
            )
    assert store.get("a1b2c3d4e5f6a7b8").confirmations == 1
    confirmed, changed = store.review("a1b2c3d4e5f6a7b8", "bob", "CONFIRM")
    assert changed and confirmed.status == "CONFIRMED"


def test_any_rejection_closes_the_alert(store: ReviewStore) -> None:
    store.record_alert(alert())
    store.review("a1b2c3d4e5f6a7b8", "alice", "CONFIRM")
    rejected, changed = store.review("a1b2c3d4e5f6a7b8", "bob", "REJECT", "different jacket")
    assert changed and rejected.status == "REJECTED" and rejected.confirmations == 1


@pytest.mark.parametrize("closing", [("bob", "CONFIRM"), ("bob", "REJECT")])
def test_a_closed_alert_takes_no_further_review(store: ReviewStore, closing: tuple[str, str]) -> None:
    store.record_alert(alert())
    store.review("a1b2c3d4e5f6a7b8", "alice", "CONFIRM")
    store.review("a1b2c3d4e5f6a7b8", *closing)
    for reviewer, action in (("carol", "CONFIRM"), ("carol", "REJECT")):
        with pytest.raises(ReviewRefused, match="already (CONFIRMED|REJECTED); a closed alert"):
            store.review("a1b2c3d4e5f6a7b8", reviewer, action)
    assert len(store.get("a1b2c3d4e5f6a7b8").reviews) == 2


def test_not_this_person_is_stored_and_suppresses_that_subject_on_that_source(store: ReviewStore) -> None:
    store.record_alert(alert())
    assert not store.suppressed("cam-1", "obama")
    rejected, _ = store.review("a1b2c3d4e5f6a7b8", "alice", "REJECT", "lookalike", not_this_person=True)
    assert rejected.reviews[0].not_this_person
    assert store.suppressed("cam-1", "obama") and store.suppressed("cam-1", "obama", track_id="t7")
    assert not store.suppressed("cam-2", "obama") and not store.suppressed("cam-1", "biden")
    assert not store.suppressed("cam-1", "obama", at=datetime.now(UTC) + timedelta(seconds=601))  # expired
    (feedback,) = store.feedback()
    assert (feedback.alert_id, feedback.source_id, feedback.subject_id, feedback.reviewer, feedback.comment) == (
        "a1b2c3d4e5f6a7b8",
        "cam-1",
        "obama",
        "alice",
        "lookalike",
    )
    assert store.feedback(since=datetime.now(UTC) + timedelta(seconds=5)) == []


def test_a_track_specific_suppression_covers_only_that_track(store_url: str) -> None:
    with ReviewStore.open(store_url, suppression_seconds=0) as store:  # 0: for good
        store.record_alert(alert())
        store.review("a1b2c3d4e5f6a7b8", "alice", "REJECT", not_this_person=True, track_id="t7")
        assert store.suppressed("cam-1", "obama", track_id="t7")
        assert not store.suppressed("cam-1", "obama", track_id="t8")
        assert store.suppressed("cam-1", "obama", "t7", at=datetime.now(UTC) + timedelta(days=3650))


def test_recording_is_idempotent_and_a_replay_never_resets_a_review(store: ReviewStore) -> None:
    _, created = store.record_alert(alert())
    _, again = store.record_alert(alert())
    assert created and not again and len(store.list_alerts()) == 1
    store.review("a1b2c3d4e5f6a7b8", "alice", "REJECT")
    replayed, created = store.record_alert(alert())
    assert not created and replayed.status == "REJECTED"


def test_alerts_stored_before_the_upgrade_count_as_audited_and_keep_the_cool_down(
    store_url: str, audit: AuditLog
) -> None:
    """A database of the version before alerts remembered their audit record and evidence time (migration 3)."""
    older = ReviewStore(open_backend(store_url, what="review"))
    older._migrated(MIGRATIONS[:2], "review_schema_version", _PG_MIGRATION_LOCK, "review")
    raised = alert()
    with older._tx(write=True) as cur:  # as the previous version stored it (its ALERT record written with it)
        cur.execute(
            "INSERT INTO review_alerts (alert_id, source_id, subject_id, status, published_status, alert,"
            " raised_at, updated_at) VALUES (?, ?, ?, 'PENDING_REVIEW', 'PENDING_REVIEW', ?, ?, ?)",
            (
                raised.alert_id,
                raised.source_id,
                raised.subject_id,
                raised.SerializeToString(),
                older._now(),
                older._now(),
            ),
        )
    older.close()
    with ReviewStore.open(store_url) as upgraded:
        assert upgraded.get(raised.alert_id).audited
        AlertRecorder(upgraded, audit).record(raised)  # a replay after the upgrade
        assert audit.records(action="ALERT") == []  # written by the previous version, not again
        last = AlertRecorder(upgraded, audit).last("cam-1", "obama")
        assert last is not None and last.alert_id == raised.alert_id and last.frame_id == "f2"
        assert abs(last.at - raised.raised_at.ToDatetime(UTC).timestamp()) < 1  # its raising time stands in


def test_purge_deletes_alerts_past_retention_with_their_reviews_and_spent_feedback(store_url: str) -> None:
    old, recent = alert("0a0a0a0a0a0a0a0a"), alert("0b0b0b0b0b0b0b0b")
    old.raised_at.FromDatetime(datetime.now(UTC) - timedelta(days=40))
    with ReviewStore.open(store_url, suppression_seconds=0.001) as store:  # suppressions end at once
        store.record_alert(old)
        store.record_alert(recent)
        store.review(old.alert_id, "alice", "REJECT", "someone else", not_this_person=True)
        store.review(recent.alert_id, "alice", "CONFIRM")
        assert store.purge(datetime.now(UTC) - timedelta(days=30)) == 1
        assert [a.alert.alert_id for a in store.list_alerts()] == [recent.alert_id]
        assert store.get(recent.alert_id).confirmations == 1
        with pytest.raises(NotFound):
            store.get(old.alert_id)
        assert len(store.feedback()) == 1  # recorded today: a report still shows it
        assert store.purge(datetime.now(UTC) + timedelta(seconds=1)) == 1
        assert store.feedback() == [] and store.list_alerts() == []


def test_erasing_a_subject_deletes_its_alerts_reviews_and_feedback_in_every_status(store: ReviewStore) -> None:
    for alert_id in ("aa" * 8, "bb" * 8, "cc" * 8):
        store.record_alert(alert(alert_id, subject="obama"))
    store.record_alert(alert("dd" * 8, subject="biden"))
    store.review("aa" * 8, "alice", "CONFIRM")  # stays pending, one confirmation
    store.review("bb" * 8, "alice", "CONFIRM")
    store.review("bb" * 8, "bob", "CONFIRM")  # confirmed
    store.review("cc" * 8, "carol", "REJECT", "lookalike", not_this_person=True)  # rejected, with feedback
    store.review("dd" * 8, "carol", "REJECT", "lookalike", not_this_person=True)
    assert store.suppressed("cam-1", "obama")

    assert store.erase_subject("obama") == ReviewErasure(alerts=3, reviews=4, suppressions=1)
    assert [a.alert.subject_id for a in store.list_alerts()] == ["biden"]
    for alert_id in ("aa" * 8, "bb" * 8, "cc" * 8):
        with pytest.raises(NotFound):
            store.get(alert_id)
    assert [f.subject_id for f in store.feedback()] == ["biden"] and store.suppressed("cam-1", "biden")
    assert not store.suppressed("cam-1", "obama") and store.unpublished() == [store.get("dd" * 8)]
    assert store.get("dd" * 8).reviews[0].reviewer == "carol"  # the other subject's alert, untouched


def test_an_alert_in_flight_at_the_erasure_is_refused_and_a_replayed_notice_erases_nothing(
    store: ReviewStore, audit: AuditLog
) -> None:
    erased_at = datetime.now(UTC)
    store.record_alert(alert("aa" * 8))
    assert store.erase_subject("obama", erased_at).alerts == 1
    # A result of a frame seen before the erasure (or within the grace after it), processed after it: not stored.
    with pytest.raises(ErasedSubjectAlert, match="subject was erased"):
        store.record_alert(alert("bb" * 8), seen_at=erased_at - timedelta(seconds=5))
    assert AlertRecorder(store, audit).record(alert("bb" * 8), seen_at=erased_at + ERASURE_GRACE) is None
    assert store.list_alerts() == [] and audit.records() == []
    # The subject enrolled again: alerts of frames seen since are stored, and the notice replayed does not touch them.
    later = erased_at + ERASURE_GRACE + timedelta(seconds=1)
    assert AlertRecorder(store, audit).record(alert("cc" * 8), seen_at=later) is not None
    assert store.erase_subject("obama", erased_at) == ReviewErasure(0, 0, 0)
    assert [a.alert.alert_id for a in store.list_alerts()] == ["cc" * 8]
    # A newer notice (erased again) does erase it.
    assert store.erase_subject("obama", later + timedelta(minutes=1)).alerts == 1 and store.list_alerts() == []


def test_purge_forgets_erasures_past_retention(store: ReviewStore) -> None:
    erased_at = datetime.now(UTC) - timedelta(days=40)
    store.erase_subject("obama", erased_at)
    with pytest.raises(ErasedSubjectAlert):
        store.record_alert(alert(), seen_at=erased_at)
    store.purge(datetime.now(UTC) - timedelta(days=30))
    stored, created = store.record_alert(alert(), seen_at=erased_at)
    assert created and stored.alert.subject_id == "obama"


def test_bad_reviews_are_refused_clearly(store: ReviewStore) -> None:
    store.record_alert(alert())
    with pytest.raises(NotFound, match="no alert with id"):
        store.review("ffffffffffff", "alice", "CONFIRM")
    with pytest.raises(InvalidInput, match="reviewer"):
        store.review("a1b2c3d4e5f6a7b8", " ", "CONFIRM")
    with pytest.raises(InvalidInput, match="rejection only"):
        store.review("a1b2c3d4e5f6a7b8", "alice", "CONFIRM", not_this_person=True)
    with pytest.raises(InvalidInput, match="CONFIRM or REJECT"):
        store.review("a1b2c3d4e5f6a7b8", "alice", "")
    assert store.get("a1b2c3d4e5f6a7b8").reviews == ()


def test_listing_by_status_with_pages_and_prefixes(store: ReviewStore) -> None:
    for i in range(5):
        store.record_alert(alert(f"{i:x}" * 6 + "0000", subject=f"s{i}"))
    store.review("1111110000", "alice", "REJECT")
    assert [a.alert.subject_id for a in store.list_alerts("PENDING_REVIEW")] == ["s0", "s2", "s3", "s4"]
    page = store.list_alerts(limit=2)
    assert [a.alert.subject_id for a in store.list_alerts(limit=2, after=page[-1].sequence)] == ["s2", "s3"]
    assert store.get("333333").alert.subject_id == "s3"  # a prefix, as the CLI shows ids
    store.record_alert(alert("333333ff0000", subject="s9"))
    with pytest.raises(InvalidInput, match="several alerts"):
        store.get("333333")


# -- the servicer: principals, audit, publication ----------------------------------------------------------------


class FakeContext:
    """Just enough of grpc.ServicerContext: the principal the server's access control admitted, and abort.

    (How a real server finds the principal is tested in test_auth.py and integration/test_access_control.py.)
    """

    def __init__(self, principal: str | None) -> None:
        self.principal = principal or ""

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise Aborted(code, details)


def admitted_principal(context: FakeContext) -> str:
    return context.principal


class Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code


def review_request(action: int, alert_id: str = "a1b2c3d4e5f6a7b8", **fields: Any) -> review_pb2.ReviewAlertRequest:
    return review_pb2.ReviewAlertRequest(alert_id=alert_id, action=action, **fields)


def test_servicer_publishes_status_changes_and_audits_every_action(store: ReviewStore, audit: AuditLog) -> None:
    published: list[events_pb2.Alert] = []
    servicer = ReviewServicer(store, audit, published.append, principal=admitted_principal)
    AlertRecorder(store, audit).record(alert())
    AlertRecorder(store, audit).record(alert())  # a replay: audited once
    confirm = review_request(review_pb2.REVIEW_ACTION_CONFIRM)
    first = servicer.ReviewAlert(confirm, FakeContext("alice"))
    assert first.alert.status == events_pb2.ALERT_STATUS_PENDING_REVIEW and first.confirmations == 1
    assert published == []  # no status change yet
    with pytest.raises(Aborted) as refused:
        servicer.ReviewAlert(confirm, FakeContext("alice"))
    assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(Aborted) as anonymous:
        servicer.ReviewAlert(confirm, FakeContext(None))
    assert anonymous.value.code == grpc.StatusCode.UNAUTHENTICATED
    second = servicer.ReviewAlert(confirm, FakeContext("bob"))
    assert second.alert.status == events_pb2.ALERT_STATUS_CONFIRMED and [r.reviewer for r in second.reviews] == [
        "alice",
        "bob",
    ]
    assert [(a.alert_id, a.status) for a in published] == [("a1b2c3d4e5f6a7b8", events_pb2.ALERT_STATUS_CONFIRMED)]
    trail = [(r.principal, r.action, r.result) for r in audit.records()]
    assert trail == [
        ("service:decision", "ALERT", "PENDING_REVIEW"),
        ("alice", "REVIEW", "PENDING_REVIEW"),
        ("alice", "REVIEW", trail[2][2]),
        ("anonymous", "ACCESS_DENIED", "refused: no principal"),
        ("bob", "REVIEW", "CONFIRMED"),
    ]
    assert trail[2][2].startswith("refused: alice has already confirmed")
    assert audit.verify().intact


def test_a_status_change_that_could_not_be_published_stays_in_the_outbox(store: ReviewStore, audit: AuditLog) -> None:
    published: list[events_pb2.Alert] = []
    broker_up = False

    def publish(message: events_pb2.Alert) -> None:
        if not broker_up:
            raise ConnectionError("broker down")
        published.append(message)

    servicer = ReviewServicer(store, audit, publish, principal=admitted_principal)
    store.record_alert(alert())
    reply = servicer.ReviewAlert(
        review_request(review_pb2.REVIEW_ACTION_REJECT, not_this_person=True), FakeContext("alice")
    )
    assert reply.alert.status == events_pb2.ALERT_STATUS_REJECTED and published == []
    assert [a.alert.alert_id for a in store.unpublished()] == ["a1b2c3d4e5f6a7b8"]
    broker_up = True
    assert servicer.flush_outbox() == 1 and published[0].status == events_pb2.ALERT_STATUS_REJECTED
    assert store.unpublished() == [] and servicer.flush_outbox() == 0


def test_servicer_lists_and_gets(store: ReviewStore, audit: AuditLog) -> None:
    servicer = ReviewServicer(store, audit, lambda _: None, principal=admitted_principal)
    for i in range(3):
        store.record_alert(alert(f"{i:x}" * 6 + "0000", subject=f"s{i}"))
    page = servicer.ListAlerts(review_pb2.ListAlertsRequest(page_size=2), FakeContext(None))
    rest = servicer.ListAlerts(
        review_pb2.ListAlertsRequest(page_size=2, page_token=page.next_page_token), FakeContext(None)
    )
    assert [a.alert.subject_id for a in page.alerts] + [a.alert.subject_id for a in rest.alerts] == ["s0", "s1", "s2"]
    got = servicer.GetAlert(review_pb2.GetAlertRequest(alert_id="222222"), FakeContext(None))
    assert got.alert.subject_id == "s2" and got.confirmations_required == 2
    with pytest.raises(Aborted) as missing:
        servicer.GetAlert(review_pb2.GetAlertRequest(alert_id="nope"), FakeContext(None))
    assert missing.value.code == grpc.StatusCode.NOT_FOUND


def test_feedback_report_counts_false_alerts_per_subject_and_source(store: ReviewStore, audit: AuditLog) -> None:
    servicer = ReviewServicer(store, audit, lambda _: None, principal=admitted_principal)
    for alert_id, source, subject in (
        ("aa" * 8, "cam-1", "obama"),
        ("bb" * 8, "cam-1", "obama"),
        ("cc" * 8, "cam-2", "biden"),
        ("dd" * 8, "cam-2", "obama"),
    ):
        made = alert(alert_id, source, subject)
        made.track_id = f"{source}/t{alert_id[:2]}"
        store.record_alert(made)
    for alert_id in ("aa" * 8, "bb" * 8, "cc" * 8):
        servicer.ReviewAlert(
            review_request(review_pb2.REVIEW_ACTION_REJECT, not_this_person=True, alert_id=alert_id),
            FakeContext("alice"),
        )
    servicer.ReviewAlert(review_request(review_pb2.REVIEW_ACTION_REJECT, alert_id="dd" * 8), FakeContext("bob"))
    report = servicer.ListFeedback(review_pb2.ListFeedbackRequest(), FakeContext(None))
    assert [(c.subject_id, c.source_id, c.rejections) for c in report.counts] == [
        ("obama", "cam-1", 2),
        ("biden", "cam-2", 1),
    ]
    assert [(f.alert_id, f.track_id, f.reviewer) for f in report.feedback] == [
        ("aa" * 8, "cam-1/taa", "alice"),
        ("bb" * 8, "cam-1/tbb", "alice"),
        ("cc" * 8, "cam-2/tcc", "alice"),
    ]
    assert all(f.HasField("suppresses_until") for f in report.feedback)  # the fixture's store suppresses for 600 s
    later = review_pb2.ListFeedbackRequest()
    later.since.FromDatetime(datetime.now(UTC) + timedelta(minutes=1))
    assert not servicer.ListFeedback(later, FakeContext(None)).feedback
