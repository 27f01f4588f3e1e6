"""Start a scorer as a child process on loopback and wait until it serves.

The demo's ``--remote``, the benchmarks and the tests all need "a real server on a
loopback port, ready to answer": this is the one place that does it. The child binds
port 0 (the kernel picks the port, so two runs can never race for one number) and
reports the ports it got through ``--port-file``; the parent waits for that file, then
for grpc.health.v1 SERVING.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import grpc

from .health_probe import check
from .portfile import read_port_file


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


def stop_process(proc: subprocess.Popen, timeout: float = 30.0, sig: int = signal.SIGTERM) -> int:
    """Send ``sig`` (SIGTERM: the scorer drains in-flight calls), then SIGKILL after ``timeout``."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait()


@dataclass
class ScorerProcess:
    """A scorer child process: its ports (as the kernel assigned them), log file and command."""

    proc: subprocess.Popen
    port: int
    metrics_port: int | None
    log_path: str
    args: list[str] = field(default_factory=list)
    host: str = "127.0.0.1"

    @property
    def target(self) -> str:
        return f"{self.host}:{self.port}"

    def log(self) -> str:
        with open(self.log_path, errors="replace") as fh:
            return fh.read()

    def metrics(self) -> str:
        """The Prometheus text of its /metrics endpoint (started with ``metrics=True``)."""
        import urllib.request

        if self.metrics_port is None:
            raise RuntimeError("metrics: this scorer was started without metrics=True")
        with urllib.request.urlopen(f"http://{self.host}:{self.metrics_port}/metrics", timeout=10) as reply:
            return reply.read().decode()

    def metric(self, name: str, text: str | None = None, **labels: str) -> float:
        """The sum of the samples ``name`` whose labels include ``labels`` (0 if none), in
        ``text`` or else in a fresh read of /metrics."""
        from prometheus_client.parser import text_string_to_metric_families

        total = 0.0
        for family in text_string_to_metric_families(self.metrics() if text is None else text):
            for s in family.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    total += s.value
        return total

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Send ``sig`` (SIGTERM drains), SIGKILL after ``timeout``; returns the exit code."""
        return stop_process(self.proc, timeout, sig)

    def __enter__(self) -> ScorerProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def scorer_command(models: Mapping[str, str], flags: Sequence[str], *, host: str, port: int, metrics: bool,
                   port_file: str) -> list[str]:
    """The ``python -m jest_stream.server`` command line of ``start_scorer``."""
    cmd = [sys.executable, "-m", "jest_stream.server", "--host", host, "--port", str(port),
           "--port-file", port_file]
    if metrics:
        cmd += ["--metrics-port", "0", "--metrics-host", host]
    for name, path in models.items():
        cmd += ["--model", f"{name}={path}"]
    return cmd + list(flags)


def start_scorer(models: Mapping[str, str], log_path: str, *flags: str, host: str = "127.0.0.1",
                 port: int = 0, metrics: bool = False, env: Mapping[str, str] | None = None,
                 wait: bool = True, tls_ca: bytes | None = None, timeout: float = 60.0) -> ScorerProcess:
    """Start ``python -m jest_stream.server`` serving ``models`` (name -> ONNX path) with
    extra ``flags``, its output appended to ``log_path``; return once it has bound its
    ports and (with ``wait``) health says SERVING. ``port`` 0 (the default) lets the kernel
    choose; give one only to restart a scorer where an earlier one listened. ``metrics``
    also serves /metrics on a kernel-chosen port. ``env`` is added to this environment."""
    folder = tempfile.mkdtemp(prefix="jest-scorer-")
    port_file = os.path.join(folder, "ports.json")
    cmd = scorer_command(models, flags, host=host, port=port, metrics=metrics, port_file=port_file)
    with open(log_path, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    try:
        ports = read_port_file(port_file, proc=proc, timeout=timeout, log_path=log_path)
        scorer = ScorerProcess(proc, ports.port, ports.metrics_port, log_path, cmd, host)
        if wait:
            wait_serving(scorer.target, proc=proc, timeout=timeout, tls_ca=tls_ca, log_path=log_path)
    except (RuntimeError, TimeoutError) as exc:
        stop_process(proc, timeout=5, sig=signal.SIGKILL)
        raise type(exc)(f"{exc}; its output:\n{_tail(log_path)}") from None
    except BaseException:
        stop_process(proc, timeout=5, sig=signal.SIGKILL)
        raise
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return scorer


def _tail(path: str, chars: int = 4000) -> str:
    with open(path, errors="replace") as fh:
        return fh.read()[-chars:]


@contextlib.contextmanager
def scorer_process(models: Mapping[str, str], log_path: str, *flags: str, **options) -> Iterator[ScorerProcess]:
    """``start_scorer`` as a context manager: yields the SERVING ScorerProcess, stops it
    (SIGTERM, then SIGKILL) on exit."""
    scorer = start_scorer(models, log_path, *flags, **options)
    try:
        yield scorer
    finally:
        scorer.stop()
