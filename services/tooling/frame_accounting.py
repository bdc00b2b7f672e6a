"""Frame accounting for hostile input: what became of each record put on the stream path, read back from the topics.

``ledger.py`` (the chaos benchmark's) follows well-formed frames by their frame id. Hostile records need more: one
that does not parse has no frame id, and its dead letter names it only by position; records may be put straight on
a topic in the middle of the path; ids may repeat. So here a record is followed by its position and, hop by hop, by
the frame id its stage read. The outcomes are the same as the ledger's.

A record published to one of the stage topics (frames, faces, embeddings, matches) is followed hop by hop by its
frame id: the stage that consumed it either dead-lettered it (the dead letter names the input's topic, partition and
offset) or published an output carrying the same frame id on the next topic. At the end of the path a match result
is decided when the decisions topic has one decision per face of it (one NO_FACE decision when it has none). Frames
that capture itself dead-lettered (``source_dead_letter``: partition -1, the frame id set) are accounted by frame id.

Each followed record ends in one ``Outcome``:

- ``dead_letter``: a stage (named in ``stage``, with its ``reason``) refused it or something derived from it;
- ``decided``: a decision for every face of its match result;
- ``no_face``: its match result has no face (none found, or none worth a search) and decision published the frame's
  one NO_FACE decision;
- ``pending``: nothing yet, which at the end of a run means lost.

Frame ids may repeat (a corrupted record can parse to any id, a replay repeats one): inputs and outputs with the same
id are paired in the order the topics give them, and outputs left over are counted as ``duplicates``. The ledger
only reads what it is given; the caller feeds it the records it published and those it consumed.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field

from google.protobuf.message import Message

from sightline.common import codec
from sightline.common.topics import DEADLETTER, DECISIONS, EMBEDDINGS, FACES, FRAMES, MATCHES, by_name
from sightline.v1 import events_pb2

# Each stage topic and the topic its stage's outputs go to (the outputs carry the input's frame id).
NEXT_HOP = {FRAMES.name: FACES.name, FACES.name: EMBEDDINGS.name, EMBEDDINGS.name: MATCHES.name}
STAGE_TOPICS = (FRAMES.name, FACES.name, EMBEDDINGS.name, MATCHES.name)
# What a reader of the ledger must consume.
WATCHED_TOPICS = (*STAGE_TOPICS, DECISIONS.name, DEADLETTER.name)

DEAD_LETTER, DECIDED, NO_FACE, PENDING = "dead_letter", "decided", "no_face", "pending"

Position = tuple[str, int, int]  # topic, partition, offset


@dataclass(frozen=True)
class Outcome:
    kind: str  # DEAD_LETTER, DECIDED, NO_FACE or PENDING
    stage: str = ""  # a dead letter: the stage that wrote it; pending: the topic of the last record found
    reason: str = ""  # a dead letter: its reason; pending: what is missing


@dataclass
class _Record:
    position: Position
    frame_id: str | None  # None: the record does not parse as its topic's event (only a dead letter accounts for it)
    faces: int = 0  # match results: how many faces need a decision


@dataclass
class FrameLedger:
    """The records followed and everything read back, with the outcome of each followed record."""

    followed: list[_Record] = field(default_factory=list)
    # Stage outputs read back, per topic and frame id, in the order read.
    outputs: dict[str, dict[str, list[_Record]]] = field(default_factory=lambda: defaultdict(lambda: defaultdict(list)))
    dead: dict[Position, events_pb2.DeadLetter] = field(default_factory=dict)  # by the input they name
    source_dead: dict[str, list[events_pb2.DeadLetter]] = field(default_factory=lambda: defaultdict(list))  # capture's
    decisions: Counter[str] = field(default_factory=Counter)  # per frame id
    own: set[Position] = field(default_factory=set)  # what this run published
    seen: set[Position] = field(default_factory=set)
    dead_letter_reasons: Counter[tuple[str, str]] = field(default_factory=Counter)
    internal_errors: list[str] = field(default_factory=list)

    # -- feeding -------------------------------------------------------------------------------------------------------

    def follow(self, topic: str, partition: int, offset: int, value: bytes | None) -> None:
        """A record this run published to a stage topic: its outcome will be reported."""
        record = _parsed(topic, partition, offset, value)
        self.followed.append(record)
        self.own.add(record.position)

    def follow_capture_frame(self, frame_id: str) -> None:
        """A frame capture read from a source (``IngestResponse``): found by its id, on the frames topic or among
        capture's own dead letters."""
        self.followed.append(_Record(("capture", -1, len(self.followed)), frame_id))

    def consume(self, topic: str, partition: int, offset: int, value: bytes | None) -> None:
        """A record read back from one of WATCHED_TOPICS (each position counts once, however often it is read)."""
        position = (topic, partition, offset)
        if position in self.seen:
            return
        self.seen.add(position)
        if topic == DEADLETTER.name:
            self._dead_letter(codec.parse(events_pb2.DeadLetter, value))
        elif topic == DECISIONS.name:
            self.decisions[codec.parse(events_pb2.Decision, value).frame.frame_id] += 1
        elif position not in self.own:  # a stage's output (what this run published is followed, not an output)
            record = _parsed(topic, partition, offset, value)
            if record.frame_id is not None:
                self.outputs[topic][record.frame_id].append(record)

    def _dead_letter(self, letter: events_pb2.DeadLetter) -> None:
        self.dead_letter_reasons[(letter.stage, letter.reason)] += 1
        if letter.reason == "internal_error":
            self.internal_errors.append(f"{letter.stage}: {letter.error}")
        if letter.input_partition < 0:  # capture's: its input was a file or a stream, not a record
            self.source_dead[letter.frame_id].append(letter)
        else:
            self.dead[(letter.input_topic, letter.input_partition, letter.input_offset)] = letter

    # -- outcomes ------------------------------------------------------------------------------------------------------

    def outcomes(self) -> list[Outcome]:
        """The outcome of every followed record, in the order they were followed."""
        pairing = _Pairing(self)
        return [pairing.outcome(record) for record in self.followed]

    def duplicates(self) -> int:
        """Stage outputs no followed record accounts for (replays; outputs of records this ledger does not follow)."""
        pairing = _Pairing(self)
        for record in self.followed:
            pairing.outcome(record)
        return sum(len(records) for by_id in self.outputs.values() for records in by_id.values()) - pairing.used


