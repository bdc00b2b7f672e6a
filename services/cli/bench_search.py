"""``sightline bench search --gallery N``: 1:N search at gallery scale, the ANN index against exact search (issue #13).

The gallery is synthetic, drawn from a model fitted to real dlib descriptors of real faces
(:mod:`sightline.tooling.gallery_synth`): N templates (``--per-subject`` per subject), ``--probes`` mated probes (a
fresh capture of a random gallery subject each, at a genuine distance) and as many non-mated probes (people not in
the gallery). Both indexes get the same gallery: ``matching.ann.AnnIndex`` and ``matching.index.SearchIndex``.

Printed as one JSON object:

- ``ann`` and ``exact``: build time, single-probe p50/p99 (one probe per call), batched time per probe (bursts of 100
  probes, one call each, as the stream path searches a camera burst), memory per template (the process's resident
  memory before and after the build, and the structures' own byte count), enrol-to-searchable latency (``add`` one
  new subject, then a search finds it), removal time; for ANN also dump and load time and size.
- ``recall_at_1_mated``: the share of mated probes whose ANN top candidate is exact search's; ``top_k_agreement``:
  whole top-k lists (subjects) equal; ``recall_at_1_non_mated_within_threshold``: the same for the non-mated probes
  whose exact top candidate is within the 1e-3 FMR distance (the impostors an operator would be shown).
- ``false_candidate_rate``: the share of non-mated probes with a candidate at or under the 1e-3 FMR distance of the
  calibration table shipped with the model (``common/scores.py``); the model's own 1e-3 point, from its impostor
  pairs, is printed beside it. ``mated_hit_rate``: mated probes whose top candidate is their own subject within that
  distance.
- ``watchlists``: the same for searches restricted to a watchlist of 10% of the subjects (the ANN index's filtered
  search) and one of 0.5% (exact over the allowed rows).
- ``replica``: a matching replica started from an encrypted snapshot of the ANN index plus the change log, and
  the time until it sees another replica's enrolments and deletions (:mod:`sightline.cli.bench_replica`).
- ``goal``: issue #13's targets at 1M; ``planned_10m``: memory and shards for 10M templates, computed from these
  figures (see its ``assumptions``).

Everything runs on one core: faiss's OpenMP and numpy's OpenBLAS are set to one thread. Exact search's single-probe
figures use at most ``--exact-probes`` probes (at 1M one takes about 0.1 s).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

GOALS = {
    "recall_at_1_min": 0.99,
    "single_probe_p99_ms_max": 5.0,
    "bytes_per_template_max": 1024,
    "ready_from_snapshot_s_max": 15.0,
    "enrol_to_searchable_ms_max": 1000.0,
}
PLANNED_TEMPLATES = 10_000_000
BURST = 100  # probes per batched call: a camera burst
ENROL_REPEATS = 50
FMR_TARGET = 1e-3


def register(kinds: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``search`` to ``sightline bench``'s kinds (called from bench.py's ``register``)."""
    parser = kinds.add_parser("search", help="1:N search at gallery scale: the ANN index against exact search")
    parser.add_argument("--gallery", type=int, required=True, help="templates in the synthetic gallery")
    parser.add_argument("--probes", type=int, default=1000, help="mated probes, and as many non-mated (default 1000)")
    parser.add_argument("--per-subject", type=int, default=1, help="templates per subject (default 1)")
    parser.add_argument("--top-k", type=int, default=5, help="candidates per search (default 5)")
    parser.add_argument(
        "--exact-probes", type=int, default=200, help="single probes timed on exact search (default 200)"
    )
    parser.add_argument("--lists", type=int, default=0, help="IVF lists (default: the index's own choice)")
    parser.add_argument("--ann-probes", type=int, default=0, help="IVF lists scanned per probe (default: automatic)")
    parser.add_argument(
        "--exact-below",
        type=int,
        default=None,
        help="templates under which the ANN index searches exactly (default: the index's, 20,000)",
    )
    parser.add_argument(
        "--replica-gib", type=float, default=16.0, help="memory of one replica, for planned_10m (default 16)"
    )
    parser.add_argument("--no-exact", action="store_true", help="skip exact search (no recall figures then)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object on one line")
    parser.set_defaults(func=cmd_search)


