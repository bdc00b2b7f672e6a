"""``matching.ann.AnnIndex`` against exact search: same candidates, masks, removal at once, snapshots.

Galleries are small random ones (the benchmark, ``sightline bench search``, measures recall at scale). Each behaviour
is checked in three configurations: untrained (below ``exact_below``: every search exact), trained with an
exhaustive scan (every list probed, and watchlist searches forced through faiss's filtered IVF search), and trained
with few lists probed (the shortlist is approximate there, so only properties that hold regardless are checked).
"""

from __future__ import annotations

import io
import threading
import time
from dataclasses import dataclass

import numpy as np
import pytest

from sightline.matching.ann import AnnIndex, AnnSettings
from sightline.matching.index import Candidate, SearchIndex

DIM = 128
NAMES = ("red", "green", "blue")

UNTRAINED = AnnSettings(exact_below=10**9)
EXHAUSTIVE = AnnSettings(exact_below=64, lists=16, probes=16, shortlist=512, exact_rows=0, exact_share=0.0)
APPROXIMATE = AnnSettings(exact_below=64, lists=32, probes=2, exact_rows=0, exact_share=0.0)
EXACT_CONFIGS = {"untrained": UNTRAINED, "exhaustive": EXHAUSTIVE}


@dataclass(frozen=True)
class Record:
    template_id: int
    subject_id: str
    vector: np.ndarray
    watchlists: tuple[str, ...] = ()


def _vector(rng: np.random.Generator) -> np.ndarray:
    return rng.standard_normal(DIM).astype(np.float32) * 0.1


def _gallery(rng: np.random.Generator, subjects: int, per_subject_max: int = 3, sessions: int = 5) -> list[Record]:
    """Subjects with 1..per_subject_max templates, on 0-2 watchlists, and a few verify-only session subjects."""
    records, template_id = [], 0
    for s in range(subjects):
        names = tuple(sorted({NAMES[s % 3], NAMES[s % 2]})) if s % 5 else ()
        for _ in range(int(rng.integers(1, per_subject_max + 1))):
            template_id += 1
            records.append(Record(template_id, f"s{s:04d}", _vector(rng), names))
    for s in range(sessions):
        template_id += 1
        records.append(Record(template_id, f"session-{s}", _vector(rng)))
    return records


def _both(records: list[Record], settings: AnnSettings) -> tuple[AnnIndex, SearchIndex]:
    ann, exact = AnnIndex(settings=settings), SearchIndex()
    ann.replace_all(records)
    exact.replace_all(records)
    return ann, exact


