"""Keeping one replica's index in step with the gallery database, change by change.

Every write to the gallery logs the subjects it touched under a new version (``GalleryStore.changes_since``). A
replica that holds the index as of version ``v`` reads the log after ``v`` and reads those subjects again: their
templates (a few per subject, the only ones it decrypts), their current lists, or their absence. A deletion or erasure
logs the removed subject's template ids, not its id (which the database keeps nowhere once it is gone): the replica
finds the subject in its index by them, and it leaves the index. Reading a subject again is idempotent, so a change
applied twice (by a local write and then by the log, or after a snapshot that already held part of it) does no harm;
so is a subject that another shard owns, which is skipped.

The log says nothing about memberships that simply expire (nothing is written when time passes): ``expire`` reads
again the subjects whose membership expired in a time window. When the log no longer reaches back to the index's
version (pruned, or the database predates it) only a full load will do: ``catch_up`` says so by returning None.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime

from sightline.matching.ann import AnnIndex
from sightline.matching.store import GalleryStore, TemplateRecord

log = logging.getLogger(__name__)

_LOG_PAGE = 10_000  # versions read from the change log per query


@dataclass(frozen=True)
class Caught:
    """What a catch-up did: the version reached, and whether lists or removals happened on the way."""

    version: int
    subjects: int  # subjects read again
    removed: int  # of them, subjects that left the index
    lists_changed: bool


class IndexFollower:
    """Applies the store's changes to an index, for the subjects ``owns`` accepts (this replica's shard)."""

    def __init__(self, store: GalleryStore, owns: Callable[[str], bool]) -> None:
        self._store = store
        self._owns = owns

    def load_all(self, index: AnnIndex, at: datetime) -> int:
        """Everything again (this shard's templates decrypted, current memberships); returns the version loaded.
        The version is read first: a change committed during the load is applied again by the next catch-up."""
        version = self._store.version()
        index.replace_all(self._store.load_templates(at=at, subjects=self._owns))
        return version

    def catch_up(self, index: AnnIndex, version: int) -> Caught | None:
        """Applies every change after ``version``; None when the log cannot say what they were (load everything)."""
        subjects: set[str] = set()
        removed = 0
        lists_changed = False
        while True:
            changes = self._store.changes_since(version, limit=_LOG_PAGE)
            if not changes.complete:
                return None
            if changes.until == version:
                return Caught(version, len(subjects), removed, lists_changed)
            removed += self.apply(index, changes.subject_ids | index.subjects_of_templates(changes.removed_templates))
            subjects |= changes.subject_ids
            lists_changed = lists_changed or changes.lists_changed
            version = changes.until

    def apply(self, index: AnnIndex, subject_ids: Iterable[str]) -> int:
        """Reads these subjects again and puts the index in step with what the database holds of them; returns how
        many left the index."""
        owned = [subject_id for subject_id in dict.fromkeys(subject_ids) if self._owns(subject_id)]
        if not owned:
            return 0
        by_subject: dict[str, list[TemplateRecord]] = {}
        for record in self._store.templates_of(owned):
            by_subject.setdefault(record.subject_id, []).append(record)
        removed = 0
        for subject_id in owned:
            records = by_subject.get(subject_id)
            if records is None:
                if index.remove_subject(subject_id):
                    removed += 1
                continue
            for record in records:
                index.add(record.template_id, subject_id, record.vector)
            index.set_watchlists(subject_id, records[0].watchlists)
        return removed

    def expire(self, index: AnnIndex, since: datetime, until: datetime) -> int:
        """Reads again the lists of the subjects whose membership expired in (since, until]; returns how many."""
        expired = [subject_id for subject_id in self._store.expired_between(since, until) if self._owns(subject_id)]
        if not expired:
            return 0
        current = self._store.current_watchlists(expired)
        for subject_id in expired:
            index.set_watchlists(subject_id, current.get(subject_id, ()))
        return len(expired)
