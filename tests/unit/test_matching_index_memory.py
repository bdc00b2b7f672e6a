"""The search index frees what it removes: session templates created and deleted at gate rate leave neither rows nor
per-subject entries behind, an erased subject's descriptors leave at once, and the watchlist mask cache is bounded.

Memory is measured two ways: the index's own ``stats()`` and, independently of it, ``tracemalloc`` (numpy reports its
array allocations to it), so the bound holds for what the process really keeps.
"""

from __future__ import annotations

import gc
import tracemalloc

import numpy as np
import pytest

from sightline.matching.index import SearchIndex

DIM = 128


def _vectors(count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, DIM)).astype(np.float32)


def _gallery(size: int, seed: int = 1) -> SearchIndex:
    index = SearchIndex()
    for i, vector in enumerate(_vectors(size, seed)):
        index.add(i, f"person-{i}", vector)
    return index


def _traced_bytes() -> int:
    gc.collect()
    return tracemalloc.get_traced_memory()[0]


def _churn_sessions(index: SearchIndex, first_id: int, cycles: int, vector: np.ndarray) -> None:
    """One gate session after another: its template enrolled, verified once, deleted."""
    for i in range(cycles):
        subject = f"session-{first_id + i}"
        index.add(first_id + i, subject, vector + 0.001 * (i % 7))
        assert index.verify(vector, subject) is not None
        assert index.remove_subject(subject) == 1


def test_deleting_session_templates_frees_their_rows_and_bytes() -> None:
    index = _gallery(2000)
    sessions = _vectors(3000, seed=2)
    for i, vector in enumerate(sessions):
        index.add(10_000 + i, f"session-{i}", vector)
    full = index.stats()
    assert (full.templates, full.rows) == (5000, 5000)

    for i in range(3000):
        index.remove_subject(f"session-{i}")
    after = index.stats()
    assert (after.templates, after.subjects) == (2000, 2000)
    # Compacted: dead rows are at most a quarter of the rows (or a handful), allocation follows the live rows.
    assert after.rows < full.rows and after.dead_rows <= max(64, after.rows // 4)
    assert after.capacity <= 2 * 2000 + 1024 and after.nbytes < full.nbytes / 2
    assert after.subject_slots <= after.subjects + after.dead_rows
    assert all(index.verify(vector, f"session-{i}") is None for i, vector in enumerate(sessions[:50]))


def test_ten_thousand_session_templates_created_and_deleted_keep_the_index_bounded() -> None:
    index = _gallery(200)
    probe = _vectors(1, seed=3)[0]
    tracemalloc.start()
    try:
        _churn_sessions(index, 100_000, 2000, probe)  # warm up: arrays reach their steady size
        before, stats_before = _traced_bytes(), index.stats()
        _churn_sessions(index, 200_000, 10_000, probe)
        grown = _traced_bytes() - before
    finally:
        tracemalloc.stop()
    stats = index.stats()
    # What 10,000 more sessions leave if each keeps even a list slot and its id string: ~900 kB with the old index.
    assert grown < 100_000, f"the index kept {grown} bytes more after 10,000 more sessions"
    assert (stats.templates, stats.subjects) == (200, 200)
    assert stats.rows <= 200 + 64 + 200 // 3 and stats.subject_slots <= stats.rows
    assert stats.capacity <= stats_before.capacity and stats.nbytes <= stats_before.nbytes


def test_after_churn_search_and_verify_are_still_exact() -> None:
    vectors = _vectors(300, seed=4)
    index = SearchIndex()
    for i, vector in enumerate(vectors):
        index.add(i, f"person-{i}", vector, ["stop"] if i % 2 else [])
    _churn_sessions(index, 1000, 500, vectors[0])
    index.add(5000, "session-live", vectors[1] + 0.01)
    probes = _vectors(20, seed=5)
    for probe in probes:
        expected = np.argsort(np.linalg.norm(vectors - probe, axis=1))[:3]
        assert [c.subject_id for c in index.search(probe, top_k=3)[0]] == [f"person-{i}" for i in expected]
        on_list = [i for i in np.argsort(np.linalg.norm(vectors - probe, axis=1)) if i % 2][:3]
        assert [c.subject_id for c in index.search(probe, 3, ["stop"])[0]] == [f"person-{i}" for i in on_list]
    assert index.verify(vectors[1], "session-live") == pytest.approx(0.01 * np.sqrt(DIM), rel=1e-3)
    assert "session-live" not in {c.subject_id for c in index.search(vectors[1], top_k=10)[0]}


def test_an_erased_subject_leaves_the_arrays_at_once() -> None:
    index = _gallery(50)
    vectors = _vectors(8, seed=6)
    for i, vector in enumerate(vectors):
        index.add(1000 + i, "erased", vector)
    before = index.stats()
    assert index.remove_subject("erased") == 8
    after = index.stats()
    assert (after.templates, after.rows, after.dead_rows, after.subject_slots) == (50, 50, 0, 50)
    assert before.rows == 58
    buffer = index._buf[: after.rows]
    assert not any(np.any(np.all(buffer == vector, axis=1)) for vector in vectors)


def test_the_mask_cache_is_bounded_under_many_distinct_watchlist_sets() -> None:
    size = 5000
    index = SearchIndex(mask_cache_size=8)
    for i, vector in enumerate(_vectors(size, seed=7)):
        index.add(i, f"person-{i}", vector, [f"list-{i % 500}"])
    probe = _vectors(1, seed=8)[0]
    tracemalloc.start()
    try:
        before = _traced_bytes()
        for i in range(200):
            [found] = index.search(probe, 1, [f"list-{i}", f"list-{i + 1}"])
            assert found and int(found[0].subject_id.split("-")[1]) % 500 in (i, i + 1)
        grown = _traced_bytes() - before
    finally:
        tracemalloc.stop()
    # 200 masks of 5,000 rows would be 1 MB (the old, unbounded cache measured 1.1 MB); eight of them are 40 kB.
    assert index.stats().cached_masks == 8
    assert grown < 8 * size + 200_000, f"{grown} bytes kept by 200 distinct searches"


def test_the_mask_cache_keeps_the_sets_in_use() -> None:
    index = SearchIndex(mask_cache_size=2)
    for i, vector in enumerate(_vectors(100, seed=1)):
        index.add(i, f"person-{i}", vector, [f"list-{i % 10}"])
    probe = _vectors(1, seed=9)[0]
    hot = index.search(probe, 3, ["list-1"])
    for i in range(2, 10):
        index.search(probe, 3, ["list-1"])  # used again and again: never the least recently used
        index.search(probe, 3, [f"list-{i}"])
        assert frozenset({"list-1"}) in index._masks
    assert index.search(probe, 3, ["list-1"]) == hot
    with pytest.raises(ValueError, match="mask_cache_size"):
        SearchIndex(mask_cache_size=0)
