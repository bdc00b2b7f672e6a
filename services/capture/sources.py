"""Frame sources: a folder of images, one image, a video file, or an RTSP stream, sampled at a given rate.

A source yields ``RawFrame``s: either the file's own encoded bytes (image files are passed through untouched, so
detection sees exactly what the camera or the document reader produced, EXIF included) or decoded pixels (video), plus
the frame's media time. A video file is sampled at the requested rate of its media time without decoding every
frame when the rate is low: frames between samples are only grabbed, or only its keyframes are decoded, or each sample
is sought (see "Videos and streams" below); a live stream is sampled on wall-clock time. Every source is vetted by the
source policy first (source_policy.py), and opening is eager: a source that cannot be opened raises SourceError from
``open_source`` itself, before any frame is read, so the caller can refuse it at once.

In a folder, a file that cannot be used is yielded as a failed frame, so the caller can dead-letter it and go on with
the next one. Such a frame never carries the file's bytes: a file that is not an image (by suffix) is not even read,
one that is named like an image but does not start like one is described by its size and SHA-256 only.
"""

from __future__ import annotations

import hashlib
import mimetypes
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlsplit

import cv2
import numpy as np

from sightline.capture.source_policy import (
    IMAGE_SUFFIXES,
    VIDEO_HEAD_BYTES,
    FileTooLarge,
    Source,
    SourceError,
    SourceKind,
    SourcePolicy,
    SourceRefused,
    SourceUnavailable,
    ffmpeg_capture_options,
    looks_like_video,
    redact,
)
from sightline.common.images import looks_like_image

# The exceptions are re-exported: callers of open_source catch them from here.
__all__ = [
    "IMAGE_SUFFIXES",
    "RawFrame",
    "SourceError",
    "SourceRefused",
    "SourceUnavailable",
    "open_source",
    "open_vetted",
    "quiet_native_logs",
    "source_id_for",
]

DEFAULT_STREAM_TIMEOUT_S = 10.0
FFMPEG_OPTIONS_VARIABLE = "OPENCV_FFMPEG_CAPTURE_OPTIONS"  # read by OpenCV each time it opens a capture
_FFMPEG_OPTIONS_LOCK = threading.Lock()  # the environment is the process's: one open sets it at a time


def quiet_native_logs() -> None:
    """Silence FFmpeg's and OpenCV's own messages (unless configured): they go straight to stderr, are not JSON, and
    may name a stream's address; capture logs what failed itself. Must run before the first video is opened."""
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")  # AV_LOG_QUIET
    os.environ.setdefault("OPENCV_LOG_LEVEL", "ERROR")


@dataclass(frozen=True)
class RawFrame:
    name: str  # file name or position in the stream, for progress and dead letters
    media_time_s: float
    encoded: bytes | None = None  # pass-through image bytes
    media_type: str = ""
    pixels: np.ndarray | None = None  # decoded RGB (video)
    error: str = ""  # set when the frame could not be read
    reason: str = "unreadable_frame"  # machine-readable reason of the error, for the dead letter
    size: int = 0  # bytes of a file that was not passed on (its content is withheld)
    sha256: bytes = b""  # digest of such a file, when it was read


def open_source(
    uri: str, fps: float, policy: SourcePolicy, stream_timeout_s: float = DEFAULT_STREAM_TIMEOUT_S
) -> Iterator[RawFrame]:
    """Frames of the source at (at most) ``fps`` frames per second of media time, if the policy allows it."""
    return open_vetted(policy.vet(uri), fps, policy, stream_timeout_s)


def open_vetted(
    source: Source, fps: float, policy: SourcePolicy, stream_timeout_s: float = DEFAULT_STREAM_TIMEOUT_S
) -> Iterator[RawFrame]:
    """Open a vetted source; raises SourceError (refused or unavailable) before any frame is yielded."""
    if source.kind is SourceKind.FOLDER:
        return _folder(Path(source.target), policy)
    if source.kind is SourceKind.IMAGE:
        return iter([_single_image(Path(source.target), source.display, policy)])
    if source.kind is SourceKind.VIDEO:
        return _video_file(source, fps, policy, stream_timeout_s)
    return _video(source, source.target, fps, stream_timeout_s)


def source_id_for(uri: str) -> str:
    """A readable default source id: the folder, file or stream name; never a URL's credentials or query."""
    if "://" in uri:
        parts = urlsplit(redact(uri))
        name = parts.path.rstrip("/").rpartition("/")[2] or (parts.hostname or "")
    else:
        name = Path(uri.rstrip("/")).name
    safe = "".join(c if c.isalnum() or c in "._-" else "-" for c in name)[:64]
    return safe.strip(".") or "source"


