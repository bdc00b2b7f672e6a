"""Policy checks over every rendered variant: security, resources, probes, images, selectors, topics, autoscaling."""

from __future__ import annotations

import base64
import re
from typing import Any

import pytest
import yaml
from deploy_helpers import (
    CHART,
    GRPC_CALLS,
    GRPC_PORTS,
    INPUT_TOPIC,
    METRICS_PORTS,
    SERVICES,
    TOPICS,
    Rendered,
    chart_catalog,
    containers,
    render,
    retention_settings,
    to_snake,
    workloads,
)


def component(doc: dict[str, Any]) -> str:
    return doc["metadata"]["labels"]["app.kubernetes.io/component"]


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def test_every_container_has_requests_and_limits(rendered: Rendered) -> None:
    for doc, spec in workloads(rendered):
        for c in containers(spec):
            res = c.get("resources") or {}
            for part in ("requests", "limits"):
                for resource in ("cpu", "memory"):
                    assert res.get(part, {}).get(resource), (
                        f"{doc['kind']} {doc['metadata']['name']}/{c['name']}: no {part}.{resource}"
                    )


def test_every_container_is_locked_down(rendered: Rendered) -> None:
    """Non-root, read-only root FS, no privilege escalation, ALL capabilities dropped, RuntimeDefault seccomp, /tmp."""
    for doc, spec in workloads(rendered):
        pod_sc = spec.get("securityContext") or {}
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        where = f"{doc['kind']} {doc['metadata']['name']}"
        assert spec.get("automountServiceAccountToken") is False, f"{where}: mounts an API token it never uses"
        for c in containers(spec):
            sc = c.get("securityContext") or {}
            run_as_non_root = sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot"))
            run_as_user = sc.get("runAsUser", pod_sc.get("runAsUser"))
            seccomp = sc.get("seccompProfile", pod_sc.get("seccompProfile")) or {}
            assert run_as_non_root is True, f"{where}: runAsNonRoot not set"
            assert run_as_user == 10001, f"{where}: runAsUser is {run_as_user}"
            assert sc.get("readOnlyRootFilesystem") is True, f"{where}: root filesystem writable"
            assert sc.get("allowPrivilegeEscalation") is False, f"{where}: privilege escalation allowed"
            assert sc.get("privileged") in (None, False), f"{where}: privileged"
            assert "ALL" in (sc.get("capabilities") or {}).get("drop", []), f"{where}: capabilities not dropped"
            assert not (sc.get("capabilities") or {}).get("add"), f"{where}: capabilities added"
            assert seccomp.get("type") == "RuntimeDefault", f"{where}: seccomp {seccomp}"
            tmp = [m for m in c.get("volumeMounts", []) if m["mountPath"] == "/tmp"]
            assert tmp and "emptyDir" in volumes[tmp[0]["name"]], f"{where}: no emptyDir at /tmp"


def test_deployments_have_grpc_probes_on_the_grpc_port(rendered: Rendered) -> None:
    """Kubelet gRPC probes; with TLS (which they cannot speak) the image's gRPC health check, run in the pod."""
    tls = rendered.values()["tls"]["enabled"]
    for d in rendered.kind("Deployment"):
        svc = component(d)
        (c,) = d["spec"]["template"]["spec"]["containers"]
        port = next(p["containerPort"] for p in c["ports"] if p["name"] == "grpc")
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            # Liveness asks whether the process is alive, not ready: a replica waiting for its database is not killed.
            service = ["sightline.liveness"] if probe == "livenessProbe" else []
            if tls:
                command = c.get(probe, {}).get("exec", {}).get("command")
                expected = ["python", "-m", "sightline.common.healthcheck", str(port), *service]
                assert command == expected, f"{svc}: {probe}"
            else:
                handler = c.get(probe, {}).get("grpc", {})
                assert handler.get("port") == port, f"{svc}: {probe}: no grpc probe on {port}"
                assert ([handler["service"]] if "service" in handler else []) == service, f"{svc}: {probe}: {handler}"


