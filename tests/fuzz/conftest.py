"""Fixtures of the fuzz suite: the hostile-input generators and the local stack the stack tests of a module share
(budgets and seed: fuzz_budget.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from sightline.tooling.hostile import HostileImages
from sightline.tooling.localstack import LocalStack

FACE_PHOTOS = ("obama.jpg", "biden.jpg", "obama2.jpg")


@pytest.fixture(scope="session")
def face_images(face_photos: Path) -> tuple[bytes, ...]:
    """Real photos with faces: frames that go all the way to a decision, and seeds that mutate into deep corruption."""
    return tuple((face_photos / name).read_bytes() for name in FACE_PHOTOS)


@pytest.fixture(scope="session")
def hostile_images(face_images: tuple[bytes, ...]) -> HostileImages:
    return HostileImages(extra_seeds=face_images)


@pytest.fixture(scope="module")  # stopped after each module: a stack left running slows every later test
def hostile_stack(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[LocalStack]:
    """One local stack for the stack tests of a module (starting one takes 7-20 s). Not one for the session: pytest
    would keep it running, busy with the hostile backlog, through every later test."""
    del models_dir  # only required: the stack loads the models itself
    with LocalStack(tmp_path_factory.mktemp("hostile") / "run", ports="auto") as stack:
        stack.start(timeout=180)
        yield stack
