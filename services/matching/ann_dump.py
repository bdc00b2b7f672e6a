"""The dump format of ``ann.AnnIndex``: its whole state (vectors, bookkeeping, watchlists, the IVF) as one stream, for
snapshots; encryption is the caller's.

A dump is ``SLANN001``, a little-endian u64 header length, the JSON header (settings, counts, watchlist sets, and the
name, dtype and shape of each array in order), then the arrays' raw bytes in that order: the used slots' arrays, the
subjects' arrays, the subject ids (one UTF-8 string and the character offset where each id ends), the serialized IVF.
Reading puts the slot and subject arrays straight into the new state's arrays (no second copy) and rebuilds the
bookkeeping that is not written (free slots and codes, counts, the template-id lookup).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from typing import Any, BinaryIO

import numpy as np

from sightline.matching.ann_ivf import Ivf
from sightline.matching.ann_state import INITIAL_SLOTS, State

_MAGIC = b"SLANN001"
_FORMAT_VERSION = 1

_SLOT_ARRAYS = ("vectors", "sq", "tid", "code", "next")
_CODE_ARRAYS = ("head", "count", "searchable", "wlset")


def write_state(state: State, settings: Mapping[str, Any], stream: BinaryIO) -> int:
    """Writes the state and the settings it was made with (as a dict) to the stream; returns the bytes written."""
    codes = len(state.subject_of)
    ids = [s or "" for s in state.subject_of]
    joined = "".join(ids).encode("utf-8")
    ends = np.cumsum([len(s) for s in ids], dtype=np.int64) if ids else np.zeros(0, dtype=np.int64)
    arrays: list[tuple[str, np.ndarray]] = [(name, getattr(state, name)[: state.used]) for name in _SLOT_ARRAYS]
    arrays += [(name, getattr(state, name)[:codes]) for name in _CODE_ARRAYS]
    arrays += [("subject_ends", ends), ("subject_text", np.frombuffer(joined, dtype=np.uint8))]
    if state.ivf is not None:
        arrays.append(("ivf", state.ivf.to_bytes()))
    header = {
        "format": "sightline-ann",
        "version": _FORMAT_VERSION,
        "dim": state.dim,
        "settings": dict(settings),
        "used": state.used,
        "trained_on": state.trained_on,
        "probes": state.probes,
        "wl_sets": [list(s) for s in state.wl_sets],
        "arrays": [{"name": n, "dtype": a.dtype.str, "shape": list(a.shape)} for n, a in arrays],
    }
    encoded = json.dumps(header).encode("utf-8")
    stream.write(_MAGIC + struct.pack("<Q", len(encoded)) + encoded)
    written = len(_MAGIC) + 8 + len(encoded)
    for _, array in arrays:
        data = _bytes_of(np.ascontiguousarray(array))
        stream.write(data)
        written += len(data)
    return written


def read_state(stream: BinaryIO) -> tuple[State, dict[str, Any]]:
    """The state of a dump and the settings (as a dict) it was written with."""
    if _read_exact(stream, len(_MAGIC)) != _MAGIC:
        raise ValueError("not a Sightline ANN index dump")
    (length,) = struct.unpack("<Q", _read_exact(stream, 8))
    header = json.loads(_read_exact(stream, length))
    if header.get("version") != _FORMAT_VERSION:
        raise ValueError(f"ANN index dump version {header.get('version')} is not {_FORMAT_VERSION}")
    specs = {spec["name"]: spec for spec in header["arrays"]}
    used, codes = int(header["used"]), int(specs["head"]["shape"][0])
    state = State(int(header["dim"]), max(INITIAL_SLOTS, used + used // 4), max(INITIAL_SLOTS, codes))
    arrays: dict[str, np.ndarray] = {}
    for spec in header["arrays"]:
        name, dtype = spec["name"], np.dtype(spec["dtype"])
        if name in _SLOT_ARRAYS or name in _CODE_ARRAYS:  # straight into the state's arrays: no second copy
            array = getattr(state, name)[: spec["shape"][0]]
            if array.dtype != dtype or list(array.shape) != spec["shape"]:
                raise ValueError(f"ANN index dump: array {name} has an unexpected type or shape")
        else:
            array = np.empty(spec["shape"], dtype=dtype)
        _read_into(stream, _bytes_of(array))
        arrays[name] = array
    state.used = used
    text, ends = arrays["subject_text"].tobytes().decode("utf-8"), arrays["subject_ends"].tolist()
    counts = state.count[:codes].tolist()
    starts = [0, *ends[:-1]] if ends else []
    state.subject_of = [text[a:b] if n else None for a, b, n in zip(starts, ends, counts, strict=True)]
    state.code_of = {s: c for c, s in enumerate(state.subject_of) if s is not None}
    state.free_codes = [c for c, n in enumerate(counts) if not n]
    state.free_slots = np.flatnonzero(state.tid[:used] < 0).tolist()
    state.wl_sets = [tuple(s) for s in header["wl_sets"]]
    state.wl_set_id = {s: i for i, s in enumerate(state.wl_sets)}
    state.templates = used - len(state.free_slots)
    live = state.code[:used][state.code[:used] >= 0]
    state.searchable_templates = int(np.count_nonzero(state.searchable[live]))
    state.max_per_subject = int(state.count.max(initial=0))
    state.tids.rebuild(state.tid)
    if "ivf" in arrays:
        state.ivf = Ivf.from_bytes(arrays["ivf"])
        state.trained_on, state.probes = int(header["trained_on"]), int(header["probes"])
    return state, dict(header["settings"])


def _bytes_of(array: np.ndarray) -> memoryview:
    """A byte view of a contiguous array, empty ones included (``memoryview.cast`` refuses a zero in the shape)."""
    return memoryview(array.reshape(-1).view(np.uint8))


def _read_into(stream: BinaryIO, view: memoryview) -> None:
    """Fills ``view`` from the stream (which may return less than asked per call, like a decrypting reader)."""
    done = 0
    while done < len(view):
        got = stream.readinto(view[done:])  # type: ignore[attr-defined]
        if not got:
            raise ValueError("ANN index dump is truncated")
        done += got


def _read_exact(stream: BinaryIO, size: int) -> bytes:
    data = stream.read(size)
    if len(data) != size:
        raise ValueError("ANN index dump is truncated")
    return data
