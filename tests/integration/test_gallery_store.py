"""Gallery store against real databases: every store test runs on SQLite (a temporary file) and on PostgreSQL.

PostgreSQL tests use the server at ``$SIGHTLINE_TEST_POSTGRES_URL`` (default
``postgresql://postgres@127.0.0.1:5432/test``): each run creates a throwaway database ``sightline_test_<random>``
(or, without the CREATEDB privilege, works in the given one) and each test gets its own schema, so parallel runs
and tests never collide. With no server reachable, the PostgreSQL parameters are skipped with a message.
"""

from __future__ import annotations

import os
import secrets
import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import closing
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import psycopg
import pytest
from psycopg import sql

from sightline.matching.store import (
    MIGRATIONS,
    GalleryChanges,
    GalleryStore,
    GalleryStoreError,
    SubjectRemoval,
    UnknownSubjectError,
    UnknownWatchlistError,
    WatchlistExistsError,
    redact_url,
)
from sightline.matching.templates import (
    TemplateCipher,
    TemplateDecryptionError,
    UnknownKeyError,
    generate_key,
)

POSTGRES_URL = os.environ.get("SIGHTLINE_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
MODEL = ("dlib-resnet", "1")
KEY_1 = generate_key()
KEY_2 = generate_key()

Opener = Callable[..., GalleryStore]


# -- fixtures ----------------------------------------------------------------------------------------------------


def _with_database(url: str, database: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + database, parts.query, parts.fragment))


def _with_search_path(url: str, schema: str) -> str:
    return f"{url}{'&' if '?' in url else '?'}options=-csearch_path%3D{schema}"


