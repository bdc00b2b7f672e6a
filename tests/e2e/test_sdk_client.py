"""The SDK's client against the whole running stack: watchlists, gallery, review under the two-person rule, audit and
kiosk sessions, each failure as its typed error; and its Subscriber reading the alerts the review published.

One stack serves the module. Its tokens file adds two reviewers, an auditor and an operator (who may search the
gallery but not change it) beside the stack's local administrator. People are registry photos: dlib's "johns"
(several photos each) walked past a camera (tests/e2e/test_watchlist_flow.py) and standing at a gate
(tests/e2e/test_gate.py).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_echannel_frames import frame_bytes
from test_gate import camera_frames
from test_watchlist_flow import photos, portraits, run_camera, walk_by

from sightline.common.auth import Principal, Role, dump_principals, hash_token, new_token
from sightline.common.topics import ALERTS
from sightline.sdk import (
    AlreadyExists,
    ConfigurationError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    SightlineClient,
    Subscriber,
    SubscriberSettings,
    Unauthenticated,
    Unavailable,
)
from sightline.sdk.local import local_stack
from sightline.tooling.broker import free_port
from sightline.tooling.localstack import LocalStack
from sightline.v1 import events_pb2, session_pb2

pytestmark = pytest.mark.e2e
ROLES = {"alice": Role.REVIEWER, "bob": Role.REVIEWER, "audrey": Role.AUDITOR, "otto": Role.OPERATOR}
TOKENS = {name: new_token() for name in ROLES}
LISTED = ("John_Salley", "John_Savage")
TRAVELLER = "John_Schneider"  # on no watchlist
WATCHLIST = "sdk-persons-of-interest"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[LocalStack]:
    run_dir = tmp_path_factory.mktemp("sdk")
    principals = run_dir / "principals.yaml"
    principals.write_text(
        dump_principals([Principal(name, frozenset({role}), hash_token(TOKENS[name])) for name, role in ROLES.items()])
    )
    with LocalStack(run_dir, ports="auto", env={"SIGHTLINE_AUTH_TOKENS_FILE": str(principals)}) as running:
        running.start(timeout=180)
        yield running


def client_as(stack: LocalStack, name: str | None = None) -> SightlineClient:
    """A client of the stack with one person's token (None: the stack's local administrator)."""
    if name is None:
        return SightlineClient.for_local_stack(stack.run_dir)
    return SightlineClient.for_local_stack(stack.run_dir, token=TOKENS[name])


@pytest.fixture(scope="module")
def admin(stack: LocalStack) -> Iterator[SightlineClient]:
    with client_as(stack) as client:
        yield client


def raise_alerts(stack: LocalStack, client: SightlineClient, dlib_johns: Path) -> dict[str, str]:
    """The LISTED people enrolled on WATCHLIST, then walked past a camera: alert id by subject."""
    client.watchlists.create(WATCHLIST, purpose="court-ordered search, case 2026/115", owner="unit-7")
    for person in LISTED:
        images = portraits(dlib_johns, person, stack.run_dir)
        assert client.gallery.enroll(person, images, watchlists=[WATCHLIST], purpose="case 2026/115").templates_added
    outcomes = run_camera(stack, walk_by([photos(dlib_johns, person)[5] for person in LISTED], 1, time.time()))
    raised = {alert.subject_id: alert.alert_id for alert in outcomes.alerts}
    assert set(raised) == set(LISTED), raised
    return raised


def traveller_photos(dlib_johns: Path) -> list[Path]:
    """Photos of someone on no watchlist: the gate searches its stop lists too (by default every list), and a hit
    refers the traveller."""
    return sorted((dlib_johns / TRAVELLER).glob("*.jpg"))


def gate_session(
    client: SightlineClient, gate: str, subject_id: str, pictures: list[Path]
) -> session_pb2.SessionUpdate:
    """One kiosk session through the SDK, as a gate runs it: frames at the camera's rate until the outcome is in."""
    with client.kiosk.open_session(gate, subject_id=subject_id) as session:
        assert session.opened.claim_kind == session_pb2.CLAIM_KIND_SUBJECT
        for frame in camera_frames(pictures):
            try:
                session.send_frame(frame)
            except FailedPrecondition:  # decided: the gate has its answer
                break
            time.sleep(0.1)  # the camera's rate
        else:
            session.close()
        return session.outcome(timeout_s=60)


