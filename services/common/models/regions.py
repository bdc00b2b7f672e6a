"""Rectangles of a frame to scan: clip, grow, intersect and merge them, and tell whether a point lies in one.

The detector scans its costly fine passes only over some regions of a CCTV frame (a camera's region of interest, and
within it where people move, where tracks are, and one tile of the frame in turn; detection/scan_plan.py). A region
is ``(x1, y1, x2, y2)`` in pixels of the frame, x2 and y2 exclusive.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

Rect = tuple[int, int, int, int]


def clip(rect: Sequence[float], width: int, height: int) -> Rect | None:
    """The part of ``rect`` inside a ``width`` x ``height`` frame, in whole pixels; None when nothing is left."""
    x1, y1 = max(0, int(np.floor(rect[0]))), max(0, int(np.floor(rect[1])))
    x2, y2 = min(width, int(np.ceil(rect[2]))), min(height, int(np.ceil(rect[3])))
    return (x1, y1, x2, y2) if x2 > x1 and y2 > y1 else None


def grown(rect: Sequence[float], margin: float) -> tuple[float, float, float, float]:
    """``rect`` with ``margin`` pixels added on every side."""
    return rect[0] - margin, rect[1] - margin, rect[2] + margin, rect[3] + margin


def intersection(a: Sequence[float], b: Sequence[float]) -> Rect | None:
    """Where two rectangles overlap, or None."""
    x1, y1, x2, y2 = max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])
    return (int(x1), int(y1), int(x2), int(y2)) if x2 > x1 and y2 > y1 else None


def intersections(areas: Iterable[Sequence[float]], within: Iterable[Sequence[float]]) -> list[Rect]:
    """Every non-empty overlap of one of ``areas`` with one of ``within``."""
    limits = list(within)
    return [part for area in areas for limit in limits if (part := intersection(area, limit)) is not None]


def merged(rects: Iterable[Rect]) -> list[Rect]:
    """Overlapping rectangles replaced by their bounding rectangle wherever that holds fewer pixels than the two
    apart (so a pixel is not scanned twice for nothing), until no such pair is left. Two far-apart regions, or an
    L-shaped pair whose bounding box is mostly empty, stay separate."""
    current = list(rects)
    while True:
        out: list[Rect] = []
        for rect in current:
            for index, other in enumerate(out):
                union = bounding(rect, other)
                if intersection(rect, other) is not None and _pixels(union) <= _pixels(rect) + _pixels(other):
                    out[index] = union
                    break
            else:
                out.append(rect)
        if len(out) == len(current):
            return out
        current = out


def bounding(a: Rect, b: Rect) -> Rect:
    """The smallest rectangle holding both."""
    return min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3])


def _pixels(rect: Rect) -> int:
    return (rect[2] - rect[0]) * (rect[3] - rect[1])


def fitted(rect: Rect, width: int, height: int, multiple: float) -> Rect:
    """``rect`` grown about its centre so that each side is a multiple of ``multiple`` pixels, shifted back inside
    the ``width`` x ``height`` frame and clipped to it when the frame is smaller."""
    x1, x2 = _fitted_span(rect[0], rect[2], width, multiple)
    y1, y2 = _fitted_span(rect[1], rect[3], height, multiple)
    return x1, y1, x2, y2


def _fitted_span(lo: int, hi: int, limit: int, multiple: float) -> tuple[int, int]:
    size = min(limit, int(np.ceil(np.ceil((hi - lo) / multiple) * multiple)))
    start = min(max(0, (lo + hi - size) // 2), limit - size)
    return start, start + size


def area(rects: Iterable[Rect]) -> int:
    """Total pixels of rectangles, counting twice where they overlap."""
    return sum(_pixels(rect) for rect in rects)


def centres_within(boxes: np.ndarray, rects: Sequence[Rect]) -> np.ndarray:
    """For [N, 4] boxes, whether each box's centre lies in any of ``rects``."""
    if not len(boxes):
        return np.zeros(0, dtype=bool)
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    inside = np.zeros(len(boxes), dtype=bool)
    for x1, y1, x2, y2 in rects:
        inside |= (centres[:, 0] >= x1) & (centres[:, 0] < x2) & (centres[:, 1] >= y1) & (centres[:, 1] < y2)
    return inside
