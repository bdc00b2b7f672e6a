"""Encrypted snapshots of the ANN index, so a matching replica starts from a file instead of the whole gallery.

A replica that starts reads the newest snapshot of its shard and then the gallery's change log since the gallery
version the snapshot covers, instead of decrypting every template in the database (issue 13: 1M templates ready in
15 s on one core). A snapshot holds every template of its shard, so it is as sensitive as the gallery: it exists on
disk only encrypted, readable only by its owner (files 0600 in a 0700 directory), and each new snapshot of a shard
deletes the older ones.

File layout (integers little-endian)::

    MAGIC (8) | format version (u16) | meta length (u32) | meta (JSON) | plaintext length (u64) | chunk 0 | chunk 1 ...
    chunk: nonce (12) | AES-256-GCM ciphertext of up to chunk_bytes of the AnnIndex dump | tag (16)

- The meta says which template key sealed the file, a random 32-byte salt, the gallery version covered, the shard and
  shard count, when it was made (UTC) and the chunk size. Everything before the plaintext length is "the header".
- The file's key is HKDF of the template key (``TemplateCipher.derive_key``, purpose ``PURPOSE`` + the salt): one key
  per file, and a template key that is retired (no longer configured) retires its snapshots with it.
- Every chunk's associated data binds the header, the chunk's number and a last-chunk flag, and the last chunk's also
  the plaintext length. So a changed byte, a reordered, dropped or added chunk, a truncated file, a forged length or a
  header moved onto another snapshot's chunks fails authentication. The plaintext length is only known once the dump
  is written, so it is filled in afterwards: that is why it sits after the header, authenticated by the last chunk.
- Streaming: ``write`` encrypts while ``AnnIndex.dump`` writes (one chunk buffered; large arrays are sealed straight
  from the index's memory), and ``load`` decrypts while ``AnnIndex.load`` reads, whole chunks straight into the new
  index's arrays. Neither ever holds the whole plaintext, let alone it and the whole ciphertext (1 GB at 1M templates).
- A snapshot that fails any check raises ``SnapshotError`` and no index is returned: the caller loads the gallery
  whole instead.

Several replicas may share the directory: each writes a uniquely named temporary file, fsyncs it and renames it into
place atomically (``gallery-s<shard>of<shards>-v<version>.snap``), so a reader sees a whole snapshot or none; a
snapshot deleted while a replica reads it stays readable to that replica (POSIX).
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import re
import secrets
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO, cast

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from sightline.matching.ann import AnnIndex
from sightline.matching.templates import TemplateCipher

logger = logging.getLogger(__name__)

PURPOSE = b"sightline/gallery-snapshot/v1"
FORMAT_VERSION = 1
DEFAULT_CHUNK_BYTES = 8 << 20
MIN_CHUNK_BYTES = 4 << 10
MAX_CHUNK_BYTES = 64 << 20
_MAGIC = b"SLSNAPSH"
_FORMAT_NAME = "sightline-gallery-snapshot"
_PREFIX = struct.Struct("<8sHI")  # magic, format version, meta length
_LENGTH = struct.Struct("<Q")  # plaintext length
_MAX_META_BYTES = 4096
_SALT_BYTES = 32
_NONCE_BYTES = 12
_TAG_BYTES = 16
_AAD_PREFIX = b"sightline/gallery-snapshot/chunk/v1\x00"
_SNAPSHOT_NAME = re.compile(r"^gallery-s(\d+)of(\d+)-v(\d+)\.snap$")
_TEMP_NAME = re.compile(r"^\.gallery-s(\d+)of(\d+)-v(\d+)\.snap\.[0-9a-f]+\.tmp$")
_STALE_TEMP_S = 3600.0  # a temporary file this old is a crashed writer's, not one still being written


class SnapshotError(Exception):
    """A snapshot cannot be used (bad header, unknown key, truncated, failed authentication, unreadable dump): load
    the gallery whole instead. The message names the file and what is wrong with it, never any key material."""


@dataclass(frozen=True)
class SnapshotInfo:
    """One snapshot file, as its header describes it (``size_bytes``: the whole file)."""

    path: Path
    version: int
    shard: int
    shards: int
    key_id: str
    created_at: datetime
    size_bytes: int


@dataclass(frozen=True)
class _Header:
    bound: bytes  # the header bytes every chunk's associated data binds (everything before the plaintext length)
    key_id: str
    salt: bytes
    version: int
    shard: int
    shards: int
    created_at: datetime
    chunk_bytes: int
    plaintext_bytes: int

    @property
    def chunks(self) -> int:
        return max(1, math.ceil(self.plaintext_bytes / self.chunk_bytes))

    @property
    def file_bytes(self) -> int:
        return len(self.bound) + _LENGTH.size + self.plaintext_bytes + self.chunks * (_NONCE_BYTES + _TAG_BYTES)


class SnapshotStore:
    """The snapshots of one shard layout (``shard`` of ``shards``) in ``directory``, sealed with ``cipher``'s keys."""

    def __init__(
        self,
        directory: Path,
        cipher: TemplateCipher,
        shard: int = 0,
        shards: int = 1,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    ) -> None:
        if shards < 1 or not 0 <= shard < shards:
            raise ValueError(f"shard must be in 0..shards-1 with shards >= 1, got shard {shard} of {shards}")
        if not MIN_CHUNK_BYTES <= chunk_bytes <= MAX_CHUNK_BYTES:
            raise ValueError(f"chunk_bytes must be {MIN_CHUNK_BYTES}..{MAX_CHUNK_BYTES}, got {chunk_bytes}")
        self._dir = Path(directory)
        self._cipher = cipher
        self._shard = shard
        self._shards = shards
        self._chunk_bytes = chunk_bytes
        _private_directory(self._dir)

    @property
    def directory(self) -> Path:
        return self._dir

    def write(self, index: AnnIndex, version: int) -> SnapshotInfo:
        """Seals ``index`` (covering gallery ``version``) under the active template key into a new snapshot, then
        deletes this layout's older snapshots. The index's mutations wait while it is dumped; searches do not."""
        if version < 0:
            raise ValueError(f"gallery version must be >= 0, got {version}")
        started = time.perf_counter()
        key_id, salt, created = self._cipher.active_key_id, os.urandom(_SALT_BYTES), datetime.now(UTC)
        bound = _encode_header(key_id, salt, version, self._shard, self._shards, created, self._chunk_bytes)
        final = self._dir / _snapshot_name(self._shard, self._shards, version)
        temp = self._dir / f".{final.name}.{secrets.token_hex(8)}.tmp"  # unique: replicas may write at once
        try:
            size = self._seal_into(temp, index, bound, AESGCM(self._file_key(key_id, salt)))
            os.replace(temp, final)  # atomic: readers see the whole snapshot or none
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        _fsync_directory(self._dir)
        removed = self._remove_older(version)
        logger.info(
            "wrote gallery snapshot %s (%d bytes, key id %r) in %.2f s; removed %d older",
            final.name,
            size,
            key_id,
            time.perf_counter() - started,
            removed,
        )
        return SnapshotInfo(final, version, self._shard, self._shards, key_id, created, size)

    def newest(self) -> SnapshotInfo | None:
        """The highest-version snapshot of this shard layout with a sound header and a key this cipher holds."""
        for version, path in sorted(self._snapshots(), reverse=True):
            try:
                info = _info(path)
            except FileNotFoundError:
                continue  # deleted meanwhile by a replica that wrote a newer one
            except (SnapshotError, OSError) as error:
                logger.warning("ignoring gallery snapshot %s: %s", path.name, error)
                continue
            if (info.version, info.shard, info.shards) != (version, self._shard, self._shards):
                logger.warning("ignoring gallery snapshot %s: its header does not match its name", path.name)
            elif not self._cipher.has_key(info.key_id):
                logger.info(
                    "ignoring gallery snapshot %s: sealed with key id %r, not configured", path.name, info.key_id
                )
            else:
                return info
        return None

    def load(self, info: SnapshotInfo, **ann_kwargs: Any) -> AnnIndex:
        """The index sealed in the snapshot (``ann_kwargs`` go to ``AnnIndex.load``: ``verify_only``, ``settings``);
        ``SnapshotError`` if anything about it is wrong, and then no index at all."""
        started = time.perf_counter()
        try:
            with open(info.path, "rb") as file:
                index = self._open(file, info, ann_kwargs)
        except FileNotFoundError:
            raise SnapshotError(f"gallery snapshot {info.path.name} is gone (replaced by a newer one?)") from None
        except OSError as error:
            raise SnapshotError(f"gallery snapshot {info.path.name} cannot be read: {error}") from error
        logger.info(
            "loaded gallery snapshot %s (%d templates) in %.2f s",
            info.path.name,
            index.size,
            time.perf_counter() - started,
        )
        return index

    def remove_all(self) -> int:
        """Deletes every snapshot and temporary snapshot file in the directory, of every shard layout (erasure of
        everything, tests); returns how many files went."""
        removed = 0
        for path in self._entries():
            if _SNAPSHOT_NAME.match(path.name) or _TEMP_NAME.match(path.name):
                path.unlink(missing_ok=True)
                removed += 1
        if removed:
            _fsync_directory(self._dir)
        return removed

    # -- internals ---------------------------------------------------------------------------------------------

    def _open(self, file: BinaryIO, info: SnapshotInfo, ann_kwargs: dict[str, Any]) -> AnnIndex:
        name = info.path.name
        header = _read_header(file, name)
        if (header.version, header.shard, header.shards) != (info.version, info.shard, info.shards):
            raise SnapshotError(f"gallery snapshot {name}: its header does not match the snapshot asked for")
        _check_size(header, os.fstat(file.fileno()).st_size, name)
        if not self._cipher.has_key(header.key_id):
            raise SnapshotError(
                f"gallery snapshot {name} was sealed with template key id {header.key_id!r}, which is not configured "
                f"(configured: {', '.join(self._cipher.key_ids)})"
            )
        reader = _OpeningReader(file, AESGCM(self._file_key(header.key_id, header.salt)), header, name)
        try:
            index = AnnIndex.load(cast(BinaryIO, reader), **ann_kwargs)
        except SnapshotError:
            raise
        except (ValueError, KeyError, TypeError, RuntimeError) as error:  # RuntimeError: faiss
            raise SnapshotError(f"gallery snapshot {name} holds an index this version cannot read: {error}") from error
        if not reader.at_end:
            raise SnapshotError(f"gallery snapshot {name} holds more data than its index dump")
        return index

    def _seal_into(self, path: Path, index: AnnIndex, bound: bytes, aead: AESGCM) -> int:
        """Writes the sealed snapshot to the new file ``path`` (mode 0600), durably; returns its size."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as file:
            file.write(bound + _LENGTH.pack(0))  # the length is known only once the dump is written
            writer = _SealingWriter(file, aead, bound, self._chunk_bytes)
            index.dump(cast(BinaryIO, writer))
            plaintext = writer.finish()
            file.seek(len(bound))
            file.write(_LENGTH.pack(plaintext))
            file.flush()
            os.fsync(file.fileno())
        return len(bound) + _LENGTH.size + writer.sealed_bytes

    def _file_key(self, key_id: str, salt: bytes) -> bytes:
        return self._cipher.derive_key(key_id, PURPOSE + b"\x00" + salt)

    def _entries(self) -> Iterator[Path]:
        try:
            yield from self._dir.iterdir()
        except FileNotFoundError:
            return

    def _snapshots(self) -> Iterator[tuple[int, Path]]:
        """(version, path) of this layout's snapshot files, by name."""
        for path in self._entries():
            match = _SNAPSHOT_NAME.match(path.name)
            if match and (int(match[1]), int(match[2])) == (self._shard, self._shards):
                yield int(match[3]), path

    def _remove_older(self, version: int) -> int:
        """Deletes this layout's snapshots older than ``version`` and its temporary files left by crashed writers."""
        removed = 0
        stale_before = time.time() - _STALE_TEMP_S
        for path in self._entries():
            snapshot, temp = _SNAPSHOT_NAME.match(path.name), _TEMP_NAME.match(path.name)
            match = snapshot or temp
            if not match or (int(match[1]), int(match[2])) != (self._shard, self._shards):
                continue
            try:
                if (snapshot and int(match[3]) < version) or (temp and path.stat().st_mtime < stale_before):
                    path.unlink()
                    removed += 1
            except FileNotFoundError:
                pass  # another replica removed it first
        if removed:
            _fsync_directory(self._dir)
        return removed


