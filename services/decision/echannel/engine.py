"""E-channel session fusion: the per-frame results of one traveller's session become ACCEPT or REFER_TO_OFFICER.

Pure logic, no Kafka: the decision service feeds it session control events and match results, and a clock tick for
time-outs. ACCEPT needs enough good frames (quality at least the minimum, verified against the claim) and a passing
liveness verdict, within the time budget. Liveness itself is assessed by detection, the only stage that sees the face
chips of consecutive frames (detection/session_liveness.py); its verdict arrives on each frame's traveller face with
the window of frames it was assessed on (``LivenessResult.first_sequence``/``last_sequence``). A frame is verified
when its distance to the claim is within this policy's threshold (``Policy.verifies``), whatever threshold matching
applied to its own ``verified`` flag, so tightening the policy tightens gates too. Only verified frames
inside that window count towards an ACCEPT: a verdict earned by one face (say a live but blurry one) cannot vouch for
frames shown after it (a good photo of the claimed person). REFER_TO_OFFICER comes from a time-out (a result folded
after the deadline included), repeated low quality, a failed liveness assessment, repeated mismatches against the
claim, or a stop-list hit on the traveller's face (within the thresholds CCTV uses, ``Policy.threshold_for``);
CANCELLED from the kiosk. Every outcome names its reasons and its evidence (frame ids, best similarity and quality,
liveness score, policy and model versions).

A session's state is a plain dataclass, serialisable with ``to_dict``/``from_dict``, so the service can keep it in its
database and recover it after a restart (``store.py``). Folding is idempotent per frame id: a match result
replayed after a restart is not counted twice. The running side (Kafka, persistence, time-outs, audit) is
``desk.py``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, NamedTuple

from sightline.common import codec
from sightline.common.scores import similarity
from sightline.decision.engine import stable_id
from sightline.decision.policy import Policy
from sightline.v1 import events_pb2, session_pb2, types_pb2

MAX_KIOSK_REASON_CHARS = 200  # a kiosk's free-text cancellation reason, as kept in the outcome and the audit record


class VerifiedFrame(NamedTuple):
    """A good frame whose traveller face was verified against the claim."""

    frame_id: str
    similarity: float
    quality: float
    sequence: int = -1  # FrameRef.sequence; -1 in a state saved before sequences were kept: inside no liveness window


@dataclass
class SessionState:
    session_id: str
    gate_id: str
    claim_subject_id: str
    opened_at: float
    deadline: float
    frames_seen: int = 0
    low_quality: int = 0
    verified: list[VerifiedFrame] = field(default_factory=list)
    mismatches: list[str] = field(default_factory=list)
    liveness_assessed: bool = False
    liveness_passed: bool = False
    liveness_window: tuple[int, int] | None = None  # (first, last) sequence of the frames the verdict was assessed on
    first_frame_at: float | None = None
    stop_list_hit: tuple[str, float, str] | None = None  # (subject id, distance, frame id)
    stop_lists: list[str] = field(default_factory=list)  # the lists the stop-list hit's subject is on
    liveness_score: float = 0.0
    closed: bool = False
    outcome: int = session_pb2.SESSION_OUTCOME_UNSPECIFIED
    model_version: str = ""
    frame_ids: list[str] = field(default_factory=list)  # every frame folded in, so a replayed result counts once
    close_requested_at: float | None = None  # the kiosk's close, while results of frames in flight are awaited
    frames_sent: int = 0  # frames the kiosk sent, when its close said so (0: unknown)
    reasons: list[str] = field(default_factory=list)  # the outcome's reasons, once decided
    decided_at: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SessionState:
        state = cls(**data)
        state.verified = [VerifiedFrame(*v) for v in state.verified]
        window = state.liveness_window
        state.liveness_window = (int(window[0]), int(window[1])) if window else None
        state.stop_list_hit = tuple(state.stop_list_hit) if state.stop_list_hit else None  # type: ignore[assignment]
        return state

    @property
    def decided(self) -> bool:
        return self.outcome != session_pb2.SESSION_OUTCOME_UNSPECIFIED


STOP_LIST_REASON = "stop-list hit: "
ERASED_STOP_LIST_REASON = STOP_LIST_REASON + "a subject since erased"


def forget_stop_list_hit(state: SessionState) -> None:
    """Right to erasure of the stop-list subject a session hit: the hit and its lists go, and the outcome's reason no
    longer names the subject (the traveller was referred, and stays referred)."""
    state.stop_list_hit, state.stop_lists = None, []
    state.reasons = [ERASED_STOP_LIST_REASON if r.startswith(STOP_LIST_REASON) else r for r in state.reasons]


def traveller_face(result: events_pb2.MatchResult) -> events_pb2.FaceMatch | None:
    """The face nearest the camera (the largest box): the traveller; others in view are bystanders."""
    if not result.faces:
        return None
    return max(result.faces, key=lambda f: (f.box.x2 - f.box.x1) * (f.box.y2 - f.box.y1))


class SessionEngine:
    def __init__(self, policy: Policy, clock: Callable[[], float] = time.time) -> None:
        """``policy``: its ``echannel`` block are the session's rules, its thresholds decide stop-list hits.
        ``clock``: wall-clock seconds, compared with deadlines (set by capture) and stamped on outcomes."""
        self.policy = policy
        self.rules = policy.echannel
        self.policy_version = policy.version
        self.clock = clock

    def open(self, event: session_pb2.SessionEvent) -> SessionState:
        """The new session of an OPENED event; MalformedEvent when its times cannot be those of a real session."""
        opened = codec.seconds(event.opened_at)
        has_deadline = event.HasField("deadline")
        deadline = codec.seconds(event.deadline) if has_deadline else opened + self.rules.budget_seconds
        self._check_times(opened, deadline)
        return SessionState(event.session_id, event.gate_id, event.claim_subject_id, opened, deadline)

    def _check_times(self, opened: float, deadline: float) -> None:
        """Refuse times no gate sends: one a database cannot store (out of the calendar's range) would fail every
        save of the session, on the session timer too, and a deadline far after the opening (more than the policy's
        ``max_deadline_seconds``) would keep the session open for as long."""
        for stamp in (opened, deadline):
            try:
                datetime.fromtimestamp(stamp, UTC)
            except (OverflowError, OSError, ValueError):
                raise codec.MalformedEvent(f"session time {stamp!r} is out of range") from None
        if deadline - opened > self.rules.max_deadline_seconds:
            raise codec.MalformedEvent(
                f"session deadline {deadline - opened:.0f} s after its opening (at most "
                f"{self.rules.max_deadline_seconds:g} s, echannel.max_deadline_seconds)"
            )

    def on_result(self, state: SessionState, result: events_pb2.MatchResult) -> session_pb2.SessionUpdate:
        """Fold one frame's match result into the session; the update carries an outcome once one is reached.

        A frame already folded in (a replay) and any frame after the outcome change nothing: ``frames_seen`` tells.
        A result folded after the deadline (late in the pipeline, or replayed after a restart) is evidence for a
        referral but never accepts: the session is referred by time-out.
        """
        frame_id = result.frame.frame_id
        if state.decided or (frame_id and frame_id in state.frame_ids):
            return self.update(state, [])
        state.frame_ids.append(frame_id)
        state.frames_seen += 1
        state.first_frame_at = state.first_frame_at or codec.seconds(result.frame.captured_at)
        state.model_version = f"{result.model_name}:{result.model_version}"
        face = traveller_face(result)
        reasons = self._fold_face(state, result.frame, face) if face is not None else []
        if not reasons:
            reasons = self._time_out(state, self.clock()) or self._try_to_decide(state)
        if not reasons and self._all_sent_frames_in(state):
            return self.close(state)
        return self.update(state, reasons)

    def _fold_face(self, state: SessionState, frame: types_pb2.FrameRef, face: events_pb2.FaceMatch) -> list[str]:
        hit = self._stop_list_hit(face)
        if hit is not None:
            candidate, threshold = hit
            state.stop_list_hit = (candidate.subject_id, candidate.distance, frame.frame_id)
            state.stop_lists = list(candidate.watchlists)
            return self._refer(
                state,
                f"{STOP_LIST_REASON}{candidate.subject_id} on {', '.join(candidate.watchlists)} "
                f"(distance {candidate.distance:.3f} <= {threshold})",
            )
        reasons = self._fold_liveness(state, face.liveness)
        if reasons:
            return reasons
        if face.quality.score < self.rules.min_quality:
            state.low_quality += 1
            if state.low_quality >= self.rules.max_low_quality_frames:
                return self._refer(
                    state, f"repeated low quality: {state.low_quality} frames under {self.rules.min_quality:.0f}"
                )
            return []
        return self._fold_verification(state, frame, face)

    def _stop_list_hit(self, face: events_pb2.FaceMatch) -> tuple[types_pb2.MatchCandidate, str] | None:
        """The first candidate on a stop list within that list's threshold, as CCTV decides it, and how the
        threshold reads."""
        for candidate in face.candidates:  # most alike first
            if candidate.watchlists:
                threshold, shown = self.policy.threshold_for(list(candidate.watchlists), candidate.watchlist_thresholds)
                if candidate.distance <= threshold:
                    return candidate, shown
        return None

    def _fold_liveness(self, state: SessionState, verdict: types_pb2.LivenessResult) -> list[str]:
        """Keep the session's liveness verdict and the window of frames it was assessed on (a verdict is about the
        session, so it is read from any frame, whatever that frame's quality)."""
        if not verdict.assessed:
            return []
        state.liveness_assessed, state.liveness_passed, state.liveness_score = True, verdict.passed, verdict.score
        state.liveness_window = (verdict.first_sequence, verdict.last_sequence)
        if not verdict.passed and self.rules.require_liveness:
            return self._refer(state, "liveness failed: " + "; ".join(verdict.reasons))
        return []

    def _fold_verification(
        self, state: SessionState, frame: types_pb2.FrameRef, face: events_pb2.FaceMatch
    ) -> list[str]:
        verification = face.verification
        if not verification.subject_found:
            return self._refer(state, f"the claimed subject {state.claim_subject_id!r} is not enrolled")
        if self.policy.verifies(verification):  # the policy's 1:1 threshold, not matching's ``verified``
            state.verified.append(
                VerifiedFrame(frame.frame_id, verification.similarity, face.quality.score, frame.sequence)
            )
            return []
        state.mismatches.append(frame.frame_id)
        if len(state.mismatches) >= self.rules.max_mismatch_frames:
            return self._refer(
                state,
                f"face does not match the claim on {len(state.mismatches)} good frames "
                f"(last distance {verification.distance:.3f} > "
                f"{self.policy.describe_threshold()})",
            )
        return []

    def _accepting(self, state: SessionState) -> list[VerifiedFrame]:
        """The verified frames an ACCEPT may rest on: with liveness required, those inside the window of frames the
        passing verdict was assessed on (none without one)."""
        if not self.rules.require_liveness:
            return state.verified
        if not state.liveness_passed or state.liveness_window is None:
            return []
        first, last = state.liveness_window
        return [v for v in state.verified if first <= v.sequence <= last]

    def _try_to_decide(self, state: SessionState) -> list[str]:
        needed, accepting = self.rules.min_verified_frames, self._accepting(state)
        if len(accepting) < needed:
            return []
        state.outcome = session_pb2.SESSION_OUTCOME_ACCEPT
        liveness = (
            f"liveness passed (score {state.liveness_score:.2f})" if state.liveness_passed else "liveness not required"
        )
        return [f"{len(accepting)} good frames verified against the claim ({needed} needed)", liveness]

    def _time_out(self, state: SessionState, now: float) -> list[str]:
        """Refer the session when its deadline has passed; no reasons otherwise."""
        if now < state.deadline:
            return []
        budget = round(state.deadline - state.opened_at, 1)
        return self._refer(state, self._shortfall(state, f"time-out after {budget:g} s"))

    def request_close(self, state: SessionState, at: float, frames_sent: int = 0) -> session_pb2.SessionUpdate:
        """The kiosk sent its last frame (``frames_sent`` of them, 0 if unknown). Results of frames still in the
        pipeline are awaited: the session is closed once all sent frames are in (a loaded pipeline must not turn a
        genuine traveller away early; the deadline still holds), or, with the count unknown, ``close_grace_seconds``
        after ``at`` (see ``tick``); until then the update carries no outcome."""
        if not state.decided and state.close_requested_at is None:  # a replayed close keeps the first one's time
            state.close_requested_at, state.frames_sent = at, frames_sent
        if not state.decided and (self._all_sent_frames_in(state) or self.rules.close_grace_seconds == 0):
            return self.close(state)
        return self.update(state, [])

    def _all_sent_frames_in(self, state: SessionState) -> bool:
        return state.close_requested_at is not None and 0 < state.frames_sent <= state.frames_seen

    def close(self, state: SessionState, now: float | None = None) -> session_pb2.SessionUpdate:
        """Decide now (``now``: the clock's time by default) with what has arrived; without enough evidence, or past
        the deadline, the traveller is referred."""
        state.closed = True
        if state.decided:
            return self.update(state, [])
        now = self.clock() if now is None else now
        reasons = (
            self._time_out(state, now)
            or self._try_to_decide(state)
            or self._refer(state, self._shortfall(state, "session closed"))
        )
        return self.update(state, reasons)

    def cancel(self, state: SessionState, reason: str = "") -> session_pb2.SessionUpdate:
        """The traveller left or the kiosk aborted (for ``reason``): the session ends without a decision about the
        traveller."""
        state.closed = True
        if state.decided:
            return self.update(state, [])
        state.outcome = session_pb2.SESSION_OUTCOME_CANCELLED
        return self.update(state, [reason[:MAX_KIOSK_REASON_CHARS] or "cancelled by the kiosk"])

    def tick(self, state: SessionState, now: float) -> session_pb2.SessionUpdate | None:
        """Refer a session whose time budget has run out, close one whose close grace has passed; None otherwise."""
        if state.decided:
            return None
        timed_out = self._time_out(state, now)
        if timed_out:
            return self.update(state, timed_out)
        closing = state.close_requested_at
        if closing is not None and state.frames_sent == 0 and now >= closing + self.rules.close_grace_seconds:
            return self.close(state, now)
        return None

    def _shortfall(self, state: SessionState, why: str) -> str:
        liveness = "liveness passed" if state.liveness_passed else "liveness not yet assessed"
        counted = self._accepting(state) if state.liveness_passed else state.verified
        text = f"{why}: {len(counted)} of {self.rules.min_verified_frames} verified frames, {liveness}"
        outside = len(state.verified) - len(counted)
        if outside and state.liveness_window is not None:
            first, last = state.liveness_window
            text += f" ({outside} more verified outside frames {first}-{last}, which liveness assessed)"
        return text

    def stop_list_alert(self, state: SessionState, watchlists: Sequence[str] | None = None) -> events_pb2.Alert | None:
        """The alert for review that a stop-list hit raises (the gate refers the traveller; a person decides).

        ``watchlists`` defaults to the lists the hit subject is on. The alert id is derived like the decision engine's
        (gate, subject, evidence frame), so a replay raises the same alert.
        """
        if state.stop_list_hit is None:
            return None
        subject_id, distance, frame_id = state.stop_list_hit
        watchlists = state.stop_lists if watchlists is None else watchlists
        return events_pb2.Alert(
            alert_id=stable_id(state.gate_id, subject_id, frame_id),
            source_id=state.gate_id,
            subject_id=subject_id,
            watchlists=list(watchlists),
            distance=distance,
            similarity=similarity(distance),
            evidence_frame_ids=[frame_id],
            status=events_pb2.ALERT_STATUS_PENDING_REVIEW,
            raised_at=codec.now(),
            policy_version=self.policy_version,
        )

    @staticmethod
    def _refer(state: SessionState, reason: str) -> list[str]:
        state.outcome = session_pb2.SESSION_OUTCOME_REFER_TO_OFFICER
        return [reason]

    def update(self, state: SessionState, reasons: Sequence[str]) -> session_pb2.SessionUpdate:
        """The session as a kiosk sees it; ``reasons`` are the outcome's when it was just reached (and are kept, so a
        decided session's update always carries them)."""
        if state.decided and state.decided_at is None:
            state.reasons, state.decided_at = list(reasons), self.clock()
        shown = state.reasons if state.decided else list(reasons)
        update = session_pb2.SessionUpdate(
            session_id=state.session_id,
            outcome=state.outcome,
            reasons=shown,
            frames_seen=state.frames_seen,
            frames_verified=len(state.verified),
            evidence_frame_ids=self._evidence(state),
            best_similarity=max((v.similarity for v in state.verified), default=0.0),
            best_quality=max((v.quality for v in state.verified), default=0.0),
            liveness_score=state.liveness_score,
            model_version=state.model_version,
            policy_version=self.policy_version,
        )
        if state.decided_at is not None and state.first_frame_at is not None:
            update.elapsed_ms = (state.decided_at - state.first_frame_at) * 1000
        return update

    @staticmethod
    def _evidence(state: SessionState) -> list[str]:
        """The frames the outcome rests on: verified ones, mismatches, and the stop-list hit's frame."""
        hit = [state.stop_list_hit[2]] if state.stop_list_hit else []
        return [v.frame_id for v in state.verified] + state.mismatches + hit
