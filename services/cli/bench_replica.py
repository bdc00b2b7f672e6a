"""The ``replica`` block of ``sightline bench search``: a matching replica's start and how fast it follows writes.

With the benchmark's ANN index as the gallery's content:

- ``snapshot_write_s`` / ``snapshot_bytes_per_template``: the index sealed into an encrypted snapshot (``matching.
  snapshots``), as a running replica writes one;
- ``ready_from_snapshot_s``: a new ``Gallery`` (what a matching process opens) started from that snapshot and the
  gallery database's change log since: wall and this thread's CPU time, which is what "ready on one core" means;
- ``enrol_to_searchable`` / ``removal_to_gone``: another replica on the same database enrols a subject (or deletes
  one); the time until the started replica's searches return it (or no longer do), polled every millisecond.
  The started replica reads the change log every ``refresh_interval_s`` (the service's default, 0.5 s), so these are
  at most that plus the catch-up. Each write waits a random part of that interval first, so that writes fall at
  random moments of the replica's cycle.

The database is a real SQLite file with encrypted templates, empty but for the subjects enrolled here: the snapshot
stands for everything enrolled before it, exactly as after a restart (its template ids continue after the
snapshot's).
"""

from __future__ import annotations

import sqlite3
import tempfile
import time
from contextlib import closing
from pathlib import Path
from typing import Any

import numpy as np

from sightline.matching.ann import AnnIndex, AnnSettings
from sightline.matching.gallery import Gallery, SnapshotPolicy
from sightline.matching.settings import MatchingSettings
from sightline.matching.snapshots import SnapshotStore
from sightline.matching.store import GalleryStore
from sightline.matching.templates import TemplateCipher, generate_key

FOLLOW_REPEATS = 20
_LONG_S = 3600.0  # the benchmark's replicas write no snapshot of their own while it measures
_POLL_S = 0.001
_GIVE_UP_S = 10.0


def replica_figures(index: AnnIndex, last_template_id: int, fresh: np.ndarray) -> dict[str, Any]:
    """Snapshot, start and follow figures for ``index`` (template ids up to ``last_template_id``); ``fresh`` are
    vectors of people not in it (to enrol)."""
    cipher = TemplateCipher.from_base64(generate_key(), "bench")
    with tempfile.TemporaryDirectory(prefix="sightline-bench-replica-") as folder:
        database = Path(folder) / "gallery.db"
        url = f"sqlite:///{database}"
        writer_store = GalleryStore.open(url, cipher)
        _continue_template_ids(database, last_template_id)
        snapshots = SnapshotStore(Path(folder) / "snapshots" / writer_store.gallery_id, cipher)
        start = time.perf_counter()
        info = snapshots.write(index, writer_store.version())
        written = time.perf_counter() - start
        replica, ready = _started(url, cipher, snapshots)
        writer = Gallery(writer_store, 0.6, _LONG_S)
        try:
            figures = {
                "snapshot_write_s": round(written, 2),
                "snapshot_bytes_per_template": round(info.size_bytes / max(index.size, 1), 1),
                "ready_from_snapshot_s": ready,
                "started_from_snapshot": replica._started_from is not None,
                "templates": replica.index.size,
                "refresh_interval_s": MatchingSettings.model_fields["refresh_interval_s"].default,
                **_follow(writer, replica, fresh[:FOLLOW_REPEATS]),
            }
        finally:
            writer.close()
            replica.close()
    return figures


def _continue_template_ids(database: Path, last: int) -> None:
    """The database's next template id follows the snapshot's, as it does for a gallery that enrolled them."""
    with closing(sqlite3.connect(database)) as connection, connection:
        connection.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('templates', ?)", (last,))


def _started(url: str, cipher: TemplateCipher, snapshots: SnapshotStore) -> tuple[Gallery, dict[str, float]]:
    wall, cpu = time.perf_counter(), time.thread_time()
    replica = Gallery(
        GalleryStore.open(url, cipher),
        0.6,
        MatchingSettings.model_fields["refresh_interval_s"].default,
        index_settings=AnnSettings(),
        snapshots=SnapshotPolicy(snapshots, _LONG_S, _LONG_S, change_log_days=7.0),
    )
    return replica, {"wall": round(time.perf_counter() - wall, 2), "cpu": round(time.thread_time() - cpu, 2)}


def _follow(writer: Gallery, replica: Gallery, fresh: np.ndarray) -> dict[str, Any]:
    # Writes land at random moments of the replica's read cycle, as real ones do, not right after its last read.
    jitter = np.random.default_rng(0).uniform(0, replica.refresh_interval_s, size=(2, len(fresh)))
    enrolled, removed = [], []
    for number, vector in enumerate(fresh):
        subject = f"bench-enrolled-{number:03d}"
        time.sleep(jitter[0, number])
        writer.enroll(subject, "", [], [vector], ("bench", "1"), [80.0])
        enrolled.append(_until(lambda v=vector, s=subject: _top(replica, v) == s))
    for number, vector in enumerate(fresh):
        subject = f"bench-enrolled-{number:03d}"
        time.sleep(jitter[1, number])
        writer.remove(subject)
        removed.append(_until(lambda v=vector, s=subject: _top(replica, v) != s))
    return {"enrol_to_searchable": _spread(enrolled), "removal_to_gone": _spread(removed)}


def _top(replica: Gallery, vector: np.ndarray) -> str | None:
    found = replica.search(vector[None, :], 1)[0]
    return found[0].subject_id if found else None


def _until(condition: Any) -> float:
    start = time.perf_counter()
    while not condition():
        if time.perf_counter() - start > _GIVE_UP_S:
            return float("inf")
        time.sleep(_POLL_S)
    return time.perf_counter() - start


def _spread(seconds: list[float]) -> dict[str, float | int]:
    values = np.array(seconds) * 1000
    finite = values[np.isfinite(values)]
    return {
        "p50_ms": round(float(np.percentile(finite, 50)), 1) if len(finite) else -1.0,
        "p99_ms": round(float(np.percentile(finite, 99)), 1) if len(finite) else -1.0,
        "max_ms": round(float(finite.max()), 1) if len(finite) else -1.0,
        "never": int(len(values) - len(finite)),
    }
