"""Erasure notices heard by every replica: each one drops the erased subject from this replica's index at once.

The replica that erases a subject drops it itself; the others used to learn of it only from the gallery version,
which they cannot read while the database is unreachable. So every replica also reads ``sightline.erasures.v1``,
every partition and without a consumer group (a group would hand each notice to one replica only), and hands each
notice to ``Gallery.erased``: the subject leaves the index without touching the database, and the replica stops
matching (``readiness.py``) until a check of the database has confirmed the erasure. A notice is therefore never
dropped: it stays pending, and the replica refuses to match, until it is applied.

Reading starts ``REPLAY_MARGIN_S`` before the listener was created, so a notice published while the gallery was
loading (or stamped by a producer whose clock is behind) is not missed; replaying one is harmless. Notices from
before that are covered by the gallery load itself. When the broker cannot be read, reading resumes from the last
notice seen, with backoff.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from sightline.common import codec
from sightline.common.bus import read_topics
from sightline.common.config import KafkaSettings
from sightline.common.topics import ERASURES
from sightline.common.transient import Backoff
from sightline.v1 import events_pb2

log = logging.getLogger(__name__)

REPLAY_MARGIN_S = 60.0
_RETRY_FIRST_S = 0.5
_RETRY_MAX_S = 30.0


class ErasureListener:
    """A thread reading erasure notices and passing each erased subject id to ``on_erased`` (which must not block)."""

    def __init__(self, kafka: KafkaSettings, on_erased: Callable[[str], None]) -> None:
        self._kafka = kafka
        self._on_erased = on_erased
        self._since_ms = int((time.time() - REPLAY_MARGIN_S) * 1000)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="erasure-listener", daemon=True)

    def start(self) -> ErasureListener:
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        backoff, failures = Backoff(_RETRY_FIRST_S, _RETRY_MAX_S), 0
        while not self._stop.is_set():
            try:
                for record in read_topics(
                    self._kafka, [ERASURES.name], since_ms=self._since_ms, stop=self._stop.is_set
                ):
                    self._handle(record.value)
                    self._since_ms = max(self._since_ms, record.timestamp)  # resume here (replays are harmless)
                    failures = 0
            except Exception:
                failures += 1
                delay = backoff.delay(failures)
                log.warning("cannot read erasure notices; trying again in %.1f s", delay, exc_info=True)
                self._stop.wait(delay)

    def _handle(self, value: bytes | None) -> None:
        try:
            notice = codec.parse(events_pb2.SubjectErased, value)
        except codec.MalformedEvent:
            log.error("an unreadable record on %s was skipped: it names no subject to erase", ERASURES.name)
            return
        if not notice.subject_id:
            log.error("an erasure notice without a subject id was skipped")
            return
        self._on_erased(notice.subject_id)
