"""Which failures are transient (the world, not the input), and how long to wait before trying again.

A stage must never dead-letter an input because a database was locked or down or the broker did not answer in time:
the input is fine, and a dead letter would drop it (an erasure notice, for one, must never be dropped). Such errors
are retried with exponential backoff, bounded per try and unbounded in total; everything else is the input's fault
and keeps the dead-letter path. The classification looks through an error's cause chain, so a store that wraps a
driver error (``raise StoreError(...) from error``) is still recognised.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass


class TransientError(Exception):
    """A failure that says nothing about the input: raise it (or chain it) to have the event retried, not
    dead-lettered."""


# SQLite reports a busy or missing database file as OperationalError, like a syntax error; only these messages are
# conditions that go away by themselves.
_SQLITE_TRANSIENT = ("database is locked", "database table is locked", "unable to open database", "disk i/o error")


def is_transient(error: BaseException) -> bool:
    """True when the error, or one it was raised from, is a condition that retrying can outlive."""
    return transient_cause(error) is not None


def transient_cause(error: BaseException) -> BaseException | None:
    """The link of the error's chain that makes it transient (for logs and metrics), or None when it is not.

    An error that carries a machine-readable ``reason`` (a stage's ``StageError``, ``MalformedEvent``, ``ImageError``)
    is the code's own verdict on the input and stays one, whatever it was raised while handling.
    """
    if isinstance(getattr(error, "reason", None), str) and not _is_transient_one(error):
        return None
    return next((link for link in _chain(error) if _is_transient_one(link)), None)


def _chain(error: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)


def _is_transient_one(error: BaseException) -> bool:
    if isinstance(error, TransientError | ConnectionError | TimeoutError):  # asyncio.TimeoutError is TimeoutError
        return True
    if isinstance(error, sqlite3.OperationalError):
        return any(text in str(error).lower() for text in _SQLITE_TRANSIENT)
    return _is_psycopg_transient(error) or _is_kafka_transient(error)


def _is_psycopg_transient(error: BaseException) -> bool:
    module = type(error).__module__
    if not module.startswith("psycopg"):
        return False  # psycopg is optional: never import it for an error that cannot be one of its own
    import psycopg

    return isinstance(error, psycopg.OperationalError)


def _is_kafka_transient(error: BaseException) -> bool:
    """Kafka client errors that mean "not now" (timeouts, lost connections, leader changes), from either client."""
    module = type(error).__module__
    if not module.startswith(("kafka", "aiokafka")):
        return False
    name = type(error).__name__
    if name in (
        "KafkaTimeoutError",
        "KafkaConnectionError",
        "NoBrokersAvailable",
        "NodeNotReadyError",
        "RequestTimedOutError",
        "NotEnoughReplicasError",
        "NotEnoughReplicasAfterAppendError",
    ):
        return True
    # A record or request too large is marked non-retriable by both clients, as are authorisation failures.
    return bool(getattr(error, "retriable", False))


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff: ``initial_s``, doubling each try, never more than ``max_s`` per wait."""

    initial_s: float = 0.1
    max_s: float = 30.0

    def delay(self, attempt: int) -> float:
        """The wait before retry number ``attempt`` (1 for the first retry)."""
        # The exponent is capped: retries go on without limit (stage.py), and 2.0 ** 1024 overflows a float.
        return min(self.max_s, self.initial_s * 2.0 ** min(max(0, attempt - 1), 64))
