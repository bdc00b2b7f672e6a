"""Gallery shards, the parts that need no server: which shard holds a subject (stable, balanced), the merge of the
shards' top-k lists (the same candidates as one index holding every subject), the wire form of descriptors, and a
search that fails whole when a shard cannot be reached (a real gRPC channel to a port nobody listens on), and the local
stack's processes and ports per shard."""

from __future__ import annotations

import socket
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest

from sightline.common.ports import SERVICES
from sightline.common.rpc import InvalidInput
from sightline.common.transient import is_transient
from sightline.matching.index import Candidate, SearchIndex
from sightline.matching.shards import RemoteShards, ShardUnavailable, merge, pack, shard_of, unpack
from sightline.tooling.localstack import LocalStack, StackError

DIM = 128


# -- shard_of -----------------------------------------------------------------------------------------------------


def test_shard_of_is_pinned_to_the_sha256_of_the_id() -> None:
    """Fixed values: a change of the hash would move subjects to other shards, where no replica would look."""
    assert [shard_of("obama", n) for n in (1, 2, 3, 8, 64)] == [0, 0, 0, 2, 42]
    assert [shard_of("biden", n) for n in (2, 3, 8, 64)] == [1, 0, 7, 31]
    assert [shard_of("session-3f2a", n) for n in (2, 3, 8, 64)] == [0, 2, 4, 60]
    assert shard_of("zoë", 64) == shard_of("zoë", 64)  # UTF-8, not the process's hash seed


@pytest.mark.parametrize("shards", [2, 3, 8, 64])
def test_shard_of_spreads_subjects_evenly(shards: int) -> None:
    ids = [f"subject-{i}" for i in range(20_000)] + [f"p{i:08d}@agency" for i in range(20_000)]
    counts = Counter(shard_of(subject_id, shards) for subject_id in ids)
    assert set(counts) == set(range(shards))
    mean = len(ids) / shards
    # Binomial spread: ~1% of the mean at 2 shards, ~8% at 64; 5 standard deviations is never crossed by a fair hash.
    sigma = (mean * (1 - 1 / shards)) ** 0.5
    assert max(abs(count - mean) for count in counts.values()) < 5 * sigma


def test_shard_of_refuses_no_shards() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        shard_of("obama", 0)


# -- merge --------------------------------------------------------------------------------------------------------


def _candidates(rng: np.random.Generator, count: int) -> list[Candidate]:
    # Distances on a coarse grid, so that ties (broken by subject id) occur often.
    distances = rng.integers(0, 40, count) / 40
    return [Candidate(f"s{i:04d}", float(d), ("w",), i) for i, d in enumerate(distances)]


def _ranked(candidates: Iterable[Candidate]) -> list[Candidate]:
    return sorted(candidates, key=lambda c: (c.distance, c.subject_id))


@pytest.mark.parametrize("seed", range(200))
def test_merge_is_the_single_sorted_top_k(seed: int) -> None:
    """Random subjects split over random shards: the merge of each shard's own top k (ties by subject id, as the
    merge breaks them) is the top k of all of them, nearest first, and no subject twice."""
    rng = np.random.default_rng(seed)
    shards, top_k, probes = int(rng.integers(1, 6)), int(rng.integers(1, 12)), int(rng.integers(1, 4))
    per_probe = [_candidates(rng, int(rng.integers(0, 30))) for _ in range(probes)]
    per_shard = [
        [_ranked(c for c in found if shard_of(c.subject_id, shards) == s)[:top_k] for found in per_probe]
        for s in range(shards)
    ]
    expected = [_ranked(found)[:top_k] for found in per_probe]
    assert merge(per_shard, top_k) == expected


def test_merge_of_sharded_indexes_equals_one_index() -> None:
    """Real exact indexes: 3,000 subjects (1-3 templates each) in one index, and the same subjects split over 4
    shard indexes by shard_of; for 50 probes and each watchlist filter, the merged shard results are the one index's."""
    rng = np.random.default_rng(7)
    whole, shards = SearchIndex(), [SearchIndex() for _ in range(4)]
    lists = {"north": [], "south": []}
    template_id = 0
    for i in range(3000):
        subject_id = f"person-{i}"
        for _ in range(int(rng.integers(1, 4))):
            vector = rng.standard_normal(DIM).astype(np.float32)
            whole.add(template_id, subject_id, vector)
            shards[shard_of(subject_id, 4)].add(template_id, subject_id, vector)
            template_id += 1
        if i % 3 == 0:
            lists["north"].append(subject_id)
        if i % 5 == 0:
            lists["south"].append(subject_id)
    for index in (whole, *shards):
        index.replace_watchlists(lists)
    probes = rng.standard_normal((50, DIM)).astype(np.float32)
    for watchlists in ([], ["north"], ["north", "south"]):
        for top_k in (1, 5, 20):
            expected = whole.search(probes, top_k=top_k, watchlists=watchlists)
            merged = merge([index.search(probes, top_k=top_k, watchlists=watchlists) for index in shards], top_k)
            assert merged == expected, (watchlists, top_k)
    assert sum(index.subject_count for index in shards) == whole.subject_count == 3000


