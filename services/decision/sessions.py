"""E-channel session fusion: the per-frame results of one traveller's session become ACCEPT or REFER_TO_OFFICER.

Pure logic, no Kafka: the decision service feeds it session control events and match results, and a clock tick for
time-outs. ACCEPT needs enough good frames (quality at least the minimum, verified against the claim) and a passing
liveness verdict, within the time budget. Liveness itself is assessed by detection, the only stage that sees the face
chips of consecutive frames (detection/session_liveness.py); its verdict arrives on each frame's traveller face.
REFER_TO_OFFICER comes from a time-out, repeated low quality, a failed liveness assessment, repeated mismatches
against the claim, or a stop-list hit on the traveller's face; CANCELLED from the kiosk. Every outcome names its
reasons and its evidence (frame ids, best similarity and quality, liveness score, policy and model versions).

A session's state is a plain dataclass, serialisable with ``to_dict``/``from_dict``, so the service can keep it in its
database and recover it after a restart (``session_store.py``). Folding is idempotent per frame id: a match result
replayed after a restart is not counted twice. The running side (Kafka, persistence, time-outs, audit) is
``session_stage.py``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from sightline.common import codec
from sightline.common.scores import similarity
from sightline.v1 import events_pb2, session_pb2, types_pb2

MAX_KIOSK_REASON_CHARS = 200  # a kiosk's free-text cancellation reason, as kept in the outcome and the audit record


class EChannelPolicy(BaseModel):
    """The rules of a gate session (the ``echannel`` block of the decision policy)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    budget_seconds: float = Field(5.0, gt=0, description="From the session's opening to REFER_TO_OFFICER by time-out.")
    min_verified_frames: int = Field(2, ge=1, description="Good frames verified against the claim needed to accept.")
    min_quality: float = Field(40.0, ge=0, le=100, description="Unified quality a frame's face needs to count.")
    max_low_quality_frames: int = Field(
        12, ge=1, description="Frames whose face is under the minimum quality before referring (repeated low quality)."
    )
    max_mismatch_frames: int = Field(
        2, ge=1, description="Good frames that fail verification against the claim before referring (mismatch)."
    )
    match_max_distance: float = Field(
        0.6, gt=0, description="A stop-list candidate at or under this distance is a hit (a list with its own "
        "threshold in the gallery uses that one).",
    )  # fmt: skip
    require_liveness: bool = Field(
        True, description="ACCEPT only with a passing liveness verdict (from detection's multi-frame checks)."
    )
    close_grace_seconds: float = Field(
        1.0, ge=0, description="After the kiosk closes a session without saying how many frames it sent, how long "
        "to wait for the results of frames still in the pipeline before deciding with what has arrived. A close "
        "that gives the count is decided when all have arrived, or at the session's deadline.",
    )  # fmt: skip


@dataclass
class SessionState:
    session_id: str
    gate_id: str
    claim_subject_id: str
    opened_at: float
    deadline: float
    frames_seen: int = 0
    low_quality: int = 0
    verified: list[tuple[str, float, float]] = field(default_factory=list)  # (frame id, similarity, quality)
    mismatches: list[str] = field(default_factory=list)
    liveness_assessed: bool = False
    liveness_passed: bool = False
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
        state.verified = [tuple(v) for v in state.verified]  # type: ignore[misc]
        state.stop_list_hit = tuple(state.stop_list_hit) if state.stop_list_hit else None  # type: ignore[assignment]
        return state

    @property
    def decided(self) -> bool:
        return self.outcome != session_pb2.SESSION_OUTCOME_UNSPECIFIED


def timestamp_seconds(stamp: Any) -> float:
    return stamp.seconds + stamp.nanos / 1e9


def traveller_face(result: events_pb2.MatchResult) -> events_pb2.FaceMatch | None:
    """The face nearest the camera (the largest box): the traveller; others in view are bystanders."""
    if not result.faces:
        return None
    return max(result.faces, key=lambda f: (f.box.x2 - f.box.x1) * (f.box.y2 - f.box.y1))


