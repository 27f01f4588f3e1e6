"""Start a scorer as a child process on loopback and wait until it serves.

The demo's ``--remote``, the benchmarks and the tests all need "a real server on a free
loopback port, ready to answer": this is the one place that does it.
"""
from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping

import grpc

from .health_probe import check


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def wait_serving(target: str, *, proc: subprocess.Popen | None = None, timeout: float = 60.0,
                 tls_ca: bytes | None = None, log_path: str | None = None) -> None:
    """Poll grpc.health.v1 at ``target`` until SERVING; raise if ``proc`` exits or time runs out."""
    see = f"; see {log_path}" if log_path else ""
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the scorer exited with code {proc.returncode} before SERVING{see}")
        with contextlib.suppress(grpc.RpcError):
            if check(target, timeout=1.0, tls_ca=tls_ca) == "SERVING":
                return
        if time.monotonic() > deadline:
            raise TimeoutError(f"the scorer at {target} is not SERVING after {timeout:.0f} s{see}")
        time.sleep(0.1)


def stop_process(proc: subprocess.Popen, timeout: float = 15.0) -> int:
    """SIGTERM (the scorer drains in-flight calls), then SIGKILL after ``timeout``."""
    if proc.poll() is None:
        proc.terminate()
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait()


@contextlib.contextmanager
def scorer_process(models: Mapping[str, str], log_path: str, *flags: str, port: int | None = None,
                   timeout: float = 60.0) -> Iterator[tuple[str, subprocess.Popen]]:
    """``python -m jest_stream.server`` serving ``models`` (name -> ONNX path) on a loopback
    port, with extra ``flags``; yields (target, process) once SERVING; stops it on exit."""
    port = port or free_port()
    cmd = [sys.executable, "-m", "jest_stream.server", "--host", "127.0.0.1", "--port", str(port), *flags]
    for name, path in models.items():
        cmd += ["--model", f"{name}={path}"]
    with open(log_path, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    try:
        target = f"127.0.0.1:{port}"
        wait_serving(target, proc=proc, timeout=timeout, log_path=log_path)
        yield target, proc
    finally:
        stop_process(proc)
