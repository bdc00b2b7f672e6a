"""Helpers of the deployment tests: find the tools, render the chart per values variant, walk the manifests.

The tools are installed by ``tools/install-helm.sh`` (the project's setup runs it). A missing tool is a broken setup,
not an optional feature, so the tests fail with the command that fixes it instead of skipping.
Module name is unique on purpose: test folders have no __init__.py, so `conftest` would be ambiguous to import.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "sightline"
TOOLS_DIR = REPO / "build" / "tools"
RELEASE = "sl"
NAMESPACE = "sightline"
INSTALL_HINT = "run `tools/install-helm.sh build/tools` (the project's setup does)"

# The values variants every test runs over: the defaults, each CI variant, and the production starting point.
VARIANTS: dict[str, list[Path]] = {"default": []}
VARIANTS.update({p.stem.removesuffix("-values"): [p] for p in sorted((CHART / "ci").glob("*.yaml"))})
VARIANTS["production"] = [CHART / "values-production.yaml"]

# The application contract the chart implements (fixed by the lead), restated here so that the chart is checked
# against it rather than against itself.
SERVICES = ("capture", "detection", "embedding", "matching", "decision")
GRPC_PORTS = {"capture": 50051, "detection": 50052, "embedding": 50053, "matching": 50054, "decision": 50055}
METRICS_PORTS = {"capture": 9101, "detection": 9102, "embedding": 9103, "matching": 9104, "decision": 9105}
HOUR_MS, DAY_MS = 3_600_000, 86_400_000
# topic -> (producer, consumers, default retention.ms); "*" is every service. The retention is the code's default
# limit for the topic's data class (RetentionSettings in services/common/retention.py): dead letters may hold frames or
# descriptors, so they are kept as briefly as those.
TOPICS = {
    "sightline.frames.v1": ("capture", ("detection",), HOUR_MS),
    "sightline.faces.v1": ("detection", ("embedding",), HOUR_MS),
    "sightline.embeddings.v1": ("embedding", ("matching",), HOUR_MS),
    "sightline.matches.v1": ("matching", ("decision",), DAY_MS),
    "sightline.decisions.v1": ("decision", (), 7 * DAY_MS),
    "sightline.alerts.v1": ("decision", (), 30 * DAY_MS),
    "sightline.sessions.v1": ("capture, decision", ("decision",), DAY_MS),
    "sightline.erasures.v1": ("matching", ("decision",), 365 * DAY_MS),
    "sightline.deadletter.v1": ("*", (), HOUR_MS),
    "sightline.audit.v1": ("*", (), 365 * DAY_MS),
}
# The topic each consumer scales on (its pipeline input; the sessions and erasures topics are side inputs of decision).
INPUT_TOPIC = {
    "detection": "sightline.frames.v1",
    "embedding": "sightline.faces.v1",
    "matching": "sightline.embeddings.v1",
    "decision": "sightline.matches.v1",
}
PUBLIC_SERVICES = {"capture", "matching", "decision"}  # reached by external clients over gRPC
# caller -> the services it calls over gRPC (matching: detection and embedding; capture's kiosk sessions: the gallery)
GRPC_CALLS = {"matching": ("detection", "embedding"), "capture": ("matching",)}

# CRDs kubernetes-validate has no schema for; test_manifests.py checks them against its own schemas.
CRD_KINDS = {
    ("keda.sh/v1alpha1", "ScaledObject"),
    ("keda.sh/v1alpha1", "TriggerAuthentication"),
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
}


def chart_catalog() -> dict[str, dict[str, Any]]:
    """The chart's per-service catalogue (``sightline.catalog`` in _helpers.tpl): what the code fixes per service."""
    helpers = (CHART / "templates" / "_helpers.tpl").read_text()
    block = re.search(r'define "sightline.catalog" -}}\n(.*?){{- end }}', helpers, re.S)
    assert block is not None, "no sightline.catalog in _helpers.tpl"
    catalog: dict[str, dict[str, Any]] = yaml.safe_load(block.group(1))
    return catalog


def find_tool(name: str, env_var: str) -> str:
    """$<env_var>, else build/tools/<name>, else PATH; fails the test with an install hint when absent."""
    candidates = [os.environ.get(env_var), str(TOOLS_DIR / name), shutil.which(name)]
    for candidate in candidates:
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    pytest.fail(f"{name} not found (looked at ${env_var}, {TOOLS_DIR / name}, PATH): {INSTALL_HINT}", pytrace=False)


@dataclass
class Rendered:
    """The manifests of one `helm template` run, with look-ups the tests need."""

    docs: list[dict[str, Any]]
    values_files: list[Path] = field(default_factory=list)

    def kind(self, kind: str) -> list[dict[str, Any]]:
        return [d for d in self.docs if d["kind"] == kind]

    def one(self, kind: str, name: str) -> dict[str, Any]:
        found = [d for d in self.kind(kind) if d["metadata"]["name"] == name]
        assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
        return found[0]

    def names(self, kind: str) -> set[str]:
        return {d["metadata"]["name"] for d in self.kind(kind)}

    def values(self) -> dict[str, Any]:
        """The effective values: chart defaults overlaid by the variant's files (enough for the keys tests read)."""
        merged = yaml.safe_load((CHART / "values.yaml").read_text())
        for path in self.values_files:
            merged = deep_merge(merged, yaml.safe_load(path.read_text()) or {})
        return merged


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def run_helm(helm: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([helm, *args], capture_output=True, text=True, timeout=120, check=False)


def template_args(values_files: list[Path], sets: list[str] | None = None) -> list[str]:
    args = ["template", RELEASE, str(CHART), "--namespace", NAMESPACE]
    for path in values_files:
        args += ["-f", str(path)]
    for item in sets or []:
        args += ["--set", item]
    return args


def render(helm: str, values_files: list[Path], sets: list[str] | None = None) -> Rendered:
    """`helm template` (hooks included), failing the test with helm's message if rendering fails."""
    result = run_helm(helm, *template_args(values_files, sets))
    assert result.returncode == 0, f"helm template failed:\n{result.stderr}"
    docs = [d for d in yaml.safe_load_all(result.stdout) if d]
    return Rendered(docs=docs, values_files=values_files)


def pod_spec(doc: dict[str, Any]) -> dict[str, Any] | None:
    """The pod spec of a workload (Deployment, Job...), or None for other kinds."""
    if doc["kind"] in {"Deployment", "StatefulSet", "DaemonSet", "Job", "ReplicaSet"}:
        return doc["spec"]["template"]["spec"]
    if doc["kind"] == "CronJob":
        return doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    if doc["kind"] == "Pod":
        return doc["spec"]
    return None


def workloads(r: Rendered) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(manifest, pod spec) of every workload, the topics hook Job included."""
    return [(d, spec) for d in r.docs if (spec := pod_spec(d)) is not None]


def containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return list(spec.get("initContainers") or []) + list(spec.get("containers") or [])


def retention_settings(values: dict[str, Any] | None = None) -> Any:
    """The code's RetentionSettings with the chart's camelCase retention values (the code's defaults when None),
    independent of the environment the tests run in; skips where the package is not installed."""
    retention = pytest.importorskip("sightline.common.retention", reason="sightline is not importable here")
    fields = {to_snake(key): value for key, value in (values or {}).items()}
    defaults = {name: field.default for name, field in retention.RetentionSettings.model_fields.items()}
    return retention.RetentionSettings.model_construct(**{**defaults, **fields})


def to_snake(camel: str) -> str:
    """A values key as the settings field it maps to: rawHours -> raw_hours."""
    return re.sub(r"(?<!^)([A-Z])", r"_\1", camel).lower()
