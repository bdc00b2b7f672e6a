"""The repeat filter of the services' logs (common/telemetry.py): a client library's storm of one message, as
aiokafka's reconnect attempts while the broker is away, becomes one line per window that counts the rest."""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Iterator

import pytest

from sightline.common.telemetry import JsonFormatter, RepeatFilter


@pytest.fixture()
def lines() -> Iterator[tuple[io.StringIO, logging.Logger, logging.Logger]]:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter("test"))
    handler.addFilter(RepeatFilter(window_s=0.3))
    library, ours = logging.getLogger("aiokafka.conn.test"), logging.getLogger("sightline.test.repeats")
    for logger in (library, ours):
        logger.addHandler(handler)
        logger.propagate = False
    yield out, library, ours
    for logger in (library, ours):
        logger.removeHandler(handler)
        logger.propagate = True


def _records(out: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_a_library_storm_is_one_line_per_window_with_the_count_held_back(
    lines: tuple[io.StringIO, logging.Logger, logging.Logger],
) -> None:
    out, library, _ = lines
    for node in range(200):
        library.error("Unable connect to node with id %s: %s", node, "[Errno 111] Connect call failed")
    time.sleep(0.35)
    library.error("Unable connect to node with id %s: %s", 7, "[Errno 111] Connect call failed")

    shown = _records(out)
    assert [r["msg"] for r in shown] == [
        "Unable connect to node with id 0: [Errno 111] Connect call failed",
        "Unable connect to node with id 7: [Errno 111] Connect call failed",
    ]
    assert "repeated" not in shown[0] and shown[1]["repeated"] == 199


def test_our_own_lines_and_other_messages_are_never_held_back(
    lines: tuple[io.StringIO, logging.Logger, logging.Logger],
) -> None:
    out, library, ours = lines
    for n in range(5):
        ours.warning("frame %s dropped", n)
    library.error("Unable connect to node with id %s", 1)
    library.error("Heartbeat failed for group %s", "g")
    library.warning("Unable connect to node with id %s", 1)  # another level: another message

    assert len(_records(out)) == 5 + 3
