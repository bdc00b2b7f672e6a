"""The audit keyring: the HMAC-SHA256 keys that authenticate audit records and checkpoints, held outside the database.

A SHA-256 chain alone proves nothing against someone who can write the database: they can edit a record and
recompute every hash after it. So each record (and each checkpoint published to the audit topic) also carries an
HMAC-SHA256 under a key the database never holds, and the id of that key. Keys come from a secret:

- ``SIGHTLINE_AUDIT_KEYS``: the keyring itself, ``id:BASE64`` entries (32-byte keys) separated by commas, spaces or
  newlines (the Helm chart sets it from a Secret, as it sets the template key), or
- ``SIGHTLINE_AUDIT_KEYS_FILE``: a file of such entries, one a line (``#`` starts a comment).
- ``SIGHTLINE_AUDIT_KEY_ID`` names the active key, the one new records are signed with (default: the last entry).

Rotation: add a new entry and make it active; records keep the id they were signed with, so older records verify
with their own key as long as it stays in the keyring. A record whose key id is not in the keyring fails
verification, naming the id.

With neither variable set, a writer refuses to open a PostgreSQL audit log (a shared, production database: every
replica and the auditor need the same key, which only a secret can give them). A SQLite audit log is a local run's
(the local stack, a laptop): its keyring is ``audit.keys`` in the database's folder, the stack's state dir, made with
one random key on first use (mode 0600) and logged as such, as the local stack makes its template key. Such a key
protects nothing against someone who can read that folder; ``SIGHTLINE_AUDIT_REQUIRE_KEYS=true`` (set by the Helm
chart) refuses it there too. Readers (``sightline audit verify``) never create a keyring. Key bytes never appear in
logs, errors or reprs.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar

from pydantic import Field, SecretStr
from pydantic_settings import SettingsConfigDict

from sightline.common.config import SightlineSettings
from sightline.common.keyring import KEY_BYTES, KEY_ID, parse_key_entries
from sightline.common.sqlstore import StoreError

log = logging.getLogger(__name__)

LOCAL_KEYS_FILE = "audit.keys"  # a local run's keyring, next to its SQLite audit log
_HOW = (
    "give every service and auditor the same keyring in SIGHTLINE_AUDIT_KEYS or SIGHTLINE_AUDIT_KEYS_FILE, from a "
    "secret ('sightline audit new-key' prints an entry)"
)


class AuditKeyError(StoreError):
    """The audit keyring is missing or malformed, or a key id is not in it. Never carries key material."""


class AuditKeySettings(SightlineSettings):
    """Where the audit keys come from (``SIGHTLINE_AUDIT_KEYS``, ``..._KEYS_FILE``, ``..._KEY_ID``)."""

    config_section: ClassVar[str] = "audit"
    model_config = SettingsConfigDict(env_prefix="SIGHTLINE_AUDIT_", extra="ignore")

    keys: SecretStr | None = Field(
        None,
        description="The audit keyring: 'id:BASE64' entries (32-byte keys), separated by commas or newlines. "
        "Keep it in a secret; the audit database never holds it. Give every service and auditor the same keyring.",
    )
    keys_file: Path | None = Field(
        None,
        description="A file holding the keyring, one 'id:BASE64' a line (instead of SIGHTLINE_AUDIT_KEYS). "
        "Neither set: a PostgreSQL audit log refuses to open; a SQLite one uses audit.keys in its own folder, "
        "created with one random key on first use (local runs only, see require_keys).",
    )
    key_id: str | None = Field(
        None,
        description="The active key id, which new records and checkpoints are signed with (default: the "
        "keyring's last entry). Rotate by adding a key and naming it here; keep old keys to verify old records.",
    )
    require_keys: bool = Field(
        False,
        description="Refuse to start without SIGHTLINE_AUDIT_KEYS or SIGHTLINE_AUDIT_KEYS_FILE even when the "
        "audit log is SQLite (the Helm chart sets it). A PostgreSQL audit log always refuses; a SQLite one otherwise "
        "gets a local keyring, audit.keys in the database's folder (local runs only).",
    )


class AuditKeyring:
    """HMAC-SHA256 keys by id, and the active one."""

    def __init__(self, keys: Mapping[str, bytes], active_key_id: str | None = None) -> None:
        if not keys:
            raise AuditKeyError("the audit keyring holds no key")
        for key_id, key in keys.items():
            _check(key_id, key)
        active = active_key_id or list(keys)[-1]
        if active not in keys:
            raise AuditKeyError(f"the active audit key id {active!r} is not in the keyring ({', '.join(keys)})")
        self._keys = dict(keys)
        self._active = active

    @classmethod
    def parse(cls, text: str, active_key_id: str | None = None) -> AuditKeyring:
        """A keyring from ``id:BASE64`` entries (commas, whitespace or newlines between them; ``#`` comments)."""
        return cls(parse_entries(text), active_key_id)

    @classmethod
    def configured(
        cls, database_url: str, settings: AuditKeySettings | None = None, create: bool = True
    ) -> AuditKeyring:
        """The keyring for the audit log at ``database_url``: the configured one, else the local one of a SQLite log
        (made when ``create``, i.e. for a writer); AuditKeyError when there is none to use."""
        settings = settings or AuditKeySettings()
        if settings.keys is not None and settings.keys_file is not None:
            raise AuditKeyError("set SIGHTLINE_AUDIT_KEYS or SIGHTLINE_AUDIT_KEYS_FILE, not both")
        if settings.keys is not None:
            return cls.parse(settings.keys.get_secret_value(), settings.key_id)
        if settings.keys_file is not None:
            return cls.from_file(settings.keys_file, settings.key_id)
        return cls._local(database_url, settings, create)

    @classmethod
    def _local(cls, database_url: str, settings: AuditKeySettings, create: bool) -> AuditKeyring:
        """The local keyring of a SQLite audit log, for a local run; refused for anything else."""
        if settings.require_keys:
            raise AuditKeyError(f"no audit keyring configured and SIGHTLINE_AUDIT_REQUIRE_KEYS is set: {_HOW}")
        if database_url == "sqlite:///:memory:":
            log.warning("audit records of an in-memory log are signed with a key that ends with the process")
            return cls({"memory": secrets.token_bytes(KEY_BYTES)})
        path = local_keys_path(database_url)
        if path is None:
            raise AuditKeyError(f"no audit keyring configured for a shared (PostgreSQL) audit log: {_HOW}")
        if create:
            ensure_keys_file(path, database_url)
        keyring = cls.from_file(path, settings.key_id)
        log.info(
            "audit records are signed with the local keyring %s (local runs only: set SIGHTLINE_AUDIT_KEYS in "
            "production)",
            path,
        )
        return keyring

    @classmethod
    def from_file(cls, path: Path, active_key_id: str | None = None) -> AuditKeyring:
        try:
            text = path.read_text()
        except OSError as exc:
            raise AuditKeyError(
                f"cannot read the audit keyring {path}: {exc.strerror} (set SIGHTLINE_AUDIT_KEYS_FILE "
                "or SIGHTLINE_AUDIT_KEYS)"
            ) from None
        try:
            return cls.parse(text, active_key_id)
        except AuditKeyError as exc:
            raise AuditKeyError(f"{path}: {exc}") from None

    @property
    def active_key_id(self) -> str:
        return self._active

    @property
    def key_ids(self) -> tuple[str, ...]:
        return tuple(self._keys)

    def mac(self, key_id: str, message: bytes) -> str:
        """Hex HMAC-SHA256 of ``message`` under ``key_id``; AuditKeyError when the keyring lacks that id."""
        key = self._keys.get(key_id)
        if key is None:
            raise AuditKeyError(
                f"audit key id {key_id!r} is not in the keyring (key ids: {', '.join(self._keys)}); "
                "add that key to SIGHTLINE_AUDIT_KEYS(_FILE) to verify what it signed"
            )
        return hmac.new(key, message, hashlib.sha256).hexdigest()

    def matches(self, key_id: str, message: bytes, mac: str) -> bool:
        """Whether ``mac`` is the MAC of ``message`` under ``key_id`` (constant time); AuditKeyError if unknown."""
        return hmac.compare_digest(self.mac(key_id, message), mac)

    def __repr__(self) -> str:
        return f"AuditKeyring(key_ids={list(self._keys)!r}, active_key_id={self._active!r})"


def parse_entries(text: str) -> dict[str, bytes]:
    """``{key_id: key}`` from ``id:BASE64`` entries; errors name the entry's position, never its content."""
    return parse_key_entries(text, "audit keyring", AuditKeyError)


def new_entry(key_id: str | None = None) -> str:
    """A fresh ``id:BASE64`` keyring entry (256 random bits); the id defaults to a random ``a-XXXXXXXX``."""
    key_id = key_id or f"a-{secrets.token_hex(4)}"
    _check(key_id, b"\0" * KEY_BYTES)
    return f"{key_id}:{base64.b64encode(secrets.token_bytes(KEY_BYTES)).decode('ascii')}"


def local_keys_path(database_url: str) -> Path | None:
    """Where a SQLite audit log's local keyring is: ``audit.keys`` in the database's folder (the local stack's state
    dir); None for any other database."""
    prefix = "sqlite:///"
    if not database_url.startswith(prefix) or database_url == prefix + ":memory:":
        return None
    return Path(database_url[len(prefix) :]).expanduser().parent / LOCAL_KEYS_FILE


def ensure_keys_file(path: Path, database_url: str = "") -> Path:
    """``path``, made with one new key (mode 0600) when it does not exist; concurrent callers all get the same file."""
    if path.exists():
        if path.stat().st_mode & 0o077:
            log.warning("%s was readable by others; restricting it to its owner", path)
            path.chmod(0o600)
        return path
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    draft = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(
            "# Sightline audit keys (id:BASE64, one a line; the last is active unless SIGHTLINE_AUDIT_KEY_ID "
            "says otherwise). Back it up: without it the audit chain cannot be verified.\n"
        )
        file.write(new_entry() + "\n")
    try:
        os.link(draft, path)  # appears complete or not at all: a concurrent starter never reads half a file
        log.warning(
            "created a local audit keyring in %s for the audit log %s: for local runs only (in production "
            "set SIGHTLINE_AUDIT_KEYS from a secret); back it up with the log",
            path,
            database_url or "next to it",
        )
    except FileExistsError:
        pass  # another process made it first: use theirs
    finally:
        draft.unlink(missing_ok=True)
    return path


def _check(key_id: str, key: bytes) -> None:
    if not isinstance(key_id, str) or not KEY_ID.fullmatch(key_id):
        raise AuditKeyError("an audit key id must be 1-64 letters, digits, '_', '.' or '-'")  # never quoted: see above
    if len(key) != KEY_BYTES:
        raise AuditKeyError(f"audit key {key_id!r} must be {KEY_BYTES} bytes, got {len(key)}")
