"""Replicas follow the gallery's change log: what one replica writes reaches another's searches without a reload, a
replica starts from an encrypted snapshot plus the changes since, and falls back to a full load when it must.

Real SQLite files and a real PostgreSQL database, real encrypted snapshots on disk, real templates (encrypted at rest)
and the real ANN index; the replicas are Gallery objects in this process, as each matching process holds one.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from sightline.matching.ann import AnnSettings
from sightline.matching.gallery import Gallery, SnapshotPolicy
from sightline.matching.snapshots import SnapshotStore
from sightline.matching.store import GalleryStore
from sightline.matching.templates import TemplateCipher, generate_key

KEY = generate_key()
MODEL = ("test-model", "1")


def wait_until(condition: Callable[[], object], timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return bool(condition())


def vectors(count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, 128)).astype(np.float32) * 0.1


@pytest.fixture()
def cipher() -> TemplateCipher:
    return TemplateCipher.from_base64(KEY, "k1")


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'gallery.db'}"
    return str(request.getfixturevalue("pg_schema_url"))


@pytest.fixture()
def replicas(tmp_path: Path, cipher: TemplateCipher, database_url: str) -> Iterator[Callable[..., Gallery]]:
    """``replica(snapshots=False, **gallery_kwargs)``: a Gallery on the shared database (and snapshot directory)."""
    opened: list[Gallery] = []

    def replica(snapshots: bool = False, **kwargs: object) -> Gallery:
        store = GalleryStore.open(database_url, cipher)
        policy = SnapshotPolicy(SnapshotStore(tmp_path / "snapshots", cipher), 0.2, 0.1, 7.0) if snapshots else None
        kwargs.setdefault("index_settings", AnnSettings(exact_below=200))
        opened.append(Gallery(store, 0.6, 0.05, snapshots=policy, **kwargs))  # type: ignore[arg-type]
        return opened[-1]

    yield replica
    for gallery in opened:
        gallery.close()


def enrol(gallery: Gallery, subject_id: str, vector: np.ndarray, watchlists: tuple[str, ...] = ()) -> None:
    gallery.enroll(subject_id, "", list(watchlists), [vector], MODEL, [80.0])


def nearest(gallery: Gallery, vector: np.ndarray, watchlists: tuple[str, ...] = ()) -> list[str]:
    return [c.subject_id for c in gallery.search(vector[None, :], 3, watchlists)[0]]


def test_a_write_on_one_replica_reaches_the_other_without_a_reload(replicas: Callable[..., Gallery]) -> None:
    writer, reader = replicas(), replicas()
    index_before = reader.index
    alice, bob = vectors(2, 1)
    enrol(writer, "alice", alice, ("vip",))
    assert nearest(writer, alice) == ["alice"]  # the writer sees its own write at once
    assert wait_until(lambda: nearest(reader, alice) == ["alice"])
    enrol(writer, "bob", bob)
    assert wait_until(lambda: nearest(reader, bob, ("vip",)) == ["alice"])  # bob is on no list
    writer.add_members("vip", ["bob"])
    assert wait_until(lambda: nearest(reader, bob, ("vip",))[:1] == ["bob"])
    writer.remove_members("vip", ["alice"])
    assert wait_until(lambda: nearest(reader, alice, ("vip",)) == ["bob"])
    writer.remove("alice")
    assert wait_until(lambda: "alice" not in reader.index.subject_ids())
    assert reader.index is index_before  # followed change by change: the index was never rebuilt
    assert reader.index.size == writer.index.size == 1


def test_deleting_a_watchlist_takes_its_members_off_it_everywhere(replicas: Callable[..., Gallery]) -> None:
    writer, reader = replicas(), replicas()
    [alice] = vectors(1, 2)
    enrol(writer, "alice", alice, ("vip", "staff"))
    assert wait_until(lambda: nearest(reader, alice, ("vip",)) == ["alice"])
    writer.delete_watchlist("vip")
    assert wait_until(lambda: nearest(reader, alice, ("vip",)) == [])
    assert nearest(reader, alice, ("staff",)) == ["alice"]


def test_an_expired_membership_stops_matching_on_every_replica(replicas: Callable[..., Gallery]) -> None:
    writer, reader = replicas(), replicas()
    [alice] = vectors(1, 3)
    enrol(writer, "alice", alice)
    writer.create_watchlist("short", "test", "owner", None, 0)
    writer.add_members("short", ["alice"], expires_at=datetime.now(UTC) + timedelta(seconds=1.5))
    assert wait_until(lambda: nearest(reader, alice, ("short",)) == ["alice"])
    assert wait_until(lambda: nearest(reader, alice, ("short",)) == [] and nearest(writer, alice, ("short",)) == [])
    assert nearest(reader, alice) == ["alice"]  # still enrolled, just on no list


def test_a_replica_starts_from_the_snapshot_plus_the_changes_since(replicas: Callable[..., Gallery]) -> None:
    first = replicas(snapshots=True)
    gallery = vectors(300, 4)  # past exact_below: the snapshot holds a trained IVF
    for number, vector in enumerate(gallery):
        enrol(first, f"s{number:03d}", vector, ("all",))
    snapshots = SnapshotStore(first._policy.snapshots.directory, first.store.cipher)  # type: ignore[union-attr]
    assert wait_until(lambda: (info := snapshots.newest()) is not None and info.version == first._version)
    enrol(first, "late", vectors(1, 5)[0])  # after the snapshot: only in the change log
    first.remove("s000")
    second = replicas(snapshots=True)
    assert second._started_from is not None and second._started_from < second._version
    assert second.index.ann_stats()["trained"]
    assert second.index.subject_ids() == first.index.subject_ids()
    assert "late" in second.index.subject_ids() and "s000" not in second.index.subject_ids()
    for vector in gallery[1:20]:
        assert nearest(second, vector) == nearest(first, vector)


def test_a_replica_older_than_the_change_log_loads_everything(replicas: Callable[..., Gallery]) -> None:
    first = replicas(snapshots=True)
    alice, bob = vectors(2, 6)
    enrol(first, "alice", alice)
    directory = first._policy.snapshots.directory  # type: ignore[union-attr]
    assert wait_until(lambda: SnapshotStore(directory, first.store.cipher).newest() is not None)
    first.close()
    writer = replicas()
    enrol(writer, "bob", bob)
    writer.store.prune_changes(datetime.now(UTC) + timedelta(seconds=1))  # the log forgets bob's enrolment
    second = replicas(snapshots=True)
    assert second._started_from is None  # the snapshot could not be brought up to date: a full load
    assert second.index.subject_ids() == {"alice", "bob"}


def test_a_damaged_snapshot_is_not_used(replicas: Callable[..., Gallery], tmp_path: Path) -> None:
    first = replicas(snapshots=True)
    enrol(first, "alice", vectors(1, 7)[0])
    directory = first._policy.snapshots.directory  # type: ignore[union-attr]
    assert wait_until(lambda: SnapshotStore(directory, first.store.cipher).newest() is not None)
    for snapshot in directory.iterdir():
        data = bytearray(snapshot.read_bytes())
        data[-20] ^= 0xFF  # a damaged (or tampered) snapshot
        snapshot.write_bytes(bytes(data))
    second = replicas(snapshots=True)
    assert second._started_from is None and second.index.subject_ids() == {"alice"}