def test_watchlists_and_the_gallery(admin: SightlineClient, face_photos: Path) -> None:
    created = admin.watchlists.create(
        "sdk-staff", purpose="building access", owner="unit-1", target_fmr=1e-3, default_membership_days=30
    )
    assert created.threshold_distance > 0 and created.owner == "unit-1"
    with pytest.raises(AlreadyExists):
        admin.watchlists.create("sdk-staff", purpose="again")
    with pytest.raises(InvalidArgument) as bad_name:
        admin.watchlists.create("no spaces allowed!", purpose="x")
    assert bad_name.value.method == "CreateWatchlist" and isinstance(bad_name.value, ValueError)
    updated = admin.watchlists.update("sdk-staff", purpose="building access, floor 3")
    assert (updated.purpose, updated.owner, updated.default_membership_days) == (
        "building access, floor 3",
        "unit-1",
        30,
    )

    # Images as paths or bytes; each image's result says whether it was accepted.
    obama = admin.gallery.enroll("sdk-obama", [face_photos / "obama.jpg"], watchlists=["sdk-staff"], purpose="test")
    biden = admin.gallery.enroll("sdk-biden", [(face_photos / "biden.jpg").read_bytes(), b"not an image"])
    assert obama.templates_added == 1 and biden.templates_added == 1
    assert [r.accepted for r in biden.results] == [True, False] and biden.results[1].reason
    assert {s.subject_id for s in admin.gallery.subjects()} >= {"sdk-obama", "sdk-biden"}
    assert [s.subject_id for s in admin.gallery.subjects(watchlist="sdk-staff")] == ["sdk-obama"]
    assert admin.gallery.subject("sdk-obama").template_count == 1
    with pytest.raises(NotFound):
        admin.gallery.subject("sdk-nobody")
    assert [m.subject_id for m in admin.watchlists.members("sdk-staff")] == ["sdk-obama"]
    assert admin.watchlists.get("sdk-staff").member_count == 1

    # 1:1 and 1:N on another photo of Obama.
    probe = face_photos / "obama2.jpg"
    assert admin.gallery.verify("sdk-obama", probe).verification.verified
    assert not admin.gallery.verify("sdk-biden", probe).verification.verified
    assert admin.gallery.search(probe, top_k=2).candidates[0].subject_id == "sdk-obama"

    assert [m.subject_id for m in admin.watchlists.add_members("sdk-staff", ["sdk-biden"])] == ["sdk-biden"]
    assert admin.watchlists.remove_members("sdk-staff", ["sdk-biden", "sdk-nobody"]) == 1
    assert admin.gallery.delete("sdk-biden").deleted
    erased = admin.gallery.erase("sdk-obama", reference="DSR-SDK-1")
    assert erased.erased and list(erased.watchlists) == ["sdk-staff"]
    assert admin.watchlists.delete("sdk-staff").deleted
    assert "sdk-staff" not in {w.name for w in admin.watchlists.list()}


def test_failures_are_typed(stack: LocalStack, tmp_path: Path) -> None:
    local = local_stack(stack.run_dir)
    with SightlineClient(token="not-a-token", matching=local.addresses["matching"]) as stranger:
        with pytest.raises(Unauthenticated):
            stranger.watchlists.list()
    with client_as(stack, "otto") as operator:
        assert isinstance(operator.watchlists.list(), list)  # an operator may read the gallery...
        with pytest.raises(PermissionDenied) as denied:  # ...but not change it
            operator.watchlists.create("sdk-otto", purpose="x")
        assert not denied.value.retryable
    with SightlineClient(token="t", matching="10.255.0.1:50054") as remote:
        with pytest.raises(ConfigurationError, match="clear text"):  # a token never goes unencrypted off the machine
            remote.watchlists.list()
    with SightlineClient(token="", matching=f"127.0.0.1:{free_port()}") as nobody:
        with pytest.raises(Unavailable) as down:
            nobody.watchlists.list()
        assert down.value.retryable
    with pytest.raises(ConfigurationError, match="no local stack"):
        SightlineClient.for_local_stack(tmp_path)


