"""Unit tests for template encryption (round trip, subject binding, tamper detection, key parsing) and the
in-memory search index (exactness against brute force, one candidate per subject, watchlists, removal, verify)."""

from __future__ import annotations

import base64
import os
import threading
from itertools import pairwise

import numpy as np
import pytest

from sightline.matching.index import Candidate, SearchIndex
from sightline.matching.templates import (
    TemplateCipher,
    TemplateDecryptionError,
    TemplateKeyError,
    UnknownKeyError,
    generate_key,
    parse_key_list,
)

DIM = 128


def _vector(rng: np.random.Generator) -> np.ndarray:
    return rng.standard_normal(DIM).astype(np.float32)


@pytest.fixture()
def cipher() -> TemplateCipher:
    return TemplateCipher({"k1": os.urandom(32)}, "k1")


# -- cipher ------------------------------------------------------------------------------------------------------


def test_cipher_round_trip(cipher: TemplateCipher) -> None:
    vector = _vector(np.random.default_rng(1))
    key_id, blob = cipher.encrypt(vector, "alice")
    assert key_id == "k1"
    restored = cipher.decrypt(key_id, blob, "alice")
    assert restored.dtype == np.float32 and restored.shape == (DIM,)
    assert np.array_equal(restored, vector)
    assert vector.tobytes() not in blob


def test_cipher_uses_fresh_nonce_each_time(cipher: TemplateCipher) -> None:
    vector = _vector(np.random.default_rng(2))
    _, first = cipher.encrypt(vector, "alice")
    _, second = cipher.encrypt(vector, "alice")
    assert first != second


def test_blob_bound_to_subject(cipher: TemplateCipher) -> None:
    key_id, blob = cipher.encrypt(_vector(np.random.default_rng(3)), "alice")
    with pytest.raises(TemplateDecryptionError, match="another subject"):
        cipher.decrypt(key_id, blob, "mallory")


@pytest.mark.parametrize("position", [0, 1, 5, 20, -1])
def test_tampered_blob_rejected(cipher: TemplateCipher, position: int) -> None:
    key_id, blob = cipher.encrypt(_vector(np.random.default_rng(4)), "alice")
    tampered = bytearray(blob)
    tampered[position] ^= 0x01
    with pytest.raises(TemplateDecryptionError):
        cipher.decrypt(key_id, bytes(tampered), "alice")


def test_truncated_blob_rejected(cipher: TemplateCipher) -> None:
    key_id, blob = cipher.encrypt(_vector(np.random.default_rng(5)), "alice")
    with pytest.raises(TemplateDecryptionError):
        cipher.decrypt(key_id, blob[:20], "alice")


def test_unknown_key_id_is_a_key_error_naming_the_id(cipher: TemplateCipher) -> None:
    _, blob = cipher.encrypt(_vector(np.random.default_rng(6)), "alice")
    with pytest.raises(KeyError) as caught:
        cipher.decrypt("k-old", blob, "alice")
    assert isinstance(caught.value, UnknownKeyError)
    assert "k-old" in str(caught.value)


def test_different_key_bytes_under_same_id_rejected(cipher: TemplateCipher) -> None:
    key_id, blob = cipher.encrypt(_vector(np.random.default_rng(7)), "alice")
    other = TemplateCipher({"k1": os.urandom(32)}, "k1")
    with pytest.raises(TemplateDecryptionError):
        other.decrypt(key_id, blob, "alice")


def test_old_keys_still_decrypt_after_rotation() -> None:
    old_key, new_key = generate_key(), generate_key()
    old = TemplateCipher.from_base64(old_key, "k0")
    key_id, blob = old.encrypt(_vector(np.random.default_rng(8)), "alice")
    rotated = TemplateCipher.from_base64(new_key, "k1", old_keys=f"k0:{old_key}")
    assert rotated.active_key_id == "k1" and set(rotated.key_ids) == {"k0", "k1"}
    assert np.array_equal(rotated.decrypt(key_id, blob, "alice"), old.decrypt(key_id, blob, "alice"))
    assert rotated.encrypt(_vector(np.random.default_rng(9)), "bob")[0] == "k1"