# -- one core --------------------------------------------------------------------------------------------------------


def single_thread() -> None:
    """One thread for faiss (OpenMP) and for numpy's OpenBLAS, which was loaded before any variable could say so."""
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = "1"
    import faiss

    faiss.omp_set_num_threads(1)
    for path in _loaded_libraries("openblas"):
        library = ctypes.CDLL(path)
        for setter in (
            "scipy_openblas_set_num_threads64_",
            "scipy_openblas_set_num_threads",
            "openblas_set_num_threads",
        ):
            if hasattr(library, setter):
                getattr(library, setter)(1)
                break


def _loaded_libraries(word: str) -> list[str]:
    try:
        with open("/proc/self/maps") as maps:
            return sorted({line.split()[-1] for line in maps if word in line.lower() and line.strip().endswith(".so")})
    except OSError:
        return []


def rss_bytes() -> int:
    """Resident memory of this process (Linux), after a garbage collection."""
    gc.collect()
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def progress(message: str) -> None:
    print(f"[bench search] {message}", file=sys.stderr, flush=True)


# -- the data --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Data:
    vectors: np.ndarray
    template_ids: np.ndarray
    subject_ids: list[str]
    subject_of_row: np.ndarray
    centres: np.ndarray
    mated: np.ndarray
    mated_subjects: list[str]
    non_mated: np.ndarray
    model: Any


@dataclass(frozen=True)
class _Record:
    template_id: int
    subject_id: str
    vector: np.ndarray
    watchlists: tuple[str, ...]


def make_data(templates: int, probes: int, per_subject: int, seed: int) -> Data:
    from sightline.tooling import gallery_synth

    progress("fitting (or reading the cached fit of) the descriptor model to the sample photos...")
    model = gallery_synth.fitted_model()
    rng = np.random.default_rng(seed)
    progress(f"drawing {templates:,} gallery templates and {2 * probes:,} probes...")
    vectors, subject_of_row, centres = model.gallery(templates, rng, per_subject)
    subjects = len(centres)
    chosen = rng.choice(subjects, min(probes, subjects), replace=False)
    return Data(
        vectors=vectors,
        template_ids=np.arange(1, templates + 1, dtype=np.int64),
        subject_ids=[f"subject-{i:08d}" for i in range(subjects)],
        subject_of_row=subject_of_row,
        centres=centres,
        mated=model.mated_probes(centres, chosen, rng),
        mated_subjects=[f"subject-{i:08d}" for i in chosen],
        non_mated=model.non_mated_probes(probes, rng),
        model=model,
    )


def watchlists_of(data: Data, seed: int) -> tuple[dict[str, tuple[str, ...]], dict[str, int]]:
    """Two watchlists over the gallery's subjects: ``wide`` (10%) and ``narrow`` (0.5%)."""
    rng = np.random.default_rng(seed + 1)
    draw = rng.random(len(data.subject_ids))
    lists: dict[str, tuple[str, ...]] = {}
    for subject, value in zip(data.subject_ids, draw.tolist(), strict=True):
        names = ("wide",) * (value < 0.10) + ("narrow",) * (value < 0.005)
        if names:
            lists[subject] = names
    sizes = {"wide": int(np.count_nonzero(draw < 0.10)), "narrow": int(np.count_nonzero(draw < 0.005))}
    return lists, sizes


# -- measuring one index ---------------------------------------------------------------------------------------------


def percentile_ms(seconds: Sequence[float], q: float) -> float:
    return round(1000 * float(np.percentile(np.asarray(seconds), q)), 3)