# -- streaming encryption ----------------------------------------------------------------------------------------------


class _SealingWriter(io.RawIOBase):
    """A write-only stream that seals what is written to it into chunks on ``file``. A full chunk is sealed only once
    more data follows it (until then it might be the last one); ``finish`` seals the last."""

    def __init__(self, file: BinaryIO, aead: AESGCM, bound: bytes, chunk_bytes: int) -> None:
        super().__init__()
        self._file, self._aead, self._bound, self._chunk = file, aead, bound, chunk_bytes
        self._pending = bytearray(chunk_bytes)
        self._filled = 0
        self._sealed = bytearray(chunk_bytes + _TAG_BYTES)
        self._number = 0
        self.plaintext_bytes = 0
        self.sealed_bytes = 0

    def writable(self) -> bool:
        return True

    def write(self, data: bytes | bytearray | memoryview) -> int:  # type: ignore[override]
        view = memoryview(data).cast("B")
        size = len(view)
        while len(view):
            if self._filled == self._chunk:  # more data: the pending chunk is not the last
                self._seal(memoryview(self._pending), last=False)
                self._filled = 0
            if not self._filled and len(view) > self._chunk:  # seal straight from the caller's memory: no copy
                self._seal(view[: self._chunk], last=False)
                view = view[self._chunk :]
                continue
            take = min(self._chunk - self._filled, len(view))
            self._pending[self._filled : self._filled + take] = view[:take]
            self._filled += take
            view = view[take:]
        self.plaintext_bytes += size
        return size

    def finish(self) -> int:
        """Seals the last chunk; returns the plaintext length."""
        self._seal(memoryview(self._pending)[: self._filled], last=True)
        self._filled = 0
        return self.plaintext_bytes

    def _seal(self, plaintext: memoryview, last: bool) -> None:
        nonce = os.urandom(_NONCE_BYTES)
        out = memoryview(self._sealed)[: len(plaintext) + _TAG_BYTES]
        total = self.plaintext_bytes if last else 0  # only finish() seals the last chunk, after every write
        self._aead.encrypt_into(nonce, plaintext, _chunk_aad(self._bound, self._number, last, total), out)
        self._file.write(nonce)
        self._file.write(out)
        self._number += 1
        self.sealed_bytes += _NONCE_BYTES + len(out)