# Image files ------------------------------------------------------------------------------------------------------


def _folder(path: Path, policy: SourcePolicy) -> Iterator[RawFrame]:
    try:
        entries = sorted(p for p in path.iterdir() if not p.name.startswith("."))
    except OSError as exc:
        raise SourceUnavailable(f"folder {path.name!r} cannot be listed: {exc.strerror}") from None
    entries = [p for p in entries if not p.is_dir()]  # sub-folders are not frames (nor read)
    if not entries:
        raise SourceUnavailable(f"folder {path.name!r} has no files")
    return (_folder_entry(entry, float(position), policy) for position, entry in enumerate(entries))


def _folder_entry(entry: Path, media_time_s: float, policy: SourcePolicy) -> RawFrame:
    """One file of a folder as a frame, or as a failed frame that carries none of its bytes."""
    try:
        path = policy.resolve_path(entry)  # a symlink in the folder may not lead out of the allowed roots
        info = path.stat()
        if policy.file_kind(path) is not SourceKind.IMAGE:
            return RawFrame(
                entry.name,
                media_time_s,
                error=f"{entry.name} is not an image file: skipped unread",
                reason="not_an_image_file",
                size=info.st_size,
            )
        policy.check_file(path, info, SourceKind.IMAGE, entry.name)
    except FileTooLarge as exc:
        return RawFrame(
            entry.name, media_time_s, error=f"{exc}: skipped unread", reason="file_too_large", size=exc.size
        )
    except SourceRefused as exc:
        return RawFrame(entry.name, media_time_s, error=f"{exc}: skipped unread", reason="file_refused")
    except OSError as exc:
        return RawFrame(entry.name, media_time_s, error=f"cannot read {entry.name}: {exc.strerror}")
    return _image_file(path, entry.name, media_time_s, policy.max_image_bytes)


def _single_image(path: Path, display: str, policy: SourcePolicy) -> RawFrame:
    """The one frame of an image source; anything wrong with it refuses the source itself."""
    frame = _image_file(path, path.name, 0.0, policy.max_image_bytes)
    if frame.reason == "unreadable_frame" and frame.error:
        raise SourceUnavailable(f"source {display!r}: {frame.error}")
    if frame.error:
        raise SourceRefused(f"source {display!r}: {frame.error}")
    return frame


