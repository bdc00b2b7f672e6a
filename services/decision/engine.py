"""The decision engine: turns per-frame match results into decisions and alerts, following the policy.

Pure logic with in-memory state, no Kafka: the service feeds it one ``MatchResult`` at a time. Agreement is kept per
(source, track, subject) for CCTV faces, which carry their track on their camera (docs/cctv.md), and per (source,
subject) for faces without a track: the recent frames on which that subject was a hit. So for a tracked face,
``min_agreeing_frames`` counts the searched faces of its track, which detection sends for a search a few times per
track, not once per frame. A track raises at most one alert per subject; an alert for a subject that the same source
alerted within ``alert_cooldown_seconds`` is merged into that one (from any track), and a reviewer's "not this
person" suppresses further alerts of the subject on that track (review/store.py). Windows use the frames' capture times,
not the wall clock, so a replay after a restart decides the same way; a replayed frame is counted once. Decision and
alert ids are derived from their inputs, so a replayed decision carries the same id and consumers can deduplicate: a
tracked face's alert is named by (source, track, subject), a track's one alert, whatever frames a replay starts from;
an untracked face's by (source, subject, first evidence frame).

An alert is recorded (``AlertBook.record``: stored for review, idempotent on its id) before any of the engine's state
changes: a failed store raises, leaves the track unalerted and the cool-down unset, and the frame is processed again
(a transient error, common/stage.py), raising the same alert. The cool-down survives a restart: with no alert of the
subject on the source in memory, the engine asks the book for the last one stored (``AlertBook.last``). A replay of
the frame that raised an alert gives that alert again (with its stored status), so an alert whose publication failed
is published by the retry.

E-channel (gate) frames get their per-frame decision but never an alert here: a stop-list hit at a gate is alerted
once, by its session (echannel/engine.py), so their decisions name no alert and leave no cool-down behind.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

from sightline.common import codec
from sightline.common.scores import fmr, fmr_is_extrapolated, format_fmr
from sightline.decision.policy import Policy
from sightline.v1 import events_pb2, types_pb2

MAX_TRACKED_KEYS = 100_000


@dataclass
class _Hits:
    frames: deque[tuple[str, float]]  # (frame_id, capture time)
    alerted: bool = False  # the track's alert for this subject is raised, or merged into another: at most one


@dataclass(frozen=True)
class LastAlert:
    """The last alert of a subject on a source: what the cool-down compares with."""

    at: float  # capture time of the frame that raised it
    alert_id: str
    frame_id: str  # the frame that raised it: a replay of that frame gives the alert again


class AlertBook(Protocol):
    """Where raised alerts are recorded before anything else happens to them (``review/recorder.py``)."""

    def record(self, alert: events_pb2.Alert, *, seen_at: datetime | None = None) -> events_pb2.Alert | None:
        """Store and audit the alert (idempotent on its id); the alert to publish, or None when its subject was
        erased. Raises when it cannot be stored or audited (the database's error: transient, so retried)."""
        ...

    def last(self, source_id: str, subject_id: str) -> LastAlert | None:
        """The last alert stored for the subject on the source, if any."""
        ...


class _Unrecorded:
    """The book of an engine run without a review store (tests, evaluation): alerts are kept nowhere."""

    def record(self, alert: events_pb2.Alert, *, seen_at: datetime | None = None) -> events_pb2.Alert | None:
        return alert

    def last(self, source_id: str, subject_id: str) -> LastAlert | None:
        return None


@dataclass(frozen=True)
class _Hit:
    subject_id: str
    distance: float
    similarity: float
    watchlists: list[str]
    reason: str


def _fmr_text(distance: float) -> str:
    """The false match rate at a score, from the calibration table, as reasons quote it; a value below what the
    table's data could measure is marked, so nobody reads a model's tail as a measurement."""
    note = " (extrapolated)" if fmr_is_extrapolated(distance) else ""
    return f"FMR at this score {format_fmr(fmr(distance))}{note}"


def _check_scores(result: events_pb2.MatchResult) -> None:
    for face in result.faces:
        scores = [c.distance for c in face.candidates] + [c.similarity for c in face.candidates]
        scores += [face.verification.distance, face.verification.similarity, face.quality.score]
        if not all(math.isfinite(score) for score in scores):
            raise codec.MalformedEvent(f"face {face.face_index} has a score that is not a finite number")


def stable_id(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:32]


class DecisionEngine:
    """Per-frame decisions and watchlist alerts over one policy; not thread-safe (the matches stage feeds it in
    turn)."""

    def __init__(
        self, policy: Policy, suppressed: Callable[[str, str, str], bool] | None = None, alerts: AlertBook | None = None
    ) -> None:
        """``suppressed(source_id, subject_id, track_id)``: whether a reviewer said "not this person" there, on that
        track ("" for a face without one) (review/store.py). ``alerts``: where raised alerts are recorded (none:
        nowhere)."""
        self.policy = policy
        self._suppressed = suppressed or (lambda source_id, subject_id, track_id: False)
        self._alerts: AlertBook = alerts or _Unrecorded()
        self._hits: OrderedDict[tuple[str, str, str], _Hits] = OrderedDict()  # (source, track, subject)
        self._last_alerts: OrderedDict[tuple[str, str], LastAlert] = OrderedDict()  # (source, subject)
        # (source, subject) the book had no alert for: alerts of those are raised here, so memory has them from then on
        self._none_stored: OrderedDict[tuple[str, str], None] = OrderedDict()

    def decide(self, result: events_pb2.MatchResult) -> tuple[list[events_pb2.Decision], list[events_pb2.Alert]]:
        """The decisions of a frame's faces and the alerts they raise. MalformedEvent for a result whose scores are
        not numbers (matching never writes one; another producer on the topic might)."""
        _check_scores(result)
        if not result.faces:
            return [self._no_face(result)], []
        decisions, alerts = [], []
        for face in result.faces:
            decision, alert = self._decide_face(result, face)
            decisions.append(decision)
            if alert is not None:
                alerts.append(alert)
        return decisions, alerts

    def _no_face(self, result: events_pb2.MatchResult) -> events_pb2.Decision:
        """The terminal record of a frame with no face to decide on: what integrators count frames by."""
        return events_pb2.Decision(
            decision_id=stable_id(result.frame.frame_id, "no-face", self.policy.version),
            frame=result.frame,
            outcome=events_pb2.OUTCOME_NO_FACE,
            reasons=["no face to decide on in this frame (none found, or none on its tracks worth a search)"],
            evidence_frame_ids=[result.frame.frame_id],
            policy_version=self.policy.version,
            model_version=f"{result.model_name}:{result.model_version}",
            decided_at=codec.now(),
        )

    def _decide_face(
        self, result: events_pb2.MatchResult, face: events_pb2.FaceMatch
    ) -> tuple[events_pb2.Decision, events_pb2.Alert | None]:
        frame = result.frame
        decision = events_pb2.Decision(
            decision_id=stable_id(frame.frame_id, str(face.face_index), self.policy.version),
            frame=frame,
            face_index=face.face_index,
            policy_version=self.policy.version,
            model_version=f"{result.model_name}:{result.model_version}",
            decided_at=codec.now(),
            track_id=face.track_id,
        )
        if face.quality.score < self.policy.min_quality:
            decision.outcome = events_pb2.OUTCOME_LOW_QUALITY
            decision.reasons.append(f"quality {face.quality.score:.0f} < minimum {self.policy.min_quality:.0f}")
            decision.evidence_frame_ids.append(frame.frame_id)
            return decision, None
        hit = self._hit(frame, face)
        if hit is None:
            return self._no_match(decision, frame, face), None
        return self._agree(decision, frame, hit)

    def _hit(self, frame: types_pb2.FrameRef, face: events_pb2.FaceMatch) -> _Hit | None:
        shown = self.policy.describe_threshold()
        if frame.claim_subject_id:
            v = face.verification
            if self.policy.verifies(v):  # the policy's own 1:1 threshold, never matching's ``verified``
                return _Hit(
                    v.subject_id,
                    v.distance,
                    v.similarity,
                    [],
                    f"claim verified: distance {v.distance:.3f} <= {shown}; {_fmr_text(v.distance)}",
                )
            return None
        for candidate in face.candidates:  # most alike first; lists may set their own thresholds
            threshold, shown = self.policy.threshold_for(list(candidate.watchlists), candidate.watchlist_thresholds)
            if candidate.distance <= threshold:
                return _Hit(
                    candidate.subject_id,
                    candidate.distance,
                    candidate.similarity,
                    list(candidate.watchlists),
                    f"best candidate: distance {candidate.distance:.3f} <= {shown}; {_fmr_text(candidate.distance)}",
                )
        return None

    def _no_match(
        self, decision: events_pb2.Decision, frame: types_pb2.FrameRef, face: events_pb2.FaceMatch
    ) -> events_pb2.Decision:
        decision.outcome = events_pb2.OUTCOME_NO_MATCH
        decision.evidence_frame_ids.append(frame.frame_id)
        limit = self.policy.describe_threshold()
        if frame.claim_subject_id:
            v = face.verification
            decision.reasons.append(
                f"claim not verified: distance {v.distance:.3f} > {limit}; {_fmr_text(v.distance)}"
                if v.subject_found
                else f"claimed subject {frame.claim_subject_id!r} is not enrolled"
            )
            decision.distance, decision.similarity = v.distance, v.similarity
        elif face.candidates:
            best = face.candidates[0].distance
            decision.reasons.append(f"no candidate within distance {limit} (best {best:.3f}); {_fmr_text(best)}")
            decision.distance, decision.similarity = face.candidates[0].distance, face.candidates[0].similarity
        else:
            decision.reasons.append("the gallery has no subject to compare with")
        return decision

    def _agree(
        self, decision: events_pb2.Decision, frame: types_pb2.FrameRef, hit: _Hit
    ) -> tuple[events_pb2.Decision, events_pb2.Alert | None]:
        at = codec.seconds(frame.captured_at)
        hits = self._record((frame.source_id, decision.track_id, hit.subject_id), frame.frame_id, at)
        decision.subject_id, decision.distance, decision.similarity = hit.subject_id, hit.distance, hit.similarity
        decision.evidence_frame_ids.extend(frame_id for frame_id, _ in hits.frames)
        agreeing, needed = len(hits.frames), self.policy.min_agreeing_frames
        what = f"searched face(s) of track {decision.track_id}" if decision.track_id else "frame(s)"
        window = self.policy.window_seconds
        decision.reasons.extend([hit.reason, f"{agreeing} {what} agree within {window:g} s ({needed} needed)"])
        if agreeing < needed:
            decision.outcome = events_pb2.OUTCOME_PENDING
            return decision, None
        decision.outcome = events_pb2.OUTCOME_MATCH
        if frame.purpose == types_pb2.PURPOSE_ECHANNEL:
            return decision, None  # a gate's stop-list hit is alerted by its session (echannel/engine.py), once
        return decision, self._maybe_alert(decision, hits, hit, at)

    def _record(self, key: tuple[str, str, str], frame_id: str, at: float) -> _Hits:
        """The hits of (source, track, subject) within the window, this frame's included (once)."""
        hits = self._hits.pop(key, None) or _Hits(deque())
        self._hits[key] = hits  # most recently used last, so the oldest keys are evicted first
        if all(frame_id != seen for seen, _ in hits.frames):
            hits.frames.append((frame_id, at))
        while hits.frames and hits.frames[0][1] < at - self.policy.window_seconds:
            hits.frames.popleft()
        while len(self._hits) > MAX_TRACKED_KEYS:
            self._hits.popitem(last=False)
        return hits

    def _maybe_alert(self, decision: events_pb2.Decision, hits: _Hits, hit: _Hit, at: float) -> events_pb2.Alert | None:
        """The alert this MATCH raises, recorded, or None; the track and the cool-down change only once it is stored."""
        watchlists = self.policy.alerts_on(hit.watchlists)
        if not watchlists:
            return None
        frame, track = decision.frame, decision.track_id
        alert = self._new_alert(decision, hit, watchlists)
        last = self._last_alert(frame.source_id, hit.subject_id)
        if last is not None and (last.alert_id, last.frame_id) == (alert.alert_id, frame.frame_id):
            return self._raise(decision, hits, alert, at)  # a replay of the frame that raised it: the same alert
        if hits.alerted or (track and last is not None and last.alert_id == alert.alert_id):  # 2nd: after a restart
            decision.reasons.append(f"alert already raised for track {track}")
            return None
        if last is not None and at - last.at < self.policy.alert_cooldown_seconds:
            hits.alerted = bool(track)  # this track's alert is that one
            decision.reasons.append(
                f"alert merged into {last.alert_id[:12]}: same subject on this source within the cool-down"
            )
            return None
        if self._suppressed(frame.source_id, hit.subject_id, track):
            where = f"on track {track}" if track else "on this source"
            decision.reasons.append(f"alert suppressed: a reviewer said this is not the person, {where}")
            return None
        return self._raise(decision, hits, alert, at)

    def _new_alert(self, decision: events_pb2.Decision, hit: _Hit, watchlists: list[str]) -> events_pb2.Alert:
        frame, track = decision.frame, decision.track_id
        # A track raises one alert per subject: naming it by the track (whose id carries its first sighting) gives a
        # replay that starts later in the track, after a restart, the same alert, not a second one to review.
        origin = f"track:{track}" if track else decision.evidence_frame_ids[0]
        return events_pb2.Alert(
            alert_id=stable_id(frame.source_id, hit.subject_id, origin),
            decision_id=decision.decision_id,
            source_id=frame.source_id,
            subject_id=hit.subject_id,
            watchlists=watchlists,
            distance=hit.distance,
            similarity=hit.similarity,
            evidence_frame_ids=list(decision.evidence_frame_ids),
            status=events_pb2.ALERT_STATUS_PENDING_REVIEW,
            raised_at=codec.now(),
            policy_version=self.policy.version,
            track_id=track,
        )

    def _raise(
        self, decision: events_pb2.Decision, hits: _Hits, alert: events_pb2.Alert, at: float
    ) -> events_pb2.Alert | None:
        """Record the alert, then (only then) mark the track alerted and start the cool-down. A failure to store it
        raises with the state untouched, so the frame's retry raises it again."""
        frame = decision.frame
        recorded = self._alerts.record(alert, seen_at=datetime.fromtimestamp(at, UTC))
        if recorded is None:  # its subject was erased meanwhile: nothing to raise, nothing to remember
            return None
        hits.alerted = bool(decision.track_id)
        self._remember_alert((frame.source_id, alert.subject_id), LastAlert(at, recorded.alert_id, frame.frame_id))
        decision.alert_id = recorded.alert_id
        decision.reasons.append(f"alert raised for watchlists {', '.join(recorded.watchlists)}")
        return recorded

    def _last_alert(self, source_id: str, subject_id: str) -> LastAlert | None:
        """The subject's last alert on the source: from memory, else (after a restart) from the book."""
        key = (source_id, subject_id)
        last = self._last_alerts.get(key)
        if last is None and key not in self._none_stored:
            last = self._alerts.last(source_id, subject_id)
            if last is not None:
                self._remember_alert(key, last)
            else:  # asked once per key and run: a subject matched frame after frame costs no query per frame
                self._none_stored[key] = None
                while len(self._none_stored) > MAX_TRACKED_KEYS:
                    self._none_stored.popitem(last=False)
        return last

    def _remember_alert(self, key: tuple[str, str], alert: LastAlert) -> None:
        self._last_alerts.pop(key, None)
        self._last_alerts[key] = alert  # most recent last, so the oldest are evicted first
        while len(self._last_alerts) > MAX_TRACKED_KEYS:
            self._last_alerts.popitem(last=False)
