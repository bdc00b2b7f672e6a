"""Frame sources: a folder of images, one image, a video file, or an RTSP stream, sampled at a given rate.

A source yields ``RawFrame``s: either the file's own encoded bytes (image files are passed through untouched, so
detection sees exactly what the camera or the document reader produced, EXIF included) or decoded pixels (video), plus
the frame's media time. A file that cannot be read is yielded as a failed frame, so the caller can dead-letter it and
go on with the next one.
"""

from __future__ import annotations

import mimetypes
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".pgm", ".ppm"}


@dataclass(frozen=True)
class RawFrame:
    name: str  # file name or position in the stream, for progress and dead letters
    media_time_s: float
    encoded: bytes | None = None  # pass-through image bytes
    media_type: str = ""
    pixels: np.ndarray | None = None  # decoded RGB (video)
    error: str = ""  # set when the frame could not be read


class SourceError(ValueError):
    """The source cannot be opened at all."""


def open_source(uri: str, fps: float) -> Iterator[RawFrame]:
    """Frames of the source at (at most) ``fps`` frames per second of media time."""
    if uri.startswith(("rtsp://", "rtsps://", "http://", "https://")):
        return _video(uri, fps, live=True)
    path = Path(uri).expanduser()
    if path.is_dir():
        return _folder(path)
    if not path.exists():
        raise SourceError(f"source {uri!r} does not exist")
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return iter([_image_file(path, 0.0)])
    return _video(str(path), fps, live=False)


def source_id_for(uri: str) -> str:
    """A readable default source id: the folder, file or stream name."""
    name = Path(uri.rstrip("/").split("?")[0]).name or "source"
    return "".join(c if c.isalnum() or c in "._-" else "-" for c in name)[:64]


def _folder(path: Path) -> Iterator[RawFrame]:
    files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        raise SourceError(f"folder {path} has no files")
    for position, file in enumerate(files):
        yield _image_file(file, float(position))


def _image_file(path: Path, media_time_s: float) -> RawFrame:
    media_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    try:
        return RawFrame(path.name, media_time_s, encoded=path.read_bytes(), media_type=media_type)
    except OSError as exc:
        return RawFrame(path.name, media_time_s, error=f"cannot read {path.name}: {exc.strerror}")


def _video(uri: str, fps: float, live: bool) -> Iterator[RawFrame]:
    capture = cv2.VideoCapture(uri)
    if not capture.isOpened():
        raise SourceError(f"cannot open video source {uri!r}")
    period = 1.0 / fps if fps > 0 else 0.0
    next_time = 0.0
    started = time.monotonic()
    position = 0
    try:
        while True:
            ok, bgr = capture.read()
            if not ok:
                return
            media_time = (time.monotonic() - started) if live else capture.get(cv2.CAP_PROP_POS_MSEC) / 1000.0
            position += 1
            if media_time + 1e-6 < next_time:
                continue  # sampling: skip frames between the ones we keep
            next_time = media_time + period
            yield RawFrame(f"frame-{position}", media_time, pixels=cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    finally:
        capture.release()