def _open_file(path: Path) -> tuple[BinaryIO, os.stat_result]:
    """Open a resolved path for reading as the file it is now, and its stat from the open file (not the path): a
    symlink swapped in after the path was checked is not followed, a FIFO does not hang the reader. Raises OSError."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    file = os.fdopen(fd, "rb")
    try:
        return file, os.fstat(fd)
    except BaseException:
        file.close()
        raise


def _image_file(path: Path, name: str, media_time_s: float, limit: int) -> RawFrame:
    """Read an image file, checking what it is on the open file itself (a file swapped after its check is caught)."""
    try:
        file, info = _open_file(path)
    except OSError as exc:
        return RawFrame(name, media_time_s, error=f"cannot read {name}: {exc.strerror}")
    with file:
        if not stat.S_ISREG(info.st_mode):
            return RawFrame(name, media_time_s, error=f"{name} is not a regular file", reason="file_refused")
        if info.st_size > limit:
            return _too_large(name, media_time_s, info.st_size, limit)
        try:
            data = file.read(limit + 1)  # the file may have grown since its stat
        except OSError as exc:
            return RawFrame(name, media_time_s, error=f"cannot read {name}: {exc.strerror}")
    if len(data) > limit:
        return _too_large(name, media_time_s, len(data), limit)
    if not looks_like_image(data):
        return RawFrame(
            name,
            media_time_s,
            error=f"{name} is not a recognised image ({len(data)} bytes): its content is withheld",
            reason="not_an_image",
            size=len(data),
            sha256=hashlib.sha256(data).digest(),
        )
    media_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
    return RawFrame(name, media_time_s, encoded=data, media_type=media_type)


def _too_large(name: str, media_time_s: float, size: int, limit: int) -> RawFrame:
    return RawFrame(
        name,
        media_time_s,
        error=f"{name} is {size} bytes; the limit is {limit} (SIGHTLINE_CAPTURE_MAX_IMAGE_FILE_BYTES): skipped unread",
        reason="file_too_large",
        size=size,
    )


# Videos and streams -----------------------------------------------------------------------------------------------

# Sampling a video file at a low rate (docs/cctv.md, `sightline bench video`). The first keyframe intervals are
# measured while every frame is decoded, then one of three ways is chosen for the rest of the file:
# - grab: frames between samples are only grabbed (FFmpeg decodes them, the next frame needs them, but they are not
#   converted to BGR nor copied out: a quarter to a third less CPU than reading them);
# - keyframes: once the period spans 2 keyframe intervals, the file is reopened with FFmpeg decoding its intra frames
#   only (OpenCV's ``avdiscard`` capture option, FFmpeg's skip_frame): P and B frames are not decoded at all, and each
#   sample is the first keyframe at or after its due time, with its own timestamp. Its cost grows with the keyframes
#   passed, so
# - seek: once the period spans 5 intervals, OpenCV's seek (CAP_PROP_POS_MSEC) to each due time: a fixed cost (it
#   decodes from the keyframe before the target less 16 frames), about that of 5 keyframes.
KEYFRAME_INTERVALS_MEASURED = 2  # intervals between the first intra frames measured before the choice
KEYFRAMES_ONLY_MIN_INTERVALS = 2.0  # keyframes only from this many of the longest interval per period (samples then
# stay within half a period of their due times)...
SEEK_MIN_INTERVALS = 5.0  # ...and a seek per sample from this many (measured crossover, `sightline bench video`),
SEEK_MIN_FRAMES = 32  # if the period spans this many frames too: a seek decodes 16 frames at least (intra-only files)
KEYFRAMES_ONLY_OPTION = "avdiscard;nonintra"  # every intra picture (open-GOP I frames too), nothing else decoded
_INTRA = ord("I")  # CAP_PROP_FRAME_TYPE of an intra-coded picture


def _video_file(source: Source, fps: float, policy: SourcePolicy, timeout_s: float) -> Iterator[RawFrame]:
    """A video file, checked on the open file (regular, size, container signature) and read by FFmpeg through that
    same open file (``/proc/self/fd/N``), so the file checked is the file decoded even if its path is swapped."""
    display = source.display
    try:
        file, info = _open_file(Path(source.target))
    except OSError as exc:
        raise SourceUnavailable(f"source {display!r} cannot be read: {exc.strerror}") from None
    try:
        policy.check_file(Path(source.target), info, SourceKind.VIDEO, display)  # regular, not empty, size limit
        try:
            head = file.read(VIDEO_HEAD_BYTES)
        except OSError as exc:
            raise SourceUnavailable(f"source {display!r} cannot be read: {exc.strerror}") from None
        if not looks_like_video(head):
            raise SourceRefused(f"source {display!r} is not a recognised video (MP4/MOV, AVI, Matroska/WebM, MPEG)")
        frames = _video(source, f"/proc/self/fd/{file.fileno()}", fps, timeout_s)
    except BaseException:
        file.close()
        raise
    return _closing(frames, file)


def _closing(frames: Iterator[RawFrame], file: BinaryIO) -> Iterator[RawFrame]:
    """The frames, keeping the file open while FFmpeg reads it (closed when they end or are abandoned)."""
    with file:
        yield from frames


def _video(source: Source, target: str, fps: float, timeout_s: float) -> Iterator[RawFrame]:
    def open_capture(keyframes_only: bool = False) -> cv2.VideoCapture:
        # FFmpeg only: no other backend (image sequences, GStreamer pipelines) may interpret the string.
        timeout_ms = int(timeout_s * 1000)
        params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, timeout_ms, cv2.CAP_PROP_READ_TIMEOUT_MSEC, timeout_ms]
        options = ffmpeg_capture_options(source) + (f"|{KEYFRAMES_ONLY_OPTION}" if keyframes_only else "")
        with _ffmpeg_options(options):
            capture = cv2.VideoCapture(target, cv2.CAP_FFMPEG, params)
        if not capture.isOpened():
            capture.release()
            raise SourceUnavailable(f"cannot open video source {source.display!r}")
        return capture

    capture = open_capture()
    if source.live:
        return _live_frames(capture, fps)
    return _file_frames(capture, open_capture, fps)  # only a file is reopened: a stream's address is not resolved twice


@contextmanager
def _ffmpeg_options(options: str) -> Iterator[None]:
    """OPENCV_FFMPEG_CAPTURE_OPTIONS set to ``options`` while a capture is opened (OpenCV reads it then), restored
    after. One open at a time: the environment is the whole process's."""
    with _FFMPEG_OPTIONS_LOCK:
        previous = os.environ.get(FFMPEG_OPTIONS_VARIABLE)
        os.environ[FFMPEG_OPTIONS_VARIABLE] = options
        try:
            yield
        finally:
            if previous is None:
                os.environ.pop(FFMPEG_OPTIONS_VARIABLE, None)
            else:
                os.environ[FFMPEG_OPTIONS_VARIABLE] = previous


