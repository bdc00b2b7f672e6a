"""How the chart reacts to values: config checksums, schema and template refusals, network flows, NOTES, dashboard."""

from __future__ import annotations

import base64
import hashlib
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from deploy_helpers import (
    CHART,
    GRPC_CALLS,
    GRPC_PORTS,
    METRICS_PORTS,
    NAMESPACE,
    PUBLIC_SERVICES,
    RELEASE,
    SERVICES,
    VARIANTS,
    Rendered,
    chart_catalog,
    render,
    retention_settings,
    run_helm,
    template_args,
)


def pod_annotations(r: Rendered, service: str) -> dict[str, str]:
    d = r.one("Deployment", f"{RELEASE}-sightline-{service}")
    return d["spec"]["template"]["metadata"].get("annotations") or {}


# --- checksum/config ------------------------------------------------------------------------------------------------


def test_policy_change_rolls_decision_pods(helm: str, tmp_path: Path) -> None:
    base = pod_annotations(render(helm, []), "decision")["checksum/config"]
    # A file, not --set: helm's --set turns 0.5 into a string, which the schema rightly refuses.
    stricter = tmp_path / "stricter.yaml"
    stricter.write_text("decision:\n  policy:\n    match_max_distance: 0.5\n")
    changed = pod_annotations(render(helm, [stricter]), "decision")
    assert changed["checksum/config"] != base
    changed = pod_annotations(render(helm, [], ["decision.policy.version=2027-01-1"]), "decision")
    assert changed["checksum/config"] != base


def test_unrelated_change_keeps_the_checksum(helm: str) -> None:
    base = pod_annotations(render(helm, []), "decision")["checksum/config"]
    same = pod_annotations(render(helm, [], ["detection.replicas=3", "capture.logLevel=DEBUG"]), "decision")
    assert same["checksum/config"] == base


# --- refusals -------------------------------------------------------------------------------------------------------

SCHEMA_ERROR = "values don't meet the specifications of the schema"


@pytest.mark.parametrize(
    "sets",
    [
        ["detection.replicas=two"],  # the example
        ["unknownKey=1"],  # unknown top-level key
        ["matching.unknownKey=1"],  # unknown key in a service block
        ["capture.image.tag=latest"],
        ["image.tag=latest"],
        ["kafka.securityProtocol=TLS"],
        ["kafka.sasl.mechanism=GSSAPI"],
        ["kafka.bootstrapServers=kafka"],  # no port
        ["detection.autoscaling.mode=memory"],
        ["capture.autoscaling.mode=kafkaLag"],  # capture has no input topic
        ["matching.database.mode=mysql"],
        ["matching.templateKey.value=not-a-32-byte-key"],
        ["decision.policy.min_agreeing_frames=0"],
        ["detection.policy.version=x"],  # policy belongs to decision only
        ["kafka.topics.frames.retentionMs=1h"],
        ["retention.rawHours=100"],  # the code caps raw biometric data at 72 hours
        ["retention.alertsDays=0"],
        ["retention.forever=1"],  # no such limit
        ["detection.streamAuditIntervalS=30"],  # matching only
        ["matching.sqlite.size=1Gi"],  # decision's volume; matching's is matching.database.sqlite
        ["decision.sqlite.accessModes={ReadOnlyMany}"],  # decision writes its database
        ["decision.sqlite.mode=postgresql"],  # the mode is matching.database.mode, for both services
        ["matching.streamAuditIntervalS=0"],
        ["matching.templateKey.previousKeys.value=k1:abc"],  # keys only from a Secret
        ["kafka.topics.renamed.retentionMs=1"],  # topic names are fixed by the code
        ["detection.logLevel=TRACE"],
        ["embedding.grpcPort=70000"],
        ["detection.resources.limits=null"],  # limits are required
        ["detection.sources.uris={rtsp://cam/1}"],  # only capture pulls streams
        ["capture.sources.uris={cam-1}"],  # not a URI
        [
            "auth.principals[0].principal=alice",
            "auth.principals[0].roles[0]=reviewer",
            "auth.principals[0].token=plaintext",
        ],  # tokens never go into values: only their hashes
        [
            "auth.principals[0].principal=alice",
            "auth.principals[0].roles[0]=admin",
            "auth.principals[0].token_sha256=" + "a" * 64,
        ],  # no such role
        ["auth.principals[0].principal=alice", "auth.principals[0].roles[0]=reviewer"],  # neither hash nor certificate
    ],
    ids=lambda s: s[0],
)
def test_schema_rejects_bad_values(helm: str, sets: list[str]) -> None:
    result = run_helm(helm, *template_args([], sets))
    assert result.returncode != 0, f"accepted {sets}"
    assert SCHEMA_ERROR in result.stderr, result.stderr


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["matching.replicas=2"], "SQLite gallery allows exactly one matching replica"),
        (["matching.autoscaling.enabled=true"], "SQLite gallery allows exactly one matching replica"),
        (["decision.replicas=2"], "decision.replicas > 1 needs matching.database.mode=postgresql"),
        (["decision.autoscaling.enabled=true"], "decision.autoscaling.enabled needs matching.database.mode=postgresql"),
        # decision's volume does not depend on matching running: the mode is the release's
        (["matching.enabled=false", "decision.replicas=2"], "allows exactly one decision replica"),
        (["matching.database.mode=postgresql"], "matching.database.postgresql.existingSecret"),
        (["kafka.securityProtocol=SASL_SSL"], "kafka.sasl.existingSecret"),
        (["kafka.tls.ca.secretName=a", "kafka.tls.ca.configMapName=b"], "only one of"),
        (["detection.autoscaling.enabled=true", "detection.autoscaling.minReplicas=5"], "maxReplicas must be >="),
        (["tls.enabled=true"], "set tls.secretName"),
    ],
    ids=lambda v: v[0] if isinstance(v, list) else None,
)
def test_templates_refuse_inconsistent_values(helm: str, sets: list[str], message: str) -> None:
    result = run_helm(helm, *template_args([], sets))
    assert result.returncode != 0, f"accepted {sets}"
    assert message in result.stderr, result.stderr


