"""``sightline keys``: template key management. ``generate`` prints a new key; ``rotate`` re-encrypts the gallery.

``rotate`` works on the gallery database directly (``--database-url``, default the matching settings'), in one
transaction: every template not yet under the new key is decrypted with the key it was written with and encrypted
again with the new one; on any error nothing changes. The current keys are read the way the matching service reads
them (``SIGHTLINE_MATCHING_TEMPLATE_KEY``, ``..._TEMPLATE_KEY_ID``, ``..._PREVIOUS_TEMPLATE_KEYS``), or from
``--old-keys-file`` (``id:BASE64,id:BASE64``). Afterwards it checks that every template decrypts with the new key
alone. The procedure that keeps running replicas working throughout is in docs/watchlists.md ("Key rotation").
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("keys", help="template encryption keys: generate, rotate")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    generate = actions.add_parser("generate", help="print a new random 256-bit key (base64) for a key file")
    generate.set_defaults(func=cmd_generate)
    rotate = actions.add_parser("rotate", help="re-encrypt every template with a new key")
    rotate.add_argument("--database-url", help="the gallery database (default: SIGHTLINE_MATCHING_DATABASE_URL)")
    rotate.add_argument("--new-key-file", type=Path, required=True, help="file holding the new key (base64, 32 bytes)")
    rotate.add_argument("--new-key-id", required=True, help="id stored with each template, e.g. k2 (never reuse one)")
    rotate.add_argument(
        "--old-keys-file",
        type=Path,
        help="file with the keys in use, 'id:BASE64,id:BASE64' (default: the matching settings' "
        "template key and previous keys)",
    )
    rotate.add_argument("--no-progress", action="store_true", help="no progress bar")
    rotate.set_defaults(func=cmd_rotate)


def cmd_generate(args: argparse.Namespace) -> int:
    from sightline.matching.templates import generate_key

    print(generate_key())
    return 0


def _read(path: Path, what: str) -> str:
    try:
        return path.read_text().strip()
    except OSError as exc:
        raise SystemExit(f"error: cannot read the {what} {path}: {exc.strerror}") from None


def _configured_keys_and_url(args: argparse.Namespace) -> tuple[dict[str, bytes], str]:
    """The keys in use and the database URL, from the flags, else from the matching settings."""
    from pydantic import ValidationError

    from sightline.matching.templates import decode_key, parse_key_list

    keys: dict[str, bytes] = parse_key_list(_read(args.old_keys_file, "old keys file")) if args.old_keys_file else {}
    url = args.database_url
    if keys and url:
        return keys, url
    from sightline.matching.settings import MatchingSettings

    try:
        settings = MatchingSettings()
    except ValidationError:
        raise SystemExit(
            "error: give --old-keys-file and --database-url, or set SIGHTLINE_MATCHING_TEMPLATE_KEY "
            "(and the other matching settings) as the matching service has them"
        ) from None
    if not keys:
        previous = settings.previous_template_keys.get_secret_value() if settings.previous_template_keys else ""
        keys = parse_key_list(previous)
        keys[settings.template_key_id] = decode_key(settings.template_key.get_secret_value(), settings.template_key_id)
    return keys, url or settings.database_url.get_secret_value()


def cmd_rotate(args: argparse.Namespace) -> int:
    from sightline.common.sqlstore import StoreError
    from sightline.matching.store import GalleryStore
    from sightline.matching.templates import (
        TemplateCipher,
        TemplateDecryptionError,
        TemplateKeyError,
        UnknownKeyError,
        decode_key,
    )

    try:
        old_keys, url = _configured_keys_and_url(args)
        new_key = decode_key(_read(args.new_key_file, "new key file"), args.new_key_id)
        if old_keys.get(args.new_key_id, new_key) != new_key:
            print(
                f"error: key id {args.new_key_id!r} is already in use with other key bytes; choose a new id",
                file=sys.stderr,
            )
            return 2
        new_cipher = TemplateCipher({args.new_key_id: new_key}, args.new_key_id)
        readers = TemplateCipher({**old_keys, args.new_key_id: new_key}, args.new_key_id)
    except TemplateKeyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    failures = (StoreError, UnknownKeyError, TemplateDecryptionError)
    try:
        with GalleryStore.open(url, readers) as store:
            print(f"gallery {store.description}: {_counts(store.template_key_counts())}")
            rotated = _rotate(store, new_cipher, progress=not args.no_progress)
            after = store.template_key_counts()
    except failures as exc:
        print(f"error: {exc}; nothing was changed", file=sys.stderr)
        return 1
    print(f"re-encrypted {rotated} template(s) with key {args.new_key_id!r}; now {_counts(after)}")
    try:
        with GalleryStore.open(url, new_cipher) as check:  # the new key alone must now read everything
            readable = len(check.load_templates())
    except failures as exc:
        print(
            f"error: after rotation, a template does not decrypt with {args.new_key_id!r} alone: {exc} (one written "
            "meanwhile by a replica without the new key? rotate again)",
            file=sys.stderr,
        )
        return 1
    print(f"checked: all {readable} template(s) decrypt with {args.new_key_id!r} alone")
    return 0


def _counts(counts: dict[str, int]) -> str:
    if not counts:
        return "no templates"
    return "templates by key id: " + ", ".join(f"{key_id}={count}" for key_id, count in counts.items())


def _rotate(store: Any, new_cipher: Any, progress: bool) -> int:
    from tqdm import tqdm

    # disable=None: tqdm hides itself when stderr is not a terminal (logs, CI).
    with tqdm(unit="template", desc="re-encrypting", disable=None if progress else True, file=sys.stderr) as bar:

        def advance(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        return int(store.rotate_keys(new_cipher, progress=advance))