def time_single(search: Callable[[np.ndarray], Any], probes: np.ndarray) -> dict[str, float]:
    search(probes[0])  # warm-up
    spent = []
    for probe in probes:
        start = time.perf_counter()
        search(probe)
        spent.append(time.perf_counter() - start)
    return {"single_probe_p50_ms": percentile_ms(spent, 50), "single_probe_p99_ms": percentile_ms(spent, 99)}


def search_batched(index: Any, probes: np.ndarray, top_k: int, watchlists: Sequence[str] = ()) -> tuple[list, float]:
    """Results of all probes, searched ``BURST`` at a time, and the time per probe."""
    results: list = []
    start = time.perf_counter()
    for first in range(0, len(probes), BURST):
        results.extend(index.search(probes[first : first + BURST], top_k=top_k, watchlists=list(watchlists)))
    return results, 1000 * (time.perf_counter() - start) / max(len(probes), 1)


def enrol_to_searchable(index: Any, data: Data, rng: np.random.Generator) -> dict[str, float]:
    """Adds ENROL_REPEATS new subjects one by one; each is searched for right after its ``add``."""
    fresh = data.model.non_mated_probes(ENROL_REPEATS, rng)
    adds, totals, found = [], [], 0
    for i, vector in enumerate(fresh):
        subject = f"enrolled-{i:04d}"
        start = time.perf_counter()
        index.add(10_000_000_000 + i, subject, vector)
        added = time.perf_counter()
        top = index.search(vector, top_k=1)[0]
        done = time.perf_counter()
        adds.append(added - start)
        totals.append(done - start)
        found += bool(top) and top[0].subject_id == subject
    removals, leaked = [], 0
    for i, vector in enumerate(fresh):
        start = time.perf_counter()
        index.remove_subject(f"enrolled-{i:04d}")
        removals.append(time.perf_counter() - start)
        top = index.search(vector, top_k=1)[0]
        leaked += bool(top) and top[0].subject_id == f"enrolled-{i:04d}"
    return {
        "add_p50_ms": percentile_ms(adds, 50),
        "add_then_found_p50_ms": percentile_ms(totals, 50),
        "add_then_found_p99_ms": percentile_ms(totals, 99),
        "found_right_after_add": found / ENROL_REPEATS,
        "remove_p50_ms": percentile_ms(removals, 50),
        "removed_returned": leaked,
    }


def rates(results: Sequence[Sequence[Any]], threshold: float, own: Sequence[str] | None = None) -> float:
    """Share of probes whose top candidate is within ``threshold`` (and, with ``own``, is the probe's subject)."""
    hits = 0
    for i, candidates in enumerate(results):
        if candidates and candidates[0].distance <= threshold and (own is None or candidates[0].subject_id == own[i]):
            hits += 1
    return round(hits / max(len(results), 1), 5)


def agreement(ann: Sequence[Sequence[Any]], exact: Sequence[Sequence[Any]]) -> dict[str, float]:
    top1 = sum(bool(a) and bool(e) and a[0].subject_id == e[0].subject_id for a, e in zip(ann, exact, strict=True))
    whole = sum([c.subject_id for c in a] == [c.subject_id for c in e] for a, e in zip(ann, exact, strict=True))
    return {"recall_at_1": round(top1 / max(len(exact), 1), 5), "top_k_agreement": round(whole / max(len(exact), 1), 5)}


def within_threshold(ann: Sequence[Sequence[Any]], exact: Sequence[Sequence[Any]], threshold: float) -> float | None:
    """Of the probes whose exact top candidate is within ``threshold`` (a candidate an operator would see), the share
    whose ANN top candidate is the same subject."""
    close = [(a, e) for a, e in zip(ann, exact, strict=True) if e and e[0].distance <= threshold]
    if not close:
        return None
    return round(sum(bool(a) and a[0].subject_id == e[0].subject_id for a, e in close) / len(close), 5)


