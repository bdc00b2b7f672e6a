"""Key lists as operators write them: ``KEY_ID:BASE64`` entries of 256-bit keys.

One parser for the template keys (matching) and the audit keyring, so an entry is read, and refused, the same way
everywhere. Errors name an entry by its position and never quote its text: an entry written the wrong way round
(``BASE64:id``) puts a key where the id goes.
"""

from __future__ import annotations

import base64
import binascii
import re

KEY_BYTES = 32
KEY_ID = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")


def decode_base64_key(text: str) -> bytes | None:
    """The bytes of standard or URL-safe base64 ``text``, or None when it is not base64 (the caller words the error,
    without the text)."""
    try:
        return base64.b64decode(text.strip().replace("-", "+").replace("_", "/"), validate=True)
    except (binascii.Error, ValueError):
        return None


def parse_key_entries(text: str, what: str, error: type[Exception]) -> dict[str, bytes]:
    """``{key_id: key}`` from ``KEY_ID:BASE64`` entries (commas, whitespace or newlines between them; ``#`` starts a
    comment); ``error(...)`` for a malformed entry, naming ``what`` (e.g. "audit keyring") and the entry's position."""
    keys: dict[str, bytes] = {}
    lines = (line.split("#", 1)[0] for line in text.splitlines())
    entries = [entry for line in lines for entry in re.split(r"[,\s]+", line) if entry]
    for position, entry in enumerate(entries, start=1):
        key_id, sep, key_b64 = entry.partition(":")
        where = f"{what} entry {position}"
        if not sep or not key_id:
            raise error(f"{where} is not of the form KEY_ID:BASE64")
        if not KEY_ID.fullmatch(key_id):
            raise error(
                f"{where}: its key id must be 1-64 letters, digits, '_', '.' or '-' (entries are "
                "KEY_ID:BASE64, the id first)"
            )
        if key_id in keys:
            raise error(f"{where}: key id {key_id!r} appears twice")
        key = decode_base64_key(key_b64)
        if key is None:
            raise error(f"{where}: its key is not valid base64 (entries are KEY_ID:BASE64, the id first)")
        if len(key) != KEY_BYTES:
            raise error(f"{where}: its key must be {KEY_BYTES} bytes, got {len(key)}")
        keys[key_id] = key
    return keys