def test_wrong_key_length_says_32_bytes_without_leaking_the_key() -> None:
    short = base64.b64encode(b"0123456789abcdef").decode()
    with pytest.raises(TemplateKeyError, match="32 bytes") as caught:
        TemplateCipher.from_base64(short, "k1")
    assert short not in str(caught.value)
    with pytest.raises(TemplateKeyError, match="32 bytes"):
        TemplateCipher({"k1": b"x" * 16}, "k1")


def test_bad_base64_reported_without_the_key() -> None:
    with pytest.raises(TemplateKeyError, match="not valid base64") as caught:
        TemplateCipher.from_base64("not base64 !!secret", "k1")
    assert "secret" not in str(caught.value)


def test_parse_key_list() -> None:
    k0, k1 = generate_key(), generate_key()
    keys = parse_key_list(f"k0:{k0}, k1:{k1}")
    assert keys == {"k0": base64.b64decode(k0), "k1": base64.b64decode(k1)}
    assert parse_key_list("") == {}
    with pytest.raises(TemplateKeyError, match="KEY_ID:BASE64") as caught:
        parse_key_list(k0)
    assert k0 not in str(caught.value)
    with pytest.raises(TemplateKeyError, match="twice"):
        parse_key_list(f"k0:{k0},k0:{k1}")


def test_active_key_must_be_configured() -> None:
    with pytest.raises(TemplateKeyError, match="active key id"):
        TemplateCipher({"k1": os.urandom(32)}, "k2")


def test_repr_holds_no_key_material() -> None:
    key = os.urandom(32)
    text = repr(TemplateCipher({"k1": key}, "k1"))
    assert "k1" in text and key.hex() not in text and base64.b64encode(key).decode() not in text