# -- the benchmark ---------------------------------------------------------------------------------------------------


def build_ann(data: Data, lists: int, probes: int, exact_below: int | None) -> tuple[Any, dict[str, Any]]:
    from sightline.matching.ann import AnnIndex, AnnSettings

    settings = AnnSettings(lists=lists, probes=probes, auto_retrain=False)
    if exact_below is not None:
        settings = replace(settings, exact_below=exact_below)
    before = rss_bytes()
    start = time.perf_counter()
    index = AnnIndex(settings=settings)
    progress(f"building the ANN index over {len(data.vectors):,} templates (one core)...")
    # Fresh id strings, made inside the measured span: the index owns its subjects' ids in a real gallery.
    index.load_arrays(data.template_ids, [f"subject-{s:08d}" for s in data.subject_of_row.tolist()], data.vectors)
    built = time.perf_counter() - start
    memory = rss_bytes() - before
    stats, ann = index.stats(), index.ann_stats()
    if ann["trained"]:
        progress(f"ANN index built in {built:.1f} s: {ann['lists']} lists, {ann['probes']} probed")
    else:
        progress(f"ANN index built in {built:.1f} s, untrained: below {settings.exact_below:,} it searches exactly")
    return index, {
        "build_s": round(built, 2),
        "rss_bytes_per_template": round(memory / len(data.vectors), 1),
        "nbytes_per_template": round(stats.nbytes / len(data.vectors), 1),
        "trained": ann["trained"],
        "lists": ann["lists"],
        "probes": ann["probes"],
        "trained_on": ann["trained_on"],
    }


def build_exact(data: Data) -> tuple[Any, dict[str, Any]]:
    from sightline.matching.index import SearchIndex

    subject_ids = data.subject_ids
    records = [
        _Record(int(t), subject_ids[s], data.vectors[row], ())
        for row, (t, s) in enumerate(zip(data.template_ids.tolist(), data.subject_of_row.tolist(), strict=True))
    ]
    before = rss_bytes()
    start = time.perf_counter()
    index = SearchIndex()
    progress(f"building the exact index over {len(records):,} templates...")
    index.replace_all(records)
    built = time.perf_counter() - start
    memory = rss_bytes() - before  # the records (and the id strings they share with the data) were there before
    del records
    return index, {
        "build_s": round(built, 2),
        "rss_bytes_per_template": round(memory / len(data.vectors), 1),
        "nbytes_per_template": round(index.stats().nbytes / len(data.vectors), 1),
    }


def snapshot_figures(index: Any) -> dict[str, Any]:
    from sightline.matching.ann import AnnIndex

    with tempfile.TemporaryDirectory(prefix="sightline-bench-search-") as folder:
        path = Path(folder) / "index.ann"
        start = time.perf_counter()
        size = index.dump(path)
        dumped = time.perf_counter() - start
        start = time.perf_counter()
        loaded = AnnIndex.load(path)
        took = time.perf_counter() - start
        same = loaded.size == index.size and loaded.subject_count == index.subject_count
        del loaded
    return {
        "dump_s": round(dumped, 2),
        "load_s": round(took, 2),
        "dump_bytes_per_template": round(size / index.size, 1),
        "load_round_trip_ok": same,
    }


def search_figures(
    index: Any, data: Data, top_k: int, threshold: float, single: int
) -> tuple[dict[str, Any], list, list]:
    mated, mated_ms = search_batched(index, data.mated, top_k)
    non_mated, non_mated_ms = search_batched(index, data.non_mated, top_k)
    figures: dict[str, Any] = time_single(lambda p: index.search(p, top_k=top_k), data.mated[:single])
    figures["batched_ms_per_probe"] = round((mated_ms + non_mated_ms) / 2, 4)
    figures["false_candidate_rate"] = rates(non_mated, threshold)
    figures["mated_hit_rate"] = rates(mated, threshold, data.mated_subjects)
    return figures, mated, non_mated


