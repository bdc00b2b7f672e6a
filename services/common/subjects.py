"""The subject-id conventions of the gallery API that its clients share.

A subject id starting with ``session-`` is the session-scoped template of an e-channel gate session,
``session-<session id>``: capture enrols it for the session's claim (capture/kiosk/claims.py) and deletes it
when the session ends; matching reserves the prefix for capture's principal (matching/names.py) and never
returns such a subject as a 1:N candidate (matching/index.py). Both read the convention from here, so neither
service imports the other.
"""

from __future__ import annotations

SESSION_SUBJECT_PREFIX = "session-"


def session_subject_id(session_id: str) -> str:
    """The subject id of a gate session's own template."""
    return f"{SESSION_SUBJECT_PREFIX}{session_id}"


def is_session_subject(subject_id: str) -> bool:
    """A gate session's own template (``session-<session id>``): verified 1:1, never searched 1:N."""
    return subject_id.startswith(SESSION_SUBJECT_PREFIX)
