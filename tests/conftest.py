"""Fixtures shared by all tests: the fetched models and sample photos, a real broker, PostgreSQL.

Models and photos come from the set-up step (`make setup`); a missing one fails the test with that instruction
rather than skipping, so a broken install can never pass as green.
"""

from __future__ import annotations

import os
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from sightline.common import paths

warnings.filterwarnings("ignore", category=DeprecationWarning)


def _required(path: Path, what: str) -> Path:
    if not path.exists():
        pytest.fail(f"{what} not found at {path}: run `make setup` first", pytrace=False)
    return path


@pytest.fixture(scope="session")
def models_dir() -> Path:
    directory = _required(paths.models_dir(), "converted models")
    _required(directory / "manifest.json", "model manifest")
    return directory


@pytest.fixture(scope="session")
def dlib_model_sources(models_dir: Path) -> Path:
    return _required(models_dir / "sources" / "dlib_face_recognition_resnet_model_v1.dat", "dlib model sources").parent


@pytest.fixture(scope="session")
def face_photos() -> Path:
    return _required(paths.samples_dir() / "face_recognition" / "obama.jpg", "face_recognition sample photos").parent


@pytest.fixture(scope="session")
def dlib_example_faces() -> Path:
    return _required(paths.samples_dir() / "dlib" / "faces", "dlib example photos")


@pytest.fixture(scope="session")
def dlib_johns() -> Path:
    return _required(paths.samples_dir() / "dlib" / "johns", "dlib 'johns' photos")


@pytest.fixture(scope="session")
def broker() -> Iterator[object]:
    """A fresh Tansu broker for the test session (its memory is never freed, so never reuse one)."""
    from sightline.tooling.broker import LocalBroker

    instance = LocalBroker()
    instance.start()
    yield instance
    instance.stop()


@pytest.fixture(scope="session")
def kafka(broker: object) -> object:
    """KafkaSettings for the session broker, with Sightline's topics created and fast group joins."""
    from sightline.common.bus import ensure_topics
    from sightline.common.config import KafkaSettings

    settings = KafkaSettings(
        bootstrap_servers=broker.bootstrap_servers,
        session_timeout_ms=2000,  # type: ignore[attr-defined]
        heartbeat_interval_ms=500,
        fetch_max_wait_ms=25,
    )
    ensure_topics(settings)
    return settings


POSTGRES_URL = os.environ.get("SIGHTLINE_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A throwaway PostgreSQL database for the session; skipped, saying so, when no server is reachable."""
    psycopg = pytest.importorskip("psycopg")
    try:
        admin = psycopg.connect(POSTGRES_URL, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError:
        pytest.skip(f"PostgreSQL not reachable at {POSTGRES_URL}: PostgreSQL tests skipped")
    name = f"sightline_test_{uuid.uuid4().hex[:10]}"
    admin.execute(f'CREATE DATABASE "{name}"')
    base = POSTGRES_URL.rsplit("/", 1)[0]
    yield f"{base}/{name}"
    admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.close()


@pytest.fixture()
def pg_schema_url(postgres_url: str) -> Iterator[str]:
    """The session database with a schema only this test uses first on the search path."""
    import secrets

    import psycopg

    schema = f"t_{secrets.token_hex(6)}"
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    yield f"{postgres_url}?options=-csearch_path%3D{schema}"
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A database for a store under test: a SQLite file, or a private schema in the PostgreSQL test database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store.db'}"
    return str(request.getfixturevalue("pg_schema_url"))
