"""What the gallery accepts as subject ids, watchlist names and erasure references; INVALID_ARGUMENT otherwise."""

from __future__ import annotations

import re

from sightline.common.rpc import InvalidInput

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$")
_NAME_RULE = "use 1-128 letters, digits and . _ : @ - (starting with a letter or digit)"
MAX_REFERENCE_CHARS = 200


def check_subject_id(subject_id: str) -> str:
    if not _NAME.match(subject_id):
        raise InvalidInput(f"invalid subject id {subject_id[:40]!r}: {_NAME_RULE}")
    return subject_id


def check_watchlist_name(name: str) -> str:
    if not _NAME.match(name):
        raise InvalidInput(f"invalid watchlist name {name[:40]!r}: {_NAME_RULE}")
    return name


def check_reference(reference: str) -> str:
    """An erasure request's reference (case number): required, one line, at most 200 characters."""
    text = reference.strip()
    if not text:
        raise InvalidInput("an erasure needs the request's reference (its case number): it is audited and published")
    if len(text) > MAX_REFERENCE_CHARS or not text.isprintable():
        raise InvalidInput(f"the reference must be one printable line of at most {MAX_REFERENCE_CHARS} characters")
    return text
