"""The CPU scorer image, built from docker/Dockerfile and run in a real Docker engine: lean
and unprivileged, healthy by its own HEALTHCHECK, answering ListModels and Select from a
client on the host, serving /metrics, draining on `docker stop`, and refusing a broken
model with one line."""
from __future__ import annotations

import shutil
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from docker_engine import REPORT, for_container_user, metric

from jest_stream.server.launch import wait_serving
from jest_stream.server.portfile import read_port_file

pytestmark = [pytest.mark.docker, pytest.mark.timeout(900)]

grpc = pytest.importorskip("grpc")
TOKEN = "docker-test-token-5b1e"
USER = "10001:10001"


def _volumes(tmp_path: Path, models: dict[str, bytes | str]) -> dict[Path, str]:
    """A /models folder (name -> ONNX file or bytes), a /cache folder the server writes its
    port file in, and the token as /run/secrets/scorer_token."""
    folder = tmp_path / "models"
    folder.mkdir()
    for name, source in models.items():
        target = folder / f"{name}.onnx"
        if isinstance(source, bytes):
            target.write_bytes(source)
        else:
            shutil.copy2(source, target)
        for_container_user(target, 0o444)
    for_container_user(folder, 0o555)
    token = tmp_path / "scorer_token"
    token.write_text(TOKEN + "\n")
    for_container_user(token, 0o400)
    cache = tmp_path / "cache"
    cache.mkdir()
    for_container_user(cache, 0o755)
    return {folder: "/models:ro", cache: "/cache", token: "/run/secrets/scorer_token:ro"}


def _serve_env(models: str) -> dict[str, str]:
    """Loopback, ports the kernel assigns (the server writes them to /cache/ports.json, and
    the image's HEALTHCHECK asks the port written there), the token, one thread."""
    return {"JEST_HOST": "127.0.0.1", "JEST_PORT": "0", "JEST_METRICS_HOST": "127.0.0.1",
            "JEST_METRICS_PORT": "0", "JEST_PORT_FILE": "/cache/ports.json", "JEST_MODEL": models,
            "JEST_TOKEN_FILE": "/run/secrets/scorer_token", "JEST_INTRA_OP_THREADS": "1", "JEST_GRACE": "10"}


def test_image_is_unprivileged_and_keeps_no_build_secrets(deploy, scorer_image: str) -> None:
    config = deploy.engine.image(scorer_image)["Config"]
    assert config["User"] == USER
    assert config["Entrypoint"] == ["jest-stream", "serve"]
    assert config["Healthcheck"]["Test"][0] == "CMD"
    # No pip config, no mirror CA, no pip cache, no compiler; the venv has the server only.
    probe = ("id -u; for f in /etc/pip.conf /run/secrets/ca.crt /root/.cache/pip; do test -e $f && echo has $f; "
             "done; for c in gcc cc g++ make; do command -v $c && echo has $c; done; "
             "python -c 'import onnxruntime, grpc, jest_stream.server'; "
             "python -c 'import torch' 2>/dev/null && echo has torch; echo done")
    result = deploy.engine.docker("run", "--rm", "--network", "host", "--label", "jest-stream.test=1",
                                  "--entrypoint", "/bin/sh", scorer_image, "-c", probe)
    assert result.stdout.split() == ["10001", "done"], result.stdout + result.stderr
    history = deploy.engine.docker("history", "--no-trunc", "--format", "{{.CreatedBy}}", scorer_image).stdout
    assert deploy.mirror.base not in history and "pip.conf" not in history, "the build's mirror reached the image"


def test_container_healthy_serves_select_and_drains_on_stop(deploy, scorer_image: str, per_example_model: str,
                                                             digits, tmp_path: Path) -> None:
    from jest_stream import codec
    from jest_stream.client.remote import RemoteScorer
    from jest_stream.v1 import scorer_pb2 as pb
    from jest_stream.v1 import scorer_pb2_grpc as pb_grpc

    engine = deploy.engine
    container = engine.run_detached(
        scorer_image, f"jest-test-scorer-{tmp_path.name}", mounts=_volumes(tmp_path, {"digits": per_example_model}),
        env=_serve_env("digits=/models/digits.onnx"), options=("--health-interval", "1s", "--stop-timeout", "30"))
    try:
        healthy_s = engine.wait_healthy(container)
        ports = read_port_file(str(tmp_path / "cache" / "ports.json"), timeout=0)
        target, metrics_port = f"127.0.0.1:{ports.port}", ports.metrics_port
        wait_serving(target, timeout=10)
        REPORT["scorer_healthy_s"] = round(healthy_s, 1)

        with RemoteScorer(target, token=TOKEN) as scorer:
            models = scorer.models()  # ListModels
        assert models["digits"].kind == "per_example"
        assert {spec.name for spec in models["digits"].inputs} == {"x", "y"}

        x, y = digits["x"][:64], digits["y"][:64]
        request = pb.SelectRequest(model="digits", job_id="docker-test/rank0of1", n_select=16, seed=3,
                                   keys=[f"digit-{i}" for i in range(64)])
        codec.encode_map({"x": x, "y": y}, request.inputs)
        codec.encode(np.random.default_rng(0).uniform(0.1, 3.0, 64).astype(np.float32), request.learner.losses)
        with grpc.insecure_channel(target) as channel:
            stub = pb_grpc.ScorerStub(channel)
            with pytest.raises(grpc.RpcError) as refused:
                stub.Select(request, timeout=30)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            reply = stub.Select(request, timeout=60, metadata=(("authorization", f"Bearer {TOKEN}"),))
        indices = list(reply.indices)
        assert len(indices) == 16 == len(set(indices)) and all(0 <= i < 64 for i in indices)

        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
            metrics = r.read().decode()
        assert metric(metrics, "jest_calls_total", method="Select", job="docker-test/rank0of1", code="OK") == 1
        assert metric(metrics, "jest_calls_total", method="ListModels", code="OK") >= 1

        engine.docker("stop", container, timeout=60)  # SIGTERM to the server (PID 1): drain, exit
        state = engine.container_state(container)
        logs = engine.docker("logs", container).stderr
        assert state["ExitCode"] == 0 and not state["OOMKilled"], logs
        assert "SIGTERM: draining" in logs and logs.rstrip().endswith("stopped"), logs
    finally:
        engine.docker("rm", "-f", container, check=False)


def test_broken_model_refused_with_one_line(deploy, scorer_image: str, tmp_path: Path) -> None:
    engine = deploy.engine
    container = engine.run_detached(
        scorer_image, f"jest-test-broken-{tmp_path.name}", mounts=_volumes(tmp_path, {"broken": b"not an onnx\n"}),
        env=_serve_env("broken=/models/broken.onnx"))
    try:
        code = int(engine.docker("wait", container, timeout=120).stdout.strip())
        logs = engine.docker("logs", container).stderr
        assert code != 0, logs
        errors = [line for line in logs.splitlines() if " ERROR " in line or "Traceback" in line]
        assert len(errors) == 1, logs
        assert "broken" in errors[0] and "/models/broken.onnx" in errors[0], errors
        REPORT["broken_model_exit_code_and_line"] = [code, errors[0].split(" ", 2)[-1]]
    finally:
        engine.docker("rm", "-f", container, check=False)
