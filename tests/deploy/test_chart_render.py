"""The chart lints, renders, and every rendered manifest is valid Kubernetes 1.37 (CRDs against our own schemas)."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from deploy_helpers import CHART, CRD_KINDS, VARIANTS, Rendered, render, run_helm

K8S_VERSION = "1.37.0"


def test_lint_strict(helm: str, variant: str) -> None:
    args = ["lint", "--strict", str(CHART)]
    for path in VARIANTS[variant]:
        args += ["-f", str(path)]
    result = run_helm(helm, *args)
    assert result.returncode == 0, f"helm lint --strict failed for {variant}:\n{result.stdout}\n{result.stderr}"


def test_renders_expected_kinds(rendered: Rendered, variant: str) -> None:
    kinds = {d["kind"] for d in rendered.docs}
    assert {"Deployment", "Service", "ServiceAccount", "Job", "ConfigMap"} <= kinds
    values = rendered.values()
    enabled = [s for s in ("capture", "detection", "embedding", "matching", "decision") if values[s]["enabled"]]
    assert len(rendered.kind("Deployment")) == len(enabled)
    assert len(rendered.kind("Service")) == len(enabled)
    assert len(rendered.kind("PodDisruptionBudget")) == len(enabled)
    assert ("NetworkPolicy" in kinds) == values["networkPolicy"]["enabled"]


def run_kubernetes_validate(paths: list[Path]) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "kubernetes_validate", "--strict", "-k", K8S_VERSION, "--quiet", *map(str, paths)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)


def write_core_manifests(r: Rendered, path: Path) -> int:
    """Write every non-CRD manifest of a render to one file; returns how many."""
    docs = [d for d in r.docs if (d["apiVersion"], d["kind"]) not in CRD_KINDS]
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return len(docs)


def test_kubernetes_validate_strict(rendered: Rendered, variant: str, tmp_path: Path) -> None:
    """kubernetes-validate --strict against 1.37 (unknown fields fail). Any warning (e.g. an unknown kind) fails too."""
    # A declared test dependency: missing means a broken setup, so fail rather than skip.
    try:
        import kubernetes_validate  # noqa: F401  (run below as a module, in this interpreter)
    except ImportError:
        pytest.fail("kubernetes-validate is missing: pip install '.[test]' (kubernetes-validate==1.37.0)")
    count = write_core_manifests(rendered, tmp_path / f"{variant}.yaml")
    result = run_kubernetes_validate([tmp_path / f"{variant}.yaml"])
    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 0 and not output, f"{variant}: {count} manifests, kubernetes-validate said:\n{output}"


def test_kubernetes_validate_catches_unknown_fields(helm: str, tmp_path: Path) -> None:
    """The validator really is strict: a typo'd field in a Deployment must fail it."""
    r = render(helm, [])
    broken = copy.deepcopy(r)
    deployment = next(d for d in broken.docs if d["kind"] == "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["readynessProbe"] = {"grpc": {"port": 1}}
    write_core_manifests(broken, tmp_path / "broken.yaml")
    result = run_kubernetes_validate([tmp_path / "broken.yaml"])
    assert result.returncode != 0, "kubernetes-validate accepted an unknown field"


# --- CRDs: KEDA ScaledObject/TriggerAuthentication and the Prometheus Operator ServiceMonitor -------------------------
# Subsets of the CRDs' OpenAPI schemas covering the fields the chart may render; unknown fields are rejected, as
# kubernetes-validate --strict does for core kinds, so a typo cannot slip through.

_NAME = {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63}
_METADATA = {
    "type": "object",
    "required": ["name", "namespace"],
    "properties": {"name": _NAME, "namespace": _NAME, "labels": {"type": "object"}, "annotations": {"type": "object"}},
    "additionalProperties": False,
}


def _crd(api_version: str, kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": api_version},
            "kind": {"const": kind},
            "metadata": _METADATA,
            "spec": spec,
        },
    }


