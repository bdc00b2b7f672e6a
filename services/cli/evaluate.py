"""``sightline eval DATASET --out DIR``: accuracy of the face pipeline on a labelled dataset, in-process.

DATASET is a folder with one subfolder per identity, or an LFW-style pairs file (images under ``--images``, default
the pairs file's folder, named ``Name/Name_0001.jpg``). Every image goes through the same pipeline the services run
(150x150 images are taken as aligned chips, see ``--chips``). The report gives the failure-to-acquire rate, the
genuine and impostor distance distributions, FMR and FNMR at chosen thresholds, the EER, TAR at FAR 1e-2 and 1e-3,
and the rank-1 identification rate; ``DIR`` receives report.json, report.html (self-contained), det.png and
histogram.png. A file that cannot be used gets one clear line on stderr; the exit code is non-zero only when nothing
could be evaluated.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from pathlib import Path
from typing import Any

DEFAULT_THRESHOLDS = (0.4, 0.5, 0.6)
REPORTED_FARS = (1e-2, 1e-3)


def add_pipeline_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every dataset command shares: chips, models folder, progress bar."""
    parser.add_argument(
        "--chips",
        choices=("auto", "always", "never"),
        default="auto",
        help="embed images directly as aligned chips: auto = those of exactly 150x150 (default)",
    )
    parser.add_argument("--models-dir", type=Path, help="converted models (default: SIGHTLINE_MODELS_DIR)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("eval", help="accuracy report (FTA, FMR/FNMR, EER, TAR@FAR, rank-1) on a dataset")
    parser.add_argument(
        "dataset",
        type=Path,
        metavar="DATASET",
        help="folder with one subfolder per identity, or an LFW-style pairs file",
    )
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="folder for the report files")
    parser.add_argument("--images", type=Path, metavar="DIR", help="images of a pairs file (default: its folder)")
    parser.add_argument(
        "--thresholds",
        type=_thresholds,
        default=DEFAULT_THRESHOLDS,
        metavar="D,D,...",
        help="distance thresholds to report FMR and FNMR at (default 0.4,0.5,0.6)",
    )
    add_pipeline_arguments(parser)
    parser.set_defaults(func=cmd_eval)


def _thresholds(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of distances: {text!r}") from None
    if not values or any(not 0 < v <= 2 for v in values):
        raise argparse.ArgumentTypeError("thresholds are distances in (0, 2]")
    return values


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sightline")
    except PackageNotFoundError:
        return "unknown"


def load_pipeline(models_dir: Path | None) -> Any:
    """The in-process pipeline, or None after saying why it cannot be built."""
    from sightline.common.models.pipeline import FacePipeline
    from sightline.common.models.registry import ModelsMissingError

    try:
        return FacePipeline(models_dir)
    except ModelsMissingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None


def evaluate(dataset: Any, acquisition: Any, thresholds: tuple[float, ...]) -> tuple[dict[str, Any], Any]:
    """The report document (what report.json holds) and the scores behind it."""
    from sightline.common import scores as sc
    from sightline.tooling import evaluation as ev

    if dataset.pairs is not None:
        scores = ev.listed_pairs_scores(acquisition.acquired, dataset.pairs)
    else:
        scores = ev.all_pairs_scores(acquisition.acquired)
    g, i = scores.genuine, scores.impostor
    report = {
        "tool": f"sightline {package_version()} (sightline eval)",
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "dataset": {
            "path": str(dataset.path),
            "format": dataset.kind,
            "identities": dataset.identities,
            "samples": len(dataset.samples),
            "problems": dataset.problems,
        },
        "model": {
            "descriptor": "dlib_resnet_v1",
            "detector": "blazeface_full_range+dlib_5pt",
            "score": "Euclidean distance; a pair at or under the threshold is a match",
            "calibration_table": str(sc.calibration().path.name),
        },
        "acquisition": {
            "samples": acquisition.samples,
            "acquired": acquisition.samples - len(acquisition.failures),
            "failures": len(acquisition.failures),
            "fta_rate": acquisition.fta_rate,
            "failed_files": [
                {"path": str(f.path), "reason": f.reason, "message": f.message} for f in acquisition.failures
            ],
            "notes": acquisition.notes,
        },
        "pairs": {
            "genuine": int(len(g)),
            "impostor": int(len(i)),
            "listed": len(dataset.pairs or []),
            "skipped_after_failure_to_acquire": scores.skipped_pairs,
            "impostor_subsampled_from": scores.impostor_sampled_from or None,
        },
        "distances": {"genuine": ev.summary(g), "impostor": ev.summary(i)},
        "thresholds": [_at_threshold(g, i, t) for t in thresholds],
        "eer": ev.equal_error_rate(g, i).as_dict(),
        "tar_at_far": [{"far": far, **ev.tar_at_far(g, i, far).as_dict()} for far in REPORTED_FARS],
        "rank1": ev.rank1_rate(acquisition.acquired).as_dict(),
        "estimation_rule": f"TAR at FAR p needs >= {ev.MIN_ERRORS_RULE}/p impostor pairs (rule of three: with N "
        "pairs and no false match, the 95% upper bound on the FMR is 3/N)",
        "files": {"json": "report.json", "html": "report.html", "det": "det.png", "histogram": "histogram.png"},
    }
    return report, scores


def _at_threshold(genuine: Any, impostor: Any, threshold: float) -> dict[str, Any]:
    from sightline.common import scores as sc
    from sightline.tooling import evaluation as ev

    measured = ev.fmr_at(impostor, threshold)
    return {
        "distance": threshold,
        "similarity": round(sc.similarity(threshold), 4),
        "fmr": None if measured != measured else measured,  # NaN (no pairs) is not valid JSON
        "fnmr": None if not len(genuine) else ev.fnmr_at(genuine, threshold),
        "impostor_matches": int((impostor <= threshold).sum()),
        "genuine_non_matches": int((genuine > threshold).sum()),
        "calibrated_fmr": sc.fmr(threshold),
        "calibrated_fmr_extrapolated": sc.fmr_is_extrapolated(threshold),
    }


def cmd_eval(args: argparse.Namespace) -> int:
    from sightline.cli import report as rendering
    from sightline.tooling.evaluation import DatasetError, acquire, load_dataset

    try:
        dataset = load_dataset(args.dataset, args.images)
    except (DatasetError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for problem in dataset.problems:
        print(problem, file=sys.stderr)
    pipeline = load_pipeline(args.models_dir)
    if pipeline is None:
        return 2
    acquisition = acquire(dataset.samples, pipeline, chips=args.chips, progress=not args.no_progress)
    for message in [f.message for f in acquisition.failures] + acquisition.notes:
        print(message, file=sys.stderr)
    report, scores = evaluate(dataset, acquisition, args.thresholds)
    args.out.mkdir(parents=True, exist_ok=True)
    rendering.write_report(args.out, report, scores)
    print(rendering.text_summary(report))
    print(f"report: {args.out / 'report.html'} (and report.json, det.png, histogram.png)")
    if not len(scores.genuine) and not len(scores.impostor):
        print("error: nothing could be evaluated: no comparison had two acquired faces", file=sys.stderr)
        return 1
    return 0
