"""``matching.snapshots``: encrypted ANN index snapshots round-trip, and every kind of damage is refused.

Real ``AnnIndex`` instances (a trained IVF one and a tiny exact one), real AES-GCM keys, real files in tmp_path.
Small chunks (``CHUNK``) so that even the small test indexes span many chunks.
"""

from __future__ import annotations

import os
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from sightline.matching.ann import AnnIndex, AnnSettings
from sightline.matching.snapshots import MIN_CHUNK_BYTES, PURPOSE, SnapshotError, SnapshotStore
from sightline.matching.templates import TemplateCipher, UnknownKeyError

DIM = 128
CHUNK = 16 * MIN_CHUNK_BYTES  # 64 KiB: the trained index's 1.6 MB dump spans ~25 chunks
NONCE_AND_TAG = 12 + 16
TRAINED = AnnSettings(exact_below=256, lists=16, probes=4, auto_retrain=False)


@dataclass(frozen=True)
class Record:
    template_id: int
    subject_id: str
    vector: np.ndarray
    watchlists: tuple[str, ...] = ()


def _records(rng: np.random.Generator, templates: int) -> list[Record]:
    """Two templates per subject around a subject centre, some subjects on watchlists, one verify-only session."""
    centres = rng.standard_normal((templates // 2 + 1, DIM)).astype(np.float32) * 0.1
    records = []
    for t in range(templates):
        s = t // 2
        names = ("red",) if s % 3 == 0 else ("blue", "red") if s % 7 == 0 else ()
        vector = centres[s] + rng.standard_normal(DIM).astype(np.float32) * 0.02
        records.append(Record(t + 1, f"s{s:05d}", vector, names))
    records.append(Record(templates + 1, "session-1", centres[0]))
    return records


@pytest.fixture(scope="module")
def trained() -> AnnIndex:
    index = AnnIndex(settings=TRAINED)
    index.replace_all(_records(np.random.default_rng(1), 3000))
    assert index.ann_stats()["trained"]
    return index


@pytest.fixture(scope="module")
def tiny() -> AnnIndex:
    index = AnnIndex()
    index.replace_all(_records(np.random.default_rng(2), 40))
    assert not index.ann_stats()["trained"]
    return index


@pytest.fixture
def cipher() -> TemplateCipher:
    return TemplateCipher({"k1": os.urandom(32)}, "k1")


def _store(directory: Path, cipher: TemplateCipher, shard: int = 0, shards: int = 1) -> SnapshotStore:
    return SnapshotStore(directory, cipher, shard=shard, shards=shards, chunk_bytes=CHUNK)


def _same_results(a: AnnIndex, b: AnnIndex, seed: int) -> None:
    rng = np.random.default_rng(seed)
    probes = rng.standard_normal((40, DIM)).astype(np.float32) * 0.1
    assert (b.size, b.subject_count, b.subject_ids()) == (a.size, a.subject_count, a.subject_ids())
    assert b.ann_stats() == a.ann_stats()
    for watchlists in ((), ("red",), ("blue",)):
        assert b.search(probes, 5, watchlists) == a.search(probes, 5, watchlists)
    assert b.verify(probes[0], "session-1") == a.verify(probes[0], "session-1")


def _header_bytes(path: Path) -> int:
    """Length of everything before the first chunk (prefix, meta, plaintext length)."""
    data = path.read_bytes()
    meta = int.from_bytes(data[10:14], "little")
    return 14 + meta + 8


def _flip(path: Path, position: int) -> None:
    """Changes one byte; a hex digit stays a hex digit (so a changed salt still parses)."""
    data = bytearray(path.read_bytes())
    if chr(data[position]) in "0123456789abcdef":
        data[position] = ord("1" if data[position] == ord("0") else "0")
    else:
        data[position] ^= 0x01
    path.write_bytes(bytes(data))


# -- round trips -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["trained", "tiny"])
def test_round_trip_gives_identical_searches(
    which: str, request: pytest.FixtureRequest, tmp_path: Path, cipher
) -> None:
    index: AnnIndex = request.getfixturevalue(which)
    store = _store(tmp_path / "snaps", cipher)
    info = store.write(index, 123)
    assert info.path.name == "gallery-s0of1-v000000000123.snap"
    assert (info.version, info.shard, info.shards, info.key_id) == (123, 0, 1, "k1")
    assert info.size_bytes == info.path.stat().st_size
    assert info.created_at.tzinfo is not None
    assert store.newest() == info
    loaded = store.load(info)
    _same_results(index, loaded, seed=7)
    # The loaded index is a live one: it takes additions and removals like any other.
    assert loaded.add(10**6, "after-load", np.full(DIM, 0.05, dtype=np.float32))
    assert loaded.remove_subject("s00000") == 2 and "s00000" in index.subject_ids()


def test_snapshot_holds_no_plaintext(trained: AnnIndex, tmp_path: Path, cipher: TemplateCipher) -> None:
    info = _store(tmp_path, cipher).write(trained, 1)
    data = info.path.read_bytes()
    assert info.size_bytes > 20 * CHUNK  # many chunks
    assert b"SLANN001" not in data  # the dump's own header is sealed...
    assert not [s for s in sorted(trained.subject_ids())[:50] if s.encode() in data]  # ...and so are subject ids


def test_load_passes_index_options(trained: AnnIndex, tmp_path: Path, cipher: TemplateCipher) -> None:
    store = _store(tmp_path, cipher)
    sessions: list[str] = []
    loaded = store.load(store.write(trained, 1), verify_only=lambda s: sessions.append(s) or True)
    loaded.add(10**6, "new-one", np.full(DIM, 0.05, dtype=np.float32))
    assert sessions == ["new-one"]
    assert loaded.search(np.full(DIM, 0.05, dtype=np.float32), 1)[0][0].subject_id != "new-one"  # verify-only


# -- damage ------------------------------------------------------------------------------------------------------------


DAMAGE = {  # where one byte changes -> what the error says
    "first chunk": "chunk 0 of .* failed authentication",
    "middle chunk": "failed authentication",
    "last tag": "failed authentication",
    "salt": "chunk 0 of .* failed authentication",  # another file key
    "meta": "chunk 0 of .* failed authentication",  # the header is bound into every chunk
    "plaintext length": "truncated|after its last chunk",
    "magic": "not a Sightline gallery snapshot",
}


@pytest.mark.parametrize("where", list(DAMAGE))
def test_one_changed_byte_is_refused(
    where: str, trained: AnnIndex, tmp_path: Path, cipher: TemplateCipher, caplog: pytest.LogCaptureFixture
) -> None:
    store = _store(tmp_path, cipher)
    info = store.write(trained, 1)
    data, start = info.path.read_bytes(), _header_bytes(info.path)
    position = {
        "first chunk": start + 12 + 100,
        "middle chunk": start + (len(data) - start) // 2,
        "last tag": len(data) - 1,
        "salt": data.index(b'"salt":"') + 11,
        "meta": data.index(b'"created_at":"') + 17,  # the year's last digit: still a valid header
        "plaintext length": start - 8,
        "magic": 0,
    }[where]
    _flip(info.path, position)
    with pytest.raises(SnapshotError, match=DAMAGE[where]):
        store.load(info)
    if where == "magic":
        assert store.newest() is None and "ignoring gallery snapshot" in caplog.text


def test_truncation_is_refused_even_with_a_forged_length(
    trained: AnnIndex, tmp_path: Path, cipher: TemplateCipher
) -> None:
    store = _store(tmp_path, cipher)
    info = store.write(trained, 1)
    whole, start = info.path.read_bytes(), _header_bytes(info.path)
    plaintext = int.from_bytes(whole[start - 8 : start], "little")
    full_chunks = plaintext // CHUNK
    assert plaintext % CHUNK  # so the last chunk is a short one, dropped below
    info.path.write_bytes(whole[:-100])
    assert store.newest() is None  # its size does not add up: not offered
    with pytest.raises(SnapshotError, match="truncated"):
        store.load(info)
    # Drop the last chunk whole and rewrite the length to match: the new last chunk was not sealed as the last one.
    forged = bytearray(whole[: start + full_chunks * (CHUNK + NONCE_AND_TAG)])
    forged[start - 8 : start] = (full_chunks * CHUNK).to_bytes(8, "little")
    info.path.write_bytes(bytes(forged))
    offered = store.newest()
    assert offered is not None
    with pytest.raises(SnapshotError, match="failed authentication"):
        store.load(offered)


def test_reordered_chunks_are_refused(trained: AnnIndex, tmp_path: Path, cipher: TemplateCipher) -> None:
    store = _store(tmp_path, cipher)
    info = store.write(trained, 1)
    data, start = bytearray(info.path.read_bytes()), _header_bytes(info.path)
    sealed = CHUNK + NONCE_AND_TAG
    one, two = data[start + sealed : start + 2 * sealed], data[start + 2 * sealed : start + 3 * sealed]
    data[start + sealed : start + 3 * sealed] = two + one
    info.path.write_bytes(bytes(data))
    with pytest.raises(SnapshotError, match="chunk 1 of .* failed authentication"):
        store.load(info)


def test_header_swapped_between_snapshots_is_refused(trained: AnnIndex, tmp_path: Path, cipher: TemplateCipher) -> None:
    a = _store(tmp_path / "a", cipher).write(trained, 5)
    b_store = _store(tmp_path / "b", cipher)
    b = b_store.write(trained, 5)
    head_a, head_b = _header_bytes(a.path), _header_bytes(b.path)
    assert head_a == head_b and a.size_bytes == b.size_bytes  # same layout: only the binding can tell them apart
    b.path.write_bytes(a.path.read_bytes()[:head_a] + b.path.read_bytes()[head_b:])
    with pytest.raises(SnapshotError, match="chunk 0 of .* failed authentication"):
        b_store.load(b)


def test_wrong_or_unknown_key_is_refused(trained: AnnIndex, tmp_path: Path, cipher: TemplateCipher) -> None:
    info = _store(tmp_path, cipher).write(trained, 1)
    same_id_other_bytes = _store(tmp_path, TemplateCipher({"k1": os.urandom(32)}, "k1"))
    with pytest.raises(SnapshotError, match="failed authentication"):
        same_id_other_bytes.load(info)
    other_id = _store(tmp_path, TemplateCipher({"k2": os.urandom(32)}, "k2"))
    assert other_id.newest() is None
    with pytest.raises(SnapshotError, match="'k1', which is not configured"):
        other_id.load(info)


def test_vanished_snapshot_is_a_snapshot_error(trained: AnnIndex, tmp_path: Path, cipher: TemplateCipher) -> None:
    store = _store(tmp_path, cipher)
    info = store.write(trained, 1)
    info.path.unlink()
    with pytest.raises(SnapshotError, match="is gone"):
        store.load(info)


# -- the directory -----------------------------------------------------------------------------------------------------


def test_older_snapshots_of_the_layout_are_deleted(tiny: AnnIndex, tmp_path: Path, cipher: TemplateCipher) -> None:
    store = _store(tmp_path, cipher)
    other_layout = _store(tmp_path, cipher, shard=1, shards=2).write(tiny, 1)
    stale = tmp_path / ".gallery-s0of1-v000000000001.snap.00ff.tmp"
    fresh = tmp_path / ".gallery-s0of1-v000000000009.snap.11ee.tmp"  # a replica still writing it
    stale.write_bytes(b"x")
    fresh.write_bytes(b"x")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    for version in (3, 1, 7):
        store.write(tiny, version)
    names = sorted(p.name for p in tmp_path.iterdir())
    # v1 was written after v3 and kept (a late writer never deletes newer ones); v7 deleted both.
    assert names == sorted([fresh.name, other_layout.path.name, "gallery-s0of1-v000000000007.snap"])


def test_newest_picks_the_highest_readable_snapshot_of_its_layout(tiny: AnnIndex, tmp_path: Path) -> None:
    k1, k2 = os.urandom(32), os.urandom(32)
    old_key = TemplateCipher({"k1": k1}, "k1")
    new_key = TemplateCipher({"k2": k2}, "k2")
    both = TemplateCipher({"k1": k1, "k2": k2}, "k2")
    _store(tmp_path, new_key).write(tiny, 9)  # newer, under a key old_key does not hold
    written = _store(tmp_path, old_key).write(tiny, 5)
    _store(tmp_path, old_key, shard=0, shards=2).write(tiny, 20)  # another layout
    (tmp_path / "gallery-s0of1-v000000000015.snap").write_bytes(b"not a snapshot at all")
    assert _store(tmp_path, old_key).newest() == written
    newest = _store(tmp_path, both).newest()
    assert newest is not None and (newest.version, newest.key_id) == (9, "k2")
    assert _store(tmp_path, both, shard=0, shards=2).newest().version == 20  # type: ignore[union-attr]
    assert _store(tmp_path, both, shard=1, shards=2).newest() is None
    assert _store(tmp_path / "missing", both).newest() is None


def test_files_are_private(tiny: AnnIndex, tmp_path: Path, cipher: TemplateCipher) -> None:
    info = _store(tmp_path / "new" / "snaps", cipher).write(tiny, 1)
    assert stat.S_IMODE(info.path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(info.path.stat().st_mode) == 0o600
    loose = tmp_path / "loose"
    loose.mkdir(mode=0o755)
    loose.chmod(0o755)
    _store(loose, cipher)
    assert stat.S_IMODE(loose.stat().st_mode) == 0o700


def test_replicas_writing_at_once(trained: AnnIndex, tmp_path: Path, cipher: TemplateCipher) -> None:
    errors: list[BaseException] = []

    def replica(versions: range) -> None:
        store = _store(tmp_path, cipher)  # each replica its own store on the shared directory
        try:
            for version in versions:
                store.write(trained, version)
        except BaseException as error:  # noqa: BLE001 - reported by the assertion below
            errors.append(error)

    threads = [threading.Thread(target=replica, args=(range(start, 12, 2),)) for start in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    store = _store(tmp_path, cipher)
    newest = store.newest()
    assert newest is not None and newest.version == 11
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    _same_results(trained, store.load(newest), seed=3)


def test_remove_all(tiny: AnnIndex, tmp_path: Path, cipher: TemplateCipher) -> None:
    store = _store(tmp_path, cipher)
    store.write(tiny, 1)
    _store(tmp_path, cipher, shard=1, shards=2).write(tiny, 1)
    (tmp_path / "unrelated.txt").write_text("kept")
    assert store.remove_all() == 2
    assert [p.name for p in tmp_path.iterdir()] == ["unrelated.txt"]
    assert store.newest() is None


def test_store_arguments_are_checked(tmp_path: Path, cipher: TemplateCipher) -> None:
    with pytest.raises(ValueError, match="shard"):
        SnapshotStore(tmp_path, cipher, shard=2, shards=2)
    with pytest.raises(ValueError, match="chunk_bytes"):
        SnapshotStore(tmp_path, cipher, chunk_bytes=100)


# -- the derived key ---------------------------------------------------------------------------------------------------


def test_derive_key_is_per_key_and_purpose(cipher: TemplateCipher) -> None:
    key = cipher.derive_key("k1", PURPOSE)
    assert len(key) == 32 and key == cipher.derive_key("k1", PURPOSE)
    assert key != cipher.derive_key("k1", PURPOSE + b"\x00other")
    assert key != TemplateCipher({"k1": os.urandom(32)}, "k1").derive_key("k1", PURPOSE)
    with pytest.raises(UnknownKeyError):
        cipher.derive_key("k9", PURPOSE)
    with pytest.raises(ValueError, match="purpose"):
        cipher.derive_key("k1", b"")
