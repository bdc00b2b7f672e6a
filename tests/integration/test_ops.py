"""``sightline ops``: lag against the real broker, Kubernetes against a small fake API server.

No Kubernetes API server can run on these machines, so the Kubernetes side is tested against an HTTP server written
here that implements exactly the paths the client calls (list Deployments by label selector, get and patch a
Deployment's scale subresource), holds its state in memory and checks the bearer token. It serves the Deployments
that `helm template` renders from the chart, so names, labels and env are the chart's own. What it cannot show is how
a real API server differs (RBAC, admission, the Deployment controller updating status): docs/deploy.md says so.
The lag side runs against the session's real Tansu broker, including the ListOffsets(LATEST) bug it must avoid.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml
from kafka import KafkaConsumer, TopicPartition

from sightline.cli.main import main
from sightline.common.bus import client_options, make_consumer, make_producer, read_topics
from sightline.common.lag import service_lags
from sightline.common.topics import FRAMES, MATCHES
from sightline.tooling.broker import free_port
from sightline.tooling.kube import deployment_name

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "sightline"
TOKEN = "test-token-not-for-output"
NAMESPACE = "sightline"


# --- the chart, rendered -----------------------------------------------------------------------------------------


def helm_binary() -> str:
    """$SIGHTLINE_HELM, build/tools/helm or PATH; a missing helm is a broken setup, so the test fails saying so."""
    candidates = [os.environ.get("SIGHTLINE_HELM"), str(REPO / "build" / "tools" / "helm"), shutil.which("helm")]
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return candidate
    pytest.fail("helm not found: run `tools/install-helm.sh build/tools` (the project's setup does)", pytrace=False)


def render_deployments(release: str = "sl", *sets: str) -> list[dict[str, Any]]:
    """The Deployments `helm template` renders for a release, with a status as a settled rollout would have."""
    command = [helm_binary(), "template", release, str(CHART), "--namespace", NAMESPACE]
    for value in sets:
        command += ["--set", value]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, f"helm template failed: {result.stderr}"
    deployments = [d for d in yaml.safe_load_all(result.stdout) if d and d.get("kind") == "Deployment"]
    for deployment in deployments:
        replicas = deployment["spec"].get("replicas", 1)
        deployment["status"] = {"replicas": replicas, "readyReplicas": replicas, "updatedReplicas": replicas}
    return deployments


# --- a fake Kubernetes API server ---------------------------------------------------------------------------------


class FakeApiServer:
    """The few apps/v1 paths `sightline ops` uses, over plain HTTP on 127.0.0.1, with Deployments held in memory."""

    def __init__(self, deployments: list[dict[str, Any]]) -> None:
        self.deployments = {(d["metadata"]["namespace"], d["metadata"]["name"]): d for d in deployments}
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path with query, content type)
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", free_port()), self._handler())
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def deployment(self, name: str) -> dict[str, Any]:
        return self.deployments[(NAMESPACE, name)]

    def set_ready(self, name: str, ready: int) -> None:
        with self.lock:
            self.deployment(name)["status"].update(readyReplicas=ready, updatedReplicas=ready, replicas=ready)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                fake.handle(self, "GET")

            def do_PATCH(self) -> None:
                fake.handle(self, "PATCH")

            def log_message(self, *args: Any) -> None:
                pass

        return Handler

    def handle(self, request: BaseHTTPRequestHandler, method: str) -> None:
        self.requests.append((method, request.path, request.headers.get("Content-Type")))
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            return self.reply(request, 401, status_object(401, "Unauthorized", "no valid bearer token"))
        url = urlsplit(request.path)
        body = request.rfile.read(int(request.headers.get("Content-Length") or 0))
        with self.lock:
            code, payload = self.route(method, url.path, parse_qs(url.query), body)
        self.reply(request, code, payload)

    def route(self, method: str, path: str, query: dict[str, list[str]], body: bytes) -> tuple[int, dict[str, Any]]:
        listing = re.fullmatch(r"/apis/apps/v1/namespaces/([^/]+)/deployments", path)
        scale = re.fullmatch(r"/apis/apps/v1/namespaces/([^/]+)/deployments/([^/]+)/scale", path)
        if listing and method == "GET":
            return 200, self.list(listing.group(1), query.get("labelSelector", [""])[0])
        if scale and (scale.group(1), scale.group(2)) in self.deployments:
            deployment = self.deployments[(scale.group(1), scale.group(2))]
            if method == "PATCH":
                deployment["spec"]["replicas"] = int(json.loads(body)["spec"]["replicas"])
            return 200, scale_object(deployment)
        return 404, status_object(404, "NotFound", f"{path} not found")

    def list(self, namespace: str, selector: str) -> dict[str, Any]:
        items = [d for (ns, _), d in self.deployments.items() if ns == namespace and selects(selector, d)]
        return {
            "apiVersion": "apps/v1",
            "kind": "DeploymentList",
            "metadata": {"resourceVersion": "1"},
            "items": json.loads(json.dumps(items)),
        }

    @staticmethod
    def reply(request: BaseHTTPRequestHandler, code: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        request.send_response(code)
        request.send_header("Content-Type", "application/json")
        request.send_header("Content-Length", str(len(data)))
        request.end_headers()
        request.wfile.write(data)

    def __enter__(self) -> FakeApiServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def selects(selector: str, deployment: dict[str, Any]) -> bool:
    """Equality (`k=v`) and set (`k in (a,b)`) requirements, comma-separated, as the API server reads them."""
    labels = deployment["metadata"].get("labels") or {}
    for key, values, value in re.findall(r"([\w./-]+)\s+in\s+\(([^)]*)\)|([\w./-]+=[^,]*)", selector):
        if key and labels.get(key) not in [v.strip() for v in values.split(",")]:
            return False
        if value:
            name, expected = value.split("=", 1)
            if labels.get(name) != expected:
                return False
    return True


def scale_object(deployment: dict[str, Any]) -> dict[str, Any]:
    meta = deployment["metadata"]
    return {
        "apiVersion": "autoscaling/v1",
        "kind": "Scale",
        "metadata": {"name": meta["name"], "namespace": meta["namespace"]},
        "spec": {"replicas": deployment["spec"].get("replicas", 1)},
        "status": {"replicas": deployment["status"].get("replicas", 0)},
    }


def status_object(code: int, reason: str, message: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Status",
        "status": "Failure",
        "code": code,
        "reason": reason,
        "message": message,
    }


def write_kubeconfig(path: Path, server: str, namespace: str = NAMESPACE) -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": "fake",
                "clusters": [{"name": "fake", "cluster": {"server": server}}],
                "users": [{"name": "sre", "user": {"token": TOKEN}}],
                "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "sre", "namespace": namespace}}],
            }
        )
    )
    return path


@pytest.fixture
def api(tmp_path: Path) -> Iterator[tuple[FakeApiServer, Path]]:
    """The fake API server serving the default chart's Deployments of release `sl`, and a kubeconfig for it."""
    with FakeApiServer(render_deployments("sl")) as server:
        yield server, write_kubeconfig(tmp_path / "kubeconfig", server.url)


