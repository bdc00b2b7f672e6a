"""The default ports of each service, shared by the services' settings, the local stack and the Helm chart docs."""

from __future__ import annotations

SERVICES = ("capture", "detection", "embedding", "matching", "decision")

GRPC_PORTS = {"capture": 50051, "detection": 50052, "embedding": 50053, "matching": 50054, "decision": 50055}
METRICS_PORTS = {"capture": 9101, "detection": 9102, "embedding": 9103, "matching": 9104, "decision": 9105}
LOCAL_BROKER_PORT = 19092