def test_encrypt_rejects_bad_vectors(cipher: TemplateCipher) -> None:
    with pytest.raises(ValueError, match="shape"):
        cipher.encrypt(np.zeros(64, np.float32), "alice")
    bad = np.zeros(DIM, np.float32)
    bad[3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        cipher.encrypt(bad, "alice")


# -- index -------------------------------------------------------------------------------------------------------


def _random_gallery(
    rng: np.random.Generator, subjects: int, per_subject_max: int = 4
) -> tuple[SearchIndex, list[tuple[int, str, np.ndarray]], dict[str, tuple[str, ...]]]:
    index, rows, watchlists = SearchIndex(), [], {}
    template_id = 0
    names = ("red", "green", "blue")
    for s in range(subjects):
        subject_id = f"s{s:04d}"
        watchlists[subject_id] = tuple(sorted({names[s % 3], names[s % 2]})) if s % 5 else ()
        for _ in range(int(rng.integers(1, per_subject_max + 1))):
            template_id += 1
            vector = _vector(rng)
            rows.append((template_id, subject_id, vector))
            assert index.add(template_id, subject_id, vector, watchlists[subject_id])
    return index, rows, watchlists


def _brute_force(
    rows: list[tuple[int, str, np.ndarray]],
    probe: np.ndarray,
    top_k: int,
    allowed: set[str] | None = None,
) -> list[tuple[str, float, int]]:
    best: dict[str, tuple[float, int]] = {}
    for template_id, subject_id, vector in rows:
        if allowed is not None and subject_id not in allowed:
            continue
        distance = float(np.linalg.norm(probe.astype(np.float64) - vector.astype(np.float64)))
        if subject_id not in best or distance < best[subject_id][0]:
            best[subject_id] = (distance, template_id)
    ranked = sorted(best.items(), key=lambda item: item[1][0])[:top_k]
    return [(subject_id, distance, template_id) for subject_id, (distance, template_id) in ranked]


def _assert_matches(found: list[Candidate], expected: list[tuple[str, float, int]]) -> None:
    assert [c.subject_id for c in found] == [e[0] for e in expected]
    assert [c.template_id for c in found] == [e[2] for e in expected]
    np.testing.assert_allclose([c.distance for c in found], [e[1] for e in expected], rtol=1e-5)


def test_search_matches_brute_force() -> None:
    rng = np.random.default_rng(10)
    index, rows, _ = _random_gallery(rng, subjects=300)
    probes = np.stack([_vector(rng) for _ in range(5)] + [rows[17][2] + 0.01 * _vector(rng)])
    results = index.search(probes, top_k=7)
    assert len(results) == len(probes)
    for probe, found in zip(probes, results, strict=True):
        _assert_matches(found, _brute_force(rows, probe, 7))
    assert results[-1][0].subject_id == rows[17][1]


def test_single_probe_returns_one_list_and_one_candidate_per_subject() -> None:
    rng = np.random.default_rng(11)
    index = SearchIndex()
    base = _vector(rng)
    # Every template of "near" is closer than anyone else: it must still appear once.
    for template_id in range(1, 6):
        index.add(template_id, "near", base + 0.001 * template_id, ("w",))
    index.add(10, "far", base + 5.0, ("w",))
    index.add(11, "farther", base + 9.0)
    [found] = index.search(base, top_k=3)
    assert [c.subject_id for c in found] == ["near", "far", "farther"]
    assert found[0].template_id == 1
    assert found[0].watchlists == ("w",) and found[2].watchlists == ()
    assert all(a.distance <= b.distance for a, b in pairwise(found))


def test_subject_with_many_templates_counts_once() -> None:
    rng = np.random.default_rng(20)
    index, rows, _ = _random_gallery(rng, subjects=100, per_subject_max=2)
    probe = _vector(rng)
    # 60 templates of one subject are nearer than anyone else's; the next subjects must still be found.
    for i in range(60):
        vector = probe + 0.01 * _vector(rng)
        index.add(5000 + i, "crowd", vector)
        rows.append((5000 + i, "crowd", vector))
    [found] = index.search(probe, top_k=4)
    assert found[0].subject_id == "crowd"
    _assert_matches(found, _brute_force(rows, probe, 4))
    index.remove_subject("crowd")
    _assert_matches(index.search(probe, top_k=4)[0], _brute_force([r for r in rows if r[1] != "crowd"], probe, 4))


def test_top_k_larger_than_gallery() -> None:
    rng = np.random.default_rng(12)
    index, rows, _ = _random_gallery(rng, subjects=4)
    [found] = index.search(_vector(rng), top_k=50)
    assert sorted(c.subject_id for c in found) == sorted({r[1] for r in rows})


def test_watchlist_filter() -> None:
    rng = np.random.default_rng(13)
    index, rows, watchlists = _random_gallery(rng, subjects=200)
    probe = _vector(rng)
    for wanted in (("red",), ("green", "blue"), ("nobody",)):
        allowed = {s for s, names in watchlists.items() if set(names) & set(wanted)}
        [found] = index.search(probe, top_k=6, watchlists=wanted)
        _assert_matches(found, _brute_force(rows, probe, 6, allowed))
        assert all(set(c.watchlists) & set(wanted) for c in found)
    assert index.search(probe, watchlists=("nobody",)) == [[]]


def test_remove_subject() -> None:
    rng = np.random.default_rng(14)
    index, rows, _ = _random_gallery(rng, subjects=50)
    victim = rows[0][1]
    victim_rows = [r for r in rows if r[1] == victim]
    assert index.remove_subject(victim) == len(victim_rows)
    assert index.remove_subject(victim) == 0
    assert index.size == len(rows) - len(victim_rows)
    assert index.subject_count == 49
    assert index.verify(victim_rows[0][2], victim) is None
    [found] = index.search(victim_rows[0][2], top_k=100)
    assert victim not in {c.subject_id for c in found}
    remaining = [r for r in rows if r[1] != victim]
    _assert_matches(found, _brute_force(remaining, victim_rows[0][2], 100))
    # Re-adding after removal works, and the removed template id may come back (e.g. a replayed event).
    assert index.add(victim_rows[0][0], victim, victim_rows[0][2])
    assert index.verify(victim_rows[0][2], victim) == pytest.approx(0.0, abs=1e-6)


def test_verify() -> None:
    rng = np.random.default_rng(15)
    index, rows, _ = _random_gallery(rng, subjects=20)
    probe = _vector(rng)
    for subject_id in {r[1] for r in rows}:
        expected = min(float(np.linalg.norm(probe - r[2])) for r in rows if r[1] == subject_id)
        assert index.verify(probe, subject_id) == pytest.approx(expected, rel=1e-5)
    assert index.verify(probe, "stranger") is None


def test_add_is_idempotent_per_template_id_and_unions_watchlists() -> None:
    rng = np.random.default_rng(16)
    index = SearchIndex()
    vector = _vector(rng)
    assert index.add(1, "a", vector, ("x",))
    assert not index.add(1, "a", vector, ("x",))
    assert index.add(2, "a", vector + 1, ("y",))
    assert index.size == 2 and index.subject_count == 1
    [[candidate]] = index.search(vector)
    assert candidate.watchlists == ("x", "y")
    index.replace_watchlists({"a": ["z"]})
    assert index.search(vector)[0][0].watchlists == ("z",)


def test_replace_watchlists_sets_every_subjects_lists_at_once() -> None:
    rng = np.random.default_rng(18)
    index = SearchIndex()
    vectors = {name: _vector(rng) for name in ("a", "b", "c")}
    for template_id, (name, vector) in enumerate(vectors.items()):
        index.add(template_id, name, vector, ("old",))
    assert [c.subject_id for c in index.search(vectors["a"], top_k=3, watchlists=["old"])[0]] != []
    index.replace_watchlists({"a": ["stop", "vip"], "b": ["vip"], "nobody-indexed": ["vip"]})  # c: on no list now
    assert index.search(vectors["c"], top_k=3, watchlists=["old"]) == [[]]
    assert sorted(c.subject_id for c in index.search(vectors["a"], top_k=3, watchlists=["vip"])[0]) == ["a", "b"]
    assert {c.subject_id: c.watchlists for c in index.search(vectors["c"], top_k=3)[0]} == {
        "a": ("stop", "vip"),
        "b": ("vip",),
        "c": (),
    }
    index.add(10, "d", _vector(rng), ("new",))  # later additions still work on the replaced lists
    assert [c.subject_id for c in index.search(vectors["a"], top_k=3, watchlists=["new"])[0]] == ["d"]


def test_replace_all() -> None:
    rng = np.random.default_rng(17)
    index, _, _ = _random_gallery(rng, subjects=10)

    class Record:
        def __init__(self, template_id: int, subject_id: str, vector: np.ndarray) -> None:
            self.template_id, self.subject_id, self.vector, self.watchlists = template_id, subject_id, vector, ("w",)

    records = [Record(100 + i, f"n{i % 3}", _vector(rng)) for i in range(9)]
    index.replace_all(records)
    assert index.size == 9 and index.subject_count == 3
    [found] = index.search(records[4].vector, top_k=1)
    assert found[0].subject_id == "n1" and found[0].template_id == 104
    index.replace_all([])
    assert index.size == 0 and index.search(records[0].vector) == [[]]


def test_rejects_bad_input() -> None:
    index = SearchIndex()
    with pytest.raises(ValueError):
        index.add(1, "a", np.zeros(64, np.float32))
    with pytest.raises(ValueError):
        index.search(np.zeros((2, 3, DIM), np.float32))
    with pytest.raises(ValueError):
        index.search(np.zeros(DIM, np.float32), top_k=0)


def test_concurrent_search_and_enrolment() -> None:
    rng = np.random.default_rng(18)
    index, rows, _ = _random_gallery(rng, subjects=200)
    probe = rows[0][2]
    errors: list[BaseException] = []
    stop = threading.Event()

    def searcher() -> None:
        try:
            while not stop.is_set():
                [found] = index.search(probe, top_k=3)
                assert found[0].subject_id == rows[0][1]
                assert len({c.subject_id for c in found}) == len(found)
        except BaseException as error:  # noqa: BLE001 - reported by the main thread
            errors.append(error)

    threads = [threading.Thread(target=searcher) for _ in range(3)]
    for thread in threads:
        thread.start()
    local = np.random.default_rng(19)
    for i in range(300):
        index.add(10_000 + i, f"new{i % 40}", _vector(local) + 10.0, ("late",))
        if i % 50 == 49:
            index.remove_subject(f"new{i % 40}")
    stop.set()
    for thread in threads:
        thread.join()
    assert not errors, errors