def test_merge_keeps_one_entry_per_subject_and_checks_the_probe_count() -> None:
    near, far = Candidate("a", 0.2, ()), Candidate("a", 0.3, ())
    assert merge([[[far]], [[near, Candidate("b", 0.25, ())]]], 5) == [[near, Candidate("b", 0.25, ())]]
    assert merge([], 5) == []
    with pytest.raises(ValueError, match="different numbers of probes"):
        merge([[[near]], [[near], [far]]], 5)
    with pytest.raises(ValueError, match="top_k"):
        merge([[[near]]], 0)


# -- the wire form ------------------------------------------------------------------------------------------------


def test_probes_round_trip_exactly() -> None:
    vectors = np.random.default_rng(1).standard_normal((100, DIM)).astype(np.float32)
    probes = pack(vectors)
    assert probes.dim == DIM and len(probes.vectors) == 100 * DIM * 4
    assert np.array_equal(unpack(probes), vectors)
    assert np.array_equal(unpack(pack(vectors[0])), vectors[:1])


def test_unpack_refuses_what_is_not_whole_finite_descriptors() -> None:
    good = pack(np.ones((2, DIM), dtype=np.float32))
    with pytest.raises(InvalidInput, match="dim is 64"):
        unpack(pack(np.ones((2, 64), dtype=np.float32)))
    good.vectors = good.vectors[:-4]
    with pytest.raises(InvalidInput, match="whole rows"):
        unpack(good)
    with pytest.raises(InvalidInput, match="NaN or infinite"):
        unpack(pack(np.full((1, DIM), np.nan, dtype=np.float32)))


# -- an unreachable shard -----------------------------------------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])  # released on close: nobody listens there


def test_a_shard_nobody_answers_for_fails_the_whole_search() -> None:
    addresses = [f"127.0.0.1:{_closed_port()}", f"127.0.0.1:{_closed_port()}"]
    remote = RemoteShards(0, addresses, timeout_s=2.0)
    try:
        assert remote.others == [1]
        with pytest.raises(ShardUnavailable, match=r"shard 1 of 2 \(127\.0\.0\.1:\d+\) did not answer the search"):
            remote.search(np.ones((3, DIM), dtype=np.float32), 5)
        assert remote.search(np.empty((0, DIM), dtype=np.float32), 5) == [[]]  # nothing to ask
        owned_by_1 = next(f"s{i}" for i in range(100) if shard_of(f"s{i}", 2) == 1)
        with pytest.raises(ShardUnavailable, match="did not answer the verification") as failed:
            remote.verify(owned_by_1, np.ones(DIM, dtype=np.float32))
        assert is_transient(failed.value)  # the stream stage retries the frame instead of dead-lettering it
        with pytest.raises(ShardUnavailable, match="did not answer the sync"):
            remote.sync(["obama", owned_by_1])
        remote.sync(["obama"])  # shard 0's own: nothing to send
        with pytest.raises(ValueError, match="verify it locally"):
            remote.verify("obama", np.ones(DIM, dtype=np.float32))
    finally:
        remote.close()


def test_remote_shards_need_a_real_shard_layout() -> None:
    with pytest.raises(ValueError, match="at least 2 shards"):
        RemoteShards(0, ["127.0.0.1:1"], timeout_s=1.0)
    with pytest.raises(ValueError, match="shard 2 is not one of the 2 shards"):
        RemoteShards(2, ["127.0.0.1:1", "127.0.0.1:2"], timeout_s=1.0)


# -- the local stack's layout of shards ---------------------------------------------------------------------------


def test_the_local_stack_runs_a_process_per_shard_on_ports_of_its_own(tmp_path: Path) -> None:
    sharded = LocalStack(tmp_path / "a", ports="default", shards=3)
    assert sharded.processes == (
        "capture",
        "detection",
        "embedding",
        "matching-0",
        "matching-1",
        "matching-2",
        "decision",
    )
    assert sharded.shard_addresses == ["127.0.0.1:50054", "127.0.0.1:50154", "127.0.0.1:50254"]
    assert sharded.addresses["matching"] == "127.0.0.1:50054"  # the gallery API: every shard serves it
    assert [sharded.ports.metrics[f"matching-{i}"] for i in range(3)] == [9104, 9204, 9304]
    auto = LocalStack(tmp_path / "b", ports="auto", shards=2)
    assert len(set(auto.ports.needed(auto.processes))) == 1 + 2 * len(auto.processes)  # all distinct


def test_one_shard_is_the_stack_without_shards(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SIGHTLINE_MATCHING_SHARDS", raising=False)
    plain = LocalStack(tmp_path, ports="default")
    assert plain.shards == 1 and plain.processes == SERVICES and plain.shard_addresses == []
    assert plain.process_addresses == plain.addresses


def test_the_local_stack_reads_the_shard_count_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SIGHTLINE_MATCHING_SHARDS", "2")
    assert LocalStack(tmp_path, ports="auto").shards == 2  # as `sightline up` would run it
    assert LocalStack(tmp_path, ports="auto", env={"SIGHTLINE_MATCHING_SHARDS": "4"}).shards == 4
    assert LocalStack(tmp_path, ports="auto", shards=1).shards == 1
    for wrong in ("0", "65", "two"):
        monkeypatch.setenv("SIGHTLINE_MATCHING_SHARDS", wrong)
        with pytest.raises(StackError, match="SIGHTLINE_MATCHING_SHARDS must be a whole number|1 to 64 shards"):
            LocalStack(tmp_path, ports="auto")