class _OpeningReader(io.RawIOBase):
    """A read-only stream of the plaintext of ``file``'s chunks, each authenticated before it is handed on."""

    def __init__(self, file: BinaryIO, aead: AESGCM, header: _Header, name: str) -> None:
        super().__init__()
        self._file, self._aead, self._header, self._name = file, aead, header, name
        self._plain = bytearray(header.chunk_bytes)
        self._sealed = bytearray(_NONCE_BYTES + header.chunk_bytes + _TAG_BYTES)
        self._start = self._end = 0  # the unread part of _plain
        self._number = 0

    def readable(self) -> bool:
        return True

    @property
    def at_end(self) -> bool:
        """Every chunk was read and authenticated, and all its plaintext handed on."""
        return self._number == self._header.chunks and self._start == self._end

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        """Fills ``buffer`` whole unless the plaintext ends first (``AnnIndex.load`` asks for whole arrays)."""
        view = memoryview(buffer).cast("B")
        done = 0
        while done < len(view):
            if self._start < self._end:
                take = min(self._end - self._start, len(view) - done)
                view[done : done + take] = memoryview(self._plain)[self._start : self._start + take]
                self._start += take
                done += take
            elif self._number == self._header.chunks:
                break
            elif len(view) - done >= (size := self._next_size()):  # a whole chunk fits: open it in place
                self._open_next(view[done : done + size])
                done += size
            else:
                self._open_next(memoryview(self._plain)[:size])
                self._start, self._end = 0, size
        return done

    def _next_size(self) -> int:
        header = self._header
        return min(header.chunk_bytes, header.plaintext_bytes - self._number * header.chunk_bytes)

    def _open_next(self, out: memoryview) -> None:
        """Reads, authenticates and decrypts the next chunk into ``out`` (its plaintext size). Should it fail, ``out``
        may hold unauthenticated bytes: it is the index being loaded, which is then dropped."""
        header, number = self._header, self._number
        last = number == header.chunks - 1
        sealed = memoryview(self._sealed)[: _NONCE_BYTES + len(out) + _TAG_BYTES]
        if _read_fully(self._file, sealed) != len(sealed):
            raise SnapshotError(f"gallery snapshot {self._name} is truncated (in chunk {number} of {header.chunks})")
        aad = _chunk_aad(header.bound, number, last, header.plaintext_bytes if last else 0)
        try:
            self._aead.decrypt_into(sealed[:_NONCE_BYTES], sealed[_NONCE_BYTES:], aad, out)
        except InvalidTag:
            raise SnapshotError(
                f"gallery snapshot {self._name}: chunk {number} of {header.chunks} failed authentication (the file "
                "was altered or truncated, mixes parts of different snapshots, or its key id names different key "
                "bytes than it was sealed with)"
            ) from None
        self._number += 1


