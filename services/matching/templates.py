"""Template protection: face descriptors are stored only as AES-256-GCM ciphertext.

A face descriptor is biometric data, so the gallery never holds one in clear. Each template is encrypted with the
active key under a fresh random 12-byte nonce, and the subject id is bound as associated data: a blob copied onto
another subject's row fails to decrypt instead of silently enrolling the wrong person. Every stored template names
the key it was written with (its ``key_id``), so keys can be rotated: keep the old keys configured for reading,
make a new one active and re-encrypt (``GalleryStore.rotate_keys``).

Blob layout: ``FORMAT_V1 (1 byte) | nonce (12 bytes) | ciphertext of the float32 little-endian vector | tag (16)``.

Key material never appears in exceptions, reprs or logs; only key ids do.
"""

from __future__ import annotations

import base64
import logging
import os
from collections.abc import Mapping

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from sightline.common.keyring import KEY_BYTES, KEY_ID, decode_base64_key, parse_key_entries
from sightline.common.models.descriptor_spec import DESCRIPTOR_SIZE

logger = logging.getLogger(__name__)

NONCE_BYTES = 12
FORMAT_V1 = b"\x01"
# Domain-separates our AAD from any other use of the same key, and versions the binding itself.
_AAD_PREFIX = b"sightline/template/v1\x00"
_VECTOR_DTYPE = np.dtype("<f4")
# Separates keys derived for other uses (``derive_key``) from each other and from the template key itself.
_DERIVE_PREFIX = b"sightline/derived-from-template-key/v1\x00"


class TemplateKeyError(ValueError):
    """A key or key list is malformed (wrong length, bad base64, bad id). Never carries the key material."""


class UnknownKeyError(KeyError):
    """A template was written with a key id this cipher does not hold."""

    def __init__(self, key_id: str, known: tuple[str, ...]) -> None:
        super().__init__(key_id)
        self.key_id = key_id
        self.known = known

    def __str__(self) -> str:
        # KeyError's default str() is the repr of its argument; say what to do instead.
        return (
            f"unknown template key id {self.key_id!r} (configured key ids: {', '.join(self.known) or 'none'}); "
            "add the old key to the configured key list to read templates written with it"
        )


class TemplateDecryptionError(ValueError):
    """A blob failed authentication: tampered, written with different key bytes, or bound to another subject."""


