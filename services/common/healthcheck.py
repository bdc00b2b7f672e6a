"""Container health probe: ``python -m sightline.common.healthcheck PORT`` exits 0 when the gRPC health service on
127.0.0.1:PORT answers SERVING, 1 otherwise (used by the Dockerfile's HEALTHCHECK; Kubernetes uses grpc probes)."""

from __future__ import annotations

import sys

from sightline.common.rpc import check_health


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not argv[0].isdigit():
        print("usage: python -m sightline.common.healthcheck PORT", file=sys.stderr)
        return 2
    status = check_health(f"127.0.0.1:{argv[0]}", timeout=3.0)
    print(status)
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
