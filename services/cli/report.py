"""Rendering of an evaluation report: DET curve and histogram (PNG), a self-contained HTML page, report.json, text.

matplotlib runs on its Agg backend (no display needed). The HTML embeds both pictures as base64 data URIs and has no
external reference, so it can be mailed or archived as one file.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

import numpy as np


def write_report(out: Path, report: dict[str, Any], scores: Any) -> None:
    """report.json, det.png, histogram.png and report.html into ``out``."""
    thresholds = [t["distance"] for t in report["thresholds"]]
    (out / "det.png").write_bytes(det_png(scores.genuine, scores.impostor, thresholds))
    (out / "histogram.png").write_bytes(histogram_png(scores.genuine, scores.impostor, thresholds))
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "report.html").write_text(html_report(report, out))


def _figure() -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(6.4, 4.8), dpi=100)


def _png(fig: Any) -> bytes:
    import io

    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def det_png(genuine: np.ndarray, impostor: np.ndarray, thresholds: list[float]) -> bytes:
    """FNMR against FMR on log axes. Zero rates are drawn at half the resolution (1/2N), below a dotted line."""
    from sightline.tooling.evaluation import error_curves, fmr_at, fnmr_at

    fig, ax = _figure()
    if len(genuine) and len(impostor):
        _, fmr, fnmr = error_curves(genuine, impostor)
        fmr_floor, fnmr_floor = 0.5 / len(impostor), 0.5 / len(genuine)
        ax.step(np.maximum(fmr, fmr_floor), np.maximum(fnmr, fnmr_floor), where="post", label="DET")
        for t in thresholds:
            x, y = max(fmr_at(impostor, t), fmr_floor), max(fnmr_at(genuine, t), fnmr_floor)
            ax.plot([x], [y], "o", label=f"distance {t:g}")
        ax.axvline(1 / len(impostor), ls=":", c="grey", label=f"FMR resolution 1/{len(impostor)}")
        ax.axhline(1 / len(genuine), ls="--", c="grey", lw=0.8, label=f"FNMR resolution 1/{len(genuine)}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no genuine or no impostor pairs", ha="center", transform=ax.transAxes)
    ax.set_xlabel("false match rate (FMR)")
    ax.set_ylabel("false non-match rate (FNMR)")
    ax.set_title("DET curve")
    ax.grid(True, which="both", alpha=0.3)
    return _png(fig)


def histogram_png(genuine: np.ndarray, impostor: np.ndarray, thresholds: list[float]) -> bytes:
    fig, ax = _figure()
    bins = np.linspace(0.0, 1.4, 57)
    if len(genuine):
        ax.hist(np.clip(genuine, 0, 1.4), bins=bins, density=True, alpha=0.6, label=f"genuine ({len(genuine)})")
    if len(impostor):
        ax.hist(np.clip(impostor, 0, 1.4), bins=bins, density=True, alpha=0.6, label=f"impostor ({len(impostor)})")
    for t in thresholds:
        ax.axvline(t, ls="--", c="black", lw=0.8)
    ax.set_xlabel("descriptor distance (lower is more alike; dashed: thresholds)")
    ax.set_ylabel("density")
    ax.set_title("Score distributions")
    if len(genuine) or len(impostor):
        ax.legend(fontsize=8)
    return _png(fig)


# -- text and HTML ---------------------------------------------------------------------------------------------------


def _rate(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.2%}" if value >= 0.001 or value == 0 else f"{value:.2e}"


def _estimate(entry: dict[str, Any]) -> str:
    if entry["value"] is None:
        return f"n/a ({entry['note']})"
    text = _rate(entry["value"])
    if entry.get("threshold") is not None:
        text += f" at distance {entry['threshold']:.3f}"
    return text + (f" ({entry['note']})" if entry.get("note") else "")


def headline(report: dict[str, Any]) -> list[tuple[str, str]]:
    """The figures every report starts with, as (label, text) rows."""
    acq, pairs, dataset = report["acquisition"], report["pairs"], report["dataset"]
    skipped = pairs["skipped_after_failure_to_acquire"]
    rows = [
        ("samples", f"{acq['samples']} images of {dataset['identities']} identities ({dataset['format']})"),
        ("failure to acquire", f"{_rate(acq['fta_rate'])} ({acq['failures']} of {acq['samples']})"),
        (
            "pairs",
            f"{pairs['genuine']} genuine, {pairs['impostor']} impostor"
            + (f", {skipped} skipped (an image failed)" if pairs["listed"] else ""),
        ),
        ("EER", _estimate(report["eer"])),
    ]
    rows += [(f"TAR at FAR {t['far']:g}", _estimate(t)) for t in report["tar_at_far"]]
    rank1 = report["rank1"]
    probes = f" over {rank1['count']} probes" if rank1["value"] is not None else ""
    rows.append(("rank-1 identification", _estimate(rank1) + probes))
    return rows


def _threshold_rows(report: dict[str, Any]) -> list[list[str]]:
    return [
        [
            f"{t['distance']:.3f}",
            f"{t['similarity']:.3f}",
            _rate(t["fmr"]),
            _rate(t["fnmr"]),
            _rate(t["calibrated_fmr"]) + (" (extrapolated)" if t["calibrated_fmr_extrapolated"] else ""),
        ]
        for t in report["thresholds"]
    ]


THRESHOLD_HEADER = ["distance", "similarity", "FMR", "FNMR", "FMR from calibration table"]


def text_summary(report: dict[str, Any]) -> str:
    lines = [f"{label:>24}: {text}" for label, text in headline(report)]
    lines.append("   " + " | ".join(THRESHOLD_HEADER))
    lines += ["   " + " | ".join(row) for row in _threshold_rows(report)]
    return "\n".join(lines)


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _image(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


STYLE = (
    "body{font-family:sans-serif;max-width:60em;margin:2em auto;color:#222}"
    "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:.3em .6em;text-align:left}"
    "img{max-width:100%}.note{color:#666}"
)


def html_report(report: dict[str, Any], out: Path) -> str:
    """One HTML file with everything inline: figures, tables, the per-file problems."""
    acq, dist = report["acquisition"], report["distances"]
    summaries = [
        [kind]
        + [
            f"{dist[kind].get(k, 0):.3f}" if k != "count" else str(dist[kind].get(k, 0))
            for k in ("count", "mean", "std", "min", "median", "max")
        ]
        for kind in ("genuine", "impostor")
        if dist[kind]["count"]
    ]
    problems = [[f["message"]] for f in acq["failed_files"]] + [[n] for n in acq["notes"]]
    parts = [
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>Sightline accuracy report</title>"
        f"<style>{STYLE}</style></head><body>",
        f"<h1>Accuracy report</h1><p class='note'>{html.escape(report['dataset']['path'])} &middot; "
        f"{html.escape(report['tool'])} &middot; {html.escape(report['created'])}</p>",
        _table(["figure", "value"], [list(row) for row in headline(report)]),
        "<h2>Error rates at thresholds</h2><p class='note'>A pair at or under the distance is a match. The last "
        "column is the FMR the shipped calibration table predicts, for comparison with the measured one.</p>",
        _table(THRESHOLD_HEADER, _threshold_rows(report)),
        "<h2>DET curve</h2>",
        _image(out / "det.png", "DET curve"),
        "<h2>Score distributions</h2>",
        _image(out / "histogram.png", "histogram of distances"),
        _table(["pairs", "count", "mean", "std", "min", "median", "max"], summaries),
        f"<p class='note'>{html.escape(report['estimation_rule'])}</p>",
        "<h2>Files that could not be used as expected</h2>",
        _table(["message"], problems) if problems else "<p>none</p>",
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"
