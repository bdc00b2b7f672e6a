"""The three example integrations in examples/, run as scripts against the whole running stack.

Each runs as an integrator would run it (``python examples/<name>.py ... --local-stack RUN_DIR``), against real
services and the real broker: bulk enrolment of a folder of registry photos, confirmed alerts forwarded to a webhook
(a local ``http.server`` on 127.0.0.1 is the receiver), gate decisions mirrored into a table (PostgreSQL, and the
SQLite fallback) and erased with the traveller. Each is run a second time to show that it resumes: nothing is
enrolled, sent or mirrored twice. Every example's ``--help`` is checked too.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from test_echannel_frames import frame_bytes
from test_sdk_client import (  # the stack and admin fixtures: the SDK client's tests start the stack the same way
    LISTED,
    admin,  # noqa: F401
    client_as,
    gate_session,
    raise_alerts,
    stack,  # noqa: F401
    traveller_photos,
)
from test_watchlist_flow import portraits

from sightline.sdk import SightlineClient
from sightline.tooling.localstack import LocalStack
from sightline.v1 import session_pb2

EXAMPLES = Path(__file__).parents[2] / "examples"
SCRIPTS = sorted(EXAMPLES.glob("*.py"))


def run_example(script: str, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.pop("SIGHTLINE_TOKEN", None)  # the local stack's token, from --local-stack
    command = [sys.executable, str(EXAMPLES / script), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda path: path.stem)
def test_every_example_explains_itself(script: Path) -> None:
    shown = run_example(script.name, "--help", timeout=60)
    assert shown.returncode == 0, shown.stderr
    summary = script.read_text().split('"""')[1].splitlines()[0]
    assert shown.stdout.startswith("usage:") and summary in shown.stdout


@pytest.mark.e2e
def test_bulk_enrol_a_folder(
    stack: LocalStack,
    admin: SightlineClient,
    dlib_johns: Path,
    face_photos: Path,
    tmp_path: Path,
) -> None:
    # People the other tests do not use (they walk LISTED past a camera, and the traveller must be on no list).
    folder = tmp_path / "photos"
    people = ["John_Shimkus", "John_Simm", "obama"]
    for person in people[:2]:  # a sub-folder of photos per subject
        (folder / person).mkdir(parents=True)
        portraits(dlib_johns, person, folder / person)
    (folder / "obama.jpg").write_bytes((face_photos / "obama.jpg").read_bytes())  # a single photo, named
    (folder / "unreadable").mkdir()
    (folder / "unreadable" / "1.jpg").write_bytes(b"not a photo")
    report = tmp_path / "report.jsonl"
    command = [str(folder), "--watchlist", "bulk-staff", "--purpose", "bulk test", "--report", str(report)]

    first = run_example("bulk_enrol.py", *command, "--jobs", "2", "--local-stack", str(stack.run_dir))
    assert first.returncode == 1, first.stderr  # one subject had no usable photo
    assert "3 subject(s) enrolled (5 template(s)), 0 already enrolled and skipped, 1 failed" in first.stdout
    assert "unreadable/1.jpg: rejected:" in first.stderr and "unreadable: FAILED" in first.stderr
    results = {line["subject_id"]: line for line in map(json.loads, report.read_text().splitlines())}
    assert {name: r["status"] for name, r in results.items()} == {
        **dict.fromkeys(people, "enrolled"),
        "unreadable": "failed",
    }
    assert sorted(s.subject_id for s in admin.gallery.subjects(watchlist="bulk-staff")) == people

    again = run_example("bulk_enrol.py", *command, "--local-stack", str(stack.run_dir))
    assert "0 subject(s) enrolled (0 template(s)), 3 already enrolled and skipped, 1 failed" in again.stdout
    assert {s.subject_id: s.template_count for s in admin.gallery.subjects(watchlist="bulk-staff")} == {
        people[0]: 2,
        people[1]: 2,
        people[2]: 1,
    }


