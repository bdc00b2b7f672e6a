"""Container health probe: ``python -m sightline.common.healthcheck PORT [SERVICE]`` exits 0 when the gRPC health
service on 127.0.0.1:PORT answers SERVING for SERVICE ("" by default: the process is ready), 1 otherwise.

The Dockerfile's HEALTHCHECK and the chart's TLS exec probes use it (Kubernetes' own grpc probes serve plain-text
pods). Liveness names ``sightline.liveness`` (rpc.LIVENESS_SERVICE): a replica that is alive but not ready (say
matching cut off from its database) waits to be ready again rather than being restarted in a loop.
"""

from __future__ import annotations

import sys

from sightline.common.rpc import check_health


def main(argv: list[str]) -> int:
    if len(argv) not in (1, 2) or not argv[0].isdigit():
        print("usage: python -m sightline.common.healthcheck PORT [SERVICE]", file=sys.stderr)
        return 2
    service = argv[1] if len(argv) == 2 else ""
    status = check_health(f"127.0.0.1:{argv[0]}", timeout=3.0, service=service)
    print(status)
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
