"""Structured logs and Prometheus metrics, the same for every service.

Logs are JSON lines with the service name, so one place can collect all of them. Metric names are shared so a
dashboard can show every stage side by side: a stage reports events processed, failed and dead-lettered, its latency,
its batch sizes and its model inference time under the same names, told apart by the ``service`` label.
Never log face data, images, descriptors or secrets: log ids, counts and reasons.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import Counter, Gauge, Histogram, start_http_server

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

EVENTS_PROCESSED = Counter(
    "sightline_events_processed_total", "Input events processed successfully.", ["service", "topic"]
)
EVENTS_FAILED = Counter("sightline_events_failed_total", "Input events that failed, by reason.", ["service", "reason"])
EVENTS_DEADLETTERED = Counter(
    "sightline_events_deadlettered_total", "Input events published to the dead-letter topic.", ["service", "reason"]
)
STAGE_RETRIES = Counter(
    "sightline_stage_retries_total",
    "Retries after a transient failure (a database or the broker not answering) in processing an input or "
    "delivering its records, by the failure's error type.",
    ["service", "reason"],
)
EVENTS_PUBLISHED = Counter("sightline_events_published_total", "Events published, by topic.", ["service", "topic"])
STAGE_LATENCY = Histogram(
    "sightline_stage_latency_seconds",
    "Time to process one input event.",
    ["service", "stage"],
    buckets=_LATENCY_BUCKETS,
)
END_TO_END_LATENCY = Histogram(
    "sightline_capture_to_stage_seconds",
    "Time from frame capture until the broker acknowledged this stage's outputs for it.",
    ["service"],
    buckets=_LATENCY_BUCKETS,
)
BATCH_SIZE = Histogram(
    "sightline_batch_size", "Items per model batch.", ["service"], buckets=(1, 2, 4, 8, 16, 32, 64, 128)
)
INFERENCE_SECONDS = Histogram(
    "sightline_model_inference_seconds",
    "Model inference time per call.",
    ["service", "model"],
    buckets=_LATENCY_BUCKETS,
)
GALLERY_TEMPLATES = Gauge("sightline_gallery_templates", "Templates in the in-memory search index.", ["service"])
GALLERY_SUBJECTS = Gauge("sightline_gallery_subjects", "Enrolled subjects.", ["service"])
AUDIT_OUTBOX_RECORDS = Gauge(
    "sightline_audit_outbox_records",
    "Audit records of gallery writes waiting in the gallery's outbox for the audit log (matching/audit_outbox.py).",
    ["service"],
)
AUDIT_OUTBOX_OLDEST = Gauge(
    "sightline_audit_outbox_oldest_seconds",
    "Age of the oldest audit record waiting in the outbox (0 when none): how long the audit log has been unwritable.",
    ["service"],
)
FRAMES_DROPPED = Counter(
    "sightline_frames_dropped_total",
    "CCTV frames capture did not publish (backpressure), by source and reason.",
    ["service", "source", "reason"],
)
SCANNED_SHARE = Histogram(
    "sightline_detection_scanned_share",
    "Share of each CCTV frame the detector's finest pass scanned (focused scanning, docs/cctv.md): 1 is a full scan.",
    ["service"],
    buckets=(0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0),
)
FACES_NOT_SEARCHED = Counter(
    "sightline_faces_not_searched_total",
    "CCTV faces detected but not searched (best-quality selection per track).",
    ["service", "reason"],
)
RECORDS_PURGED = Counter(
    "sightline_records_purged_total", "Database records deleted past their retention, by job.", ["service", "job"]
)

_RESERVED = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, service, logger, message, and any ``extra=`` fields."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self._service = service

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "service": self._service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update({k: v for k, v in vars(record).items() if k not in _RESERVED})
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


CLIENT_LIBRARIES = ("kafka", "aiokafka", "faust", "mode", "grpc")


class RepeatFilter(logging.Filter):
    """Lets the first of a run of the same message from a client library through, then at most one every
    ``window_s``, which says how many were held back (``repeated``). While the broker is away, aiokafka logs every
    reconnect attempt, some 75 lines a second per service: they would bury the lines that matter and fill the log
    store. Messages are the same when their logger, level and format string are (the arguments may differ)."""

    MAX_KEYS = 1000  # format strings are few; a bound all the same

    def __init__(self, prefixes: tuple[str, ...] = CLIENT_LIBRARIES, window_s: float = 10.0) -> None:
        super().__init__()
        self._prefixes = prefixes
        self._window_s = window_s
        self._runs: dict[tuple[str, int, str], list[float]] = {}  # key -> [window start, held back]
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(self._prefixes):
            return True
        key = (record.name, record.levelno, str(record.msg))
        now = time.monotonic()
        with self._lock:
            run = self._runs.get(key)
            if run is not None and now - run[0] < self._window_s:
                run[1] += 1
                return False
            if run is None and len(self._runs) >= self.MAX_KEYS:
                self._runs.clear()
            held_back = int(run[1]) if run is not None else 0
            self._runs[key] = [now, 0]
        if held_back:
            record.repeated = held_back  # a JSON field: how many like it since the last one shown
        return True


def configure_logging(service: str, level: str = "INFO", json_lines: bool = True) -> None:
    """Route every logger to stderr in the chosen format; quiet the chatty client libraries (WARNING and up, each
    repeated message at most once every 10 s)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RepeatFilter())
    if json_lines:
        handler.setFormatter(JsonFormatter(service))
    else:
        handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s {service} %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in CLIENT_LIBRARIES:
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(level)))


def start_metrics(port: int) -> None:
    """Serve /metrics on the given port (0 disables it)."""
    if port:
        start_http_server(port)


@contextmanager
def timed(histogram: Histogram, **labels: str) -> Iterator[None]:
    """Observe the duration of the block in the histogram."""
    start = time.perf_counter()
    try:
        yield
    finally:
        histogram.labels(**labels).observe(time.perf_counter() - start)