def test_postgres_mode_scales_matching(helm: str) -> None:
    r = render(
        helm,
        [],
        ["matching.database.mode=postgresql", "matching.database.postgresql.existingSecret=db", "matching.replicas=3"],
    )
    assert r.one("Deployment", f"{RELEASE}-sightline-matching")["spec"]["replicas"] == 3


def test_image_registry_and_tag_overrides(helm: str) -> None:
    r = render(helm, [], ["image.registry=registry.example.org/", "image.tag=1.2.3", "detection.image.tag=1.2.4"])
    images = {
        d["metadata"]["name"]: d["spec"]["template"]["spec"]["containers"][0]["image"] for d in r.kind("Deployment")
    }
    assert images[f"{RELEASE}-sightline-capture"] == "registry.example.org/sightline/capture:1.2.3"
    assert images[f"{RELEASE}-sightline-detection"] == "registry.example.org/sightline/detection:1.2.4"
    default = render(helm, [])
    chart_version = re.search(r'^appVersion:\s*"?([^"\s]+)', (CHART / "Chart.yaml").read_text(), re.M).group(1)
    job_image = default.kind("Job")[0]["spec"]["template"]["spec"]["containers"][0]["image"]
    assert job_image == f"sightline/cli:{chart_version}"


# --- network policies -----------------------------------------------------------------------------------------------


def selects(selector: dict[str, Any], service: str) -> bool:
    return selector.get("matchLabels", {}).get("app.kubernetes.io/component") == service


def ingress_ports_from(policy: dict[str, Any], peer_service: str | None) -> set[int]:
    """Ports of a policy's ingress rules that admit `peer_service`'s pods (None: an arbitrary outside client)."""
    ports: set[int] = set()
    for rule in policy["spec"].get("ingress", []):
        peers = rule.get("from")
        admits = peers is None or (
            peer_service is not None
            and any(list(p) == ["podSelector"] and selects(p["podSelector"], peer_service) for p in peers)
        )
        if admits:
            ports |= {p["port"] for p in rule["ports"]}
    return ports


def egress_ports_to(policy: dict[str, Any], peer_service: str) -> set[int]:
    ports: set[int] = set()
    for rule in policy["spec"].get("egress", []):
        peers = rule.get("to")
        if peers is not None and any(
            list(p) == ["podSelector"] and selects(p["podSelector"], peer_service) for p in peers
        ):
            ports |= {p["port"] for p in rule["ports"]}
    return ports