def _chunk_aad(bound: bytes, number: int, last: bool, plaintext_bytes: int) -> bytes:
    aad = _AAD_PREFIX + bound + struct.pack("<QB", number, last)
    return aad + _LENGTH.pack(plaintext_bytes) if last else aad


def _read_fully(file: BinaryIO, view: memoryview) -> int:
    done = 0
    while done < len(view):
        got = file.readinto(view[done:])  # type: ignore[attr-defined]
        if not got:
            break
        done += got
    return done


# -- the header --------------------------------------------------------------------------------------------------------


def _encode_header(
    key_id: str, salt: bytes, version: int, shard: int, shards: int, created: datetime, chunk_bytes: int
) -> bytes:
    meta = {
        "format": _FORMAT_NAME,
        "key_id": key_id,
        "salt": salt.hex(),
        "gallery_version": version,
        "shard": shard,
        "shards": shards,
        "created_at": created.isoformat(timespec="microseconds"),
        "chunk_bytes": chunk_bytes,
    }
    encoded = json.dumps(meta, separators=(",", ":")).encode("utf-8")
    return _PREFIX.pack(_MAGIC, FORMAT_VERSION, len(encoded)) + encoded


def _read_header(file: BinaryIO, name: str) -> _Header:
    prefix = file.read(_PREFIX.size)
    if len(prefix) != _PREFIX.size or prefix[:8] != _MAGIC:
        raise SnapshotError(f"{name} is not a Sightline gallery snapshot")
    _, version, meta_bytes = _PREFIX.unpack(prefix)
    if version != FORMAT_VERSION:
        raise SnapshotError(
            f"gallery snapshot {name} has format version {version}, this version reads {FORMAT_VERSION}"
        )
    if meta_bytes > _MAX_META_BYTES:
        raise SnapshotError(f"gallery snapshot {name} has a bad header ({meta_bytes} bytes of meta)")
    encoded = file.read(meta_bytes)
    length = file.read(_LENGTH.size)
    if len(encoded) != meta_bytes or len(length) != _LENGTH.size:
        raise SnapshotError(f"gallery snapshot {name} is truncated (in its header)")
    try:
        meta = json.loads(encoded)
        header = _Header(
            bound=prefix + encoded,
            key_id=_field(meta, "key_id", str),
            salt=bytes.fromhex(_field(meta, "salt", str)),
            version=_field(meta, "gallery_version", int),
            shard=_field(meta, "shard", int),
            shards=_field(meta, "shards", int),
            created_at=datetime.fromisoformat(_field(meta, "created_at", str)),
            chunk_bytes=_field(meta, "chunk_bytes", int),
            plaintext_bytes=_LENGTH.unpack(length)[0],
        )
    except (ValueError, TypeError, KeyError) as error:
        raise SnapshotError(f"gallery snapshot {name} has a bad header: {error}") from None
    if (
        meta.get("format") != _FORMAT_NAME
        or len(header.salt) != _SALT_BYTES
        or header.version < 0
        or not 0 <= header.shard < header.shards
        or not MIN_CHUNK_BYTES <= header.chunk_bytes <= MAX_CHUNK_BYTES
        or header.created_at.utcoffset() is None
    ):
        raise SnapshotError(f"gallery snapshot {name} has a bad header")
    return header


