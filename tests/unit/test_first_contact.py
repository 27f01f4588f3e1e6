"""First-contact errors name what to change: a port in use names the port and its flag,
a bad environment value names the variable, a target without a port is refused."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from jest_stream import RemoteScorer


def serve(model: str, *flags: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jest_stream", "serve", "--model", f"digits={model}",
                           "--host", "127.0.0.1", "--metrics-host", "127.0.0.1", *flags], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


@pytest.fixture
def busy_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


@pytest.mark.parametrize("flag, other", [("--port", "--metrics-port"), ("--metrics-port", "--port")])
def test_a_port_in_use_names_the_port_and_its_flag(per_example_model, busy_port, flag, other):
    done = serve(per_example_model, flag, str(busy_port), other, "0")
    assert done.returncode == 1
    assert f"{flag} {busy_port}: cannot listen on 127.0.0.1:{busy_port}" in done.stderr
    assert f"pick another with {flag}" in done.stderr and "Traceback" not in done.stderr


def test_a_bad_environment_value_names_the_variable(per_example_model):
    done = serve(per_example_model, env={"JEST_PORT": "abc"})
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("JEST_PORT='abc': not a valid --port")


@pytest.mark.parametrize("target", ["localhost", "scorer.internal", "::1", ["10.0.0.5:50051", "10.0.0.6"], ""])
def test_a_target_without_a_port_is_refused(target):
    with pytest.raises(ValueError, match="expected host:port"):
        RemoteScorer(target)


@pytest.mark.parametrize("target", ["localhost:50051", "[::1]:50051", "dns:///scorer:50051", "a:1,b:2"])
def test_targets_with_a_port_are_accepted(target):
    RemoteScorer(target).close()