class Receiver(BaseHTTPRequestHandler):
    """A webhook that keeps every POST it is sent."""

    received: list[tuple[dict[str, str], bytes]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        Receiver.received.append((dict(self.headers), body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def webhook() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    Receiver.received = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/alerts"
    server.shutdown()
    server.server_close()


@pytest.mark.e2e
def test_confirmed_alerts_are_forwarded_to_a_webhook_once(
    stack: LocalStack,
    admin: SightlineClient,
    dlib_johns: Path,
    webhook: str,
    tmp_path: Path,
) -> None:
    raised = raise_alerts(stack, admin, dlib_johns)
    with client_as(stack, "alice") as alice, client_as(stack, "bob") as bob:
        alice.review.confirm(raised[LISTED[0]])
        bob.review.confirm(raised[LISTED[0]])  # CONFIRMED: forwarded
        bob.review.reject(raised[LISTED[1]], "not him")  # REJECTED: not forwarded
    command = [webhook, "--group", f"hook-{uuid.uuid4().hex[:6]}", "--store", str(tmp_path / "seen.db")]

    first = run_example(
        "forward_alerts_to_webhook.py", *command, "--idle-exit", "3", "--local-stack", str(stack.run_dir)
    )
    assert first.returncode == 0, first.stderr
    assert "1 confirmed alert(s) forwarded" in first.stdout
    [(headers, body)] = Receiver.received
    event = json.loads(body)
    assert headers["Content-Type"] == "application/cloudevents+json"
    assert event["id"] == headers["Idempotency-Key"] == f"{raised[LISTED[0]]}:CONFIRMED"
    assert event["type"] == "sightline.v1.Alert" and event["source"] == "/sightline/decision"
    assert event["data"]["status"] == "ALERT_STATUS_CONFIRMED" and event["data"]["subject_id"] == LISTED[0]

    again = run_example(
        "forward_alerts_to_webhook.py", *command, "--idle-exit", "3", "--local-stack", str(stack.run_dir)
    )
    assert again.returncode == 0, again.stderr
    assert "0 confirmed alert(s) forwarded" in again.stdout and len(Receiver.received) == 1


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def mirror_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'mirror.db'}"
    return str(request.getfixturevalue("pg_schema_url"))


def mirrored_rows(url: str) -> list[tuple[object, ...]]:
    query = "SELECT session_id, gate_id, claim_subject_id, outcome FROM gate_decisions"
    if url.startswith("sqlite:///"):
        with sqlite3.connect(url.removeprefix("sqlite:///")) as conn:
            return [tuple(row) for row in conn.execute(query)]
    import psycopg

    with psycopg.connect(url) as conn:
        return [tuple(row) for row in conn.execute(query)]


@pytest.mark.e2e
def test_gate_decisions_are_mirrored_into_a_table_and_erased_with_the_traveller(
    stack: LocalStack,
    admin: SightlineClient,
    dlib_johns: Path,
    mirror_url: str,
    tmp_path: Path,
) -> None:
    traveller, gate = f"mirror-{uuid.uuid4().hex[:6]}", f"gate-{uuid.uuid4().hex[:6]}"
    pictures = traveller_photos(dlib_johns)
    assert admin.gallery.enroll(traveller, [frame_bytes(pictures[-1], 0, 0)]).templates_added == 1
    outcome = gate_session(admin, gate, traveller, pictures)
    assert outcome.outcome == session_pb2.SESSION_OUTCOME_ACCEPT, list(outcome.reasons)
    command = [mirror_url, "--group", f"mirror-{uuid.uuid4().hex[:6]}", "--store", str(tmp_path / "seen.db")]

    first = run_example("mirror_gate_decisions.py", *command, "--idle-exit", "3", "--local-stack", str(stack.run_dir))
    assert first.returncode == 0, first.stderr
    assert (outcome.session_id, gate, traveller, "ACCEPT") in mirrored_rows(mirror_url)

    again = run_example("mirror_gate_decisions.py", *command, "--idle-exit", "3", "--local-stack", str(stack.run_dir))
    assert "0 gate decision(s) mirrored, 0 row(s) erased" in again.stdout, again.stderr

    assert admin.gallery.erase(traveller, reference="DSR-MIRROR-1").erased
    erased = run_example("mirror_gate_decisions.py", *command, "--idle-exit", "3", "--local-stack", str(stack.run_dir))
    assert "0 gate decision(s) mirrored, 1 row(s) erased" in erased.stdout, erased.stderr
    assert not [row for row in mirrored_rows(mirror_url) if row[2] == traveller]
