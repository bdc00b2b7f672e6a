"""A thin wrapper over the Kubernetes Python client for ``sightline ops``: find the chart's Deployments, read and
change their replica counts.

It uses four API calls, and nothing else: list Deployments in a namespace by label selector, read a Deployment, and
read and patch a Deployment's ``scale`` subresource (the same calls ``kubectl get deploy -l`` and ``kubectl scale``
make). The RBAC an operator needs is therefore ``get``/``list`` on ``deployments`` and ``get``/``patch`` on
``deployments/scale`` in the release's namespace.

Deployments are found by the labels the chart puts on them (templates/_helpers.tpl): ``app.kubernetes.io/part-of=
sightline``, ``app.kubernetes.io/instance=<release>`` and ``app.kubernetes.io/component=<service>``. Labels are used
rather than names because they survive ``nameOverride``/``fullnameOverride``; ``deployment_name`` reproduces the
chart's naming for messages about a Deployment that is not there.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

SERVICES = ("capture", "detection", "embedding", "matching", "decision")
CHART_NAME = "sightline"
PART_OF = "app.kubernetes.io/part-of"
INSTANCE = "app.kubernetes.io/instance"
COMPONENT = "app.kubernetes.io/component"
# The chart sets this on matching with a plain value (a file path, no credentials) when the gallery is SQLite, and
# from a Secret when it is PostgreSQL; a SQLite gallery allows one writer only.
# A service whose database is a SQLite file on a ReadWriteOnce volume runs exactly one replica (the chart's rule).
DATABASE_ENVS = ("SIGHTLINE_MATCHING_DATABASE_URL", "SIGHTLINE_DECISION_DATABASE_URL")
INCLUSTER_NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


class KubeError(RuntimeError):
    """The Kubernetes API could not be reached or refused a request; the message is safe to print."""


@dataclass(frozen=True)
class DeploymentState:
    """What ``ops`` reads from one of the chart's Deployments."""

    service: str
    name: str
    namespace: str
    release: str
    desired: int
    ready: int
    updated: int
    sqlite_database: bool  # its database is a SQLite file (matching's gallery, decision's): one replica at most

    @property
    def is_ready(self) -> bool:
        return self.ready == self.desired


def chart_fullname(release: str, name_override: str = "", fullname_override: str = "") -> str:
    """The chart's ``sightline.fullname``: <release>-sightline, or <release> when it already contains the chart name,
    cut to 40 characters (so "<fullname>-embedding" fits the 63-character label limit) without a trailing dash."""
    if fullname_override:
        return _trunc_trim(fullname_override, 40)
    name = name_override or CHART_NAME
    return _trunc_trim(release if name in release else f"{release}-{name}", 40)


def deployment_name(release: str, service: str, name_override: str = "", fullname_override: str = "") -> str:
    """The chart's ``sightline.serviceName``: the name of a service's Deployment, Service and ServiceAccount."""
    return f"{chart_fullname(release, name_override, fullname_override)}-{service}"


def _trunc_trim(value: str, length: int) -> str:
    # Helm's `trunc N | trimSuffix "-"`: trimSuffix removes one dash, not all of them.
    value = value[:length]
    return value[:-1] if value.endswith("-") else value


def label_selector(release: str | None, service: str | None = None) -> str:
    terms = [f"{PART_OF}=sightline"]
    if release:
        terms.append(f"{INSTANCE}={release}")
    terms.append(f"{COMPONENT}={service}" if service else f"{COMPONENT} in ({','.join(SERVICES)})")
    return ",".join(terms)