def test_network_policies_allow_only_the_designed_flows(helm: str) -> None:
    r = render(helm, [])
    policies = {p["metadata"]["name"].removeprefix(f"{RELEASE}-sightline-"): p for p in r.kind("NetworkPolicy")}
    deny = policies["default-deny"]["spec"]
    assert deny["policyTypes"] == ["Ingress", "Egress"] and "ingress" not in deny and "egress" not in deny
    for svc in SERVICES:
        p = policies[svc]
        assert selects(p["spec"]["podSelector"], svc)
        # gRPC from outside only for the public services; pod-to-pod gRPC only along GRPC_CALLS.
        assert (GRPC_PORTS[svc] in ingress_ports_from(p, None)) == (svc in PUBLIC_SERVICES), svc
        for caller in SERVICES:
            expected = svc in GRPC_CALLS.get(caller, ())
            assert (GRPC_PORTS[svc] in ingress_ports_from(p, caller)) == (expected or svc in PUBLIC_SERVICES), (
                caller,
                svc,
            )
        # Metrics only from the Prometheus peer.
        metrics_rules = [
            rule for rule in p["spec"]["ingress"] if METRICS_PORTS[svc] in {x["port"] for x in rule["ports"]}
        ]
        assert len(metrics_rules) == 1 and "namespaceSelector" in metrics_rules[0]["from"][0]
        # Egress: DNS and Kafka for all; matching also to its two peers; nobody else to any pod.
        egress_ports = {x["port"] for rule in p["spec"]["egress"] for x in rule["ports"]}
        assert {53, 9092} <= egress_ports
        for callee in SERVICES:
            expected = {GRPC_PORTS[callee]} if callee in GRPC_CALLS.get(svc, ()) else set()
            assert egress_ports_to(p, callee) == expected, (svc, callee)
        assert 5432 not in egress_ports, "SQLite mode needs no database egress"
        assert 554 not in egress_ports, "no camera egress without capture.sources"
    assert "topics" in policies


def test_network_policy_database_egress_with_postgres(helm: str) -> None:
    r = render(helm, VARIANTS["postgres"])
    for svc in SERVICES:  # the gallery; alerts and reviews; the audit trail, where every service audits refusals
        p = r.one("NetworkPolicy", f"{RELEASE}-sightline-{svc}")
        ports = {x["port"] for rule in p["spec"]["egress"] for x in rule["ports"]}
        assert 5432 in ports, svc
        # The variant sets capture.sources: capture, and only capture, may reach the cameras.
        assert (554 in ports) == (svc == "capture")