class TemplateCipher:
    """Encrypts and decrypts face templates with AES-256-GCM; holds every readable key and one active key."""

    def __init__(self, keys: Mapping[str, bytes], active_key_id: str, dim: int = DESCRIPTOR_SIZE) -> None:
        if not keys:
            raise TemplateKeyError("no template keys configured")
        for key_id, key in keys.items():
            _check_key(key_id, key)
        if active_key_id not in keys:
            raise TemplateKeyError(
                f"active key id {active_key_id!r} is not among the configured key ids ({', '.join(keys)})"
            )
        self._aead = {key_id: AESGCM(bytes(key)) for key_id, key in keys.items()}
        self._keys = {key_id: bytes(key) for key_id, key in keys.items()}  # for derive_key only
        self._active_key_id = active_key_id
        self._dim = dim

    @classmethod
    def from_base64(
        cls, key_b64: str, key_id: str, old_keys: str | Mapping[str, bytes] = "", dim: int = DESCRIPTOR_SIZE
    ) -> TemplateCipher:
        """The active key as base64 plus, for rotation, older read-only keys (``"k0:BASE64,k1:BASE64"``)."""
        keys = dict(parse_key_list(old_keys) if isinstance(old_keys, str) else old_keys)
        keys[key_id] = decode_key(key_b64, key_id)
        return cls(keys, key_id, dim=dim)

    @property
    def active_key_id(self) -> str:
        return self._active_key_id

    @property
    def key_ids(self) -> tuple[str, ...]:
        return tuple(self._aead)

    @property
    def dim(self) -> int:
        return self._dim

    def has_key(self, key_id: str) -> bool:
        return key_id in self._aead

    def derive_key(self, key_id: str, purpose: bytes) -> bytes:
        """A 256-bit key for another use of template key ``key_id`` (HKDF-SHA256 with ``purpose`` as its info), so
        data sealed with it is readable exactly as long as that template key is configured: retiring the key
        retires the data too. Each use names its own ``purpose`` (e.g. ``b"sightline/gallery-snapshot/v1"``)."""
        key = self._keys.get(key_id)
        if key is None:
            raise UnknownKeyError(key_id, self.key_ids)
        if not purpose:
            raise ValueError("derive_key needs a non-empty purpose")
        hkdf = HKDF(algorithm=hashes.SHA256(), length=len(key), salt=None, info=_DERIVE_PREFIX + purpose)
        return hkdf.derive(key)

    def encrypt(self, vector: np.ndarray, subject_id: str) -> tuple[str, bytes]:
        """Returns ``(key_id, blob)`` for the vector, bound to ``subject_id``."""
        plaintext = self._check_vector(vector).tobytes()
        nonce = os.urandom(NONCE_BYTES)
        sealed = self._aead[self._active_key_id].encrypt(nonce, plaintext, _aad(subject_id))
        return self._active_key_id, FORMAT_V1 + nonce + sealed

    def decrypt(self, key_id: str, blob: bytes, subject_id: str) -> np.ndarray:
        """The float32 vector sealed in ``blob``; raises if the key is unknown or the blob fails authentication."""
        aead = self._aead.get(key_id)
        if aead is None:
            raise UnknownKeyError(key_id, self.key_ids)
        blob = bytes(blob)
        if len(blob) < 1 + NONCE_BYTES + 16 or blob[:1] != FORMAT_V1:
            raise TemplateDecryptionError("template blob is truncated or has an unknown format")
        nonce, sealed = blob[1 : 1 + NONCE_BYTES], blob[1 + NONCE_BYTES :]
        try:
            plaintext = aead.decrypt(nonce, sealed, _aad(subject_id))
        except InvalidTag:
            raise TemplateDecryptionError(
                f"template blob failed authentication with key id {key_id!r}: it was tampered with, written "
                "with different key bytes under that id, or belongs to another subject"
            ) from None
        if len(plaintext) != self._dim * _VECTOR_DTYPE.itemsize:
            raise TemplateDecryptionError(
                f"template holds {len(plaintext) // _VECTOR_DTYPE.itemsize} values, expected {self._dim}"
            )
        return np.frombuffer(plaintext, dtype=_VECTOR_DTYPE).astype(np.float32)

    def _check_vector(self, vector: np.ndarray) -> np.ndarray:
        array = np.asarray(vector)
        if array.shape != (self._dim,):
            raise ValueError(f"template vector must have shape ({self._dim},), got {array.shape}")
        array = array.astype(_VECTOR_DTYPE)
        if not np.all(np.isfinite(array)):
            raise ValueError("template vector holds NaN or infinite values")
        return array

    def __repr__(self) -> str:
        return f"TemplateCipher(key_ids={list(self.key_ids)!r}, active_key_id={self._active_key_id!r})"


def decode_key(key_b64: str, key_id: str) -> bytes:
    """Decodes one base64 (standard or URL-safe) key and checks it is 32 bytes."""
    key = decode_base64_key(key_b64)
    if key is None:
        raise TemplateKeyError(f"template key {key_id!r} is not valid base64")
    _check_key(key_id, key)
    return key


def parse_key_list(spec: str) -> dict[str, bytes]:
    """Parses ``"k0:BASE64,k1:BASE64"`` (commas or whitespace between entries) into ``{key_id: key}``."""
    return parse_key_entries(spec, "template key list", TemplateKeyError)


def generate_key() -> str:
    """A fresh random 256-bit key, base64-encoded, for operators creating or rotating keys."""
    return base64.b64encode(os.urandom(KEY_BYTES)).decode("ascii")


def _check_key(key_id: str, key: bytes) -> None:
    if not isinstance(key_id, str) or not KEY_ID.fullmatch(key_id):
        raise TemplateKeyError(
            f"template key id {key_id!r} must be 1-64 characters of letters, digits, '_', '.' or '-'"
        )
    if not isinstance(key, bytes | bytearray) or len(key) != KEY_BYTES:
        size = len(key) if isinstance(key, bytes | bytearray) else "not bytes"
        raise TemplateKeyError(f"template key {key_id!r} must be {KEY_BYTES} bytes (AES-256), got {size}")


def _aad(subject_id: str) -> bytes:
    return _AAD_PREFIX + subject_id.encode("utf-8")