_STR = {"type": "string"}
_INT = {"type": "integer", "minimum": 0}
_SECRET_REF = {
    "type": "array",
    "minItems": 1,
    "items": {
        "type": "object",
        "required": ["parameter", "name", "key"],
        "additionalProperties": False,
        "properties": {"parameter": _STR, "name": _NAME, "key": _STR},
    },
}
CRD_SCHEMAS: dict[tuple[str, str], dict[str, Any]] = {
    ("keda.sh/v1alpha1", "ScaledObject"): _crd(
        "keda.sh/v1alpha1",
        "ScaledObject",
        {
            "type": "object",
            "required": ["scaleTargetRef", "triggers"],
            "additionalProperties": False,
            "properties": {
                "scaleTargetRef": {
                    "type": "object",
                    "required": ["name"],
                    "additionalProperties": False,
                    "properties": {"apiVersion": _STR, "kind": _STR, "name": _NAME, "envSourceContainerName": _STR},
                },
                "pollingInterval": _INT,
                "cooldownPeriod": _INT,
                "initialCooldownPeriod": _INT,
                "idleReplicaCount": _INT,
                "minReplicaCount": _INT,
                "maxReplicaCount": _INT,
                "fallback": {"type": "object"},
                "advanced": {"type": "object"},
                "triggers": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["type", "metadata"],
                        "additionalProperties": False,
                        "properties": {
                            "type": _STR,
                            "name": _STR,
                            "useCachedMetrics": {"type": "boolean"},
                            "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                            # KEDA trigger metadata values are all strings.
                            "metadata": {"type": "object", "additionalProperties": _STR},
                            "authenticationRef": {
                                "type": "object",
                                "required": ["name"],
                                "additionalProperties": False,
                                "properties": {
                                    "name": _NAME,
                                    "kind": {"enum": ["TriggerAuthentication", "ClusterTriggerAuthentication"]},
                                },
                            },
                        },
                    },
                },
            },
        },
    ),
    ("keda.sh/v1alpha1", "TriggerAuthentication"): _crd(
        "keda.sh/v1alpha1",
        "TriggerAuthentication",
        {
            "type": "object",
            "minProperties": 1,
            "additionalProperties": False,
            "properties": {"secretTargetRef": _SECRET_REF, "configMapTargetRef": _SECRET_REF, "env": {"type": "array"}},
        },
    ),
    ("monitoring.coreos.com/v1", "ServiceMonitor"): _crd(
        "monitoring.coreos.com/v1",
        "ServiceMonitor",
        {
            "type": "object",
            "required": ["selector", "endpoints"],
            "additionalProperties": False,
            "properties": {
                "jobLabel": _STR,
                "selector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {"matchLabels": {"type": "object"}, "matchExpressions": {"type": "array"}},
                },
                "namespaceSelector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {"any": {"type": "boolean"}, "matchNames": {"type": "array", "items": _STR}},
                },
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "port": _STR,
                            "targetPort": {"type": ["string", "integer"]},
                            "path": _STR,
                            "scheme": {"enum": ["http", "https"]},
                            "interval": {
                                "type": "string",
                                "pattern": "^(0|(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$",
                            },
                            "scrapeTimeout": {
                                "type": "string",
                                "pattern": "^(0|(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$",
                            },
                            "honorLabels": {"type": "boolean"},
                            "honorTimestamps": {"type": "boolean"},
                            "relabelings": {"type": "array"},
                            "metricRelabelings": {"type": "array"},
                            "tlsConfig": {"type": "object"},
                        },
                    },
                },
            },
        },
    ),
}


def test_crds_match_their_schemas(rendered: Rendered) -> None:
    for doc in rendered.docs:
        key = (doc["apiVersion"], doc["kind"])
        if key in CRD_KINDS:
            jsonschema.validate(doc, CRD_SCHEMAS[key])


def test_only_known_crds_are_rendered(rendered: Rendered) -> None:
    """Anything that is neither core Kubernetes nor a CRD checked above would escape validation."""
    core_groups = ("v1", "apps/v1", "batch/v1", "policy/v1", "autoscaling/v2", "networking.k8s.io/v1")
    for doc in rendered.docs:
        key = (doc["apiVersion"], doc["kind"])
        assert doc["apiVersion"] in core_groups or key in CRD_KINDS, f"unchecked kind {key}"


def test_crd_schema_catches_typos() -> None:
    bad = {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": {"name": "x", "namespace": "y"},
        "spec": {"scaleTargetRef": {"name": "x"}, "triggers": [{"type": "kafka", "metadata": {"lagThreshold": 5}}]},
    }
    with pytest.raises(jsonschema.ValidationError):  # lagThreshold must be a string
        jsonschema.validate(bad, CRD_SCHEMAS[("keda.sh/v1alpha1", "ScaledObject")])
    bad["spec"]["triggers"][0]["metadata"]["lagThreshold"] = "5"
    bad["spec"]["maxReplicas"] = 3  # the field is maxReplicaCount
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, CRD_SCHEMAS[("keda.sh/v1alpha1", "ScaledObject")])


def test_every_variant_is_exercised() -> None:
    """The CI variants the issue asks for exist (autoscaling off / HPA / KEDA, existingSecret, postgres, netpol off)."""
    expected = {"default", "hpa", "keda", "existing-secrets", "postgres", "networkpolicy-off", "production", "tls"}
    assert expected <= set(VARIANTS)