def ops(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["ops", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def true_lag(kafka: Any, topic: str, group: str) -> int:
    """Ground truth without offsets APIs: records actually readable past the group's committed offsets."""
    probe = KafkaConsumer(**client_options(kafka), group_id=group, enable_auto_commit=False)
    committed = {p: probe.committed(TopicPartition(topic, p)) or 0 for p in probe.partitions_for_topic(topic)}
    probe.close()
    return sum(1 for r in read_topics(kafka, [topic], idle_timeout_s=1.5) if r.offset >= committed[r.partition])


# --- lag against the real broker -----------------------------------------------------------------------------------


def test_lag_is_high_watermark_minus_committed_despite_the_end_offset_bug(kafka: Any) -> None:
    before = true_lag(kafka, FRAMES.name, "sightline-detection")
    producer = make_producer(kafka)
    produced = 0
    for batch in range(3):  # several batches per partition: Tansu's ListOffsets(LATEST) then under-counts
        for i in range(10):
            producer.send(FRAMES.name, key=f"cam-{i}".encode(), value=b"frame" * 100, partition=(i * 7 + batch) % 4)
            produced += 1
        producer.flush()
    total = before + produced

    consumed = 11
    group = make_consumer(
        kafka, FRAMES.name, group_id="sightline-detection", enable_auto_commit=False, auto_offset_reset="earliest"
    )
    taken, deadline = 0, time.monotonic() + 30
    while taken < consumed and time.monotonic() < deadline:
        taken += sum(len(rs) for rs in group.poll(timeout_ms=500, max_records=consumed - taken).values())
    group.commit()  # commits the positions after the records poll returned, i.e. exactly `consumed` records
    group.close()
    assert taken == consumed

    lag = service_lags(kafka, ["detection"])["detection"]
    assert lag.topic == FRAMES.name and lag.group == "sightline-detection" and lag.error is None
    assert lag.partition_count == 4
    assert lag.total == total - consumed == true_lag(kafka, FRAMES.name, "sightline-detection")
    assert sum(p.committed or 0 for p in lag.partitions) == consumed

    # The figure ListOffsets(LATEST) would have given is wrong on this broker; ours is not built from it.
    reader = KafkaConsumer(**client_options(kafka), group_id=None)
    ends = reader.end_offsets([TopicPartition(FRAMES.name, p.partition) for p in lag.partitions])
    reader.close()
    assert sum(ends.values()) < sum(p.highwater for p in lag.partitions) == total, (
        "Tansu's end offsets are right now: this test no longer shows that lag avoids them"
    )


def test_lag_of_a_group_without_commits_is_the_whole_topic_and_missing_topics_are_reported(kafka: Any) -> None:
    producer = make_producer(kafka)
    for i in range(5):
        producer.send(MATCHES.name, key=f"t{i}".encode(), value=b"m", partition=i % 2)
    producer.flush()
    lags = service_lags(kafka, ["capture", "decision"])
    assert set(lags) == {"decision"}  # capture consumes no topic
    assert lags["decision"].total == true_lag(kafka, MATCHES.name, "sightline-decision") >= 5
    assert all(p.committed is None for p in lags["decision"].partitions)


# --- Kubernetes against the fake API server ------------------------------------------------------------------------


def test_chart_naming_is_reproduced(tmp_path: Path) -> None:
    for release, sets in [
        ("sl", ()),
        ("sightline-prod", ()),
        ("x" * 45, ()),
        ("sl", ("fullnameOverride=face-id",)),
        ("sl", ("nameOverride=fr",)),
    ]:
        rendered = {
            d["metadata"]["labels"]["app.kubernetes.io/component"]: d["metadata"]["name"]
            for d in render_deployments(release, *sets)
        }
        overrides = dict(s.split("=", 1) for s in sets)
        for service, name in rendered.items():
            assert (
                deployment_name(
                    release, service, overrides.get("nameOverride", ""), overrides.get("fullnameOverride", "")
                )
                == name
            )


def test_status_rows_then_scale_changes_the_server_and_the_next_status(
    api: tuple[FakeApiServer, Path], kafka: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    server, kubeconfig = api
    common = ["--kubeconfig", str(kubeconfig), "--bootstrap", kafka.bootstrap_servers]
    code, out, err = ops(capsys, "status", *common)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith(f"namespace {NAMESPACE}  release sl")
    assert lines[1].split()[:3] == ["SERVICE", "DEPLOYMENT", "DESIRED"]
    rows = {line.split()[0]: line.split() for line in lines[2:7]}
    assert list(rows) == ["capture", "detection", "embedding", "matching", "decision"]
    assert rows["detection"][:7] == ["detection", "sl-sightline-detection", "1", "1", "1", FRAMES.name, "4"]
    assert rows["capture"][5:8] == ["-", "-", "-"]  # no input topic, so no partitions and no lag

    code, out, err = ops(capsys, "scale", "detection", "6", "--kubeconfig", str(kubeconfig))
    assert code == 0, err
    assert out.strip() == f"sl-sightline-detection (namespace {NAMESPACE}): replicas 1 -> 6"
    assert server.deployment("sl-sightline-detection")["spec"]["replicas"] == 6
    patch = [r for r in server.requests if r[0] == "PATCH"]
    assert patch == [
        (
            "PATCH",
            f"/apis/apps/v1/namespaces/{NAMESPACE}/deployments/sl-sightline-detection/scale",
            "application/merge-patch+json",
        )
    ]

    code, out, err = ops(capsys, "status", "--json", *common)
    report = json.loads(out)
    detection = next(s for s in report["services"] if s["service"] == "detection")
    assert code == 1 and report["ok"] is False
    assert (detection["desired"], detection["ready"], detection["partitions"]) == (6, 1, 4)
    assert "not ready (1/6)" in detection["notes"]
    assert "replicas beyond the partition count sit idle (6 > 4)" in detection["notes"]

    server.set_ready("sl-sightline-detection", 6)  # what the Deployment controller would do
    code, out, _ = ops(capsys, "status", *common)
    assert code == 0 and "replicas beyond the partition count sit idle (6 > 4)" in out
    assert TOKEN not in out


def test_scale_refuses_matching_and_decision_above_one_on_sqlite(
    api: tuple[FakeApiServer, Path], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    server, kubeconfig = api
    code, _, err = ops(capsys, "scale", "matching", "2", "--kubeconfig", str(kubeconfig))
    assert code == 1 and "SQLite" in err and "PostgreSQL" in err
    assert server.deployment("sl-sightline-matching")["spec"]["replicas"] == 1
    assert not [r for r in server.requests if r[0] == "PATCH"]
    code, out, _ = ops(capsys, "scale", "matching", "0", "--kubeconfig", str(kubeconfig))
    assert code == 0 and out.strip().endswith("replicas 1 -> 0")
    code, _, err = ops(capsys, "scale", "decision", "2", "--kubeconfig", str(kubeconfig))  # its own SQLite volume
    assert code == 1 and "sl-sightline-decision keeps its database in SQLite" in err

    postgres = render_deployments(
        "sl", "matching.database.mode=postgresql", "matching.database.postgresql.existingSecret=gallery-db"
    )
    with FakeApiServer(postgres) as pg_server:
        pg_kubeconfig = write_kubeconfig(tmp_path / "pg-kubeconfig", pg_server.url)
        code, out, err = ops(capsys, "scale", "matching", "3", "--kubeconfig", str(pg_kubeconfig))
        assert code == 0, err
        assert pg_server.deployment("sl-sightline-matching")["spec"]["replicas"] == 3


def test_scale_validates_service_and_replicas(
    api: tuple[FakeApiServer, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    _, kubeconfig = api
    for args, message in [
        (["gallery", "1"], "invalid choice: 'gallery'"),
        (["detection", "-1"], "0 or more"),
        (["detection", "two"], "not a whole number"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            main(["ops", "scale", *args, "--kubeconfig", str(kubeconfig)])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    code, _, err = ops(capsys, "scale", "detection", "2", "--kubeconfig", str(kubeconfig), "--release", "other")
    assert code == 1 and "no Deployment of service detection in release other" in err
    assert "(expected other-sightline-detection)" in err


def test_several_releases_need_a_release_name(kafka: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with FakeApiServer(render_deployments("blue") + render_deployments("green")) as server:
        kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", server.url)
        common = ["--kubeconfig", str(kubeconfig), "--bootstrap", kafka.bootstrap_servers]
        code, _, err = ops(capsys, "status", *common)
        assert code == 1 and "several Sightline releases (blue, green): pass --release" in err
        code, out, _ = ops(capsys, "status", "--release", "green", *common)
        assert code == 0 and "green-sightline-decision" in out and "blue-" not in out


def test_api_server_down_is_a_clear_error_and_lag_is_still_shown(
    kafka: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", dead)
    code, out, err = ops(capsys, "status", "--kubeconfig", str(kubeconfig), "--bootstrap", kafka.bootstrap_servers)
    assert code == 1
    assert f"cannot reach the Kubernetes API server at {dead}: connection refused" in err
    detection = next(line.split() for line in out.splitlines() if line.startswith("detection"))
    assert detection[1:5] == ["?"] * 4 and detection[5] == FRAMES.name and detection[7].isdigit()
    code, _, err = ops(capsys, "scale", "detection", "2", "--kubeconfig", str(kubeconfig))
    assert code == 1 and "cannot reach the Kubernetes API server" in err
    code, _, err = ops(
        capsys, "status", "--kubeconfig", str(tmp_path / "missing"), "--bootstrap", kafka.bootstrap_servers
    )
    assert code == 1 and "cannot load the Kubernetes configuration" in err


def test_broker_down_still_shows_the_deployments(
    api: tuple[FakeApiServer, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    _, kubeconfig = api
    bootstrap = f"127.0.0.1:{free_port()}"
    code, out, err = ops(capsys, "status", "--kubeconfig", str(kubeconfig), "--bootstrap", bootstrap, "--timeout", "2")
    assert code == 0  # every Deployment is ready; the exit code is about readiness
    assert f"error: Kafka: cannot reach the Kafka brokers at {bootstrap}" in err
    detection = next(line.split() for line in out.splitlines() if line.startswith("detection"))
    assert detection[1:8] == ["sl-sightline-detection", "1", "1", "1", FRAMES.name, "?", "?"]


def test_wrong_token_is_reported_without_the_token(
    api: tuple[FakeApiServer, Path], kafka: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server, _ = api
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", server.url)
    kubeconfig.write_text(kubeconfig.read_text().replace(TOKEN, "wrong-secret-token"))
    code, out, err = ops(capsys, "status", "--kubeconfig", str(kubeconfig), "--bootstrap", kafka.bootstrap_servers)
    assert code == 1 and "HTTP 401" in err and "no valid bearer token" in err
    assert "wrong-secret-token" not in out + err


def test_status_json_end_to_end(api: tuple[FakeApiServer, Path], kafka: Any) -> None:
    server, kubeconfig = api
    server.set_ready("sl-sightline-embedding", 0)
    producer = make_producer(kafka)
    for i in range(7):
        producer.send(MATCHES.name, key=f"track-{i}".encode(), value=b"m")
    producer.flush()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "sightline.cli.main",
            "ops",
            "status",
            "--json",
            "--kubeconfig",
            str(kubeconfig),
            "--bootstrap",
            kafka.bootstrap_servers,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1, result.stderr
    report = json.loads(result.stdout)
    services = {s["service"]: s for s in report["services"]}
    assert report["namespace"] == NAMESPACE and report["release"] == "sl" and report["ok"] is False
    assert report["kubernetes"] == {"server": server.url, "error": None}
    assert report["kafka"] == {"bootstrap_servers": kafka.bootstrap_servers, "error": None}
    assert services["embedding"]["ready"] == 0 and services["embedding"]["desired"] == 1
    assert services["decision"]["input_topic"] == MATCHES.name and services["decision"]["partitions"] == 4
    assert services["decision"]["lag"] == true_lag(kafka, MATCHES.name, "sightline-decision") >= 7
    assert sum(services["decision"]["lag_by_partition"].values()) == services["decision"]["lag"]
    assert services["capture"]["input_topic"] is None and services["capture"]["lag"] is None
    assert TOKEN not in result.stdout + result.stderr