def test_network_policy_peers_narrow(helm: str) -> None:
    r = render(helm, VARIANTS["observability"])
    p = r.one("NetworkPolicy", f"{RELEASE}-sightline-matching")
    public = [rule for rule in p["spec"]["ingress"] if GRPC_PORTS["matching"] in {x["port"] for x in rule["ports"]}]
    assert all(rule.get("from") for rule in public), "a restricted clients.from must not leave an open gRPC rule"
    assert any("ipBlock" in peer for rule in public for peer in rule["from"]), "kubelet CIDRs missing"
    kafka = [rule for rule in p["spec"]["egress"] if 9092 in {x["port"] for x in rule["ports"]}]
    assert kafka[0]["to"][0]["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "kafka"}


# --- observability --------------------------------------------------------------------------------------------------


def test_scrape_annotations_or_service_monitor(helm: str) -> None:
    plain = render(helm, [])
    for svc in SERVICES:
        ann = pod_annotations(plain, svc)
        assert ann["prometheus.io/scrape"] == "true" and ann["prometheus.io/port"] == str(METRICS_PORTS[svc])
    monitored = render(helm, VARIANTS["observability"])
    (sm,) = monitored.kind("ServiceMonitor")
    assert sm["spec"]["endpoints"][0]["port"] == "metrics" and sm["spec"]["endpoints"][0]["honorLabels"] is True
    assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    for d in monitored.kind("Deployment"):
        assert "prometheus.io/scrape" not in (d["spec"]["template"]["metadata"].get("annotations") or {})
    for s in monitored.kind("Service"):
        assert sm["spec"]["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()


DASHBOARD_METRICS = {
    "sightline_events_processed_total",
    "sightline_events_failed_total",
    "sightline_stage_retries_total",
    "sightline_events_deadlettered_total",
    "sightline_events_published_total",
    "sightline_stage_latency_seconds",
    "sightline_capture_to_stage_seconds",
    "sightline_batch_size",
    "sightline_model_inference_seconds",
    "sightline_gallery_templates",
    "sightline_gallery_subjects",
    "sightline_audit_outbox_records",
    "sightline_audit_outbox_oldest_seconds",
    "sightline_frames_dropped_total",
    "sightline_faces_not_searched_total",
    "sightline_detection_scanned_share",
    "sightline_records_purged_total",
}


def dashboard_exprs(dashboard: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def test_dashboard_uses_every_metric_and_only_known_ones() -> None:
    dashboard = json.loads((CHART / "dashboards" / "sightline.json").read_text())
    assert dashboard["uid"] and dashboard["title"]
    used = {m for e in dashboard_exprs(dashboard) for m in re.findall(r"\bsightline_[a-z_]+", e)}
    base = {re.sub(r"_(bucket|count|sum)$", "", m) for m in used}
    assert base == DASHBOARD_METRICS, f"missing {DASHBOARD_METRICS - base}, unknown {base - DASHBOARD_METRICS}"
    for p in dashboard["panels"]:
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${datasource}", p["title"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for e in dashboard_exprs(dashboard):
        assert e.count("(") == e.count(")"), e
        if "_bucket" in e:
            assert "histogram_quantile" in e and "le" in e, e


def test_dashboard_metrics_are_the_services_metrics() -> None:
    """DASHBOARD_METRICS is every metric the services define (sightline.common.telemetry), so a new one gets a panel."""
    telemetry = pytest.importorskip("sightline.common.telemetry", reason="sightline is not importable here")
    from prometheus_client.metrics import MetricWrapperBase

    defined = set()
    for metric in vars(telemetry).values():
        if isinstance(metric, MetricWrapperBase):
            (family,) = metric.describe()
            defined.add(family.name + ("_total" if family.type == "counter" else ""))
    assert defined == DASHBOARD_METRICS


def test_dashboard_splits_drops_skips_and_purges_by_their_labels() -> None:
    dashboard = json.loads((CHART / "dashboards" / "sightline.json").read_text())
    by_metric = {m: e for e in dashboard_exprs(dashboard) for m in re.findall(r"\bsightline_[a-z_]+", e)}
    assert re.search(r"by \(source, reason\)", by_metric["sightline_frames_dropped_total"])
    assert re.search(r"by \(reason\)", by_metric["sightline_faces_not_searched_total"])
    assert re.search(r"by \(service, job\)", by_metric["sightline_records_purged_total"])


def test_dashboard_config_map(helm: str) -> None:
    r = render(helm, VARIANTS["observability"])
    (cm,) = [c for c in r.kind("ConfigMap") if c["metadata"]["name"].endswith("-dashboard")]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["namespace"] == "monitoring"
    assert json.loads(cm["data"]["sightline.json"]) == json.loads((CHART / "dashboards" / "sightline.json").read_text())
    assert not [c for c in render(helm, []).kind("ConfigMap") if c["metadata"]["name"].endswith("-dashboard")]


# --- NOTES.txt ------------------------------------------------------------------------------------------------------


def notes(helm: str, values_files: list[Any], sets: list[str] | None = None) -> str:
    args = ["install", RELEASE, str(CHART), "--namespace", NAMESPACE, "--dry-run=client"]
    for path in values_files:
        args += ["-f", str(path)]
    for item in sets or []:
        args += ["--set", item]
    result = run_helm(helm, *args)
    assert result.returncode == 0, result.stderr
    return result.stdout.split("NOTES:", 1)[1]


def test_notes_tell_what_to_do_next(helm: str) -> None:
    text = notes(helm, [])
    assert f"port-forward svc/{RELEASE}-sightline-matching 50054:50054" in text
    assert "sightline watch decisions" in text
    assert "/metrics" in text and f"svc/{RELEASE}-sightline-detection:9102" in text
    assert "runs exactly one replica on its own PVC" in text
    assert f"PVC {RELEASE}-sightline-matching-gallery" in text and f"PVC {RELEASE}-sightline-decision-data" in text
    assert "two separate hash chains" in text
    assert "Capture, detection and embedding log the calls they refuse but cannot audit them" in text
    assert "Back it up" in text
    assert "needs a bearer token" in text and "sightline auth new-token" in text


def test_notes_warn_that_tokens_travel_in_clear_text_without_tls(helm: str) -> None:
    assert "bearer tokens travel in clear text inside the cluster" in notes(helm, [])
    assert "clear text" not in notes(helm, VARIANTS["tls"])
    assert "clear text" not in notes(helm, [], ["auth.enabled=false"])  # no tokens; the no-auth warning instead
    assert "cannot audit them" not in notes(helm, VARIANTS["postgres"])  # there, every service audits refusals


def test_notes_warn_about_idle_replicas(helm: str) -> None:
    text = notes(helm, VARIANTS["keda"])
    # embedding may reach 6 replicas on a 4-partition topic; detection's 8 match frames' 8 partitions.
    assert "embedding may run up to 6 replicas" in text and "sit idle" in text
    assert "detection may run" not in text


def test_tracing_is_off_by_default_and_otlp_reaches_the_collector(helm: str) -> None:
    def env(r: Rendered, service: str) -> dict[str, str]:
        container = r.one("Deployment", f"{RELEASE}-sightline-{service}")["spec"]["template"]["spec"]["containers"][0]
        return {e["name"]: e.get("value", "") for e in container["env"]}

    default = render(helm, [])
    assert env(default, "detection")["SIGHTLINE_TRACING_EXPORTER"] == "none"
    assert "SIGHTLINE_TRACING_OTLP_ENDPOINT" not in env(default, "detection")
    on = render(helm, [], ["tracing.exporter=otlp", "tracing.otlpEndpoint=http://otel.observability:4317"])
    for service in ("capture", "detection", "embedding", "matching", "decision"):
        assert env(on, service)["SIGHTLINE_TRACING_OTLP_ENDPOINT"] == "http://otel.observability:4317"
    services = {f"{RELEASE}-sightline-{s}" for s in ("capture", "detection", "embedding", "matching", "decision")}
    policies = [p for p in on.kind("NetworkPolicy") if p["metadata"]["name"] in services]
    assert len(policies) == 5
    assert policies and all(
        any(port.get("port") == 4317 for rule in p["spec"]["egress"] for port in rule.get("ports", []))
        for p in policies
    )
    assert not any(
        port.get("port") == 4317
        for p in default.kind("NetworkPolicy")
        for rule in p["spec"].get("egress", [])
        for port in rule.get("ports", [])
    )


def test_decision_keeps_reviews_and_audit_in_postgresql_when_configured(helm: str) -> None:
    def decision_db(r: Rendered) -> dict[str, Any]:
        container = r.one("Deployment", f"{RELEASE}-sightline-decision")["spec"]["template"]["spec"]["containers"][0]
        return next(e for e in container["env"] if e["name"] == "SIGHTLINE_DECISION_DATABASE_URL")

    pg = render(helm, [], ["matching.database.mode=postgresql", "matching.database.postgresql.existingSecret=db"])
    assert decision_db(pg)["valueFrom"]["secretKeyRef"]["name"] == "db"
    policy = pg.one("NetworkPolicy", f"{RELEASE}-sightline-decision")
    assert any(port.get("port") == 5432 for rule in policy["spec"]["egress"] for port in rule.get("ports", []))
    assert decision_db(render(helm, []))["value"] == "sqlite:////var/lib/sightline/decision.db"


def test_sqlite_mode_gives_decision_a_persistent_volume(helm: str) -> None:
    """The default (SQLite) install: a ReadWriteOnce claim for decision, mounted where its database and audit chain
    live, so alerts awaiting review, sessions and the chain survive a pod replacement; kept on uninstall."""
    r = render(helm, [])
    claim = r.one("PersistentVolumeClaim", f"{RELEASE}-sightline-decision-data")
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert claim["spec"]["resources"]["requests"]["storage"] == "1Gi"
    assert claim["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert claim["metadata"]["labels"]["app.kubernetes.io/component"] == "decision"
    spec = r.one("Deployment", f"{RELEASE}-sightline-decision")["spec"]["template"]["spec"]
    volume = next(v for v in spec["volumes"] if v.get("persistentVolumeClaim"))
    assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    mount = next(m for m in spec["containers"][0]["volumeMounts"] if m["name"] == volume["name"])
    assert mount["mountPath"] == "/var/lib/sightline" and not mount.get("readOnly")
    env = env_values(r, "decision")
    assert env["SIGHTLINE_DECISION_DATABASE_URL"]["value"] == "sqlite:////var/lib/sightline/decision.db"
    assert env["SIGHTLINE_AUDIT_DATABASE_URL"]["value"] == "sqlite:////var/lib/sightline/decision-audit.db"
    # matching's gallery claim is unchanged (renaming it would start an upgraded release on an empty gallery)
    assert r.one("PersistentVolumeClaim", f"{RELEASE}-sightline-matching-gallery")


def test_decision_volume_settings_and_existing_claim(helm: str) -> None:
    r = render(
        helm,
        [],
        ["decision.sqlite.size=3Gi", "decision.sqlite.storageClass=fast", "decision.sqlite.keepOnUninstall=false"],
    )
    claim = r.one("PersistentVolumeClaim", f"{RELEASE}-sightline-decision-data")
    assert claim["spec"]["resources"]["requests"]["storage"] == "3Gi"
    assert claim["spec"]["storageClassName"] == "fast"
    assert "helm.sh/resource-policy" not in (claim["metadata"].get("annotations") or {})
    existing = render(helm, [], ["decision.sqlite.existingClaim=decision-archive"])
    assert existing.names("PersistentVolumeClaim") == {f"{RELEASE}-sightline-matching-gallery"}
    volumes = pod_volumes(existing, "decision")
    assert {"name": "data", "persistentVolumeClaim": {"claimName": "decision-archive"}} in volumes


def test_postgresql_mode_gives_decision_no_volume(helm: str) -> None:
    r = render(
        helm,
        [],
        ["matching.database.mode=postgresql", "matching.database.postgresql.existingSecret=db", "decision.replicas=3"],
    )
    assert not r.kind("PersistentVolumeClaim")
    d = r.one("Deployment", f"{RELEASE}-sightline-decision")
    assert d["spec"]["replicas"] == 3 and d["spec"]["strategy"]["type"] == "RollingUpdate"
    assert not any("persistentVolumeClaim" in v for v in pod_volumes(r, "decision"))
    assert all(m["mountPath"] != "/var/lib/sightline" for m in container_of(r, "decision")["volumeMounts"])


def test_matching_and_decision_share_one_audit_database_in_postgresql_mode(helm: str) -> None:
    """One audit chain: both services get SIGHTLINE_AUDIT_DATABASE_URL from the same Secret key as the gallery."""
    existing = ["matching.database.postgresql.existingSecret=db", "matching.database.postgresql.existingSecretKey=url"]
    inline = ["matching.database.postgresql.dsn=postgresql://sightline@pg:5432/sightline"]
    for sets, source in (
        (existing, {"name": "db", "key": "url"}),
        (inline, {"name": f"{RELEASE}-sightline-database", "key": "dsn"}),
    ):
        r = render(helm, [], ["matching.database.mode=postgresql", *sets])
        matching, decision = env_values(r, "matching"), env_values(r, "decision")
        assert matching["SIGHTLINE_AUDIT_DATABASE_URL"]["valueFrom"]["secretKeyRef"] == source
        assert decision["SIGHTLINE_AUDIT_DATABASE_URL"]["valueFrom"]["secretKeyRef"] == source
        assert matching["SIGHTLINE_MATCHING_DATABASE_URL"]["valueFrom"]["secretKeyRef"] == source
    sqlite = render(helm, [])
    urls = {svc: env_values(sqlite, svc)["SIGHTLINE_AUDIT_DATABASE_URL"]["value"] for svc in ("matching", "decision")}
    assert urls["matching"] != urls["decision"], "two pods must not share one SQLite file"


def test_every_service_audits_refusals_in_the_one_chain_in_postgresql_mode(helm: str) -> None:
    """PostgreSQL: every service gets the audit chain's URL (refused calls are audited); SQLite: only matching and
    decision, each on its own volume: capture, detection and embedding log refusals only."""
    pg = render(helm, [], ["matching.database.mode=postgresql", "matching.database.postgresql.existingSecret=db"])
    for svc in SERVICES:
        assert env_values(pg, svc)["SIGHTLINE_AUDIT_DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {
            "name": "db",
            "key": "dsn",
        }, svc
    sqlite = render(helm, [])
    assert [svc for svc in SERVICES if "SIGHTLINE_AUDIT_DATABASE_URL" in env_values(sqlite, svc)] == [
        "matching",
        "decision",
    ]


def test_previous_template_keys_come_from_a_secret_only_when_set(helm: str) -> None:
    assert "SIGHTLINE_MATCHING_PREVIOUS_TEMPLATE_KEYS" not in env_values(render(helm, []), "matching")
    r = render(
        helm,
        [],
        [
            "matching.templateKey.previousKeys.existingSecret=rotation",
            "matching.templateKey.previousKeys.existingSecretKey=old",
        ],
    )
    env = env_values(r, "matching")
    ref = env["SIGHTLINE_MATCHING_PREVIOUS_TEMPLATE_KEYS"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": "rotation", "key": "old"}
    assert "rotation" not in r.names("Secret"), "the chart never holds previous keys itself"
    for svc in ("capture", "detection", "embedding", "decision"):
        assert "SIGHTLINE_MATCHING_PREVIOUS_TEMPLATE_KEYS" not in env_values(r, svc)


def test_stream_audit_interval_reaches_matching(helm: str) -> None:
    assert env_values(render(helm, []), "matching")["SIGHTLINE_MATCHING_STREAM_AUDIT_INTERVAL_S"]["value"] == "60"
    r = render(helm, [], ["matching.streamAuditIntervalS=300"])
    assert env_values(r, "matching")["SIGHTLINE_MATCHING_STREAM_AUDIT_INTERVAL_S"]["value"] == "300"


def test_topic_retention_follows_changed_limits(helm: str, tmp_path: Path) -> None:
    """A site's limits (decimals too) reach the topics as the code would compute them; retentionMs still wins."""
    site = tmp_path / "site.yaml"
    site.write_text(
        "retention: {rawHours: 0.25, matchesHours: 6, decisionsDays: 2.5, auditDays: 730}\n"
        "kafka: {topics: {alerts: {retentionMs: 1000}}}\n"
    )
    (cm,) = [c for c in render(helm, [site]).kind("ConfigMap") if c["metadata"]["name"].endswith("-topics")]
    created = {t["name"]: t["retention_ms"] for t in yaml.safe_load(cm["data"]["topics.yaml"])}
    limits = retention_settings({"rawHours": 0.25, "matchesHours": 6, "decisionsDays": 2.5, "auditDays": 730})
    assert created == {**limits.topic_retention_ms(), "sightline.alerts.v1": 1000}


# --- access control and TLS -------------------------------------------------------------------------------------------


def container_of(r: Rendered, service: str) -> dict[str, Any]:
    return r.one("Deployment", f"{RELEASE}-sightline-{service}")["spec"]["template"]["spec"]["containers"][0]


def pod_volumes(r: Rendered, service: str) -> list[dict[str, Any]]:
    return r.one("Deployment", f"{RELEASE}-sightline-{service}")["spec"]["template"]["spec"]["volumes"]


def env_values(r: Rendered, service: str) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container_of(r, service)["env"]}


def chart_caller_roles() -> dict[str, set[str]]:
    return {svc: set(entry["callerRoles"]) for svc, entry in chart_catalog().items() if entry["callerRoles"]}


def test_chart_caller_roles_match_the_code() -> None:
    """The services' own principals get the roles the code says their calls need (auth.SERVICE_CALLER_ROLES)."""
    try:
        from sightline.common import auth
    except ImportError:  # the deploy tests also run where the package is not installed
        pytest.skip("sightline is not importable here")
    assert chart_caller_roles() == {svc: {r.value for r in roles} for svc, roles in auth.SERVICE_CALLER_ROLES.items()}


def test_every_service_reads_the_tokens_file_and_callers_send_their_own_token(helm: str) -> None:
    values = [
        "auth.principals[0].principal=alice",
        "auth.principals[0].roles[0]=reviewer",
        "auth.principals[0].token_sha256=" + hashlib.sha256(b"alice-token").hexdigest(),
    ]
    r = render(helm, [], values)
    secret = r.one("Secret", f"{RELEASE}-sightline-auth")["data"]
    principals = {p["principal"]: p for p in yaml.safe_load(base64.b64decode(secret["tokens.yaml"]))}
    callers = chart_caller_roles()
    assert set(principals) == {"alice", *(f"service:{svc}" for svc in callers)}
    for svc in SERVICES:
        env = env_values(r, svc)
        assert env["SIGHTLINE_AUTH_TOKENS_FILE"]["value"] == "/etc/sightline/auth/tokens.yaml"
        mounts = {m["mountPath"]: m["name"] for m in container_of(r, svc)["volumeMounts"]}
        pod = r.one("Deployment", f"{RELEASE}-sightline-{svc}")["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes[mounts["/etc/sightline/auth"]]["secret"]["secretName"] == f"{RELEASE}-sightline-auth"
        if svc not in callers:
            assert "SIGHTLINE_AUTH_TOKEN" not in env, f"{svc} calls no one: it needs no token"
            continue
        ref = env["SIGHTLINE_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
        token = base64.b64decode(secret[ref["key"]])
        entry = principals[f"service:{svc}"]
        assert len(token) >= 43 and entry["token_sha256"] == hashlib.sha256(token).hexdigest()
        assert set(entry["roles"]) == callers[svc]
    assert secret["capture-token"] != secret["matching-token"]


def test_auth_can_be_turned_off_and_taken_from_an_existing_secret(helm: str) -> None:
    off = render(helm, [], ["auth.enabled=false"])
    assert f"{RELEASE}-sightline-auth" not in off.names("Secret")
    for svc in SERVICES:
        assert not {"SIGHTLINE_AUTH_TOKENS_FILE", "SIGHTLINE_AUTH_TOKEN"} & set(env_values(off, svc))
    existing = render(helm, VARIANTS["existing-secrets"])
    assert f"{RELEASE}-sightline-auth" not in existing.names("Secret")
    volumes = existing.one("Deployment", f"{RELEASE}-sightline-decision")["spec"]["template"]["spec"]["volumes"]
    (auth_volume,) = [v for v in volumes if v["name"] == "auth"]
    assert auth_volume["secret"] == {
        "secretName": "sightline-tokens",
        "items": [{"key": "principals.yaml", "path": "tokens.yaml"}],
    }
    assert env_values(existing, "matching")["SIGHTLINE_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {
        "name": "sightline-tokens",
        "key": "matching-token",
    }


def test_tls_mounts_the_certificate_and_requires_client_certificates(helm: str) -> None:
    r = render(helm, VARIANTS["tls"])
    for svc in SERVICES:
        env = {name: e.get("value") for name, e in env_values(r, svc).items()}
        tls = "/etc/sightline/tls"
        assert env["SIGHTLINE_TLS_SERVER_CERT_FILE"] == env["SIGHTLINE_TLS_CLIENT_CERT_FILE"] == f"{tls}/tls.crt"
        assert env["SIGHTLINE_TLS_SERVER_KEY_FILE"] == env["SIGHTLINE_TLS_CLIENT_KEY_FILE"] == f"{tls}/tls.key"
        assert env["SIGHTLINE_TLS_CA_FILE"] == env["SIGHTLINE_TLS_CLIENT_CA_FILE"] == "/etc/sightline/tls/ca.crt"
        spec = r.one("Deployment", f"{RELEASE}-sightline-{svc}")["spec"]["template"]["spec"]
        (tls_volume,) = [v for v in spec["volumes"] if v["name"] == "tls"]
        assert tls_volume["secret"]["secretName"] == "sightline-grpc-tls"
        assert {"mountPath": tls, "name": "tls", "readOnly": True} in container_of(r, svc)["volumeMounts"]
    server_only = render(helm, VARIANTS["tls"], ["tls.requireClientCert=false"])
    env = env_values(server_only, "matching")
    assert "SIGHTLINE_TLS_SERVER_CERT_FILE" in env and "SIGHTLINE_TLS_CA_FILE" in env
    assert not {"SIGHTLINE_TLS_CLIENT_CA_FILE", "SIGHTLINE_TLS_CLIENT_CERT_FILE"} & set(env)
    assert not any(
        name.startswith("SIGHTLINE_TLS_") and name != "SIGHTLINE_TLS_ALLOW_PLAINTEXT_TOKENS"
        for name in env_values(render(helm, []), "matching")
    )


def test_callers_may_send_their_tokens_in_clear_text_only_without_tls(helm: str) -> None:
    """The code refuses a token over plaintext to anything but loopback; the chart without TLS says the cluster
    network is trusted, for the services that send tokens (capture, matching) and no other."""
    allowed = "SIGHTLINE_TLS_ALLOW_PLAINTEXT_TOKENS"
    plain = render(helm, [])
    callers = set(chart_caller_roles())
    for svc in SERVICES:
        env = env_values(plain, svc)
        assert (env.get(allowed, {}).get("value") == "true") == (svc in callers), svc
        assert (allowed in env) == ("SIGHTLINE_AUTH_TOKEN" in env), svc
    for sets in (VARIANTS["tls"], []):
        r = render(helm, sets, [] if sets else ["auth.enabled=false"])  # TLS on; or no tokens to protect
        assert not any(allowed in env_values(r, svc) for svc in SERVICES)


def test_capture_source_policy_is_deny_by_default_and_reaches_capture_as_it_reads_it(
    helm: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The chart's env lines are parsed by capture's own settings: nothing is allowed unless the values say so."""
    from sightline.capture.settings import CaptureSettings

    def settings(r: object) -> CaptureSettings:
        for name, entry in env_values(r, "capture").items():
            if name.startswith("SIGHTLINE_CAPTURE_") and "value" in entry:
                monkeypatch.setenv(name, entry["value"])
        return CaptureSettings()

    closed = settings(render(helm, []))
    assert closed.allowed_roots == [] and closed.allowed_schemes == [] and closed.allowed_hosts == []
    opened = settings(
        render(
            helm,
            [],
            [
                "capture.sourcePolicy.allowedRoots={/data/frames}",
                "capture.sourcePolicy.allowedSchemes={rtsp}",
                "capture.sourcePolicy.allowedHosts={10.20.0.0/16}",
            ],
        )
    )
    assert [str(p) for p in opened.allowed_roots] == ["/data/frames"]
    assert opened.allowed_schemes == ["rtsp"] and opened.allowed_hosts == ["10.20.0.0/16"]
