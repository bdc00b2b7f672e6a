"""``sightline ops status|scale``: the SRE's view of a Helm release of Sightline on Kubernetes.

``status`` shows, per service, its Deployment's desired, ready and updated replicas (Kubernetes API) next to the lag
of its consumer group on its input topic (Kafka), and exits 0 only when every Deployment is ready. Each side is read
on its own: when the API server or the brokers cannot be reached, the other side is still shown, with the reason.
``scale SERVICE N`` sets one Deployment's replicas through the scale subresource, refusing what the chart forbids.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SERVICES = ("capture", "detection", "embedding", "matching", "decision")
IDLE_NOTE = "replicas beyond the partition count sit idle"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("ops", help="Kubernetes operations: replicas and consumer lag per service, scaling")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    status = actions.add_parser("status", help="replicas and consumer-group lag per service; exit 1 unless all ready")
    _kube_arguments(status)
    status.add_argument("--bootstrap", help="Kafka bootstrap servers (default: SIGHTLINE_KAFKA_* or the local stack)")
    status.add_argument("--json", action="store_true", help="print one JSON object")
    status.set_defaults(func=cmd_status)
    scale = actions.add_parser("scale", help="set the replicas of one service's Deployment")
    scale.add_argument("service", choices=SERVICES, metavar="SERVICE", help=" | ".join(SERVICES))
    scale.add_argument("replicas", type=_replica_count, metavar="N", help="replicas, 0 or more")
    _kube_arguments(scale)
    scale.set_defaults(func=cmd_scale)


def _kube_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--namespace", "-n", help="namespace of the release (default: the context's namespace)")
    parser.add_argument("--release", help="Helm release name (default: the only Sightline release in the namespace)")
    parser.add_argument(
        "--kubeconfig",
        type=Path,
        help="kubeconfig file (default: $KUBECONFIG, ~/.kube/config, else the pod's service account)",
    )
    parser.add_argument("--context", help="kubeconfig context (default: the current one)")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for each system (default 10)")


def _replica_count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"replicas must be 0 or more, not {value}")
    return value


# --- status -----------------------------------------------------------------------------------------------------


@dataclass
class Report:
    """Everything ``status`` could read, and why it could not read the rest."""

    namespace: str | None = None
    release: str | None = None
    kube_server: str | None = None
    kube_error: str | None = None
    bootstrap: str = ""
    kafka_error: str | None = None
    deployments: dict[str, Any] = field(default_factory=dict)  # service -> kube.DeploymentState
    lags: dict[str, Any] = field(default_factory=dict)  # service -> lag.GroupLag

    @property
    def ok(self) -> bool:
        return self.kube_error is None and all(d.is_ready for d in self.deployments.values())


def cmd_status(args: argparse.Namespace) -> int:
    report = Report()
    _read_kubernetes(report, args)
    _read_kafka(report, args)
    rows = [_row(service, report) for service in SERVICES]
    if args.json:
        print(json.dumps(_json(report, rows)))
    else:
        _print_table(report, rows)
    return 0 if report.ok else 1


def _read_kubernetes(report: Report, args: argparse.Namespace) -> None:
    from sightline.tooling.kube import Kube, KubeError

    report.namespace, report.release = args.namespace, args.release
    try:
        kube = Kube(args.kubeconfig, args.context, args.namespace, timeout_s=args.timeout)
        report.namespace, report.kube_server = kube.namespace, kube.server
        report.deployments = kube.deployments(args.release)
    except KubeError as exc:
        report.kube_error = str(exc)
        return
    if not report.deployments:
        where = f"release {args.release}" if args.release else "no Sightline release"
        report.kube_error = f"{where}: no Deployments found in namespace {report.namespace}"
    elif not report.release:
        report.release = next(iter(report.deployments.values())).release


def _read_kafka(report: Report, args: argparse.Namespace) -> None:
    from sightline.cli.endpoints import kafka_settings
    from sightline.common.lag import LagError, service_lags

    settings = kafka_settings(args.bootstrap)
    report.bootstrap = settings.bootstrap_servers
    try:
        report.lags = service_lags(settings, SERVICES, timeout_s=args.timeout)
    except LagError as exc:
        report.kafka_error = str(exc)


def _row(service: str, report: Report) -> dict[str, Any]:
    from sightline.common.lag import input_topic

    state, lag = report.deployments.get(service), report.lags.get(service)
    read = lag if lag is not None and lag.error is None else None
    row: dict[str, Any] = {
        "service": service,
        "deployment": state.name if state else None,
        "desired": state.desired if state else None,
        "ready": state.ready if state else None,
        "updated": state.updated if state else None,
        "input_topic": input_topic(service),
        "partitions": read.partition_count if read else None,
        "lag": read.total if read else None,
        "lag_by_partition": {str(p.partition): p.lag for p in read.partitions} if read else None,
        "notes": [],
    }
    _add_notes(row, report, state, lag)
    return row


def _add_notes(row: dict[str, Any], report: Report, state: Any, lag: Any) -> None:
    notes: list[str] = row["notes"]
    if report.kube_error is None and state is None:
        notes.append("not deployed")
    if state is not None and not state.is_ready:
        notes.append(f"not ready ({state.ready}/{state.desired})")
    if lag is not None and lag.error:
        notes.append(lag.error)
    if state is not None and row["partitions"] and state.desired > row["partitions"]:
        notes.append(f"{IDLE_NOTE} ({state.desired} > {row['partitions']})")


def _warnings(rows: list[dict[str, Any]]) -> list[str]:
    """Lag that nothing is working off: records are waiting and no replica of the consumer is ready."""
    return [
        f"warning: {r['service']} has {r['lag']} record(s) waiting on {r['input_topic']} and no ready replica"
        for r in rows
        if r["lag"] and r["ready"] == 0
    ]


def _json(report: Report, rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "ok": report.ok,
        "namespace": report.namespace,
        "release": report.release,
        "kubernetes": {"server": report.kube_server, "error": report.kube_error},
        "kafka": {"bootstrap_servers": report.bootstrap, "error": report.kafka_error},
        "services": rows,
        "warnings": _warnings(rows),
    }


def _print_table(report: Report, rows: list[dict[str, Any]]) -> None:
    print(f"namespace {report.namespace or '?'}  release {report.release or '?'}  kafka {report.bootstrap}")
    header = ("SERVICE", "DEPLOYMENT", "DESIRED", "READY", "UPDATED", "INPUT TOPIC", "PARTITIONS", "LAG", "NOTES")
    kube_unknown, kafka_unknown = report.kube_error is not None, report.kafka_error is not None
    table = [header] + [_cells(r, kube_unknown, kafka_unknown) for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(header) - 1)]
    for line in table:
        cells = [cell.ljust(width) for cell, width in zip(line, widths, strict=False)]
        print("  ".join([*cells, line[-1]]).rstrip())
    for warning in _warnings(rows):
        print(warning)
    if report.kube_error:
        print(f"error: Kubernetes: {report.kube_error}", file=sys.stderr)
    if report.kafka_error:
        print(f"error: Kafka: {report.kafka_error}", file=sys.stderr)


def _cells(row: dict[str, Any], kube_unknown: bool, kafka_unknown: bool) -> tuple[str, ...]:
    """'?' where a system could not be read, '-' where a value does not apply (capture has no input topic)."""
    kube_blank = "?" if kube_unknown else "-"
    kafka_blank = "?" if kafka_unknown and row["input_topic"] else "-"

    def show(value: Any, blank: str) -> str:
        return blank if value is None else str(value)

    return (
        row["service"],
        show(row["deployment"], kube_blank),
        show(row["desired"], kube_blank),
        show(row["ready"], kube_blank),
        show(row["updated"], kube_blank),
        row["input_topic"] or "-",
        show(row["partitions"], kafka_blank),
        show(row["lag"], kafka_blank),
        "; ".join(row["notes"]),
    )


# --- scale ------------------------------------------------------------------------------------------------------


def cmd_scale(args: argparse.Namespace) -> int:
    from sightline.tooling.kube import Kube, KubeError

    try:
        kube = Kube(args.kubeconfig, args.context, args.namespace, timeout_s=args.timeout)
        state = kube.deployment(args.service, args.release)
        if refusal := _refusal(state, args.replicas):
            print(f"error: {refusal}", file=sys.stderr)
            return 1
        old, new = kube.scale(state.name, args.replicas)
    except KubeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{state.name} (namespace {kube.namespace}): replicas {old} -> {new}")
    return 0


def _refusal(state: Any, replicas: int) -> str | None:
    """Why the chart forbids this replica count, if it does."""
    if state.sqlite_database and replicas > 1:
        return (
            f"{state.name} keeps its database in SQLite on a ReadWriteOnce volume (matching.database.mode=sqlite):"
            " it runs exactly one replica. Move the databases to PostgreSQL to scale it out."
        )
    return None