class _Pairing:
    """One pass over the followed records, pairing each with the outputs and decisions it accounts for."""

    def __init__(self, ledger: FrameLedger) -> None:
        self.ledger = ledger
        self.claimed: dict[str, Counter[str]] = defaultdict(Counter)  # outputs paired, per topic and frame id
        self.decided: Counter[str] = Counter()  # decisions paired, per frame id
        self.source_claimed: Counter[str] = Counter()  # capture's dead letters paired, per frame id
        self.used = 0

    def outcome(self, record: _Record) -> Outcome:
        if record.position[0] != "capture":
            return self._follow(record)
        frame_id = record.frame_id or ""
        letters = self.ledger.source_dead.get(frame_id, [])
        if self.source_claimed[frame_id] < len(letters):
            letter = letters[self.source_claimed[frame_id]]
            self.source_claimed[frame_id] += 1
            return Outcome(DEAD_LETTER, letter.stage, letter.reason)
        published = self._claim(FRAMES.name, frame_id)
        return Outcome(PENDING, "capture", "not published") if published is None else self._follow(published)

    def _follow(self, record: _Record) -> Outcome:
        current = record
        while True:
            letter = self.ledger.dead.get(current.position)
            if letter is not None:
                return Outcome(DEAD_LETTER, letter.stage, letter.reason)
            topic = current.position[0]
            if current.frame_id is None:
                return Outcome(PENDING, topic, "unparseable, no dead letter")
            if topic == MATCHES.name:
                return self._decided(current)
            following = self._claim(NEXT_HOP[topic], current.frame_id)
            if following is None:
                return Outcome(PENDING, topic, "no output, no dead letter")
            current = following

    def _decided(self, result: _Record) -> Outcome:
        frame_id = result.frame_id or ""
        needed = max(result.faces, 1)  # a frame with no face has its one NO_FACE decision
        if self.ledger.decisions[frame_id] - self.decided[frame_id] < needed:
            return Outcome(PENDING, MATCHES.name, "decisions missing")
        self.decided[frame_id] += needed
        return Outcome(DECIDED if result.faces else NO_FACE)

    def _claim(self, topic: str, frame_id: str) -> _Record | None:
        """The next output on ``topic`` with this frame id not yet paired with an input, if any."""
        candidates = self.ledger.outputs[topic].get(frame_id, [])
        taken = self.claimed[topic][frame_id]
        if taken >= len(candidates):
            return None
        self.claimed[topic][frame_id] += 1
        self.used += 1
        return candidates[taken]


def _parsed(topic: str, partition: int, offset: int, value: bytes | None) -> _Record:
    """A stage-topic record with its frame id, as the stage consuming it would read it (codec.parse)."""
    position = (topic, partition, offset)
    try:
        message: Message = codec.parse(codec.event_class(by_name(topic)), value)
    except codec.MalformedEvent:
        return _Record(position, None)
    faces = len(message.faces) if isinstance(message, events_pb2.MatchResult) else 0
    return _Record(position, message.frame.frame_id, faces)  # type: ignore[attr-defined]


def summary(outcomes: list[Outcome]) -> Counter[str]:
    """Outcomes counted by kind; dead letters and pending records also by stage and reason
    (``dead_letter:detection:undecodable_image``, ``pending:sightline.matches.v1:decisions missing``)."""
    counts: Counter[str] = Counter()
    for outcome in outcomes:
        counts[outcome.kind] += 1
        if outcome.kind in (DEAD_LETTER, PENDING):
            counts[f"{outcome.kind}:{outcome.stage}:{outcome.reason}"] += 1
    return counts