class _Sampler:
    """Which frames to keep: the first at or after each due time, due times ``1/fps`` apart on a grid, so the rate is
    ``fps`` on average whatever the source's own rate. After a gap of a period or more the grid restarts at the frame
    taken (no burst to catch up)."""

    def __init__(self, fps: float) -> None:
        self.period = 1.0 / fps if fps > 0 else 0.0
        self.due = 0.0

    def take(self, media_time: float) -> bool:
        if media_time + 1e-6 < self.due:
            return False
        self.due += self.period
        if self.due <= media_time:
            self.due = media_time + self.period
        return True

    def late(self, media_time: float) -> bool:
        """True when a frame this late means a whole sample was passed by."""
        return self.period > 0 and media_time >= self.due + self.period


def _live_frames(capture: cv2.VideoCapture, fps: float) -> Iterator[RawFrame]:
    """A stream's frames at ``fps`` of wall-clock time since it was opened (its own timestamps may start anywhere,
    restart or jump); every frame is decoded, since a live stream cannot skip ahead."""
    sampler = _Sampler(fps)
    started = time.monotonic()
    position = 0
    try:
        while capture.grab():
            position += 1
            media_time = time.monotonic() - started
            if sampler.take(media_time):
                frame = _retrieved(capture, f"frame-{position}", media_time)
                if frame is None:
                    return
                yield frame
    finally:
        capture.release()


def _file_frames(
    capture: cv2.VideoCapture, reopen: Callable[[bool], cv2.VideoCapture], fps: float
) -> Iterator[RawFrame]:
    """A file's frames at ``fps`` of its media time, each with its own timestamp: frames between samples grabbed,
    keyframes only (``reopen(True)``) or a seek to each sample, by how many keyframe intervals a period spans."""
    sampler = _Sampler(fps)
    nominal_fps = capture.get(cv2.CAP_PROP_FPS)
    keyframes: list[float] = []  # times of the first intra frames, while the way is not chosen
    way = ""  # "grab", "keyframes" or "seek" once chosen
    try:
        while capture.grab():
            media_time = capture.get(cv2.CAP_PROP_POS_MSEC) / 1000.0
            if not way:
                if capture.get(cv2.CAP_PROP_FRAME_TYPE) == _INTRA:
                    keyframes.append(media_time)
                if len(keyframes) > KEYFRAME_INTERVALS_MEASURED:
                    way = _sampling_way(keyframes, sampler.period, nominal_fps)
                    if way == "keyframes":  # from the file's start: the keyframes passed cost little, none is due
                        capture.release()
                        capture = reopen(True)
                        continue
                    if way == "seek":
                        capture.set(cv2.CAP_PROP_POS_MSEC, sampler.due * 1000.0)
                        continue
            elif way == "keyframes" and sampler.late(media_time):
                # Keyframes sparser than they began: back to the missed due time (one seek), every frame decoded
                # from there to the end of the file.
                capture.release()
                capture = reopen(False)
                capture.set(cv2.CAP_PROP_POS_MSEC, sampler.due * 1000.0)
                way = "grab"
                continue
            if sampler.take(media_time):
                frame = _retrieved(capture, _frame_name(media_time, nominal_fps), media_time)
                if frame is None:
                    return
                yield frame
                if way == "seek":  # a seek that fails leaves the capture where it is: frames are grabbed on
                    capture.set(cv2.CAP_PROP_POS_MSEC, sampler.due * 1000.0)
    finally:
        capture.release()


def _sampling_way(keyframe_times: list[float], period: float, nominal_fps: float) -> str:
    """How to sample the rest of a file ("grab", "keyframes" or "seek", see the constants above), from the longest
    interval between its first keyframes."""
    longest = max(b - a for a, b in zip(keyframe_times, keyframe_times[1:], strict=False))
    frame_s = 1.0 / nominal_fps if nominal_fps > 0 else longest
    if period >= SEEK_MIN_INTERVALS * longest and period >= SEEK_MIN_FRAMES * frame_s:
        return "seek"
    if longest > 1.5 * frame_s and period >= KEYFRAMES_ONLY_MIN_INTERVALS * longest:
        return "keyframes"  # (an intra-only file, MJPEG say, decodes every frame either way)
    return "grab"


def _retrieved(capture: cv2.VideoCapture, name: str, media_time: float) -> RawFrame | None:
    """The grabbed frame, converted and copied out (None if it cannot be: the video ends there, as with a read)."""
    ok, bgr = capture.retrieve()
    return RawFrame(name, media_time, pixels=cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)) if ok else None


def _frame_name(media_time: float, nominal_fps: float) -> str:
    """``frame-N``: the frame's position in the file at its nominal rate (counted from 1)."""
    return f"frame-{round(media_time * nominal_fps) + 1}" if nominal_fps > 0 else f"frame-at-{media_time:.3f}s"