def test_alerts_review_audit_and_the_alerts_topic(stack: LocalStack, admin: SightlineClient, dlib_johns: Path) -> None:
    raised = raise_alerts(stack, admin, dlib_johns)
    pending = {reviewed.alert.alert_id for reviewed in admin.review.alerts("PENDING_REVIEW")}
    assert set(raised.values()) <= pending

    # Two-person rule: each reviewer is the principal of their own client's token.
    confirmed_id, rejected_id = raised[LISTED[0]], raised[LISTED[1]]
    with client_as(stack, "alice") as alice, client_as(stack, "bob") as bob:
        first = alice.review.confirm(confirmed_id, "looks like him")
        assert first.alert.status == events_pb2.ALERT_STATUS_PENDING_REVIEW and first.confirmations == 1
        with pytest.raises(FailedPrecondition):
            alice.review.confirm(confirmed_id)
        second = bob.review.confirm(confirmed_id[:10])  # a unique prefix will do
        assert second.alert.status == events_pb2.ALERT_STATUS_CONFIRMED
        assert [r.reviewer for r in bob.review.get(confirmed_id).reviews] == ["alice", "bob"]
        rejected = bob.review.reject(rejected_id, "not him", not_this_person=True)
        assert rejected.alert.status == events_pb2.ALERT_STATUS_REJECTED
        feedback = alice.review.feedback()
        assert [(c.subject_id, c.rejections) for c in feedback.counts] == [(LISTED[1], 1)]
        with pytest.raises(NotFound):
            alice.review.get("0123456789abcdef")
    assert {r.alert.alert_id for r in admin.review.alerts("CONFIRMED")} >= {confirmed_id}

    # The audit trail, read and verified over gRPC by an auditor.
    with client_as(stack, "audrey") as auditor:
        reviews = list(auditor.audit.records(action="REVIEW"))
        assert {r.principal for r in reviews} >= {"alice", "bob"}
        assert {r.subject_id for r in auditor.audit.records(action="ENROL")} >= set(LISTED)
        sequences = [r.sequence for r in auditor.audit.records()]
        assert sequences == sorted(sequences) and len(sequences) == len(set(sequences))
        verified = auditor.audit.verify()
        assert verified.intact and verified.records_checked == len(sequences), verified
    with client_as(stack, "alice") as alice, pytest.raises(PermissionDenied):
        alice.audit.verify()

    # An integrator's view: each status change of each alert, once, typed, with its ce_id.
    settings = SubscriberSettings(store_dir=stack.run_dir / "subscribers", poll_timeout_s=0.2)
    with Subscriber(
        [ALERTS.name], "sdk-alert-watcher", kafka=local_stack(stack.run_dir).kafka_settings(), settings=settings
    ) as sub:
        seen = {event.id: event.payload(events_pb2.Alert) for event in sub.events(idle_timeout_s=3.0)}
    assert {f"{confirmed_id}:PENDING_REVIEW", f"{confirmed_id}:CONFIRMED", f"{rejected_id}:REJECTED"} <= set(seen)
    assert seen[f"{confirmed_id}:CONFIRMED"].status == events_pb2.ALERT_STATUS_CONFIRMED


def test_kiosk_sessions(stack: LocalStack, admin: SightlineClient, dlib_johns: Path) -> None:
    pictures = traveller_photos(dlib_johns)
    assert admin.gallery.enroll("sdk-traveller", [frame_bytes(pictures[-1], 0, 0)]).templates_added == 1
    outcome = gate_session(admin, "sdk-gate-1", "sdk-traveller", pictures)
    assert outcome.outcome == session_pb2.SESSION_OUTCOME_ACCEPT, list(outcome.reasons)
    assert outcome.frames_verified >= 2 and outcome.evidence_frame_ids

    # A kiosk that fails inside its session cancels it: no decision for a traveller the gate no longer serves.
    with pytest.raises(RuntimeError), admin.kiosk.open_session("sdk-gate-2", subject_id="sdk-traveller") as left:
        left.send_frame(camera_frames(pictures)[0])
        raise RuntimeError("the camera failed")
    assert left.outcome(timeout_s=30).outcome == session_pb2.SESSION_OUTCOME_CANCELLED

    with pytest.raises(InvalidArgument):
        admin.kiosk.open_session("sdk-gate-3", subject_id="sdk-not-enrolled")
    with pytest.raises(ValueError, match="exactly one claim"):
        admin.kiosk.open_session("sdk-gate-3", subject_id="sdk-traveller", portrait=b"...")
