"""What the topics say about every frame of a run: its terminal outcome, counted before and after deduplication.

A frame's terminal outcome is one of:

- **decided**: one ``Decision`` (decisions topic) per face of its ``MatchResult``, the faces that were searched;
- **no face**: its ``MatchResult`` has no face (none found, or on a CCTV track none worth a search), and decision
  published its one ``Decision`` with outcome NO_FACE, the record integrators count such a frame by;
- **dead letter**: a ``DeadLetter`` naming the frame, from any stage.

Delivery is at least once: after a kill, a stage processes again what it had not committed, so any record may come
more than once. Replays carry the same ids (a decision's id comes from its frame id, face index and policy version;
an alert's from its source, track and subject), so after deduplication by id every frame must have exactly one
terminal outcome. ``Ledger`` follows the topics from a thread and keeps only ids and figures (never images,
templates or descriptors); the ``*_account`` functions count, for a set of frames, what is lost and what is doubled.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, defaultdict, deque
from dataclasses import dataclass, field
from typing import Any

from sightline.common import codec
from sightline.common.bus import read_topics
from sightline.common.config import KafkaSettings
from sightline.common.topics import ALERTS, DEADLETTER, DECISIONS, FRAMES, MATCHES, SESSIONS, by_name
from sightline.v1 import events_pb2, session_pb2

TOPICS = (FRAMES, MATCHES, DECISIONS, ALERTS, DEADLETTER, SESSIONS)
# Where a frame's NO_FACE decision is kept among its faces' decisions (face indexes are never negative).
NO_FACE_KEY = -1


@dataclass(frozen=True)
class FrameSeen:
    frame_id: str
    source_id: str
    sequence: int
    session_id: str
    captured_at: float  # epoch seconds


@dataclass(frozen=True)
class DecisionSeen:
    decision_id: str
    frame_id: str
    source_id: str
    face_index: int
    outcome: str  # MATCH, NO_MATCH, PENDING, LOW_QUALITY...
    subject_id: str
    alert_id: str
    track_id: str
    echannel: bool
    reasons: tuple[str, ...]


@dataclass(frozen=True)
class AlertSeen:
    alert_id: str
    source_id: str
    track_id: str
    subject_id: str
    evidence: tuple[str, ...]  # frame ids, oldest first


@dataclass(frozen=True)
class DeadLetterSeen:
    frame_id: str
    stage: str
    reason: str


@dataclass(frozen=True)
class SessionSeen:
    session_id: str
    gate_id: str
    kind: str  # OPENED, DECIDED, ...
    outcome: str  # for DECIDED
    alert_id: str
    reason: str  # the outcome's first reason


@dataclass
class Ledger:
    """The result topics of a run, followed from a thread (``start``/``stop``); every copy of every record is kept."""

    settings: KafkaSettings
    since_ms: int
    frames: dict[str, list[FrameSeen]] = field(default_factory=lambda: defaultdict(list))
    matches: dict[str, list[tuple[int, ...]]] = field(default_factory=lambda: defaultdict(list))  # face indexes
    decisions: dict[str, list[DecisionSeen]] = field(default_factory=lambda: defaultdict(list))
    alerts: dict[str, list[AlertSeen]] = field(default_factory=lambda: defaultdict(list))
    dead_letters: list[DeadLetterSeen] = field(default_factory=list)
    sessions: list[SessionSeen] = field(default_factory=list)
    unreadable: int = 0
    _by_source: dict[str, set[int]] = field(default_factory=lambda: defaultdict(set))
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _records_this_poll: int = 0
    _poll_started_at: float = 0.0
    # Monotonic times at which the last few polls that found nothing began: the reader was at the end then.
    _empty_polls: deque[float] = field(default_factory=lambda: deque(maxlen=4))

    def start(self) -> Ledger:
        self._thread = threading.Thread(target=self._follow, name="ledger", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def caught_up_since(self, moment: float) -> bool:
        """Whether polls begun after ``moment`` (monotonic) found nothing more to read (two, in case the client
        answered the first from a fetch sent earlier): the ledger holds all that the broker had stored by then."""
        return sum(1 for started in list(self._empty_polls) if started > moment) >= 2

    def wait_caught_up(self, timeout: float = 30.0) -> bool:
        moment, deadline = time.monotonic(), time.monotonic() + timeout
        while not self.caught_up_since(moment):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def published(self, source_id: str) -> set[int]:
        """The sequences of a source's frames on the frames topic so far."""
        with self._lock:
            return set(self._by_source.get(source_id, ()))

    def _follow(self) -> None:
        names = [topic.name for topic in TOPICS]
        for record in read_topics(self.settings, names, self.since_ms, stop=self._polled):
            self._records_this_poll += 1
            try:
                message = codec.parse(codec.event_class(by_name(record.topic)), record.value)
            except codec.MalformedEvent:
                self.unreadable += 1
                continue
            with self._lock:
                self._add(message)

    def _polled(self) -> bool:
        """Called by read_topics before each poll: the poll before, if it yielded nothing, found the reader at the
        end."""
        if self._records_this_poll == 0 and self._poll_started_at:
            self._empty_polls.append(self._poll_started_at)
        self._records_this_poll, self._poll_started_at = 0, time.monotonic()
        return self._stop.is_set()

    def _add(self, message: Any) -> None:
        if isinstance(message, events_pb2.FrameCaptured):
            ref = message.frame
            seen = FrameSeen(ref.frame_id, ref.source_id, ref.sequence, ref.session_id, codec.seconds(ref.captured_at))
            self.frames[ref.frame_id].append(seen)
            self._by_source[ref.source_id].add(ref.sequence)
        elif isinstance(message, events_pb2.MatchResult):
            self.matches[message.frame.frame_id].append(tuple(sorted(f.face_index for f in message.faces)))
        elif isinstance(message, events_pb2.Decision):
            self.decisions[message.decision_id].append(_decision(message))
        elif isinstance(message, events_pb2.Alert):
            self.alerts[message.alert_id].append(
                AlertSeen(
                    message.alert_id,
                    message.source_id,
                    message.track_id,
                    message.subject_id,
                    tuple(message.evidence_frame_ids),
                )
            )
        elif isinstance(message, events_pb2.DeadLetter):
            self.dead_letters.append(DeadLetterSeen(message.frame_id, message.stage, message.reason))
        elif isinstance(message, session_pb2.SessionEvent):
            kind = codec.enum_label(session_pb2.SessionEvent.Kind, message.kind, "KIND_")
            outcome = codec.outcome_name(message.update.outcome)
            reason = message.update.reasons[0] if message.update.reasons else ""
            self.sessions.append(
                SessionSeen(message.session_id, message.gate_id, kind, outcome, message.update.alert_id, reason)
            )

    # Views, each under the lock ---------------------------------------------------------------------------------------

    def frame_ids(self, sources: set[str] | None = None, sessions: set[str] | None = None) -> set[str]:
        """The ids of the frames on the frames topic from these sources, or of these gate sessions."""
        with self._lock:
            return {
                frame_id
                for frame_id, copies in self.frames.items()
                if (sources is not None and copies[0].source_id in sources)
                or (sessions is not None and copies[0].session_id in sessions)
            }

    def session_ids(self, gate_ids: set[str]) -> set[str]:
        """The sessions these gates opened (their OPENED events)."""
        with self._lock:
            return {s.session_id for s in self.sessions if s.gate_id in gate_ids and s.kind == "OPENED"}

    def decisions_with_frames(self) -> list[tuple[DecisionSeen, FrameSeen | None]]:
        """Each distinct decision, with its frame as the frames topic had it (None: not seen there)."""
        with self._lock:
            return [
                (copies[0], self.frames[copies[0].frame_id][0] if copies[0].frame_id in self.frames else None)
                for copies in self.decisions.values()
            ]

    def unfinished(self, frame_ids: set[str]) -> set[str]:
        """The frames without a terminal outcome yet (or with a searched face still waiting for its decision)."""
        with self._lock:
            decided = self._decided_faces()
            dead = {letter.frame_id for letter in self.dead_letters}
            return {
                frame_id
                for frame_id in frame_ids
                if frame_id not in dead
                and (frame_id not in self.matches or not _terminal(self.matches[frame_id], decided.get(frame_id, {})))
            }

    def _decided_faces(self) -> dict[str, dict[int, set[str]]]:
        """frame id -> face index -> the distinct decision ids for it."""
        faces: dict[str, dict[int, set[str]]] = defaultdict(lambda: defaultdict(set))
        for decision_id, copies in self.decisions.items():
            face = NO_FACE_KEY if copies[0].outcome == "NO_FACE" else copies[0].face_index
            faces[copies[0].frame_id][face].add(decision_id)
        return faces