class SessionEngine:
    def __init__(self, policy: EChannelPolicy, policy_version: str) -> None:
        self.policy = policy
        self.policy_version = policy_version

    def open(self, event: session_pb2.SessionEvent) -> SessionState:
        opened = timestamp_seconds(event.opened_at)
        has_deadline = event.HasField("deadline")
        deadline = timestamp_seconds(event.deadline) if has_deadline else opened + self.policy.budget_seconds
        return SessionState(event.session_id, event.gate_id, event.claim_subject_id, opened, deadline)

    def on_result(self, state: SessionState, result: events_pb2.MatchResult) -> session_pb2.SessionUpdate:
        """Fold one frame's match result into the session; the update carries an outcome once one is reached.

        A frame already folded in (a replay) and any frame after the outcome change nothing: ``frames_seen`` tells.
        """
        frame_id = result.frame.frame_id
        if state.decided or (frame_id and frame_id in state.frame_ids):
            return self.update(state, [])
        state.frame_ids.append(frame_id)
        state.frames_seen += 1
        state.first_frame_at = state.first_frame_at or timestamp_seconds(result.frame.captured_at)
        state.model_version = f"{result.model_name}:{result.model_version}"
        face = traveller_face(result)
        reasons = (self._fold_face(state, frame_id, face) if face is not None else []) or self._try_to_decide(state)
        if not reasons and self._all_sent_frames_in(state):
            return self.close(state)
        return self.update(state, reasons)

    def _fold_face(self, state: SessionState, frame_id: str, face: events_pb2.FaceMatch) -> list[str]:
        policy = self.policy
        hit = next((c for c in face.candidates if c.watchlists and c.distance <= self._hit_distance(c)), None)
        if hit is not None:
            state.stop_list_hit, state.stop_lists = (hit.subject_id, hit.distance, frame_id), list(hit.watchlists)
            return self._refer(state, f"stop-list hit: {hit.subject_id} on {', '.join(hit.watchlists)} "
                                      f"(distance {hit.distance:.3f})")  # fmt: skip
        if face.quality.score < policy.min_quality:
            state.low_quality += 1
            if state.low_quality >= policy.max_low_quality_frames:
                return self._refer(state, f"repeated low quality: {state.low_quality} frames under "
                                          f"{policy.min_quality:.0f}")  # fmt: skip
            return []
        if face.liveness.assessed:
            state.liveness_assessed, state.liveness_passed = True, face.liveness.passed
            state.liveness_score = face.liveness.score
            if not face.liveness.passed and policy.require_liveness:
                return self._refer(state, "liveness failed: " + "; ".join(face.liveness.reasons))
        return self._fold_verification(state, frame_id, face)

    def _hit_distance(self, candidate: types_pb2.MatchCandidate) -> float:
        """The candidate's threshold: within any of its lists' (the gallery's own for a list, else the policy's)."""
        own = candidate.watchlist_thresholds
        return max(own.get(name, self.policy.match_max_distance) for name in candidate.watchlists)

    def _fold_verification(self, state: SessionState, frame_id: str, face: events_pb2.FaceMatch) -> list[str]:
        verification = face.verification
        if not verification.subject_found:
            return self._refer(state, f"the claimed subject {state.claim_subject_id!r} is not enrolled")
        if verification.verified:
            state.verified.append((frame_id, verification.similarity, face.quality.score))
            return []
        state.mismatches.append(frame_id)
        if len(state.mismatches) >= self.policy.max_mismatch_frames:
            return self._refer(state, f"face does not match the claim on {len(state.mismatches)} good frames "
                                      f"(last distance {verification.distance:.3f})")  # fmt: skip
        return []

    def _try_to_decide(self, state: SessionState) -> list[str]:
        needed = self.policy.min_verified_frames
        if len(state.verified) < needed or (self.policy.require_liveness and not state.liveness_passed):
            return []
        state.outcome = session_pb2.SESSION_OUTCOME_ACCEPT
        liveness = f"liveness passed (score {state.liveness_score:.2f})" if state.liveness_passed else "liveness not required"
        return [f"{len(state.verified)} good frames verified against the claim ({needed} needed)", liveness]

    def request_close(self, state: SessionState, at: float, frames_sent: int = 0) -> session_pb2.SessionUpdate:
        """The kiosk sent its last frame (``frames_sent`` of them, 0 if unknown). Results of frames still in the
        pipeline are awaited: the session is closed once all sent frames are in (a loaded pipeline must not turn a
        genuine traveller away early; the deadline still holds), or, with the count unknown, ``close_grace_seconds``
        after ``at`` (see ``tick``); until then the update carries no outcome."""
        if not state.decided and state.close_requested_at is None:  # a replayed close keeps the first one's time
            state.close_requested_at, state.frames_sent = at, frames_sent
        if not state.decided and (self._all_sent_frames_in(state) or self.policy.close_grace_seconds == 0):
            return self.close(state)
        return self.update(state, [])

    def _all_sent_frames_in(self, state: SessionState) -> bool:
        return state.close_requested_at is not None and 0 < state.frames_sent <= state.frames_seen

    def close(self, state: SessionState) -> session_pb2.SessionUpdate:
        """Decide now with what has arrived; without enough evidence the traveller is referred."""
        state.closed = True
        if state.decided:
            return self.update(state, [])
        reasons = self._try_to_decide(state) or self._refer(state, self._shortfall(state, "session closed"))
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
        if now >= state.deadline:
            budget = round(state.deadline - state.opened_at, 1)
            return self.update(state, self._refer(state, self._shortfall(state, f"time-out after {budget:g} s")))
        closing = state.close_requested_at
        if closing is not None and state.frames_sent == 0 and now >= closing + self.policy.close_grace_seconds:
            return self.close(state)
        return None

    def _shortfall(self, state: SessionState, why: str) -> str:
        liveness = "liveness passed" if state.liveness_passed else "liveness not yet assessed"
        return f"{why}: {len(state.verified)} of {self.policy.min_verified_frames} verified frames, {liveness}"

    def stop_list_alert(self, state: SessionState, watchlists: Sequence[str] | None = None) -> events_pb2.Alert | None:
        """The alert for review that a stop-list hit raises (the gate refers the traveller; a person decides).

        ``watchlists`` defaults to the lists the hit subject is on. The alert id is derived like the decision engine's
        (gate, subject, evidence frame), so a replay raises the same alert.
        """
        # Imported here: engine -> policy -> sessions (the policy's echannel block) would otherwise be circular.
        from sightline.decision.engine import stable_id

        if state.stop_list_hit is None:
            return None
        subject_id, distance, frame_id = state.stop_list_hit
        watchlists = state.stop_lists if watchlists is None else watchlists
        return events_pb2.Alert(
            alert_id=stable_id(state.gate_id, subject_id, frame_id), source_id=state.gate_id, subject_id=subject_id,
            watchlists=list(watchlists), distance=distance, similarity=similarity(distance),
            evidence_frame_ids=[frame_id], status=events_pb2.ALERT_STATUS_PENDING_REVIEW, raised_at=codec.now(),
            policy_version=self.policy_version,
        )  # fmt: skip

    @staticmethod
    def _refer(state: SessionState, reason: str) -> list[str]:
        state.outcome = session_pb2.SESSION_OUTCOME_REFER_TO_OFFICER
        return [reason]

    def update(self, state: SessionState, reasons: Sequence[str]) -> session_pb2.SessionUpdate:
        """The session as a kiosk sees it; ``reasons`` are the outcome's when it was just reached (and are kept, so a
        decided session's update always carries them)."""
        if state.decided and state.decided_at is None:
            state.reasons, state.decided_at = list(reasons), time.time()
        shown = state.reasons if state.decided else list(reasons)
        update = session_pb2.SessionUpdate(
            session_id=state.session_id, outcome=state.outcome, reasons=shown, frames_seen=state.frames_seen,
            frames_verified=len(state.verified), evidence_frame_ids=self._evidence(state),
            best_similarity=max((v[1] for v in state.verified), default=0.0),
            best_quality=max((v[2] for v in state.verified), default=0.0),
            liveness_score=state.liveness_score, model_version=state.model_version,
            policy_version=self.policy_version,
        )  # fmt: skip
        if state.decided_at is not None and state.first_frame_at is not None:
            update.elapsed_ms = (state.decided_at - state.first_frame_at) * 1000
        return update

    @staticmethod
    def _evidence(state: SessionState) -> list[str]:
        """The frames the outcome rests on: verified ones, mismatches, and the stop-list hit's frame."""
        hit = [state.stop_list_hit[2]] if state.stop_list_hit else []
        return [v[0] for v in state.verified] + state.mismatches + hit
