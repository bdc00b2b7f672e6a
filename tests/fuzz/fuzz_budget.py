"""The fuzz suite's budgets and seed, from the environment, so CI and a developer run the same tests larger.

- ``SIGHTLINE_FUZZ_EXAMPLES``: hypothesis examples per in-process target (default 100: 15-20 s for all of them);
- ``SIGHTLINE_FUZZ_INPUTS``: generated inputs of each ``slow`` stack test (default 2,000 records through the
  pipeline and 2,000 gRPC calls, to keep CI's run short; the 10,000 of docs/reliability.md: set it to 10000);
- ``SIGHTLINE_FUZZ_SEED``: the seed of the stack tests' inputs (default 14). Hypothesis is derandomized, so every run
  draws the same inputs: a failure in CI fails the same way on a laptop.
"""

from __future__ import annotations

import os

FUZZ_EXAMPLES = int(os.environ.get("SIGHTLINE_FUZZ_EXAMPLES", "100"))
FUZZ_INPUTS = int(os.environ.get("SIGHTLINE_FUZZ_INPUTS", "2000"))
FUZZ_SEED = int(os.environ.get("SIGHTLINE_FUZZ_SEED", "14"))