def _decision(message: events_pb2.Decision) -> DecisionSeen:
    from sightline.v1 import types_pb2

    return DecisionSeen(
        message.decision_id,
        message.frame.frame_id,
        message.frame.source_id,
        message.face_index,
        codec.enum_label(events_pb2.Outcome, message.outcome, "OUTCOME_"),
        message.subject_id,
        message.alert_id,
        message.track_id,
        message.frame.purpose == types_pb2.PURPOSE_ECHANNEL,
        tuple(message.reasons),
    )


def _terminal(copies: list[tuple[int, ...]], decided: dict[int, set[str]]) -> bool:
    """Whether decision finished with a frame whose match results are ``copies``: a decision for every face any copy
    searched, or, when none searched a face, the frame's NO_FACE decision."""
    searched = _faces_of(copies)
    return searched <= set(decided) if searched else NO_FACE_KEY in decided


def _faces_of(copies: list[tuple[int, ...]]) -> set[int]:
    """Every face index any copy of a frame's match result named (a replay through a restarted tracker may search
    other faces than the first pass did)."""
    return {index for faces in copies for index in faces}


# --- accounting ----------------------------------------------------------------------------------------------------


def frame_account(ledger: Ledger, frame_ids: set[str]) -> dict[str, Any]:
    """Each frame's terminal outcome, after deduplication by id: how many frames ended which way, and the frames
    with none (lost) or with more than one (duplicated)."""
    with ledger._lock:
        decided = ledger._decided_faces()
        letters: dict[str, set[tuple[str, str]]] = defaultdict(set)
        for letter in ledger.dead_letters:
            letters[letter.frame_id].add((letter.stage, letter.reason))
        matches = {frame_id: list(ledger.matches.get(frame_id, [])) for frame_id in frame_ids}
    ends: Counter[str] = Counter()
    lost, doubled, differing = [], [], 0
    for frame_id in sorted(frame_ids):
        copies, faces, dead = matches[frame_id], decided.get(frame_id, {}), letters.get(frame_id, set())
        outcomes = len(dead) + (1 if copies else 0)
        searched = _faces_of(copies)
        if len(set(copies)) > 1:
            differing += 1
        if outcomes == 0 or (copies and not _terminal(copies, faces)):
            lost.append(frame_id)
            continue
        if outcomes > 1 or any(len(ids) > 1 for ids in faces.values()):
            doubled.append(frame_id)
        ends["dead_letter" if dead else "decided" if searched else "no_face"] += 1
    return {
        "frames": len(frame_ids),
        "decided": ends["decided"],
        "no_face_or_not_searched": ends["no_face"],
        "dead_letter": ends["dead_letter"],
        "lost": len(lost),
        "duplicated_after_dedup": len(doubled),
        "replays_with_other_faces_searched": differing,
        "lost_examples": lost[:5],
        "duplicated_examples": doubled[:5],
    }