class Kube:
    """Connection to one cluster and namespace. ``kubeconfig`` None: $KUBECONFIG or ~/.kube/config, else the pod's
    in-cluster service account. ``namespace`` None: the context's namespace (or the pod's), else "default"."""

    def __init__(
        self,
        kubeconfig: Path | None = None,
        context: str | None = None,
        namespace: str | None = None,
        timeout_s: float = 10.0,
    ) -> None:
        from kubernetes import client

        configuration, default_namespace = _load_configuration(kubeconfig, context)
        # Fail fast on a dead server: one retry instead of urllib3's default three.
        configuration.retries = 1
        self.server = _public_url(configuration.host)
        self.namespace = namespace or default_namespace
        self.timeout_s = timeout_s
        self._apps = client.AppsV1Api(client.ApiClient(configuration))

    def deployments(self, release: str | None = None) -> dict[str, DeploymentState]:
        """The chart's Deployments in the namespace, by service. Refuses to guess between several releases."""
        with self._errors("list Deployments"):
            found = self._apps.list_namespaced_deployment(
                self.namespace, label_selector=label_selector(release), _request_timeout=self.timeout_s
            )
        states = [_state(item) for item in found.items]
        releases = sorted({s.release for s in states})
        if len(releases) > 1:
            raise KubeError(
                f"namespace {self.namespace} holds several Sightline releases ({', '.join(releases)}): pass --release"
            )
        return {s.service: s for s in sorted(states, key=lambda s: SERVICES.index(s.service))}

    def deployment(self, service: str, release: str | None = None) -> DeploymentState:
        """The Deployment of one service, or KubeError naming what was expected."""
        states = self.deployments(release)
        if service not in states:
            expected = f" (expected {deployment_name(release, service)})" if release else ""
            where = f"release {release} in " if release else ""
            raise KubeError(f"no Deployment of service {service} in {where}namespace {self.namespace}{expected}")
        return states[service]

    def scale(self, name: str, replicas: int) -> tuple[int, int]:
        """Set a Deployment's replicas through its scale subresource; returns (old, new)."""
        with self._errors(f"read the scale of {name}"):
            current = self._apps.read_namespaced_deployment_scale(name, self.namespace, _request_timeout=self.timeout_s)
        # A merge patch of spec.replicas only: it cannot touch anything else of the Deployment.
        with self._errors(f"scale {name}"):
            patched = self._apps.patch_namespaced_deployment_scale(
                name,
                self.namespace,
                {"spec": {"replicas": replicas}},
                _content_type="application/merge-patch+json",
                _request_timeout=self.timeout_s,
            )
        return int(current.spec.replicas or 0), int(patched.spec.replicas or 0)

    @contextlib.contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        """Turn client and transport errors into one clear message that names the server but carries no credential."""
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        try:
            yield
        except ApiException as exc:
            raise KubeError(
                f"Kubernetes API {self.server} refused to {action} in namespace {self.namespace}: "
                f"HTTP {exc.status} {exc.reason}{_api_message(exc.body)}"
            ) from None
        except HTTPError as exc:
            reason = _transport_reason(exc)
            raise KubeError(f"cannot reach the Kubernetes API server at {self.server}: {reason}") from None


def _load_configuration(kubeconfig: Path | None, context: str | None) -> tuple[Any, str]:
    """A client configuration and the default namespace, from a kubeconfig file or the in-cluster service account."""
    from kubernetes import client, config

    configuration = client.Configuration()
    path = str(kubeconfig) if kubeconfig else os.environ.get("KUBECONFIG") or str(Path("~/.kube/config").expanduser())
    try:
        if kubeconfig or os.environ.get("KUBECONFIG") or Path(path).is_file():
            config.load_kube_config(
                config_file=path, context=context, client_configuration=configuration, persist_config=False
            )
            return configuration, _context_namespace(path, context)
        if os.environ.get("KUBERNETES_SERVICE_HOST"):
            config.load_incluster_config(client_configuration=configuration)
            return configuration, _incluster_namespace()
    except (config.ConfigException, OSError, ValueError) as exc:
        raise KubeError(f"cannot load the Kubernetes configuration from {path}: {exc}") from None
    raise KubeError(f"no Kubernetes configuration: {path} does not exist and this is not a pod; pass --kubeconfig")


def _context_namespace(path: str, context: str | None) -> str:
    from kubernetes import config

    contexts, active = config.list_kube_config_contexts(path)
    chosen = next((c for c in contexts if c.get("name") == context), active) if context else active
    return ((chosen or {}).get("context") or {}).get("namespace") or "default"


def _incluster_namespace() -> str:
    try:
        return INCLUSTER_NAMESPACE_FILE.read_text().strip() or "default"
    except OSError:
        return "default"


def _state(item: Any) -> DeploymentState:
    labels = item.metadata.labels or {}
    status = item.status
    return DeploymentState(
        service=labels.get(COMPONENT, ""),
        name=item.metadata.name,
        namespace=item.metadata.namespace or "",
        release=labels.get(INSTANCE, ""),
        # spec.replicas is absent only in a manifest; the API server defaults it to 1.
        desired=int(item.spec.replicas if item.spec.replicas is not None else 1),
        ready=int((status.ready_replicas if status else None) or 0),
        updated=int((status.updated_replicas if status else None) or 0),
        sqlite_database=_uses_sqlite(item),
    )


def _uses_sqlite(item: Any) -> bool:
    containers = item.spec.template.spec.containers if item.spec.template and item.spec.template.spec else []
    for container in containers or []:
        for env in container.env or []:
            if env.name in DATABASE_ENVS and env.value and env.value.startswith("sqlite:"):
                return True
    return False


def _public_url(host: str) -> str:
    """The server URL without any user:password@ part, for messages."""
    parts = urlsplit(host)
    return f"{parts.scheme}://{parts.hostname}{f':{parts.port}' if parts.port else ''}{parts.path}".rstrip("/")


def _api_message(body: Any) -> str:
    """The API server's own explanation (a Status object's message), if the body has one."""
    import json

    try:
        message = json.loads(body).get("message") if body else None
    except (ValueError, AttributeError, TypeError):
        message = None
    return f": {message}" if message else ""


def _transport_reason(exc: Exception) -> str:
    reason = getattr(exc, "reason", None) or exc
    text = str(reason)
    for marker in ("Connection refused", "timed out", "Name or service not known", "certificate verify failed"):
        if marker in text:
            return marker.lower()
    return text