def watchlist_figures(ann: Any, exact: Any | None, data: Data, top_k: int, probes: int, seed: int) -> dict[str, Any]:
    lists, sizes = watchlists_of(data, seed)
    ann.replace_watchlists(lists)
    if exact is not None:
        exact.replace_watchlists(lists)
    out: dict[str, Any] = {}
    for name, size in sizes.items():
        members = [s for s, names in lists.items() if name in names]
        rng = np.random.default_rng(seed + 2)
        chosen = rng.choice(len(members), min(probes, len(members)), replace=False) if members else []
        codes = np.array([int(members[i].rsplit("-", 1)[1]) for i in chosen], dtype=np.int64)
        mated = data.model.mated_probes(data.centres, codes, rng) if len(codes) else data.mated[:0]
        block: dict[str, Any] = {"subjects": size}
        if not len(mated):
            out[name] = block
            continue
        ann_results, ann_ms = search_batched(ann, mated, top_k, [name])
        block["ann"] = {
            **time_single(lambda p, n=name: ann.search(p, top_k=top_k, watchlists=[n]), mated),
            "batched_ms_per_probe": round(ann_ms, 4),
        }
        if exact is not None:
            exact_results, exact_ms = search_batched(exact, mated, top_k, [name])
            block["ann"].update(agreement(ann_results, exact_results))
            block["exact"] = {"batched_ms_per_probe": round(exact_ms, 4)}
        out[name] = block
    return out


def planned(ann: dict[str, Any], templates: int, replica_gib: float) -> dict[str, Any]:
    """Memory and shards for PLANNED_TEMPLATES, from the measured figures (see ``assumptions``)."""
    per_template = max(ann["rss_bytes_per_template"], ann["nbytes_per_template"])
    total = per_template * PLANNED_TEMPLATES
    usable = 0.7 * replica_gib * 2**30  # the rest: the process, the model-free matching service, headroom
    shards = max(1, math.ceil(total / usable))
    per_shard = PLANNED_TEMPLATES / shards
    # Building: training grows with lists squared (lists ~ sqrt(n), 40 points per list), adding with n x lists; so
    # both grow like n^1.5 per shard. Searching: scanned codes per probe grow like n / sqrt(n) = sqrt(n) per shard.
    growth = (per_shard / templates) ** 1.5
    return {
        "templates": PLANNED_TEMPLATES,
        "bytes_per_template": per_template,
        "total_gib": round(total / 2**30, 2),
        "replica_gib": replica_gib,
        "shards": shards,
        "templates_per_shard": int(per_shard),
        "build_s_per_shard": round(ann["build_s"] * growth, 1),
        "batched_ms_per_probe_per_shard": round(ann["batched_ms_per_probe"] * math.sqrt(per_shard / templates), 3),
        "cpu_ms_per_probe_all_shards": round(
            shards * ann["batched_ms_per_probe"] * math.sqrt(per_shard / templates), 3
        ),
        "assumptions": (
            f"measured at {templates:,} templates; memory linear in templates; 70% of a replica's memory for the "
            "index; "
            "build time ~ n^1.5 and per-probe time ~ sqrt(n) per shard (IVF lists ~ sqrt(n)); every probe searches "
            "every shard"
        ),
    }