def duplicates_before_dedup(ledger: Ledger, frame_ids: set[str]) -> dict[str, int]:
    """Records that arrived more than once (replays), per kind, among the given frames' records."""
    with ledger._lock:
        decisions = [copies for copies in ledger.decisions.values() if copies[0].frame_id in frame_ids]
        letters = Counter(letter for letter in ledger.dead_letters if letter.frame_id in frame_ids)
        return {
            "frames": sum(len(ledger.frames[f]) - 1 for f in frame_ids if f in ledger.frames),
            "match_results": sum(len(ledger.matches[f]) - 1 for f in frame_ids if f in ledger.matches),
            "decisions": sum(len(copies) - 1 for copies in decisions),
            "dead_letters": sum(count - 1 for count in letters.values()),
            "alerts": sum(len(copies) - 1 for copies in ledger.alerts.values()),
            "session_outcomes": sum(
                count - 1 for count in Counter(s.session_id for s in ledger.sessions if s.kind == "DECIDED").values()
            ),
        }


def alert_account(
    ledger: Ledger, sources: set[str], watchlisted: set[str], cooldown_s: float, stored: set[str] | None = None
) -> dict[str, Any]:
    """Alerts of CCTV sources: none missing (every alert a decision names, or the review store holds, is published;
    every track that reached MATCH on a watchlisted subject has its alert, or was merged into a published one) and
    none doubled (one per source, track and subject; none within the cool-down of another of the same subject on
    the same source)."""
    with ledger._lock:
        published = {
            alert_id: copies[0] for alert_id, copies in ledger.alerts.items() if copies[0].source_id in sources
        }
        decisions = [copies[0] for copies in ledger.decisions.values() if copies[0].source_id in sources]
        captured = {frame_id: copies[0].captured_at for frame_id, copies in ledger.frames.items()}
    named = {d.alert_id for d in decisions if d.alert_id}
    missing = (named | (stored or set())) - set(published)
    unalerted = _unalerted_tracks(decisions, published, watchlisted)
    per_track = Counter((a.source_id, a.track_id, a.subject_id) for a in published.values())
    doubled = sum(count - 1 for count in per_track.values()) + _within_cooldown(published, captured, cooldown_s)
    return {
        "published": len(published),
        "missing": len(missing) + len(unalerted),
        "doubled": doubled,
        "missing_examples": sorted(missing)[:3] + [" / ".join(key) for key in unalerted[:3]],
    }


