"""``sightline bench outage``: the broker goes away for ``--down-s`` seconds and comes back; do the services ride it
out, and what flows afterwards?

A private local stack runs, supervised as ``sightline up`` supervises it (a service that exits is started again, with
backoff). One batch of photos goes through before the outage (all must be decided). Then the
broker is stopped; while it is away a batch is sent to capture (the frames wait in capture's producer, up to its
buffer) and the services' health is read; after ``--down-s`` a new broker starts on the same port and the topics are
created again. Batches are then sent until one arrives whole, each given up to BATCH_TIMEOUT_S.

What it reports: each service's health during and after the outage, its restarts (a stream service whose consumer
group stays stalled after the return exits to be restarted, common/stall.py), how many of the frames sent during
the outage reached decision, and, batch by batch after the return, how many frames were decided.

The embedded broker (Tansu with memory storage) keeps nothing across a restart: the new one has no records, no
topics and no consumer offsets. A consumer that was at offset N of a partition goes on fetching from N in the new,
empty log; the first records there below N are skipped. A real Kafka cluster keeps its log and offsets through a
broker restart, so nothing of this is lost there (docs/reliability.md, "Broker outage").
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BATCH_FRAMES = 10
BATCH_TIMEOUT_S = 60.0
MAX_BATCHES_AFTER = 6
DURING_WAIT_S = 30.0  # after the return: how long the frames sent during the outage get to arrive


def register(kinds: Any) -> None:
    outage = kinds.add_parser("outage", help="the broker away for a while and back: do the services ride it out?")
    outage.add_argument("--down-s", type=float, default=30.0, help="how long the broker stays away (default 30)")
    outage.add_argument("--keep", action="store_true", help="keep the run folder (the services' logs) and say where")
    outage.add_argument("--json", action="store_true", help="print one JSON object")
    outage.set_defaults(func=cmd_outage)


def cmd_outage(args: argparse.Namespace) -> int:
    if args.down_s <= 0:
        print("error: --down-s must be positive", file=sys.stderr)
        return 2
    result = bench_outage(args.down_s, args.keep)
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))
    return 0 if result["passed"] else 1


def _photos(folder: Path) -> Path:
    """BATCH_FRAMES photos with faces (the bench's samples), as one folder capture can read."""
    from sightline.cli.bench import bench_frames

    folder.mkdir(parents=True)
    for n, photo in enumerate(bench_frames(BATCH_FRAMES), 1):
        shutil.copy(photo, folder / f"{n:03d}{photo.suffix}")
    return folder


def _send(stack: Any, folder: Path, source_id: str) -> int:
    """The frames capture accepted for publication (0 when the call failed)."""
    import grpc

    from sightline.cli.run import ingest

    try:
        reply = ingest(
            str(folder), source_id=source_id, no_pacing=True, address=stack.addresses["capture"], progress=False
        )
    except grpc.RpcError as error:
        print(f"  Ingest {source_id}: {error.code().name}", file=sys.stderr)
        return 0
    return int(reply.frames_published)


def _decided(kafka: Any, source_id: str, frames: int, since_ms: int, timeout_s: float) -> int:
    """How many of the source's frames reached their terminal record within the timeout."""
    from sightline.cli.outcomes import collect

    sequences = set(range(1, frames + 1))
    outcomes = collect(kafka, source_id, sequences, since_ms, timeout_s=timeout_s)
    terminal = {d.frame.sequence for d in outcomes.decisions} | outcomes.dead_sequences()
    return len(terminal & sequences)


def _health(stack: Any) -> dict[str, str]:
    from sightline.common.rpc import check_health

    return {name: check_health(address, timeout=2.0) for name, address in stack.process_addresses.items()}


def health_after_ok(stack: Any) -> bool:
    return all(state == "SERVING" for state in _health(stack).values())


def _flowing(after: list[dict[str, Any]]) -> bool:
    """Whether the last batch sent after the return arrived whole."""
    return bool(after) and after[-1]["sent"] > 0 and after[-1]["decided"] == after[-1]["sent"]


def bench_outage(down_s: float, keep: bool = False) -> dict[str, Any]:
    from sightline.common.config import KafkaSettings
    from sightline.tooling.localstack import LocalStack
    from sightline.tooling.supervisor import RestartSettings, Supervisor

    work = Path(tempfile.mkdtemp(prefix="sightline-bench-outage-"))
    try:
        folder = _photos(work / "frames" / "batch")
        with LocalStack(work / "run", ports="auto", capture_roots=[work / "frames"]) as stack:
            print("starting a private local stack...", file=sys.stderr)
            stack.start(timeout=180)
            notices: list[str] = []
            Supervisor(stack, RestartSettings(), notify=notices.append).start()
            kafka = KafkaSettings(bootstrap_servers=stack.bootstrap_servers, fetch_max_wait_ms=25)
            since = int(time.time() * 1000) - 1000
            before = _decided(kafka, "outage-before", _send(stack, folder, "outage-before"), since, BATCH_TIMEOUT_S)

            print(f"stopping the broker for {down_s:g} s...", file=sys.stderr)
            down_at = time.monotonic()
            stack.stop_broker()
            during_sent = _send(stack, folder, "outage-during")
            health_during = _health(stack)
            time.sleep(max(0.0, down_at + down_s - time.monotonic()))
            stack.start_broker_again()
            back_at = time.monotonic()
            print("the broker is back; sending batches until one arrives whole...", file=sys.stderr)

            since = int(time.time() * 1000) - 60_000
            after = []
            for n in range(MAX_BATCHES_AFTER):
                source = f"outage-after-{n}"
                sent = _send(stack, folder, source)
                decided = _decided(kafka, source, sent, since, BATCH_TIMEOUT_S) if sent else 0
                after.append({"batch": n, "sent": sent, "decided": decided, "at_s": round(time.monotonic() - back_at)})
                if sent and decided == sent:
                    break
            during = _decided(kafka, "outage-during", during_sent, 0, DURING_WAIT_S) if during_sent else 0
            restarts = {name: stack.record(name).restarts for name in stack.processes}
            return {
                "down_s": down_s,
                "before": {"sent": BATCH_FRAMES, "decided": before},
                "during": {"accepted_by_capture": during_sent, "decided_after_the_return": during},
                "health_during": health_during,
                "after": after,
                "flowing_again_after_s": after[-1]["at_s"] if _flowing(after) else None,
                "health_after": _health(stack),  # read once more by health_after_ok
                "restarts": restarts,
                "supervisor": [line for n in notices for line in n.splitlines() if line.startswith("restart")][:10],
                "passed": before == BATCH_FRAMES and _flowing(after) and health_after_ok(stack),
            }
    finally:
        if keep:
            print(f"run folder kept: {work} (logs in {work / 'run' / 'logs'})", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