def test_images_are_pinned(rendered: Rendered) -> None:
    for doc, spec in workloads(rendered):
        for c in containers(spec):
            image = c["image"]
            repo, _, tag = image.rpartition(":")
            assert repo and "/" not in tag, f"{doc['metadata']['name']}: image {image!r} has no tag"
            assert tag and tag != "latest", f"{doc['metadata']['name']}: image {image!r} is not pinned"
            assert c.get("imagePullPolicy") in {"IfNotPresent", "Always", "Never"}


def test_each_service_selects_exactly_its_deployment(rendered: Rendered) -> None:
    deployments = rendered.kind("Deployment")
    pod_labels = [(d, d["spec"]["template"]["metadata"]["labels"]) for d in deployments]
    other_pods = [
        doc["spec"]["template"]["metadata"]["labels"] for doc, _ in workloads(rendered) if doc["kind"] != "Deployment"
    ]
    for s in rendered.kind("Service"):
        selector = s["spec"]["selector"]
        matched = [d for d, labels in pod_labels if selector.items() <= labels.items()]
        assert len(matched) == 1, f"Service {s['metadata']['name']} selects {len(matched)} Deployments"
        (d,) = matched
        assert d["metadata"]["name"] == s["metadata"]["name"]
        assert d["spec"]["selector"]["matchLabels"] == selector, "Service and Deployment selectors differ"
        assert not any(selector.items() <= labels.items() for labels in other_pods), "Service selects a hook pod"
        ports = {p["name"]: p for p in s["spec"]["ports"]}
        svc = component(s)
        assert ports["grpc"]["port"] == rendered.values()[svc]["grpcPort"]
        assert ports["metrics"]["port"] == rendered.values()[svc]["metricsPort"]


def test_default_ports_follow_the_contract(helm: str) -> None:
    r = render(helm, [])
    for d in r.kind("Deployment"):
        svc = component(d)
        (c,) = d["spec"]["template"]["spec"]["containers"]
        env = env_of(c)
        assert env[f"SIGHTLINE_{svc.upper()}_GRPC_PORT"]["value"] == str(GRPC_PORTS[svc])
        assert env[f"SIGHTLINE_{svc.upper()}_METRICS_PORT"]["value"] == str(METRICS_PORTS[svc])
        assert c["args"] == ["python", "-m", f"sightline.{svc}"]


def test_kafka_settings_reach_every_container(rendered: Rendered) -> None:
    values = rendered.values()["kafka"]
    for _doc, spec in workloads(rendered):
        for c in containers(spec):
            env = env_of(c)
            assert env["SIGHTLINE_KAFKA_BOOTSTRAP_SERVERS"]["value"] == values["bootstrapServers"]
            assert env["SIGHTLINE_KAFKA_SECURITY_PROTOCOL"]["value"] == values["securityProtocol"]
            assert env["SIGHTLINE_KAFKA_REPLICATION_FACTOR"]["value"] == str(values["replicationFactor"])
            if values["securityProtocol"].startswith("SASL_"):
                assert "secretKeyRef" in env["SIGHTLINE_KAFKA_SASL_PASSWORD"]["valueFrom"], "password not from a Secret"
            else:
                assert "SIGHTLINE_KAFKA_SASL_PASSWORD" not in env
            ca = values["tls"]["ca"]
            if values["securityProtocol"] in ("SSL", "SASL_SSL") and (ca["secretName"] or ca["configMapName"]):
                assert env["SIGHTLINE_KAFKA_SSL_CAFILE"]["value"] == "/etc/sightline/kafka-ca/ca.crt"
                assert any(m["mountPath"] == "/etc/sightline/kafka-ca" for m in c["volumeMounts"])


def test_secrets_never_appear_as_plain_env(rendered: Rendered) -> None:
    secret_like = re.compile(r"(PASSWORD|TEMPLATE_KEYS?$|SECRET|TOKEN)")
    flags = {"SIGHTLINE_TLS_ALLOW_PLAINTEXT_TOKENS"}  # a switch about tokens, not a token
    for doc, spec in workloads(rendered):
        for c in containers(spec):
            for e in c.get("env", []):
                if e["name"] in flags:
                    assert e["value"] in ("true", "false"), f"{e['name']} is a switch, not {e['value']!r}"
                elif secret_like.search(e["name"]) and not e["name"].endswith("_FILE"):  # a mounted Secret's path
                    assert "valueFrom" in e, f"{e['name']} is a literal in {doc['metadata']['name']}"
                if e["name"].endswith("_DATABASE_URL") and "value" in e:
                    assert e["value"].startswith("sqlite:"), f"{e['name']}: a PostgreSQL DSN must come from a Secret"


