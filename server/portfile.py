"""The port file: how a server started with ``--port 0`` tells its parent the ports the
kernel gave it (``jest-stream serve --port-file PATH``).

One small JSON object, ``{"port": 43117, "metrics_port": 43119}`` (``metrics_port`` null
without ``--metrics-port``), written to a temporary name and renamed into place, so a
reader sees either no file or the whole of it.
"""
from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class BoundPorts:
    """The ports a server listens on, as the kernel assigned them."""

    port: int
    metrics_port: int | None = None


def write_port_file(path: str, ports: BoundPorts) -> None:
    """Write ``ports`` to ``path`` atomically (a temporary file in the same folder, then
    a rename)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as fh:
        json.dump({"port": ports.port, "metrics_port": ports.metrics_port}, fh)
    os.replace(tmp, path)


def read_port_file(path: str, *, proc: subprocess.Popen | None = None, timeout: float = 60.0,
                   log_path: str | None = None) -> BoundPorts:
    """Wait until ``path`` exists and return its ports; raise if ``proc`` exits first or
    ``timeout`` seconds pass."""
    see = f"; see {log_path}" if log_path else ""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode} before it bound its port{see}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"the server wrote no port file {path} in {timeout:.0f} s{see}")
        time.sleep(0.02)
    with open(path) as fh:
        data = json.load(fh)
    return BoundPorts(int(data["port"]), None if data.get("metrics_port") is None else int(data["metrics_port"]))
