"""The right to erasure: ``sightline erase`` against two matching replicas sharing one gallery, the real broker for
the SubjectErased notice, and the shared audit log; plus replicas (two Gallery objects on one database, SQLite and
PostgreSQL) dropping erased subjects and expired memberships on their own.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from contextlib import closing
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import numpy as np
import pytest
from test_watchlists import TOKEN, Replica, face_services, photo, records, refused, search, start_replica, wait_until

from sightline.cli.main import main as cli
from sightline.common.audit import AuditLog, AuditSettings, TopicPublisher, parse_time
from sightline.common.bus import read_topics
from sightline.common.topics import ERASURES
from sightline.matching.audit_outbox import WRITTEN_AT
from sightline.matching.erasure import erasure_publisher
from sightline.matching.gallery import Gallery
from sightline.matching.store import GalleryStore
from sightline.matching.templates import TemplateCipher, generate_key
from sightline.tooling.localstack import LocalStack
from sightline.v1 import events_pb2, gallery_pb2

__all__ = ["face_services"]  # a fixture, imported for this module's replicas

REFERENCE = "DSAR-2026-0117"


@pytest.fixture(scope="module")
def audit(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuditLog]:
    url = f"sqlite:///{tmp_path_factory.mktemp('audit') / 'audit.db'}"
    log = AuditLog.open_configured(settings=AuditSettings(database_url=url))
    yield log
    log.close()


@pytest.fixture(scope="module")
def gallery_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gallery") / "gallery.db"


@pytest.fixture(scope="module")
def replicas(
    face_services: LocalStack, gallery_file: Path, audit: AuditLog, kafka: object
) -> Iterator[tuple[Replica, Replica]]:
    """Replica A publishes erasure notices to the session broker; replica B has no publisher configured."""
    key, url = generate_key(), f"sqlite:///{gallery_file}"
    publisher = TopicPublisher(kafka)
    first = start_replica(
        face_services, url, key, audit, refresh_interval_s=0.2, notify_erased=erasure_publisher(publisher)
    )
    second = start_replica(face_services, url, key, audit, refresh_interval_s=0.2)
    yield first, second
    first.stop()
    second.stop()
    publisher.close()


def _blobs(gallery_file: Path, subject_id: str) -> list[bytes]:
    with closing(sqlite3.connect(gallery_file)) as conn:
        return [
            bytes(row[0])
            for row in conn.execute("SELECT ciphertext FROM templates WHERE subject_id = ?", (subject_id,))
        ]


def _notices(kafka: object, since_ms: int, subject_id: str) -> list[events_pb2.SubjectErased]:
    found = []
    for record in read_topics(kafka, [ERASURES.name], since_ms=since_ms, idle_timeout_s=2.0):  # type: ignore[arg-type]
        notice = events_pb2.SubjectErased.FromString(record.value)
        if notice.subject_id == subject_id:
            assert record.key == subject_id.encode()
            found.append(notice)
    return found


def test_an_erased_subject_is_gone_from_both_replicas_the_file_and_is_announced(  # type: ignore[no-untyped-def]
    replicas: tuple[Replica, Replica],
    face_photos: Path,
    gallery_file: Path,
    audit: AuditLog,
    kafka,
    capsys: pytest.CaptureFixture[str],
) -> None:
    first, second = replicas
    a, b = first.gallery_stub(), second.gallery_stub()
    a.Enroll(
        gallery_pb2.EnrollRequest(
            subject_id="e-obama",
            watchlists=["stop", "border"],
            images=[photo(face_photos, "obama.jpg"), photo(face_photos, "obama2.jpg")],
        )
    )
    a.Enroll(gallery_pb2.EnrollRequest(subject_id="e-biden", images=[photo(face_photos, "biden.jpg")]))
    probe = photo(face_photos, "obama3.jpg")
    assert wait_until(lambda: "e-obama" in [c.subject_id for c in search(b, probe)], timeout=5)  # B has it too
    blobs = _blobs(gallery_file, "e-obama")
    assert len(blobs) == 2
    since_ms = int(time.time() * 1000) - 1000
    start = audit.head()[0]

    assert (
        cli(["erase", "e-obama", "--reference", REFERENCE, "--yes", "--matching", first.address, "--token", TOKEN]) == 0
    )
    assert "e-obama: erased (2 template(s); watchlists: border, stop)" in capsys.readouterr().out

    assert "e-obama" not in [c.subject_id for c in search(a, probe)]  # this replica: at once
    assert wait_until(lambda: "e-obama" not in [c.subject_id for c in search(b, probe)], timeout=3)  # the other: soon
    for stub in (a, b):
        assert (
            refused(lambda stub=stub: stub.GetSubject(gallery_pb2.GetSubjectRequest(subject_id="e-obama"))).code()
            == grpc.StatusCode.NOT_FOUND
        )
        assert "e-obama" not in [s.subject_id for s in stub.ListSubjects(gallery_pb2.ListSubjectsRequest()).subjects]
    assert [c.subject_id for c in search(b, photo(face_photos, "biden.jpg"))][0] == "e-biden"  # nobody else touched
    dump = gallery_file.read_bytes()
    assert not any(blob in dump for blob in blobs) and b"e-obama" not in dump  # overwritten, not just unlinked

    [notice] = _notices(kafka, since_ms, "e-obama")
    assert (notice.templates_removed, list(notice.watchlists), notice.reference) == (2, ["border", "stop"], REFERENCE)
    assert abs(notice.erased_at.ToDatetime(tzinfo=UTC) - datetime.now(UTC)) < timedelta(minutes=1)
    # The erasure's record, committed with it; then whether the notice went out, once it had.
    [erased, told] = records(audit, start, action="ERASE")
    assert (erased.subject_id, erased.purpose, erased.result, erased.principal) == (
        "e-obama",
        "erasure-request",
        "erased",
        "officer-1",
    )
    details = dict(erased.details)
    assert parse_time(details.pop(WRITTEN_AT)) <= erased.at
    assert details == {"reference": REFERENCE, "templates_removed": "2", "watchlists": "border,stop"}
    assert (told.subject_id, told.result, told.details["reference"]) == ("e-obama", "notice published", REFERENCE)

    # Idempotent: erasing again changes nothing, and is audited and announced all the same.
    again = a.EraseSubject(gallery_pb2.EraseSubjectRequest(subject_id="e-obama", reference=REFERENCE))
    assert (again.erased, again.templates_removed) == (False, 0)
    assert [r.result for r in records(audit, start, action="ERASE")] == [
        "erased",
        "notice published",
        "nothing enrolled",
        "notice published",
    ]
    assert len(_notices(kafka, since_ms, "e-obama")) == 2
    assert audit.verify().intact


def test_an_erasure_needs_a_reference_and_says_when_nobody_was_told(  # type: ignore[no-untyped-def]
    replicas: tuple[Replica, Replica], face_photos: Path, audit: AuditLog, capsys: pytest.CaptureFixture[str]
) -> None:
    first, second = replicas
    start = audit.head()[0]
    error = refused(lambda: first.gallery_stub().EraseSubject(gallery_pb2.EraseSubjectRequest(subject_id="anyone")))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "reference" in error.details()

    assert cli(["erase", "anyone", "--reference", REFERENCE, "--matching", first.address, "--token", TOKEN]) == 2
    assert "pass --yes" in capsys.readouterr().err  # no terminal to ask: refuse rather than erase unasked

    # Replica B has no erasure publisher: the subject is erased all the same, and the caller is told to retry.
    second.gallery_stub().Enroll(
        gallery_pb2.EnrollRequest(subject_id="e-biden2", images=[photo(face_photos, "biden.jpg")])
    )
    error = refused(
        lambda: second.gallery_stub().EraseSubject(
            gallery_pb2.EraseSubjectRequest(subject_id="e-biden2", reference=REFERENCE)
        )
    )
    assert error.code() == grpc.StatusCode.UNAVAILABLE and "erase it again" in error.details()
    assert second.gallery.store.get_subject("e-biden2") is None
    trail = records(audit, start, action="ERASE")
    assert [(r.subject_id, r.result) for r in trail] == [
        ("anyone", "refused: an erasure needs the request's reference (its case number): it is audited and published"),
        ("e-biden2", "erased"),
        ("e-biden2", "notice not published: no publisher configured"),
    ]


# -- replicas on one database, without gRPC -------------------------------------------------------------------


@pytest.fixture()
def two_galleries(store_url: str) -> Iterator[tuple[Gallery, Gallery]]:
    cipher = TemplateCipher.from_base64(generate_key(), "k1")
    first = Gallery(GalleryStore.open(store_url, cipher), 0.6, refresh_interval_s=0.1)
    second = Gallery(GalleryStore.open(store_url, cipher), 0.6, refresh_interval_s=0.1)
    yield first, second
    first.close()
    second.close()


def _ids(gallery: Gallery, vector: np.ndarray, watchlists: tuple[str, ...] = ()) -> list[str]:
    return [c.subject_id for c in gallery.search(vector[None, :], 5, watchlists)[0]]


def test_replicas_drop_an_erased_subject_on_their_own(two_galleries: tuple[Gallery, Gallery]) -> None:
    first, second = two_galleries
    rng = np.random.default_rng(7)
    alice, bob = (rng.standard_normal(128).astype(np.float32) for _ in range(2))
    first.enroll("alice", "", ["stop"], [alice, alice + 0.01], ("m", "1"), [80.0, 80.0])
    first.enroll("bob", "", [], [bob], ("m", "1"), [80.0])
    assert wait_until(lambda: _ids(second, alice)[:1] == ["alice"], timeout=3)

    removal = first.remove("alice")
    assert (removal.existed, removal.templates_removed, removal.watchlists) == (True, 2, ("stop",))
    assert "alice" not in _ids(first, alice)
    assert wait_until(lambda: "alice" not in _ids(second, alice), timeout=3)
    assert _ids(second, bob)[0] == "bob" and second.index.size == 1


def test_replicas_drop_an_expired_membership_on_their_own(two_galleries: tuple[Gallery, Gallery]) -> None:
    first, second = two_galleries
    vector = np.random.default_rng(8).standard_normal(128).astype(np.float32)
    first.enroll("carol", "", [], [vector], ("m", "1"), [80.0])
    first.create_watchlist("visitors", "day passes", "desk", 1e-3, 0)
    # Expiring well after B can have learnt of it (3 s at most), even when PostgreSQL is slow on a loaded machine.
    first.add_members("visitors", ["carol"], expires_at=datetime.now(UTC) + timedelta(seconds=6))
    assert wait_until(lambda: _ids(second, vector, ("visitors",)) == ["carol"], timeout=3)  # B learnt of it
    [candidate] = second.search(vector[None, :], 1, ["visitors"])[0]
    assert set(candidate.watchlist_thresholds) == {"visitors"}

    for gallery in (first, second):
        assert wait_until(lambda gallery=gallery: not _ids(gallery, vector, ("visitors",)), timeout=10)
    assert _ids(second, vector) == ["carol"] and not second.search(vector[None, :], 1)[0][0].watchlist_thresholds


def test_a_replica_that_cannot_decrypt_the_gallery_still_drops_an_erased_subject(store_url: str) -> None:
    """Keys rotated elsewhere before this replica got the new one: its full reload fails, but the erasure still
    reaches its index (ids only, nothing to decrypt)."""
    old = TemplateCipher.from_base64(generate_key(), "k1")
    writer = Gallery(GalleryStore.open(store_url, old), 0.6, refresh_interval_s=0.1)
    behind = Gallery(GalleryStore.open(store_url, old), 0.6, refresh_interval_s=0.1)
    try:
        rng = np.random.default_rng(9)
        dave, erin = (rng.standard_normal(128).astype(np.float32) for _ in range(2))
        writer.enroll("dave", "", ["stop"], [dave], ("m", "1"), [80.0])
        writer.enroll("erin", "", ["stop"], [erin], ("m", "1"), [80.0])
        assert wait_until(lambda: _ids(behind, dave)[:1] == ["dave"], timeout=3)
        writer.store.rotate_keys(TemplateCipher.from_base64(generate_key(), "k2", old_keys=""))
        writer.remove("dave")
        assert wait_until(lambda: "dave" not in _ids(behind, dave), timeout=3)
        assert _ids(behind, erin)[:1] == ["erin"]  # what it could not reload stays as it was
    finally:
        writer.close()
        behind.close()