def test_secret_references_resolve(rendered: Rendered) -> None:
    """Every secretKeyRef names a Secret the chart renders, or one the values say exists, with the right key."""
    values = rendered.values()
    rendered_secrets = {s["metadata"]["name"]: s for s in rendered.kind("Secret")}
    existing = {
        values["kafka"]["sasl"]["existingSecret"],
        values["matching"]["database"]["postgresql"]["existingSecret"],
        values["matching"]["templateKey"]["existingSecret"],
        values["matching"]["templateKey"]["previousKeys"]["existingSecret"],
        values["capture"]["sources"]["existingSecret"],
        values["auth"]["existingSecret"],
        values["audit"]["keys"]["existingSecret"],
    } - {""}
    for doc, spec in workloads(rendered):
        for c in containers(spec):
            for e in c.get("env", []):
                ref = (e.get("valueFrom") or {}).get("secretKeyRef")
                if not ref:
                    continue
                if ref["name"] in rendered_secrets:
                    assert ref["key"] in rendered_secrets[ref["name"]]["data"], f"{ref} has no such key"
                else:
                    assert ref["name"] in existing, (
                        f"{doc['metadata']['name']}: {ref['name']} is neither rendered nor existing"
                    )


def test_generated_template_key_is_32_bytes(rendered: Rendered) -> None:
    for s in rendered.kind("Secret"):
        if s["metadata"]["name"].endswith("-template-key"):
            key = base64.b64decode(base64.b64decode(s["data"]["template_key"]))
            assert len(key) == 32
            assert s["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"


def hook_topics(rendered: Rendered) -> list[dict[str, Any]]:
    (cm,) = [c for c in rendered.kind("ConfigMap") if c["metadata"]["name"].endswith("-topics")]
    return yaml.safe_load(cm["data"]["topics.yaml"])


def test_hook_creates_every_topic_a_service_uses(rendered: Rendered) -> None:
    values = rendered.values()
    created = {t["name"]: t for t in hook_topics(rendered)}
    for topic, (producer, consumers, _retention) in TOPICS.items():
        assert topic in created, f"{topic} (produced by {producer}, consumed by {consumers}) is not created"
        explicit = values["kafka"]["topics"][topic.split(".")[1]].get("retentionMs")
        if explicit is not None:
            assert created[topic]["retention_ms"] == explicit, f"{topic}: retentionMs {explicit} not applied"
        assert created[topic]["partitions"] >= 1
    assert set(created) == set(TOPICS), f"unexpected topics: {set(created) - set(TOPICS)}"


def test_topic_retention_follows_the_retention_values(rendered: Rendered) -> None:
    """Topics without their own retentionMs get the code's limit for their data class, from the retention values."""
    values = rendered.values()
    expected = retention_settings(values["retention"]).topic_retention_ms()
    for topic in hook_topics(rendered):
        if values["kafka"]["topics"][topic["name"].split(".")[1]].get("retentionMs") is None:
            assert topic["retention_ms"] == expected[topic["name"]], topic["name"]


def test_retention_values_reach_every_container(rendered: Rendered) -> None:
    values = rendered.values()["retention"]
    expected = {f"SIGHTLINE_RETENTION_{to_snake(key).upper()}": value for key, value in values.items()}
    for doc, spec in workloads(rendered):
        for c in containers(spec):
            env = {name: e.get("value") for name, e in env_of(c).items() if name.startswith("SIGHTLINE_RETENTION_")}
            assert set(env) == set(expected), f"{doc['metadata']['name']}: {set(expected) ^ set(env)}"
            for name, value in expected.items():
                assert float(env[name]) == value, f"{doc['metadata']['name']}: {name}={env[name]}, values say {value}"


def test_retention_defaults_are_the_codes() -> None:
    """values.yaml documents the code's defaults, and has a value for each limit the code has (and no other)."""
    chart = yaml.safe_load((CHART / "values.yaml").read_text())["retention"]
    code = retention_settings()
    assert {to_snake(key) for key in chart} == set(type(code).model_fields)
    assert retention_settings(chart) == code


def test_audit_chain_is_one_database_in_postgresql_mode(rendered: Rendered) -> None:
    """Every service appends to one audit chain (matching's and decision's records, everyone's refused calls): the
    same database, read from the same Secret key. SQLite cannot be shared between pods: matching and decision each
    keep their own file on their own volume (two chains, as docs/deploy.md says), and the others audit nothing."""
    values = rendered.values()
    if not (values["matching"]["enabled"] and values["decision"]["enabled"]):
        return
    env = {component(d): env_of(d["spec"]["template"]["spec"]["containers"][0]) for d in rendered.kind("Deployment")}
    audit = {svc: e.get("SIGHTLINE_AUDIT_DATABASE_URL") for svc, e in env.items()}
    if values["matching"]["database"]["mode"] == "postgresql":
        sources = {svc: url["valueFrom"]["secretKeyRef"] for svc, url in audit.items()}  # a KeyError: no URL
        assert set(sources) == set(env) and len({tuple(ref.items()) for ref in sources.values()}) == 1
        assert audit["matching"]["valueFrom"] == env["matching"]["SIGHTLINE_MATCHING_DATABASE_URL"]["valueFrom"]
    else:
        assert audit.pop("matching")["value"] == "sqlite:////var/lib/sightline/audit.db"  # on the gallery PVC
        assert audit.pop("decision")["value"] == "sqlite:////var/lib/sightline/decision-audit.db"  # on decision's PVC
        assert set(audit.values()) == {None}, "a stateless pod has no volume for a SQLite chain"


def test_default_retention_follows_the_contract(helm: str) -> None:
    created = {t["name"]: t for t in hook_topics(render(helm, []))}
    for topic, (_, _, retention) in TOPICS.items():
        assert created[topic]["retention_ms"] == retention
        assert created[topic]["partitions"] == 4


def test_chart_topics_match_the_code() -> None:
    """The chart's topics agree with sightline.common.topics, the code's single list, and their default retention
    with the code's default limits (RetentionSettings.topic_retention_ms, what the local stack creates)."""
    try:
        from sightline.common import topics
    except ImportError:  # the deploy tests also run where the package is not installed
        pytest.skip("sightline is not importable here; the contract list in deploy_helpers is checked instead")
    from sightline.common.lag import input_topic

    assert {t.name for t in topics.ALL_TOPICS} == set(TOPICS)
    assert retention_settings().topic_retention_ms() == {k: v[2] for k, v in TOPICS.items()}
    for spec in topics.ALL_TOPICS:
        assert spec.consumers == TOPICS[spec.name][1]
    for svc in SERVICES:  # the lag `sightline status` reports, and capture's back-pressure reads, is KEDA's
        assert input_topic(svc) == INPUT_TOPIC.get(svc), svc


def test_chart_catalogue_lists_what_each_service_consumes() -> None:
    """Each service's input topic (scaled on) and side inputs in the chart are the topics the contract says it reads."""
    for svc, entry in chart_catalog().items():
        consumed = {f"sightline.{key}.v1" for key in [entry["consumes"], *entry["alsoConsumes"]] if key}
        assert consumed == {topic for topic, (_, consumers, _) in TOPICS.items() if svc in consumers}, svc
        assert (f"sightline.{entry['consumes']}.v1" if entry["consumes"] else None) == INPUT_TOPIC.get(svc), svc


def test_topics_hook_job(rendered: Rendered) -> None:
    (job,) = rendered.kind("Job")
    ann = job["metadata"]["annotations"]
    assert ann["helm.sh/hook"] == "pre-install,pre-upgrade"
    assert ann["helm.sh/hook-delete-policy"] == "before-hook-creation,hook-succeeded"
    spec = job["spec"]["template"]["spec"]
    (c,) = spec["containers"]
    args = c["args"]
    path = args[args.index("--from-file") + 1]
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volume = next(v for v in spec["volumes"] if v["name"] == mounts[path.rsplit("/", 1)[0]])
    # Everything the Job needs at pre-install time must itself be a hook that runs before it.
    needed = {("ConfigMap", volume["configMap"]["name"]), ("ServiceAccount", spec["serviceAccountName"])}
    for e in c["env"]:
        if ref := (e.get("valueFrom") or {}).get("secretKeyRef"):
            if ref["name"] not in {rendered.values()["kafka"]["sasl"]["existingSecret"]}:
                needed.add(("Secret", ref["name"]))
    weight = int(ann["helm.sh/hook-weight"])
    for kind, name in needed:
        dep = rendered.one(kind, name)
        dep_ann = dep["metadata"].get("annotations", {})
        assert "pre-install" in dep_ann.get("helm.sh/hook", ""), f"{kind} {name} is not a pre-install hook"
        assert int(dep_ann["helm.sh/hook-weight"]) < weight, f"{kind} {name} is not created before the Job"


def test_autoscalers_target_rendered_deployments(rendered: Rendered) -> None:
    values = rendered.values()
    deployments = {d["metadata"]["name"]: d for d in rendered.kind("Deployment")}
    scaled = {}
    for hpa in rendered.kind("HorizontalPodAutoscaler"):
        ref = hpa["spec"]["scaleTargetRef"]
        assert ref["kind"] == "Deployment" and ref["name"] in deployments
        scaled[ref["name"]] = "cpu"
    trigger_auths = rendered.names("TriggerAuthentication")
    for so in rendered.kind("ScaledObject"):
        name = so["spec"]["scaleTargetRef"]["name"]
        assert name in deployments, f"ScaledObject targets missing Deployment {name}"
        svc = component(deployments[name])
        assert name not in scaled, f"{name} has both an HPA and a ScaledObject"
        scaled[name] = "kafkaLag"
        (trigger,) = so["spec"]["triggers"]
        meta = trigger["metadata"]
        assert trigger["type"] == "kafka"
        assert meta["topic"] == INPUT_TOPIC[svc], f"{svc} scales on {meta['topic']}, not its input"
        assert meta["consumerGroup"] == f"sightline-{svc}"
        assert meta["bootstrapServers"] == values["kafka"]["bootstrapServers"]
        assert int(meta["lagThreshold"]) == values[svc]["autoscaling"]["lagThreshold"]
        if "authenticationRef" in trigger:
            assert trigger["authenticationRef"]["name"] in trigger_auths
        if values["kafka"]["securityProtocol"].startswith("SASL_"):
            assert "authenticationRef" in trigger and "sasl" in meta
    for name, d in deployments.items():
        svc = component(d)
        autoscaled = values[svc]["autoscaling"]["enabled"]
        assert (name in scaled) == autoscaled, f"{svc}: autoscaling {autoscaled} but scaler rendered {name in scaled}"
        assert ("replicas" in d["spec"]) != autoscaled, f"{svc}: replicas must be left to the autoscaler"


def test_pod_disruption_budgets_select_their_pods(rendered: Rendered) -> None:
    deployments = {d["metadata"]["name"]: d for d in rendered.kind("Deployment")}
    for pdb in rendered.kind("PodDisruptionBudget"):
        d = deployments[pdb["metadata"]["name"]]
        assert pdb["spec"]["selector"]["matchLabels"] == d["spec"]["selector"]["matchLabels"]


def test_sqlite_gallery_means_one_matching_replica(rendered: Rendered) -> None:
    values = rendered.values()["matching"]
    if not values["enabled"]:
        return
    d = next(d for d in rendered.kind("Deployment") if component(d) == "matching")
    spec = d["spec"]["template"]["spec"]
    url = env_of(spec["containers"][0])["SIGHTLINE_MATCHING_DATABASE_URL"]
    if values["database"]["mode"] == "sqlite":
        assert d["spec"]["replicas"] == 1 and d["spec"]["strategy"]["type"] == "Recreate"
        assert url["value"].startswith("sqlite:////var/lib/sightline/")
        claim = next(v for v in spec["volumes"] if v["name"] == "gallery")["persistentVolumeClaim"]["claimName"]
        assert (
            claim in rendered.names("PersistentVolumeClaim") or claim == values["database"]["sqlite"]["existingClaim"]
        )
    else:
        assert "secretKeyRef" in url["valueFrom"]
        assert not rendered.kind("PersistentVolumeClaim")


def persistent_dirs(spec: dict[str, Any]) -> dict[str, str]:
    """Mount path -> claim name of the first container's PersistentVolumeClaim mounts."""
    claims = {
        v["name"]: v["persistentVolumeClaim"]["claimName"]
        for v in spec.get("volumes", [])
        if "persistentVolumeClaim" in v
    }
    mounts = spec["containers"][0].get("volumeMounts", [])
    return {m["mountPath"]: claims[m["name"]] for m in mounts if m["name"] in claims}


def sqlite_dir(url: str) -> str:
    """The directory of a sqlite:////absolute/path URL's file."""
    assert url.startswith("sqlite:////"), url
    return url.removeprefix("sqlite:///").rsplit("/", 1)[0]


def test_sqlite_mode_keeps_decision_on_its_own_volume(rendered: Rendered) -> None:
    """SQLite mode: decision's database and audit chain are files on a PVC of its own (one replica, Recreate), so a
    pod replacement loses neither; PostgreSQL mode: both come from the Secret and decision has no volume."""
    values = rendered.values()
    if not values["decision"]["enabled"]:
        return
    d = next(d for d in rendered.kind("Deployment") if component(d) == "decision")
    spec = d["spec"]["template"]["spec"]
    env = env_of(spec["containers"][0])
    urls = [env[name] for name in ("SIGHTLINE_DECISION_DATABASE_URL", "SIGHTLINE_AUDIT_DATABASE_URL")]
    claims = [c for c in rendered.kind("PersistentVolumeClaim") if component(c) == "decision"]
    if values["matching"]["database"]["mode"] == "sqlite":
        assert d["spec"]["replicas"] == 1 and d["spec"]["strategy"]["type"] == "Recreate"
        mounts = persistent_dirs(spec)
        for url in urls:
            assert sqlite_dir(url["value"]) in mounts, f"{url['value']} is not on a persistent volume"
        claim = mounts[sqlite_dir(urls[0]["value"])]
        existing = values["decision"]["sqlite"]["existingClaim"]
        assert claim == (existing or f"{d['metadata']['name']}-data")
        assert [c["metadata"]["name"] for c in claims] == ([] if existing else [claim])
        assert all(c["spec"]["accessModes"] == values["decision"]["sqlite"]["accessModes"] for c in claims)
    else:
        assert all("secretKeyRef" in url["valueFrom"] for url in urls)
        assert not persistent_dirs(spec) and not claims


def test_decision_mounts_its_policy(rendered: Rendered) -> None:
    values = rendered.values()
    d = next(d for d in rendered.kind("Deployment") if component(d) == "decision")
    spec = d["spec"]["template"]["spec"]
    path = env_of(spec["containers"][0])["SIGHTLINE_DECISION_POLICY_FILE"]["value"]
    cm_name = next(v for v in spec["volumes"] if v["name"] == "policy")["configMap"]["name"]
    policy = yaml.safe_load(rendered.one("ConfigMap", cm_name)["data"][path.rsplit("/", 1)[1]])
    assert policy == values["decision"]["policy"]
    assert "checksum/config" in d["spec"]["template"]["metadata"]["annotations"]


def test_callers_reach_their_peers_by_service_name(rendered: Rendered) -> None:
    services = {component(s): s for s in rendered.kind("Service")}
    for caller, peers in GRPC_CALLS.items():
        d = next((d for d in rendered.kind("Deployment") if component(d) == caller), None)
        if d is None:
            continue
        env = env_of(d["spec"]["template"]["spec"]["containers"][0])
        for peer in peers:
            host, port = env[f"SIGHTLINE_{caller.upper()}_{peer.upper()}_ADDR"]["value"].split(":")
            assert host == services[peer]["metadata"]["name"]
            assert int(port) == next(p["port"] for p in services[peer]["spec"]["ports"] if p["name"] == "grpc")


def test_services_list_is_complete(rendered: Rendered) -> None:
    values = rendered.values()
    assert {component(d) for d in rendered.kind("Deployment")} == {s for s in SERVICES if values[s]["enabled"]}