def _same(found: list[Candidate], expected: list[Candidate]) -> None:
    assert [c.subject_id for c in found] == [c.subject_id for c in expected]
    assert [c.template_id for c in found] == [c.template_id for c in expected]
    assert [c.watchlists for c in found] == [c.watchlists for c in expected]
    np.testing.assert_allclose([c.distance for c in found], [c.distance for c in expected], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("settings", EXACT_CONFIGS.values(), ids=EXACT_CONFIGS.keys())
def test_same_candidates_as_exact_search(settings: AnnSettings) -> None:
    rng = np.random.default_rng(1)
    records = _gallery(rng, subjects=400)
    ann, exact = _both(records, settings)
    assert ann.ann_stats()["trained"] is (settings is EXHAUSTIVE)
    probes = np.stack([_vector(rng) for _ in range(8)] + [records[20].vector + 0.01 * _vector(rng)])
    for watchlists in ((), ("red",), ("green", "blue"), ("nobody",)):
        for top_k in (1, 5):
            results, expected = ann.search(probes, top_k, watchlists), exact.search(probes, top_k, watchlists)
            assert len(results) == len(probes)
            for found, wanted in zip(results, expected, strict=True):
                _same(found, wanted)
    assert ann.search(probes[-1], top_k=1)[0][0].subject_id == records[20].subject_id
    assert ann.size == exact.size and ann.subject_count == exact.subject_count
    assert ann.subject_ids() == exact.subject_ids()


def test_approximate_search_keeps_every_rule() -> None:
    rng = np.random.default_rng(2)
    records = _gallery(rng, subjects=600)
    ann = AnnIndex(settings=APPROXIMATE)
    ann.replace_all(records)
    assert ann.ann_stats()["probes"] == 2 and ann.ann_stats()["lists"] == 32
    lists_of = {r.subject_id: r.watchlists for r in records}
    probes = np.stack([_vector(rng) for _ in range(20)])
    for watchlists in ((), ("red",), ("blue",)):
        for probe, found in zip(probes, ann.search(probes, top_k=6, watchlists=watchlists), strict=True):
            assert len({c.subject_id for c in found}) == len(found) == 6  # widening found enough allowed rows
            assert all(not c.subject_id.startswith("session-") for c in found)
            assert all(not watchlists or set(lists_of[c.subject_id]) & set(watchlists) for c in found)
            assert [c.distance for c in found] == sorted(c.distance for c in found)
            for candidate in found:  # every distance is exact: the subject's nearest template
                assert candidate.distance == pytest.approx(ann.verify(probe, candidate.subject_id), rel=1e-6)
    # A mated probe (a template plus a little noise) finds its subject.
    for record in records[:60]:
        if not record.subject_id.startswith("session-"):
            [top] = ann.search(record.vector + 0.005 * _vector(rng), top_k=1)[0]
            assert top.subject_id == record.subject_id


ALL_CONFIGS = {**EXACT_CONFIGS, "approximate": APPROXIMATE}


@pytest.mark.parametrize("settings", EXACT_CONFIGS.values(), ids=EXACT_CONFIGS.keys())
def test_a_subject_with_many_templates_counts_once(settings: AnnSettings) -> None:
    rng = np.random.default_rng(3)
    records = _gallery(rng, subjects=150, per_subject_max=2)
    probe = _vector(rng)
    # 60 templates of one subject are nearer than anyone else's: the next subjects must still be found.
    records += [Record(9000 + i, "crowd", probe + 0.01 * _vector(rng), ("red",)) for i in range(60)]
    ann, exact = _both(records, settings)
    for watchlists in ((), ("red",)):
        [found] = ann.search(probe, top_k=4, watchlists=watchlists)
        assert found[0].subject_id == "crowd"
        _same(found, exact.search(probe, top_k=4, watchlists=watchlists)[0])
    assert ann.remove_subject("crowd") == 60 and exact.remove_subject("crowd") == 60
    _same(ann.search(probe, top_k=4)[0], exact.search(probe, top_k=4)[0])


@pytest.mark.parametrize("settings", ALL_CONFIGS.values(), ids=ALL_CONFIGS.keys())
def test_session_subjects_are_verified_never_searched(settings: AnnSettings) -> None:
    rng = np.random.default_rng(4)
    records = _gallery(rng, subjects=200, sessions=0)
    session = Record(50_000, "session-gate-7", _vector(rng))
    ann = AnnIndex(settings=settings)
    ann.replace_all([*records, session])
    assert ann.verify(session.vector, session.subject_id) == pytest.approx(0.0, abs=1e-6)
    assert session.subject_id not in {c.subject_id for c in ann.search(session.vector, top_k=50)[0]}
    assert ann.add(50_001, "session-gate-8", records[0].vector)  # same vector as a searchable subject's
    assert {c.subject_id for c in ann.search(records[0].vector, top_k=50)[0]}.isdisjoint({"session-gate-8"})
    if ann.ann_stats()["trained"]:
        assert ann.ann_stats()["ivf_templates"] == len(records)  # verify-only templates are not in the IVF
    assert ann.remove_subject("session-gate-7") == 1
    assert ann.verify(session.vector, "session-gate-7") is None
    assert ann.size == len(records) + 1


@pytest.mark.parametrize("settings", ALL_CONFIGS.values(), ids=ALL_CONFIGS.keys())
def test_removal_is_at_once_and_slots_are_reused(settings: AnnSettings) -> None:
    rng = np.random.default_rng(5)
    records = _gallery(rng, subjects=300)
    ann = AnnIndex(settings=settings)
    ann.replace_all(records)
    victim = records[0].subject_id
    victims = [r for r in records if r.subject_id == victim]
    before = ann.stats()
    assert ann.remove_subject(victim) == len(victims)
    assert ann.remove_subject(victim) == 0
    assert ann.size == len(records) - len(victims) and victim not in ann.subject_ids()
    assert ann.verify(victims[0].vector, victim) is None
    for watchlists in ((), victims[0].watchlists):
        assert victim not in {c.subject_id for c in ann.search(victims[0].vector, 100, watchlists)[0]}
    # Its slots are reused; its template ids may come back (a replayed event, a re-enrolment).
    for record in victims:
        assert ann.add(record.template_id, "reborn", record.vector, ("red",))
    after = ann.stats()
    assert after.rows == before.rows and after.capacity == before.capacity
    [top] = ann.search(victims[0].vector, top_k=1, watchlists=["red"])[0]
    assert top.subject_id == "reborn" and top.template_id == victims[0].template_id and top.distance < 1e-5


@pytest.mark.parametrize("settings", [UNTRAINED, APPROXIMATE], ids=["untrained", "approximate"])
def test_a_removed_subject_never_comes_back_under_concurrent_searches(settings: AnnSettings) -> None:
    rng = np.random.default_rng(6)
    records = _gallery(rng, subjects=800, per_subject_max=2)
    ann = AnnIndex(settings=settings)
    ann.replace_all(records)
    victims = sorted({r.subject_id for r in records if not r.subject_id.startswith("session-")})[:40]
    probes = np.stack([next(r.vector for r in records if r.subject_id == v) for v in victims])
    seen: list[tuple[float, set[str]]] = []  # (when a search started, the subjects it returned)
    errors: list[BaseException] = []
    stop = threading.Event()

    def searcher(watchlists: tuple[str, ...]) -> None:
        try:
            while not stop.is_set():
                started = time.monotonic()
                found = ann.search(probes, top_k=3, watchlists=watchlists)
                seen.append((started, {c.subject_id for row in found for c in row}))
        except BaseException as error:  # noqa: BLE001 - reported by the main thread
            errors.append(error)

    threads = [threading.Thread(target=searcher, args=(w,)) for w in ((), (), ("red", "green", "blue"))]
    for thread in threads:
        thread.start()
    removed_at: dict[str, float] = {}
    local = np.random.default_rng(7)
    for i, victim in enumerate(victims):
        ann.add(100_000 + i, f"newcomer{i}", _vector(local), ("red",))  # mutations of every kind meanwhile
        assert ann.remove_subject(victim) > 0
        removed_at[victim] = time.monotonic()
        time.sleep(0.002)
    time.sleep(0.05)
    stop.set()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert len(seen) > len(victims)
    for victim, when in removed_at.items():
        assert not [started for started, subjects in seen if started > when and victim in subjects], victim


@pytest.mark.parametrize("settings", EXACT_CONFIGS.values(), ids=EXACT_CONFIGS.keys())
def test_watchlist_masks_follow_every_change(settings: AnnSettings) -> None:
    rng = np.random.default_rng(8)
    records = _gallery(rng, subjects=300)
    ann, exact = _both(records, settings)
    probe = _vector(rng)

    def check(*watchlists: str) -> None:
        for wanted in (watchlists, ()):
            _same(ann.search(probe, top_k=5, watchlists=wanted)[0], exact.search(probe, 5, wanted)[0])

    check("red")  # the mask is cached now; every change below must keep it right
    for index in (ann, exact):
        index.add(70_000, "newcomer", probe + 0.001, ("red",))
    check("red")
    assert ann.search(probe, top_k=1, watchlists=["red"])[0][0].subject_id == "newcomer"
    for index in (ann, exact):
        index.add(70_001, "newcomer", probe + 0.5, ("violet",))  # its lists grow to red and violet
    check("violet")
    for index in (ann, exact):
        index.remove_subject("newcomer")
    check("red")
    check("violet")
    memberships = {r.subject_id: ["violet"] for r in records[::7]}
    for index in (ann, exact):
        index.replace_watchlists(memberships)
    check("violet")
    check("red")
    assert ann.search(probe, watchlists=["red"]) == [[]]
    one = records[14].subject_id
    assert ann.set_watchlists(one, ["gold"]) and not ann.set_watchlists("stranger", ["gold"])
    assert [c.subject_id for c in ann.search(probe, top_k=5, watchlists=["gold"])[0]] == [one]
    assert ann.stats().cached_masks >= 1


@pytest.mark.parametrize("settings", ALL_CONFIGS.values(), ids=ALL_CONFIGS.keys())
def test_dump_and_load_round_trip(settings: AnnSettings, tmp_path: object) -> None:
    rng = np.random.default_rng(9)
    records = _gallery(rng, subjects=300)
    ann = AnnIndex(settings=settings)
    ann.replace_all(records)
    ann.remove_subject(records[3].subject_id)  # free slots and codes are part of the state too
    ann.add(80_000, "late", _vector(rng), ("late-list",))
    stream = io.BytesIO()
    written = ann.dump(stream)
    assert written == len(stream.getvalue())
    copy = AnnIndex.load(io.BytesIO(stream.getvalue()))
    assert copy.ann_stats() == ann.ann_stats()
    assert (copy.size, copy.subject_count, copy.subject_ids()) == (ann.size, ann.subject_count, ann.subject_ids())
    probes = np.stack([_vector(rng) for _ in range(10)])
    for watchlists in ((), ("red",), ("late-list",)):
        assert copy.search(probes, 5, watchlists) == ann.search(probes, 5, watchlists)
    for record in records[:20]:
        assert copy.verify(record.vector, record.subject_id) == ann.verify(record.vector, record.subject_id)
    assert not copy.add(records[0].template_id, records[0].subject_id, records[0].vector)
    assert copy.add(80_001, "after-load", probes[0]) and copy.search(probes[0], 1)[0][0].subject_id == "after-load"
    assert copy.remove_subject("late") == 1 and "late" not in copy.subject_ids()
    path = tmp_path / "index.ann"  # type: ignore[operator]
    assert ann.dump(path) == written
    assert AnnIndex.load(path).search(probes, 3) == ann.search(probes, 3)
    with pytest.raises(ValueError, match="truncated"):
        AnnIndex.load(io.BytesIO(stream.getvalue()[: written - 100]))
    with pytest.raises(ValueError, match="not a Sightline ANN index dump"):
        AnnIndex.load(io.BytesIO(b"something else entirely"))


def test_trains_once_large_enough_and_retraining_keeps_concurrent_changes() -> None:
    rng = np.random.default_rng(10)
    settings = AnnSettings(exact_below=300, lists=8, probes=8, shortlist=512, retrain_growth=2.0)
    ann, exact = AnnIndex(settings=settings), SearchIndex()
    records = _gallery(rng, subjects=400, per_subject_max=1, sessions=0)
    for record in records[:299]:
        ann.add(record.template_id, record.subject_id, record.vector, record.watchlists)
        exact.add(record.template_id, record.subject_id, record.vector, record.watchlists)
    assert not ann.ann_stats()["trained"]
    for record in records[299:]:  # the 300th template starts a training in the background
        ann.add(record.template_id, record.subject_id, record.vector, record.watchlists)
        exact.add(record.template_id, record.subject_id, record.vector, record.watchlists)
    ann.wait_retrained(timeout=30)
    assert ann.ann_stats()["trained"] and ann.ann_stats()["trained_on"] >= 300
    # A retraining while enrolments and removals go on: the new IVF must hold exactly what the index holds.
    retraining = threading.Thread(target=ann.retrain)
    retraining.start()
    for i in range(200):
        vector = _vector(rng)
        ann.add(60_000 + i, f"during{i % 50}", vector, ("red",))
        exact.add(60_000 + i, f"during{i % 50}", vector, ("red",))
        if i % 3 == 0:
            ann.remove_subject(records[i].subject_id)
            exact.remove_subject(records[i].subject_id)
    retraining.join(timeout=30)
    ann.wait_retrained(timeout=30)
    stats = ann.ann_stats()
    assert stats["ivf_templates"] == exact.size
    probes = np.stack([_vector(rng) for _ in range(10)])
    for watchlists in ((), ("red",)):
        for found, wanted in zip(ann.search(probes, 5, watchlists), exact.search(probes, 5, watchlists), strict=True):
            _same(found, wanted)


def test_template_ids_are_unique() -> None:
    rng = np.random.default_rng(11)
    ann = AnnIndex(settings=UNTRAINED)
    vectors = rng.standard_normal((6000, DIM)).astype(np.float32)
    for i, vector in enumerate(vectors):  # more than the recent-ids set holds: the sorted array is rebuilt
        assert ann.add(i, f"s{i % 1000}", vector)
    assert not any(ann.add(i, "other", vectors[i]) for i in (0, 2500, 4097, 5999))
    assert ann.size == 6000 and ann.subject_count == 1000
    ann.load_arrays(np.array([5, 6, 5]), ["a", "b", "c"], vectors[:3])  # a repeated id keeps its first row
    assert ann.size == 2 and ann.subject_ids() == {"a", "b"}
    assert ann.search(vectors[2], top_k=1)[0][0].subject_id != "c"


def test_rejects_bad_input() -> None:
    ann = AnnIndex(settings=UNTRAINED)
    with pytest.raises(ValueError):
        ann.add(1, "a", np.zeros(64, np.float32))
    with pytest.raises(ValueError):
        ann.add(1, "a", np.full(DIM, np.nan, np.float32))
    with pytest.raises(ValueError):
        ann.search(np.zeros((2, 3, DIM), np.float32))
    with pytest.raises(ValueError):
        ann.search(np.zeros(DIM, np.float32), top_k=0)
    with pytest.raises(ValueError):
        ann.load_arrays(np.array([1, 2]), ["a"], np.zeros((2, DIM), np.float32))
    assert ann.search(np.zeros(DIM, np.float32)) == [[]]
    assert ann.verify(np.zeros(DIM, np.float32), "nobody") is None