@pytest.fixture(scope="session")
def postgres_database() -> Iterator[str]:
    """URL of a database only this test run uses, dropped afterwards."""
    try:
        admin = psycopg.connect(POSTGRES_URL, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError:
        pytest.skip(f"PostgreSQL not reachable at URL: {redact_url(POSTGRES_URL)} tests skipped")
    name = f"sightline_test_{secrets.token_hex(4)}"
    try:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    except psycopg.errors.InsufficientPrivilege:
        name = ""  # per-test schemas in the given database still keep tests apart
    try:
        yield _with_database(POSTGRES_URL, name) if name else POSTGRES_URL
    finally:
        if name:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        admin.close()


@pytest.fixture()
def postgres_url(postgres_database: str) -> Iterator[str]:
    schema = f"t_{secrets.token_hex(6)}"
    with psycopg.connect(postgres_database, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    yield _with_search_path(postgres_database, schema)
    with psycopg.connect(postgres_database, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def gallery_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'gallery.db'}"  # tmp_path is absolute: sqlite:////tmp/...
    return request.getfixturevalue("postgres_url")


@pytest.fixture()
def open_store() -> Iterator[Opener]:
    """Opens stores and closes them all at teardown (before the test schema is dropped)."""
    opened: list[GalleryStore] = []

    def opener(url: str, cipher: TemplateCipher | None = None) -> GalleryStore:
        store = GalleryStore.open(url, cipher or _cipher("k1", KEY_1))
        opened.append(store)
        return store

    yield opener
    for store in opened:
        store.close()


@pytest.fixture()
def store(gallery_url: str, open_store: Opener) -> GalleryStore:
    return open_store(gallery_url)


# -- helpers -----------------------------------------------------------------------------------------------------


def _cipher(key_id: str, key_b64: str, old_keys: str = "") -> TemplateCipher:
    return TemplateCipher.from_base64(key_b64, key_id, old_keys=old_keys)


def _vectors(seed: int, count: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(128).astype(np.float32) for _ in range(count)]


def _raw(url: str, statement: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Runs SQL on a separate connection, bypassing the store (``?`` placeholders)."""
    if url.startswith("sqlite:///"):
        with closing(sqlite3.connect(url[len("sqlite:///") :])) as conn:
            rows = conn.execute(statement, params).fetchall()
            conn.commit()
            return rows
    with psycopg.connect(url, autocommit=True) as conn:
        cursor = conn.execute(statement.replace("?", "%s"), params or None)
        return cursor.fetchall() if cursor.description else []


def _count(url: str, table: str, subject_id: str) -> int:
    return int(_raw(url, f"SELECT COUNT(*) FROM {table} WHERE subject_id = ?", (subject_id,))[0][0])


def _dump(url: str) -> bytes:
    """Everything at rest: the SQLite files' bytes, or every row of the PostgreSQL templates table."""
    if url.startswith("sqlite:///"):
        path = Path(url[len("sqlite:///") :])
        files = [path, *(path.with_name(path.name + suffix) for suffix in ("-wal", "-journal"))]
        return b"".join(f.read_bytes() for f in files if f.exists())
    parts = []
    for row in _raw(url, "SELECT * FROM templates"):
        for value in row:
            parts.append(bytes(value) if isinstance(value, bytes | memoryview) else str(value).encode())
    return b"\x00".join(parts)


def _enrol(
    store: GalleryStore, subject_id: str, vectors: list[np.ndarray], watchlists: tuple[str, ...] = ()
) -> list[int]:
    store.add_subject(subject_id, display_name=f"Name of {subject_id}", watchlists=watchlists)
    return [store.add_template(subject_id, v, *MODEL, quality=0.5) for v in vectors]


# -- tests on both backends --------------------------------------------------------------------------------------


def test_enrol_list_paginate_delete_round_trip(store: GalleryStore) -> None:
    # Mixed case, digits and non-ASCII: the order must be the same byte order on both backends.
    ids = [f"subj-{i:03d}" for i in range(23)] + ["Zed", "alpha", "émile", "_under", "Bob"]
    for n, subject_id in enumerate(ids):
        assert store.add_subject(subject_id, f"Person {n}", watchlists=("all", "even" if n % 2 == 0 else "odd"))
        for vector in _vectors(n, n % 3):
            store.add_template(subject_id, vector, *MODEL)
    assert store.add_subject("Zed") is False  # idempotent

    pages, after = [], None
    while page := store.list_subjects(limit=7, after=after):
        assert len(page) <= 7
        pages.append(page)
        after = page[-1].subject_id
    listed = [record for page in pages for record in page]
    assert [r.subject_id for r in listed] == sorted(ids)
    by_id = {r.subject_id: r for r in listed}
    for n, subject_id in enumerate(ids):
        record = by_id[subject_id]
        assert record.display_name == f"Person {n}"
        assert record.template_count == n % 3
        assert record.watchlists == tuple(sorted(("all", "even" if n % 2 == 0 else "odd")))
        assert record.created_at.tzinfo is not None

    even = [ids[n] for n in range(len(ids)) if n % 2 == 0]
    first = store.list_subjects(watchlist="even", limit=5)
    rest = store.list_subjects(watchlist="even", limit=100, after=first[-1].subject_id)
    assert [r.subject_id for r in first + rest] == sorted(even)
    assert store.list_subjects(watchlist="nobody") == []

    assert store.get_subject("subj-005") == by_id["subj-005"]
    assert store.delete_subject("subj-005") == 5 % 3
    assert store.get_subject("subj-005") is None
    assert "subj-005" not in [r.subject_id for r in store.list_subjects(limit=1000)]
    assert store.delete_subject("subj-005") == 0
    assert store.delete_subject("never-enrolled") == 0


def test_delete_leaves_no_rows(store: GalleryStore, gallery_url: str) -> None:
    _enrol(store, "alice", _vectors(1, 3), ("wl-a", "wl-b"))
    _enrol(store, "bob", _vectors(2, 2), ("wl-a",))
    assert _count(gallery_url, "templates", "alice") == 3
    assert _count(gallery_url, "watchlist_members", "alice") == 2

    assert store.delete_subject("alice") == 3

    for table in ("templates", "watchlist_members", "subjects"):
        assert _count(gallery_url, table, "alice") == 0, table
    assert _count(gallery_url, "templates", "bob") == 2
    assert [r.subject_id for r in store.load_templates()] == ["bob", "bob"]


def test_reopen_decrypts_same_vectors(gallery_url: str, open_store: Opener) -> None:
    vectors = _vectors(3, 4)
    first = open_store(gallery_url)
    ids = _enrol(first, "alice", vectors[:3], ("border",)) + _enrol(first, "bob", vectors[3:])
    first.close()

    reopened = open_store(gallery_url, _cipher("k1", KEY_1))
    records = reopened.load_templates()
    assert [r.template_id for r in records] == ids
    for record, vector in zip(records, vectors, strict=True):
        assert np.array_equal(record.vector, vector) and record.vector.dtype == np.float32
        assert (record.model_name, record.model_version) == MODEL
        assert record.quality == pytest.approx(0.5)
    assert [r.watchlists for r in records] == [("border",)] * 3 + [()]
    assert reopened.load_templates(model_name="other") == []
    assert len(reopened.load_templates(*MODEL)) == 4


def test_no_plaintext_vector_at_rest(store: GalleryStore, gallery_url: str) -> None:
    vectors = _vectors(4, 3)
    _enrol(store, "plaintext-marker", vectors)
    store.close()  # flush everything to the file

    dump = _dump(gallery_url)
    assert b"plaintext-marker" in dump  # the dump is the real data
    for vector in vectors:
        assert vector.tobytes() not in dump
        assert vector.astype(">f4").tobytes() not in dump
        assert vector.astype(np.float64).tobytes() not in dump
        for value in vector[:32]:
            for text in (repr(float(value)), str(value), f"{value:.6f}", f"{value:.5e}"):
                assert text.encode() not in dump, text


def test_wrong_key_is_a_clear_error(gallery_url: str, open_store: Opener) -> None:
    writer = open_store(gallery_url)
    [template_id] = _enrol(writer, "alice", _vectors(5, 1))
    writer.close()

    same_id_other_bytes = open_store(gallery_url, _cipher("k1", generate_key()))
    with pytest.raises(TemplateDecryptionError, match=f"template {template_id}.*failed authentication"):
        same_id_other_bytes.load_templates()

    other_id = open_store(gallery_url, _cipher("k9", generate_key()))
    with pytest.raises(KeyError) as caught:
        other_id.load_templates()
    assert isinstance(caught.value, UnknownKeyError) and "'k1'" in str(caught.value)
    assert KEY_1 not in str(caught.value)


def test_blob_moved_to_another_subject_fails(store: GalleryStore, gallery_url: str) -> None:
    [alice_template] = _enrol(store, "alice", _vectors(6, 1))
    _enrol(store, "mallory", [])
    _raw(gallery_url, "UPDATE templates SET subject_id = ? WHERE id = ?", ("mallory", alice_template))
    with pytest.raises(TemplateDecryptionError, match="another subject"):
        store.load_templates()


def test_rotate_keys_then_only_new_key_needed(gallery_url: str, open_store: Opener) -> None:
    vectors = _vectors(7, 5)
    store = open_store(gallery_url, _cipher("k1", KEY_1))
    _enrol(store, "alice", vectors[:3])
    _enrol(store, "bob", vectors[3:])
    version = store.version()

    assert store.rotate_keys(_cipher("k2", KEY_2, old_keys=f"k1:{KEY_1}")) == 5
    assert store.cipher.active_key_id == "k2"
    assert {row[0] for row in _raw(gallery_url, "SELECT key_id FROM templates")} == {"k2"}
    assert store.version() == version  # the gallery's content did not change
    # New templates use the new key too.
    store.add_template("bob", _vectors(8, 1)[0], *MODEL)
    store.close()

    only_new = open_store(gallery_url, _cipher("k2", KEY_2))
    records = only_new.load_templates()
    assert len(records) == 6
    for record, vector in zip(records, vectors, strict=False):
        assert np.array_equal(record.vector, vector)
    with pytest.raises(UnknownKeyError):
        open_store(gallery_url, _cipher("k1", KEY_1)).load_templates()


def test_rotate_with_cipher_holding_only_the_new_key(store: GalleryStore) -> None:
    vectors = _vectors(9, 2)
    _enrol(store, "alice", vectors)
    # The store's current cipher still reads the old blobs.
    assert store.rotate_keys(_cipher("k2", KEY_2)) == 2
    assert [np.array_equal(r.vector, v) for r, v in zip(store.load_templates(), vectors, strict=True)] == [True] * 2


def test_version_increments(store: GalleryStore, gallery_url: str, open_store: Opener) -> None:
    replica = open_store(gallery_url)
    seen = [store.version()]

    def changed() -> bool:
        now = store.version()
        assert replica.version() == now  # another replica sees the same counter
        grew = now > seen[-1]
        seen.append(now)
        return grew

    store.add_subject("alice", watchlists=("w1",))
    assert changed()
    store.add_subject("alice", watchlists=("w1",))
    assert not changed()
    store.add_subject("alice", watchlists=("w2",))
    assert changed()
    store.add_subject("alice", display_name="Alice")
    assert changed()
    store.add_template("alice", _vectors(10, 1)[0], *MODEL)
    assert changed()
    replica.add_template("alice", _vectors(11, 1)[0], *MODEL)
    assert changed()
    assert store.delete_subject("alice") == 2
    assert changed()
    assert store.delete_subject("alice") == 0
    assert not changed()


def test_add_template_for_unknown_subject(store: GalleryStore) -> None:
    with pytest.raises(KeyError) as caught:
        store.add_template("ghost", _vectors(12, 1)[0], *MODEL)
    assert isinstance(caught.value, UnknownSubjectError) and "ghost" in str(caught.value)
    assert store.load_templates() == []


def test_template_ids_are_not_reused_after_delete(store: GalleryStore) -> None:
    [first] = _enrol(store, "alice", _vectors(13, 1))
    store.delete_subject("alice")
    [second] = _enrol(store, "alice", _vectors(14, 1))
    assert second > first


def test_schema_is_versioned(gallery_url: str, open_store: Opener) -> None:
    open_store(gallery_url).close()
    open_store(gallery_url).close()  # reopening applies nothing twice
    assert _raw(gallery_url, "SELECT version FROM schema_version ORDER BY version") == [(1,), (2,), (3,), (4,)]
    _raw(gallery_url, "INSERT INTO schema_version (version, description, applied_at) VALUES (999, 'future', 'now')")
    with pytest.raises(GalleryStoreError, match="newer than this build"):
        open_store(gallery_url)


def test_concurrent_writers_and_readers(store: GalleryStore) -> None:
    for t in range(4):
        store.add_subject(f"s{t}")
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            for vector in _vectors(100 + t, 10):
                store.add_template(f"s{t}", vector, *MODEL)
                store.list_subjects()
                store.version()
        except BaseException as error:  # noqa: BLE001 - reported by the main thread
            errors.append(error)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert [r.template_count for r in store.list_subjects()] == [10] * 4
    assert len(store.load_templates()) == 40


def test_input_validation(store: GalleryStore) -> None:
    with pytest.raises(ValueError):
        store.add_subject("")
    with pytest.raises(ValueError):
        store.add_subject("alice", watchlists=("",))
    store.add_subject("alice")
    with pytest.raises(ValueError, match="shape"):
        store.add_template("alice", np.zeros(64, np.float32), *MODEL)
    with pytest.raises(ValueError):
        store.list_subjects(limit=0)


# -- URL handling ------------------------------------------------------------------------------------------------


def test_sqlite_url_forms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, open_store: Opener) -> None:
    monkeypatch.chdir(tmp_path)
    relative = open_store("sqlite:///data/relative.db")
    relative.add_subject("alice")
    assert (tmp_path / "data" / "relative.db").exists()
    absolute = open_store(f"sqlite:///{tmp_path / 'data' / 'relative.db'}")
    assert [r.subject_id for r in absolute.list_subjects()] == ["alice"]
    memory = open_store("sqlite:///:memory:")
    assert memory.add_subject("bob") and memory.dialect == "sqlite"


@pytest.mark.parametrize("url", ["mysql://localhost/db", "sqlite://relative.db", "sqlite:///"])
def test_bad_urls(url: str) -> None:
    with pytest.raises(GalleryStoreError):
        GalleryStore.open(url, _cipher("k1", KEY_1))


def test_unreachable_postgres_error_hides_password() -> None:
    with pytest.raises(GalleryStoreError, match="cannot connect") as caught:
        GalleryStore.open(
            "postgresql://sightline:sekret-pw@127.0.0.1:1/gallery?connect_timeout=2", _cipher("k1", KEY_1)
        )
    assert "sekret-pw" not in str(caught.value)
    assert redact_url("postgres://u:pw@h:5/db?password=pw2") == "postgres://u:***@h:5/db?password=***"


@pytest.mark.postgres
def test_postgres_scheme_alias(postgres_url: str, open_store: Opener) -> None:
    store = open_store("postgres" + postgres_url[len("postgresql") :])
    assert store.dialect == "postgresql" and store.add_subject("alice")


# -- watchlists, memberships and their expiry --------------------------------------------------------------------


def _schema_1_database(url: str) -> None:
    """A gallery as the first release left it (migration 1 only), with a subject, a template and two lists."""
    from sightline.common.sqlstore import migrate, open_backend

    backend = open_backend(url)
    try:
        with backend.transaction(write=True) as cur:
            migrate(cur, backend.dialect, MIGRATIONS[:1], table="schema_version", lock_key=1, what="gallery")
            now = backend.dialect.to_db_time(datetime.now(UTC) - timedelta(days=3))
            cur.execute(
                "INSERT INTO subjects (subject_id, display_name, created_at) VALUES (?, ?, ?)",
                ("old-timer", "Old", now),
            )
            key_id, blob = _cipher("k1", KEY_1).encrypt(_vectors(40, 1)[0], "old-timer")
            cur.execute(
                "INSERT INTO templates (subject_id, key_id, ciphertext, model_name, model_version, quality,"
                " created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                ("old-timer", key_id, blob, *MODEL, 0.5, now),
            )
            for name in ("border", "staff"):
                cur.execute(
                    "INSERT INTO watchlist_members (subject_id, watchlist, created_at) VALUES (?, ?, ?)",
                    ("old-timer", name, now),
                )
    finally:
        backend.close()


def test_a_schema_1_gallery_upgrades_keeping_its_lists(gallery_url: str, open_store: Opener) -> None:
    _schema_1_database(gallery_url)
    store = open_store(gallery_url)
    assert store.schema_version == len(MIGRATIONS)
    lists = store.list_watchlists()
    assert [(w.name, w.purpose, w.owner, w.target_fmr, w.member_count) for w in lists] == [
        ("border", "", "", None, 1),
        ("staff", "", "", None, 1),
    ]  # no purpose yet: `watchlists list` shows it
    assert all(w.created_at < datetime.now(UTC) - timedelta(days=2) for w in lists)
    [record] = store.load_templates()
    assert record.watchlists == ("border", "staff") and np.array_equal(record.vector, _vectors(40, 1)[0])
    assert [m.expires_at for m in store.list_members("border")] == [None]


def test_watchlist_create_update_delete(store: GalleryStore) -> None:
    created = store.create_watchlist("stop", "court order 12/2026", "unit-7", 1e-4, 30)
    assert (
        created.name,
        created.purpose,
        created.owner,
        created.target_fmr,
        created.default_membership_days,
        created.member_count,
    ) == ("stop", "court order 12/2026", "unit-7", 1e-4, 30, 0)  # exact, not float32
    with pytest.raises(WatchlistExistsError, match="already exists"):
        store.create_watchlist("stop", "again")
    _enrol(store, "alice", _vectors(41, 1), ("stop",))
    updated = store.update_watchlist("stop", "court order 13/2026", "unit-8", None, 0)
    assert (updated.purpose, updated.owner, updated.target_fmr, updated.member_count) == (
        "court order 13/2026",
        "unit-8",
        None,
        1,
    )
    assert store.get_watchlist("stop") == updated
    with pytest.raises(UnknownWatchlistError):
        store.update_watchlist("nope", "x", "", None, 0)
    with pytest.raises(ValueError, match="target FMR"):
        store.create_watchlist("bad", "x", target_fmr=1.5)

    assert store.delete_watchlist("stop") == 1
    assert store.delete_watchlist("stop") is None
    assert store.get_subject("alice").watchlists == () and store.get_subject("alice").template_count == 1


def test_enrolling_into_an_unknown_list_creates_it(store: GalleryStore) -> None:
    store.create_watchlist("known", "purpose")
    enrolment = store.enrol_subject("bob", "Bob", ["known", "fresh"], owner="officer-1")
    assert enrolment.created and enrolment.watchlists_created == ("fresh",)
    fresh = store.get_watchlist("fresh")
    assert (fresh.purpose, fresh.owner, fresh.member_count) == ("", "officer-1", 1)
    assert store.enrol_subject("bob", watchlists=["fresh"]).watchlists_created == ()


def test_expired_memberships_leave_every_matching_read(store: GalleryStore) -> None:
    now = datetime.now(UTC)
    store.create_watchlist("visitors", "day passes")
    _enrol(store, "alice", _vectors(42, 1))
    _enrol(store, "bob", _vectors(43, 1))
    store.add_members("visitors", ["alice"], expires_at=now + timedelta(hours=1))
    store.add_members("visitors", ["bob"], expires_at=now - timedelta(seconds=1))  # already lapsed

    assert {r.subject_id: r.watchlists for r in store.load_templates(at=now)} == {"alice": ("visitors",), "bob": ()}
    assert [r.subject_id for r in store.list_subjects(watchlist="visitors")] == ["alice"]
    assert store.get_subject("bob").watchlists == ()
    assert store.get_watchlist("visitors").member_count == 1
    state = store.memberships(at=now)
    assert state.watchlists == {"alice": ("visitors",)}
    assert abs((state.next_expiry - (now + timedelta(hours=1))).total_seconds()) < 1e-3

    later = now + timedelta(hours=2)  # alice's membership has run out too, without anything being written
    assert {r.subject_id: r.watchlists for r in store.load_templates(at=later)} == {"alice": (), "bob": ()}
    assert store.memberships(at=later).watchlists == {} and store.memberships(at=later).next_expiry is None

    assert [m.subject_id for m in store.list_members("visitors")] == ["alice"]
    listed = store.list_members("visitors", include_expired=True)
    assert [(m.subject_id, m.expired(now)) for m in listed] == [("alice", False), ("bob", True)]


def test_membership_expiry_defaults_renewals_and_removal(store: GalleryStore) -> None:
    store.create_watchlist("staff", "building access", default_membership_days=10)
    _enrol(store, "alice", _vectors(44, 1))
    _enrol(store, "bob", _vectors(45, 1))
    [by_default] = store.add_members("staff", ["alice"])
    assert abs((by_default.expires_at - datetime.now(UTC)).total_seconds() - 10 * 86400) < 60
    explicit = datetime(2031, 1, 1, tzinfo=UTC)
    [renewed] = store.add_members("staff", ["alice"], expires_at=explicit)
    assert renewed.expires_at == explicit and renewed.added_at == by_default.added_at

    store.add_members("staff", ["bob"], expires_at=datetime.now(UTC) - timedelta(seconds=5))
    [lapsed] = store.list_members("staff", include_expired=True, after="alice")
    [again] = store.add_members("staff", ["bob"], expires_at=explicit)
    assert again.added_at > lapsed.added_at  # a lapsed membership starts afresh

    with pytest.raises(UnknownSubjectError, match="ghost"):
        store.add_members("staff", ["alice", "ghost"])
    with pytest.raises(UnknownWatchlistError):
        store.add_members("nowhere", ["alice"])
    assert store.remove_members("staff", ["bob", "ghost"]) == ["bob"]
    removal = store.remove_subject("alice")
    assert (removal.existed, removal.templates_removed, removal.watchlists) == (True, 1, ("staff",))
    assert store.remove_subject("alice") == SubjectRemoval(False, 0, ())


def test_list_members_pages(store: GalleryStore) -> None:
    store.create_watchlist("many", "paging")
    ids = [f"s{i:02d}" for i in range(7)]
    for subject_id in ids:
        store.add_subject(subject_id)
    store.add_members("many", ids)
    pages, after = [], None
    while page := store.list_members("many", limit=3, after=after):
        pages.append([m.subject_id for m in page])
        after = page[-1].subject_id
    assert pages == [ids[:3], ids[3:6], ids[6:]]
    with pytest.raises(UnknownWatchlistError):
        store.list_members("none")


def test_the_change_log_names_every_subject_each_version_touched(
    store: GalleryStore, gallery_url: str, open_store: Opener
) -> None:
    other = open_store(gallery_url)
    start = store.version()
    store.create_watchlist("a", "p")
    store.add_subject("alice")
    store.add_members("a", ["alice"])
    store.add_members("a", ["alice"])  # nothing changes: no version
    other.add_subject("bob")  # another replica's write is in the same log
    store.update_watchlist("a", "q", "", 1e-3, 0)
    changes = store.changes_since(start)
    assert changes.complete and changes.until == start + 5 == store.version()
    assert changes.subject_ids == {"alice", "bob"} and changes.lists_changed
    store.remove_members("a", ["alice"])
    assert store.changes_since(start + 5) == GalleryChanges(start + 5, start + 6, frozenset({"alice"}), False, True)
    store.add_members("a", ["alice"])
    store.delete_watchlist("a")  # its members are named: their memberships changed
    assert store.changes_since(start + 7).subject_ids == {"alice"}
    paged = store.changes_since(start, limit=2)
    assert paged.until == start + 2 and paged.subject_ids == {"alice"}
    assert store.changes_since(store.version()).until == store.version()


def test_a_pruned_change_log_says_it_is_incomplete(store: GalleryStore) -> None:
    store.add_subject("alice")
    version = store.version()
    store.add_subject("bob")
    assert store.prune_changes(datetime.now(UTC) + timedelta(seconds=1)) >= 2
    changes = store.changes_since(version)
    assert not changes.complete and changes.until == version
    store.add_subject("carol")  # a new version after the gap: still incomplete from the old version...
    assert not store.changes_since(version).complete
    assert store.changes_since(version + 1).complete  # ...but complete from the version before carol


# -- key rotation through `sightline keys rotate` ----------------------------------------------------------------


def _assert_no_plaintext(dump: bytes, vectors: list[np.ndarray]) -> None:
    for vector in vectors:
        assert vector.astype("<f4").tobytes() not in dump and vector.astype(">f4").tobytes() not in dump


def test_keys_rotate_command(
    gallery_url: str,
    open_store: Opener,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from sightline.cli.main import main as cli

    vectors = _vectors(50, 3)
    writer = open_store(gallery_url, _cipher("k1", KEY_1))
    _enrol(writer, "alice", vectors[:2])
    _enrol(writer, "bob", vectors[2:])
    writer.close()
    _assert_no_plaintext(_dump(gallery_url), vectors)
    (tmp_path / "old.keys").write_text(f"k1:{KEY_1}\n")
    (tmp_path / "k2.key").write_text(KEY_2 + "\n")
    rotate = [
        "keys",
        "rotate",
        "--database-url",
        gallery_url,
        "--new-key-file",
        str(tmp_path / "k2.key"),
        "--new-key-id",
        "k2",
        "--no-progress",
    ]

    assert cli([*rotate, "--old-keys-file", str(tmp_path / "old.keys")]) == 0
    out = capsys.readouterr().out
    assert "templates by key id: k1=3" in out and "re-encrypted 3 template(s) with key 'k2'" in out
    assert "now templates by key id: k2=3" in out and "checked: all 3 template(s) decrypt with 'k2' alone" in out
    only_new = open_store(gallery_url, _cipher("k2", KEY_2))
    assert all(np.array_equal(r.vector, v) for r, v in zip(only_new.load_templates(), vectors, strict=True))
    only_new.close()
    _assert_no_plaintext(_dump(gallery_url), vectors)

    # Again, with the keys as the matching service reads them: only templates written since are re-encrypted.
    monkeypatch.setenv("SIGHTLINE_MATCHING_TEMPLATE_KEY", KEY_2)
    monkeypatch.setenv("SIGHTLINE_MATCHING_TEMPLATE_KEY_ID", "k2")
    monkeypatch.setenv("SIGHTLINE_MATCHING_PREVIOUS_TEMPLATE_KEYS", f"k1:{KEY_1}")
    monkeypatch.setenv("SIGHTLINE_MATCHING_DATABASE_URL", gallery_url)
    assert cli(rotate[:2] + rotate[4:]) == 0
    assert "re-encrypted 0 template(s)" in capsys.readouterr().out

    (tmp_path / "clash.key").write_text(generate_key())
    assert (
        cli(
            [
                *rotate[:4],
                "--new-key-file",
                str(tmp_path / "clash.key"),
                "--new-key-id",
                "k1",
                "--old-keys-file",
                str(tmp_path / "old.keys"),
            ]
        )
        == 2
    )
    assert "already in use with other key bytes" in capsys.readouterr().err


def test_rotate_keys_reports_progress(store: GalleryStore) -> None:
    _enrol(store, "alice", _vectors(51, 4))
    seen: list[tuple[int, int]] = []
    assert store.rotate_keys(_cipher("k2", KEY_2), progress=lambda done, total: seen.append((done, total))) == 4
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert store.template_key_counts() == {"k2": 4}


def test_a_removed_subject_leaves_the_change_log_by_its_templates_only(gallery_url: str, store: GalleryStore) -> None:
    start = store.version()
    template_ids = _enrol(store, "e-erased", _vectors(21, 2))
    store.remove_subject("e-erased")
    changes = store.changes_since(start)
    assert changes.removed_templates == set(template_ids) and "e-erased" not in changes.subject_ids
    assert _raw(gallery_url, "SELECT COUNT(*) FROM gallery_changes WHERE subject_id = 'e-erased'") == [(0,)]
