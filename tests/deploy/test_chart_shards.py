"""The chart with a sharded gallery (matching.shards): one Deployment, Service, PodDisruptionBudget and autoscaler per
shard, each shard's pods told their shard and every shard's address, the flows between shards allowed, and the
manifests valid Kubernetes; with one shard, exactly the chart without shards."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from deploy_helpers import CHART, RELEASE, Rendered, render, run_helm, template_args
from test_chart_render import run_kubernetes_validate, write_core_manifests

POSTGRES = [CHART / "ci" / "postgres-values.yaml"]
MATCHING = f"{RELEASE}-sightline-matching"
GRPC, METRICS = 50054, 9104


@pytest.fixture(scope="module")
def sharded(helm: str) -> Rendered:
    return render(helm, POSTGRES, ["matching.shards=2"])


def pod_labels(deployment: dict[str, Any]) -> dict[str, str]:
    return deployment["spec"]["template"]["metadata"]["labels"]


def selected(selector: dict[str, str], r: Rendered) -> set[str]:
    """The Deployments whose pods a label selector picks."""
    return {d["metadata"]["name"] for d in r.kind("Deployment") if selector.items() <= pod_labels(d).items()}


def shard_env(deployment: dict[str, Any]) -> dict[str, str]:
    env = deployment["spec"]["template"]["spec"]["containers"][0]["env"]
    return {e["name"]: e["value"] for e in env if "SHARD" in e["name"]}


def test_sharded_chart_lints_and_is_valid_kubernetes(helm: str, sharded: Rendered, tmp_path: Path) -> None:
    args = ["lint", "--strict", str(CHART), "-f", str(POSTGRES[0]), "--set", "matching.shards=2"]
    linted = run_helm(helm, *args)
    assert linted.returncode == 0, linted.stdout + linted.stderr
    count = write_core_manifests(sharded, tmp_path / "sharded.yaml")
    result = run_kubernetes_validate([tmp_path / "sharded.yaml"])
    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 0 and not output, f"{count} manifests, kubernetes-validate said:\n{output}"


def test_one_deployment_per_shard_with_its_shard_and_every_address(sharded: Rendered) -> None:
    deployments = {d["metadata"]["name"]: d for d in sharded.kind("Deployment") if MATCHING in d["metadata"]["name"]}
    assert set(deployments) == {f"{MATCHING}-0", f"{MATCHING}-1"}
    addresses = f'["{MATCHING}-0:{GRPC}","{MATCHING}-1:{GRPC}"]'
    for shard in (0, 1):
        deployment = deployments[f"{MATCHING}-{shard}"]
        assert shard_env(deployment) == {
            "SIGHTLINE_MATCHING_SHARDS": "2",
            "SIGHTLINE_MATCHING_SHARD": str(shard),
            "SIGHTLINE_MATCHING_SHARD_ADDRESSES": addresses,
        }
        assert pod_labels(deployment)["sightline/shard"] == str(shard)
        # Each Deployment owns its own pods only: overlapping selectors would make them fight over ReplicaSets.
        assert selected(deployment["spec"]["selector"]["matchLabels"], sharded) == {f"{MATCHING}-{shard}"}


def test_the_shard_env_is_what_matching_reads(sharded: Rendered, monkeypatch: pytest.MonkeyPatch) -> None:
    """The chart's lines, parsed by matching's own settings, make a valid sharded replica."""
    from sightline.matching.settings import MatchingSettings

    for name, value in shard_env(sharded.one("Deployment", f"{MATCHING}-1")).items():
        monkeypatch.setenv(name, value)
    settings = MatchingSettings(template_key="k" * 44)
    assert (settings.shards, settings.shard) == (2, 1)
    assert settings.shard_addresses == [f"{MATCHING}-0:{GRPC}", f"{MATCHING}-1:{GRPC}"]


def test_each_shard_has_its_own_service_and_the_gallery_api_reaches_all(sharded: Rendered) -> None:
    services = {s["metadata"]["name"]: s for s in sharded.kind("Service")}
    for shard in (0, 1):
        service = services[f"{MATCHING}-{shard}"]  # the address in SIGHTLINE_MATCHING_SHARD_ADDRESSES
        assert selected(service["spec"]["selector"], sharded) == {f"{MATCHING}-{shard}"}
        assert {p["port"] for p in service["spec"]["ports"]} == {GRPC, METRICS}
    gallery = services[MATCHING]  # capture's kiosk sessions and enrolment clients
    assert selected(gallery["spec"]["selector"], sharded) == {f"{MATCHING}-0", f"{MATCHING}-1"}
    assert [p["port"] for p in gallery["spec"]["ports"]] == [GRPC]  # no metrics: each pod is scraped once
    capture = sharded.one("Deployment", f"{RELEASE}-sightline-capture")["spec"]["template"]["spec"]["containers"][0]
    matching_addr = {e["name"]: e.get("value") for e in capture["env"]}["SIGHTLINE_CAPTURE_MATCHING_ADDR"]
    assert matching_addr == f"{MATCHING}:{GRPC}"


def test_every_pod_is_scraped_through_exactly_one_service(sharded: Rendered) -> None:
    for deployment in sharded.kind("Deployment"):
        scraped_by = [
            s["metadata"]["name"]
            for s in sharded.kind("Service")
            if s["spec"]["selector"].items() <= pod_labels(deployment).items()
            and any(p["name"] == "metrics" for p in s["spec"]["ports"])
        ]
        assert len(scraped_by) == 1, (deployment["metadata"]["name"], scraped_by)


def test_disruption_budgets_and_autoscalers_per_shard(helm: str, sharded: Rendered, tmp_path: Path) -> None:
    budgets = [p for p in sharded.kind("PodDisruptionBudget") if MATCHING in p["metadata"]["name"]]
    picked = [selected(p["spec"]["selector"]["matchLabels"], sharded) for p in budgets]
    assert sorted(map(sorted, picked)) == [[f"{MATCHING}-0"], [f"{MATCHING}-1"]]
    for mode, kind in (("cpu", "HorizontalPodAutoscaler"), ("kafkaLag", "ScaledObject")):
        sets = ["matching.shards=2", "matching.autoscaling.enabled=true", f"matching.autoscaling.mode={mode}"]
        r = render(helm, POSTGRES, sets)
        scalers = [a for a in r.kind(kind) if MATCHING in a["metadata"]["name"]]
        assert sorted(a["spec"]["scaleTargetRef"]["name"] for a in scalers) == [f"{MATCHING}-0", f"{MATCHING}-1"]
        for scaler in scalers:
            assert "replicas" not in r.one("Deployment", scaler["spec"]["scaleTargetRef"]["name"])["spec"]
        if kind == "ScaledObject":  # every shard's replicas consume in the one group: each scales on its lag
            assert {a["spec"]["triggers"][0]["metadata"]["consumerGroup"] for a in scalers} == {"sightline-matching"}
        else:
            write_core_manifests(r, tmp_path / "hpa.yaml")
            result = run_kubernetes_validate([tmp_path / "hpa.yaml"])
            assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), result.stdout


def test_network_policy_lets_shards_call_each_other(sharded: Rendered) -> None:
    policy = sharded.one("NetworkPolicy", MATCHING)
    assert policy["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "matching"  # every shard

    def matching_peer(peers: list[dict[str, Any]] | None) -> bool:
        return any(
            p.get("podSelector", {}).get("matchLabels", {}).get("app.kubernetes.io/component") == "matching"
            for p in peers or []
        )

    ingress = {
        x["port"] for rule in policy["spec"]["ingress"] if matching_peer(rule.get("from")) for x in rule["ports"]
    }
    egress = {x["port"] for rule in policy["spec"]["egress"] if matching_peer(rule.get("to")) for x in rule["ports"]}
    assert ingress == egress == {GRPC}


def test_one_shard_renders_the_chart_without_shards(helm: str) -> None:
    """shards=1 (the default) is today's chart: one matching Deployment and Service, no shard label or env."""

    def stable(r: Rendered) -> list[dict[str, Any]]:  # generated Secrets are random on every render
        return [{**d, "data": sorted(d["data"])} if d["kind"] == "Secret" else d for d in r.docs]

    assert stable(render(helm, POSTGRES, ["matching.shards=1"])) == stable(render(helm, POSTGRES))
    r = render(helm, POSTGRES)
    deployment = r.one("Deployment", MATCHING)
    assert shard_env(deployment) == {} and "sightline/shard" not in pod_labels(deployment)
    assert "sightline/shard" not in yaml.safe_dump_all(r.docs)


@pytest.mark.parametrize(
    ("files", "sets", "message"),
    [
        ([], ["matching.shards=2"], "matching.shards > 1 needs matching.database.mode=postgresql"),
        (POSTGRES, ["matching.shards=0"], "minimum"),
        (POSTGRES, ["matching.shards=65"], "maximum"),
        (POSTGRES, ["decision.shards=2"], "at '/decision'"),  # a matching value only
    ],
)
def test_shard_values_are_checked(helm: str, files: list[Path], sets: list[str], message: str) -> None:
    result = run_helm(helm, *template_args(files, sets))
    assert result.returncode != 0 and message in result.stderr, result.stderr


def test_every_shard_keeps_its_snapshots_on_its_own_sized_volume(sharded: Rendered) -> None:
    for deployment in sharded.kind("Deployment"):
        if MATCHING not in deployment["metadata"]["name"]:
            continue
        pod = deployment["spec"]["template"]["spec"]
        container = pod["containers"][0]
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["SIGHTLINE_MATCHING_SNAPSHOT_DIR"] == "/var/cache/sightline/snapshots"
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        assert mounts["snapshots"] == "/var/cache/sightline/snapshots"
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["snapshots"]["emptyDir"] == {"sizeLimit": "2Gi"}
