"""A stream service's watchdog: the process exits when its consumer group has stopped making progress while records
wait, so that its supervisor (the local stack's, or Kubernetes) starts it afresh.

Why: when the broker goes away and comes back, faust's consumer can lose its group for good: heartbeats fail, the
coordinator is marked dead, and it never joins again (faust-streaming issues 175 and 523; seen here after a 30 s
outage, ``sightline bench outage``). Nothing fails, the gRPC health stays SERVING, and no record is consumed again.
A new process joins the group and resumes from the committed offsets, which is what a restart gives.

Progress is read from the broker, not from this process: the group's committed offsets on the service's input topic
and its lag (common/lag.py, right on Tansu too). The group is stalled when, for ``stall_exit_s``, its lag stayed above
zero and no committed offset moved. A replica without partitions is never stalled by itself: the group's offsets move
while any replica works. While the lag cannot be read (the broker is away), the clock starts again: the wait for a
wedged consumer begins once the broker is back.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from sightline.common.config import KafkaSettings
from sightline.common.lag import GroupLag, LagError, service_lags

log = logging.getLogger(__name__)

EXIT_CODE = 75  # EX_TEMPFAIL: a restart is the cure
CHECKS_PER_WINDOW = 6


@dataclass
class StallJudge:
    """Decides from successive lag readings whether the group is stalled; pure logic, fed by ``StallWatchdog``."""

    exit_after_s: float
    _since: float | None = None  # when the committed offsets were last seen to move (or the reading restarted)
    _committed: tuple[int | None, ...] | None = None

    def observe(self, lag: GroupLag | None, now: float) -> bool:
        """True when the group is stalled. ``lag`` None: it could not be read."""
        if lag is None or lag.error is not None:
            self._since, self._committed = now, None
            return False
        committed = tuple(p.committed for p in lag.partitions)
        if committed != self._committed or lag.total == 0 or self._since is None:
            self._since, self._committed = now, committed
            return False
        return now - self._since >= self.exit_after_s


class StallWatchdog:
    """A daemon thread that reads the service group's lag every ``exit_after_s / CHECKS_PER_WINDOW`` seconds and
    calls ``on_stall`` (by default: log and exit the process) once the group is stalled."""

    def __init__(
        self,
        service: str,
        kafka: KafkaSettings,
        exit_after_s: float,
        on_stall: Callable[[], None] | None = None,
        read_lag: Callable[[], GroupLag | None] | None = None,
    ) -> None:
        self._service = service
        self._kafka = kafka
        self._judge = StallJudge(exit_after_s)
        self._every_s = exit_after_s / CHECKS_PER_WINDOW
        self._on_stall = on_stall or self._exit
        self._read_lag = read_lag or self._group_lag
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stall-watchdog", daemon=True)

    def start(self) -> StallWatchdog:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self._every_s):
            if self._judge.observe(self._read_lag(), time.monotonic()):
                self._on_stall()
                return

    def _group_lag(self) -> GroupLag | None:
        try:
            return service_lags(self._kafka, [self._service], timeout_s=min(10.0, self._every_s)).get(self._service)
        except LagError:
            return None

    def _exit(self) -> None:
        log.error(
            "the consumer group committed nothing while records waited: exiting to be restarted",
            extra={"stalled_s": self._judge.exit_after_s, "exit_code": EXIT_CODE},
        )
        logging.shutdown()
        os._exit(EXIT_CODE)  # no clean stop: the wedged consumer would hold it up, and a restart is the cure