def _unalerted_tracks(
    decisions: list[DecisionSeen], published: dict[str, AlertSeen], watchlisted: set[str]
) -> list[tuple[str, str, str]]:
    """(source, track, subject) of CCTV tracks with a MATCH on a watchlisted subject but neither an alert of their
    own nor a merge into (or a note of) a published alert."""
    prefixes = {alert_id[:12] for alert_id in published}
    keys = {(a.source_id, a.track_id, a.subject_id) for a in published.values()}
    covered: set[tuple[str, str, str]] = set()
    matched: set[tuple[str, str, str]] = set()
    for d in decisions:
        if d.echannel or d.outcome != "MATCH" or d.subject_id not in watchlisted:
            continue
        key = (d.source_id, d.track_id, d.subject_id)
        matched.add(key)
        merged = any(
            ("merged into " in r and r.split("merged into ", 1)[1][:12] in prefixes) or "already raised" in r
            for r in d.reasons
        )
        if d.alert_id in published or merged or key in keys:
            covered.add(key)
    return sorted(matched - covered)


def _within_cooldown(published: dict[str, AlertSeen], captured: dict[str, float], cooldown_s: float) -> int:
    """Alerts raised for a subject on a source within the cool-down of an earlier one there (they should merge)."""
    times: dict[tuple[str, str], list[float]] = defaultdict(list)
    for alert in published.values():
        raising = alert.evidence[-1] if alert.evidence else ""  # oldest first: the last is the frame that raised it
        if raising in captured:
            times[(alert.source_id, alert.subject_id)].append(captured[raising])
    close = 0
    for stamps in times.values():
        ordered = sorted(stamps)
        close += sum(1 for a, b in zip(ordered, ordered[1:], strict=False) if b - a < cooldown_s)
    return close


def session_account(ledger: Ledger, gate_ids: set[str]) -> dict[str, Any]:
    """Gate sessions: each one opened is decided exactly once (its DECIDED events agree after deduplication)."""
    with ledger._lock:
        events = [s for s in ledger.sessions if s.gate_id in gate_ids or s.kind == "DECIDED"]
    opened = {s.session_id for s in events if s.kind == "OPENED" and s.gate_id in gate_ids}
    outcomes: dict[str, set[tuple[str, str]]] = defaultdict(set)
    referred: Counter[str] = Counter()
    for s in events:
        if s.kind == "DECIDED" and s.session_id in opened:
            outcomes[s.session_id].add((s.outcome, s.alert_id))
            if s.outcome != "ACCEPT":
                referred[s.reason.split(":")[0][:80]] += 1
    return {
        "opened": len(opened),
        "decided": len(outcomes),
        "undecided": len(opened - set(outcomes)),
        "decided_twice": sum(1 for found in outcomes.values() if len(found) > 1),
        "outcomes": dict(Counter(next(iter(found))[0] for found in outcomes.values())),
        "referral_reasons": dict(referred.most_common(5)),  # per DECIDED event, replays included
    }
