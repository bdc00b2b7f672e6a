"""Where the chart puts capture's gate session store: the shared PostgreSQL database, or the pod's own file."""

from __future__ import annotations

from typing import Any

from deploy_helpers import RELEASE, Rendered, render


def capture_env(r: Rendered) -> dict[str, Any]:
    container = r.one("Deployment", f"{RELEASE}-sightline-capture")["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e for e in container["env"]}


def test_capture_replicas_share_their_gate_sessions_in_postgresql(helm: str) -> None:
    pg = render(helm, [], ["matching.database.mode=postgresql", "matching.database.postgresql.existingSecret=db"])
    url = capture_env(pg)["SIGHTLINE_CAPTURE_DATABASE_URL"]
    assert url["valueFrom"]["secretKeyRef"] == {"name": "db", "key": "dsn"} and "value" not in url
    policy = pg.one("NetworkPolicy", f"{RELEASE}-sightline-capture")
    assert any(port.get("port") == 5432 for rule in policy["spec"]["egress"] for port in rule.get("ports", []))


def test_in_sqlite_mode_capture_keeps_its_gate_sessions_in_its_writable_tmp_volume(helm: str) -> None:
    r = render(helm, [])
    env = capture_env(r)
    assert "SIGHTLINE_CAPTURE_DATABASE_URL" not in env  # the default: <SIGHTLINE_HOME>/run/capture-sessions.db
    assert env["SIGHTLINE_HOME"]["value"].startswith("/tmp/")
    spec = r.one("Deployment", f"{RELEASE}-sightline-capture")["spec"]["template"]["spec"]
    mounts = {m["mountPath"]: m["name"] for m in spec["containers"][0]["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]  # writable under readOnlyRootFilesystem, kept across restarts
