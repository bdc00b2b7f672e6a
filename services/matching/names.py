"""What the gallery accepts as subject ids, watchlist names and erasure references; INVALID_ARGUMENT otherwise.

Subject ids starting with ``session-`` are reserved for the session-scoped templates of e-channel gate sessions
(capture/kiosk/kiosk.py; the convention lives in common/subjects.py): only capture's own principal enrols them, and
they are never candidates in a 1:N search (index.py).
"""

from __future__ import annotations

import re

from sightline.common.auth import service_principal
from sightline.common.rpc import InvalidInput
from sightline.common.subjects import SESSION_SUBJECT_PREFIX, is_session_subject

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$")
_NAME_RULE = "use 1-128 letters, digits and . _ : @ - (starting with a letter or digit)"
MAX_REFERENCE_CHARS = 200
SESSION_ENROLLER = service_principal("capture")


def check_subject_id(subject_id: str) -> str:
    if not _NAME.match(subject_id):
        raise InvalidInput(f"invalid subject id {subject_id[:40]!r}: {_NAME_RULE}")
    return subject_id


def check_enrolled_subject_id(subject_id: str, caller: str) -> str:
    """A subject id ``caller`` may enrol: ``session-`` ids only for capture (or anyone when authentication is off,
    ``caller`` "")."""
    check_subject_id(subject_id)
    if is_session_subject(subject_id) and caller not in ("", SESSION_ENROLLER):
        raise InvalidInput(
            f"subject id {subject_id[:40]!r}: ids starting with {SESSION_SUBJECT_PREFIX!r} are "
            f"reserved for the templates of e-channel gate sessions, enrolled by {SESSION_ENROLLER} "
            "only; choose another id"
        )
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
