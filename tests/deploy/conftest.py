"""Fixtures of the deployment tests (helpers live in deploy_helpers.py)."""

from __future__ import annotations

import pytest
from deploy_helpers import VARIANTS, Rendered, find_tool, render

_RENDERED: dict[str, Rendered] = {}


@pytest.fixture(scope="session")
def helm() -> str:
    """Path of helm: $SIGHTLINE_HELM, build/tools/helm or PATH; the test fails if there is none."""
    return find_tool("helm", "SIGHTLINE_HELM")


@pytest.fixture(scope="session")
def hadolint() -> str:
    """Path of hadolint: $SIGHTLINE_HADOLINT, build/tools/hadolint or PATH; the test fails if there is none."""
    return find_tool("hadolint", "SIGHTLINE_HADOLINT")


@pytest.fixture(params=sorted(VARIANTS), scope="session")
def variant(request: pytest.FixtureRequest) -> str:
    """Name of a values variant: default, each helm/sightline/ci/*-values.yaml, production."""
    return request.param


@pytest.fixture(scope="session")
def rendered(helm: str, variant: str) -> Rendered:
    """The chart rendered with one variant's values, hooks included; rendered once per session."""
    if variant not in _RENDERED:
        _RENDERED[variant] = render(helm, VARIANTS[variant])
    return _RENDERED[variant]