def _field(meta: Any, key: str, kind: type) -> Any:
    value = meta[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise TypeError(f"{key} is not {kind.__name__}")
    return value


def _check_size(header: _Header, size: int, name: str) -> None:
    if size < header.file_bytes:
        raise SnapshotError(f"gallery snapshot {name} is truncated ({size} of {header.file_bytes} bytes)")
    if size > header.file_bytes:
        raise SnapshotError(f"gallery snapshot {name} has {size - header.file_bytes} bytes after its last chunk")


def _info(path: Path) -> SnapshotInfo:
    with open(path, "rb") as file:
        header = _read_header(file, path.name)
        size = os.fstat(file.fileno()).st_size
    _check_size(header, size, path.name)
    return SnapshotInfo(path, header.version, header.shard, header.shards, header.key_id, header.created_at, size)


# -- files -------------------------------------------------------------------------------------------------------------


def _snapshot_name(shard: int, shards: int, version: int) -> str:
    return f"gallery-s{shard}of{shards}-v{version:012d}.snap"


def _private_directory(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    if path.stat().st_mode & 0o077:
        try:
            path.chmod(0o700)
            logger.warning("snapshot directory %s was open to others; restricted it to its owner", path)
        except PermissionError:  # e.g. a volume's mount point owned by root: the files themselves are 0600
            logger.warning("snapshot directory %s is open to others and cannot be restricted", path)


def _fsync_directory(path: Path) -> None:
    """Makes a rename or unlink in ``path`` durable (a crash right after must not bring the old names back)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
