"""The retry backoff doubles from its first delay up to its cap, and stays there however long an outage lasts."""

from __future__ import annotations

from sightline.common.transient import Backoff


def test_the_delay_doubles_up_to_the_cap() -> None:
    backoff = Backoff(initial_s=0.1, max_s=1.0)
    assert [backoff.delay(attempt) for attempt in range(1, 7)] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]


def test_an_outage_of_any_length_keeps_the_cap() -> None:
    """Stages retry a transient failure without limit: attempt 1025 (about 8.5 h at 30 s) once overflowed a float."""
    backoff = Backoff(initial_s=0.1, max_s=30.0)
    assert backoff.delay(1025) == 30.0
    assert backoff.delay(10**9) == 30.0
