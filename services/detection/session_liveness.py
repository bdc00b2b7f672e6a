"""Liveness of e-channel sessions, assessed where the face chips are: in the detection service.

The liveness checks compare the traveller's aligned chips across frames (docs/liveness.md), and chips never leave
detection (only short-retention topics may hold them, and only up to embedding). So detection keeps, per open
session, the traveller's recent observations in memory and attaches the current verdict to the traveller's face of
each e-channel frame; the decision service fuses verdicts, never pixels. A gate's frames are keyed by its id, so all
frames of a session reach the same detection replica in order. Buffers of sessions that have gone quiet are dropped.

Only faces of at least ``LivenessSettings.min_quality`` count towards the verdict, the same bar decision sets for a
frame to count as verified evidence (``echannel.min_quality``), and the verdict names the window it rests on (the
first and last frame sequence assessed). Decision accepts only on verified frames inside that window, so every frame
an ACCEPT rests on is one the liveness checks saw: a live but blurry face cannot earn the verdict for a good photo
shown after it.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

from sightline.common.models.pipeline import AnalyzedFace
from sightline.detection.liveness import LivenessChecker, LivenessObservation, LivenessSettings
from sightline.v1 import types_pb2

IDLE_SECONDS = 120.0
MAX_SESSIONS = 1000


@dataclass
class _Session:
    observations: list[LivenessObservation] = field(default_factory=list)
    sequences: list[int] = field(default_factory=list)  # FrameRef.sequence of each observation
    last_seen: float = 0.0
    verdict: types_pb2.LivenessResult | None = None


def traveller(faces: Sequence[AnalyzedFace]) -> AnalyzedFace | None:
    """The face nearest the camera (largest box): the traveller; others in view are bystanders."""
    if not faces:
        return None
    return max(faces, key=lambda f: float((f.box[2] - f.box[0]) * (f.box[3] - f.box[1])))


class SessionLiveness:
    def __init__(self, settings: LivenessSettings | None = None) -> None:
        self.checker = LivenessChecker(settings or LivenessSettings())
        self._sessions: OrderedDict[str, _Session] = OrderedDict()
        self._lock = threading.Lock()

    def observe(self, session_id: str, face: AnalyzedFace, at: float, sequence: int) -> types_pb2.LivenessResult:
        """Add the traveller's face of one frame (``sequence``: its ``FrameRef.sequence``) and return the session's
        verdict as of this frame.

        Faces under ``min_quality`` are not counted. A session is assessed once, on its first ``min_frames`` counted
        faces: the decision acts on that first verdict (an accept needs it passed, and rests only on frames inside its
        window; a failure refers), so later frames of the session get the same verdict without the checks running
        again (they are the costliest part of an e-channel frame in detection).
        """
        settings = self.checker.settings
        with self._lock:
            session = self._session(session_id, at)
            if session.verdict is not None:
                return session.verdict
            if face.quality.score < settings.min_quality:
                counted = len(session.observations)
                return types_pb2.LivenessResult(
                    assessed=False,
                    frames=counted,
                    reasons=[
                        f"face quality {face.quality.score:.0f} under {settings.min_quality:.0f}: not counted "
                        f"({counted} of {settings.min_frames} frames)"
                    ],
                )
            session.observations.append(LivenessObservation.from_face(face))
            session.sequences.append(sequence)
            observations, sequences = list(session.observations), list(session.sequences)
        if len(observations) < settings.min_frames:
            needed = f"need {settings.min_frames} frames, have {len(observations)}"
            return types_pb2.LivenessResult(assessed=False, frames=len(observations), reasons=[needed])
        verdict = self.checker.assess(observations)
        result = types_pb2.LivenessResult(
            assessed=True,
            passed=verdict.passed,
            score=verdict.score,
            reasons=list(verdict.reasons),
            frames=len(observations),
            first_sequence=sequences[0],
            last_sequence=sequences[-1],
        )
        with self._lock:
            session.verdict, session.observations, session.sequences = result, [], []  # not needed any more
        return result

    def _session(self, session_id: str, at: float) -> _Session:
        for stale in [k for k, s in self._sessions.items() if at - s.last_seen > IDLE_SECONDS]:
            del self._sessions[stale]
        session = self._sessions.pop(session_id, None) or _Session()
        session.last_seen = at
        self._sessions[session_id] = session
        while len(self._sessions) > MAX_SESSIONS:
            self._sessions.popitem(last=False)
        return session