def cmd_search(args: argparse.Namespace) -> int:
    if args.gallery < 100 or args.probes < 1 or args.per_subject < 1 or args.top_k < 1:
        print("error: --gallery must be at least 100; --probes, --per-subject, --top-k at least 1", file=sys.stderr)
        return 2
    single_thread()
    import faiss

    from sightline.cli.bench_replica import FOLLOW_REPEATS, replica_figures
    from sightline.common import scores
    from sightline.tooling import gallery_synth

    data = make_data(args.gallery, args.probes, args.per_subject, args.seed)
    threshold = scores.distance_for_fmr(FMR_TARGET)
    rng = np.random.default_rng(args.seed + 3)
    ann_index, ann = build_ann(data, args.lists, args.ann_probes, args.exact_below)
    progress("searching the ANN index...")
    figures, ann_mated, ann_non_mated = search_figures(ann_index, data, args.top_k, threshold, args.probes)
    ann.update(figures)
    progress("dump and load of the ANN index...")
    ann.update(snapshot_figures(ann_index))
    ann["enrol_to_searchable"] = enrol_to_searchable(ann_index, data, rng)
    progress("a replica started from an encrypted snapshot, following another's writes...")
    replica = replica_figures(ann_index, int(data.template_ids.max()), data.model.non_mated_probes(FOLLOW_REPEATS, rng))
    exact_index = None
    exact: dict[str, Any] | None = None
    if not args.no_exact:
        exact_index, exact = build_exact(data)
        progress("searching exactly (the reference)...")
        figures, exact_mated, exact_non_mated = search_figures(
            exact_index, data, args.top_k, threshold, min(args.exact_probes, args.probes)
        )
        exact.update(figures)
        exact["enrol_to_searchable"] = enrol_to_searchable(exact_index, data, rng)
        mated_agreement = agreement(ann_mated, exact_mated)
        ann["recall_at_1_mated"] = mated_agreement["recall_at_1"]
        ann["top_k_agreement_mated"] = mated_agreement["top_k_agreement"]
        non_mated_agreement = agreement(ann_non_mated, exact_non_mated)
        ann["recall_at_1_non_mated"] = non_mated_agreement["recall_at_1"]
        ann["top_k_agreement_non_mated"] = non_mated_agreement["top_k_agreement"]
        ann["recall_at_1_non_mated_within_threshold"] = within_threshold(ann_non_mated, exact_non_mated, threshold)
    progress("watchlist-restricted searches...")
    watchlists = watchlist_figures(ann_index, exact_index, data, args.top_k, min(args.probes, 500), args.seed)
    per_template = max(ann["rss_bytes_per_template"], ann["nbytes_per_template"])
    result = {
        "gallery": args.gallery,
        "subjects": len(data.subject_ids),
        "per_subject": args.per_subject,
        "probes": {"mated": len(data.mated), "non_mated": len(data.non_mated)},
        "top_k": args.top_k,
        "dim": int(data.vectors.shape[1]),
        "threads": 1,
        "cores": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "index": (
            f"faiss {faiss.__version__} IVF{ann['lists']},SQ8, {ann['probes']} lists probed, exact re-ranking"
            if ann["trained"]
            else "untrained: exact search over the ANN index's float32 vectors"
        ),
        "threshold_fmr_1e-3": {
            "calibrated": round(threshold, 4),
            "model": round(gallery_synth.impostor_threshold(data.model, FMR_TARGET, pairs=300_000), 4),
        },
        "distribution": {"spread": data.model.spread, **data.model.provenance.get("fit", {})},
        "ann": ann,
        "exact": exact,
        "watchlists": watchlists,
        "replica": replica,
        "goal": {
            **GOALS,
            "met": {
                "recall_at_1": ann.get("recall_at_1_mated", 0.0) >= GOALS["recall_at_1_min"],
                "single_probe_p99": ann["single_probe_p99_ms"] <= GOALS["single_probe_p99_ms_max"],
                "bytes_per_template": per_template <= GOALS["bytes_per_template_max"],
                "ready_from_snapshot": replica["ready_from_snapshot_s"]["wall"] <= GOALS["ready_from_snapshot_s_max"],
                "enrol_to_searchable": 0
                <= replica["enrol_to_searchable"]["max_ms"]
                <= GOALS["enrol_to_searchable_ms_max"],
            },
        },
        "planned_10m": planned(ann, args.gallery, args.replica_gib),
    }
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))
    return 0
