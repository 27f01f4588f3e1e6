"""The CPU image, run as plain commands (this machine has no Docker engine).

The test reads docker/Dockerfile and does what `docker build` and `docker run` would:
the build stage's ENV, WORKDIR, COPY (from the context that .dockerignore lets through)
and RUN lines, in a fresh virtual environment (no system site-packages; the install line
is the Dockerfile's own, `pip install --no-cache-dir '.[server]'`); then the runtime
stage's ENTRYPOINT with its ENV plus this test's overrides (loopback, ports the kernel assigns, the
model and token "volumes"), its HEALTHCHECK command until healthy, a real Select, the
metrics endpoint, and a SIGTERM stop. Container paths (/opt/venv, /src, /models, /cache,
/run/secrets) are mapped under one temporary root.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from support import digit_key

from jest_stream.server.portfile import read_port_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_deploy_files import ROOT, Dockerfile, Instruction, build_context_files, parse_env  # noqa: E402

grpc = pytest.importorskip("grpc")

DOCKERFILE = ROOT / "docker" / "Dockerfile"
TOKEN = "deploy-test-token-7f3a"
# Where a container would take these from: the build machine's network settings.
PASSTHROUGH = ("PIP_", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy",
               "no_proxy", "SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE", "LANG", "LC_ALL")


class ContainerRoot:
    """Maps the container's absolute paths under ``root`` (only the prefixes named)."""

    def __init__(self, root: Path, prefixes: list[str]):
        self.root = root
        self.prefixes = sorted(set(prefixes), key=len, reverse=True)
        alternatives = "|".join(re.escape(p) for p in self.prefixes)
        self._pattern = re.compile(rf"(?<![\w./-])({alternatives})(?=/|$|[^\w.-])")

    def path(self, container_path: str) -> Path:
        return self.root / container_path.lstrip("/")

    def rewrite(self, text: str) -> str:
        return self._pattern.sub(lambda m: str(self.path(m.group(1))), text)


def _base_env(home: Path) -> dict[str, str]:
    """What a container starts from: a PATH with this Python (as the base image's
    /usr/local/bin) and the system folders, but no virtual environment of ours."""
    base_bin = str(Path(sys._base_executable).parent)  # type: ignore[attr-defined]
    dev_bin = str(Path(sys.prefix) / "bin")
    system = [p for p in os.environ.get("PATH", "").split(os.pathsep)
              if p and p != dev_bin and not p.startswith(str(Path(sys.prefix)))]
    env = {k: v for k, v in os.environ.items() if k.startswith(PASSTHROUGH)}
    env.update(PATH=os.pathsep.join([base_bin, *[p for p in system if p != base_bin]]),
               HOME=str(home), OMP_NUM_THREADS="1")
    return env


def _apply_env(inst: Instruction, env: dict[str, str], fs: ContainerRoot) -> None:
    """ENV K=V ...: substituted against the environment so far, container paths mapped."""
    for key, value in parse_env(inst.args, env):
        env[key] = fs.rewrite(value)


def _copy(inst: Instruction, fs: ContainerRoot, context: Path, cwd: Path) -> None:
    """COPY SRC... DEST from the build context, with Docker's rules: a folder's contents
    go into DEST; files go into DEST/ (or become DEST when it is one file's name)."""
    words = inst.args.split()
    assert not any(w.startswith("--") for w in words), f"Dockerfile:{inst.line}: COPY flags in the build stage"
    *sources, dest = words
    target = fs.path(dest) if dest.startswith("/") else cwd / dest
    for source in sources:
        src = context / source.rstrip("/")
        if src.is_dir():
            shutil.copytree(src, target, dirs_exist_ok=True)
        elif dest.endswith("/") or len(sources) > 1:
            target.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, target / src.name)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, target)


def _run_build_stage(df: Dockerfile, fs: ContainerRoot, context: Path, env: dict[str, str]) -> list[str]:
    """Run the build stage's instructions; returns the RUN command lines it ran."""
    cwd = fs.root
    cwd.mkdir(parents=True, exist_ok=True)
    ran = []
    for inst in df.stage("build").instructions:
        if inst.keyword == "ENV":
            _apply_env(inst, env, fs)
        elif inst.keyword == "ARG":
            key, _, value = inst.args.partition("=")
            env.setdefault(key.strip(), value.strip().strip('"'))
        elif inst.keyword == "WORKDIR":
            cwd = fs.path(inst.args.strip())
            cwd.mkdir(parents=True, exist_ok=True)
        elif inst.keyword == "COPY":
            _copy(inst, fs, context, cwd)
        elif inst.keyword == "RUN":
            # RUN --mount=type=secret,...: the build's pip settings; here pip has the host's own.
            command = re.sub(r"^(\s*--mount=\S+\s+)+", "", inst.args)
            form = Instruction(inst.keyword, command, inst.line).exec_form()
            argv = [fs.rewrite(a) for a in form] if form else ["/bin/sh", "-c", fs.rewrite(command)]
            result = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
            assert result.returncode == 0, (f"Dockerfile:{inst.line} RUN {inst.args}\n"
                                            f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
            ran.append(command)
    return ran


def _wait_healthy(command: list[str], env: dict[str, str], cwd: Path, proc: subprocess.Popen,
                  timeout: float, per_try: float, log: Path) -> subprocess.CompletedProcess:
    """Run the HEALTHCHECK command until it exits 0 (as Docker would, minus the interval)."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the entrypoint exited with {proc.returncode} before healthy:\n{log.read_text()}")
        last = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True,
                              timeout=per_try + 10)
        if last.returncode == 0:
            return last
        time.sleep(0.5)
    pytest.fail(f"HEALTHCHECK never passed in {timeout:.0f}s; last: {last}\n{log.read_text()}")


def _reference_outputs(model_path: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model_path, options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, inputs)))


def _sample(text: str, name: str, **labels: str) -> float:
    """Sum of the Prometheus samples ``name`` whose labels include ``labels``."""
    from prometheus_client.parser import text_string_to_metric_families

    return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def test_image_install_entrypoint_healthcheck_select(tmp_path: Path, per_example_model: str, digits) -> None:
    from jest_stream import codec
    from jest_stream.cachefile import CacheFileWriter
    from jest_stream.contract import model_version
    from jest_stream.v1 import scorer_pb2 as pb
    from jest_stream.v1 import scorer_pb2_grpc as pb_grpc

    df = Dockerfile.parse(DOCKERFILE)
    build, runtime = df.stage("build"), df.final
    build_env = build.env()
    volumes = [v for inst in runtime.all("VOLUME") for v in (inst.exec_form() or inst.args.split())]
    prefixes = [build_env["VIRTUAL_ENV"], *volumes, "/run/secrets"]
    prefixes += [i.args.strip() for stage in (build, runtime) for i in stage.all("WORKDIR")]
    fs = ContainerRoot(tmp_path / "root", prefixes)
    for copy in runtime.all("COPY"):  # COPY --from=build /opt/venv /opt/venv: same mapped path
        words = copy.args.split()
        assert words[0].startswith("--from=") and words[1] == words[2], \
            f"Dockerfile:{copy.line}: the test maps COPY --from=build SRC SRC only"

    # -- docker build: the context .dockerignore lets through, then the build stage --------
    context = tmp_path / "context"
    for rel in build_context_files():
        (context / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, context / rel)
    env = _base_env(tmp_path / "home")
    (tmp_path / "home").mkdir()
    started = time.monotonic()
    ran = _run_build_stage(df, fs, context, env)
    install_seconds = time.monotonic() - started
    assert "pip install --no-cache-dir '.[server]'" in ran
    venv = fs.path(build_env["VIRTUAL_ENV"])
    assert (venv / "pyvenv.cfg").read_text().count("include-system-site-packages = false") == 1
    listed = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "list", "--format=json"],
                            capture_output=True, text=True, check=True, env=env)
    installed = {re.sub(r"[-_.]+", "-", p["name"]).lower() for p in json.loads(listed.stdout)}
    assert {"jest-stream", "onnxruntime", "grpcio", "grpcio-health-checking", "prometheus-client"} <= installed
    assert not installed & {"torch", "onnxruntime-gpu", "onnx", "scikit-learn"}, \
        f"the server extra pulled {sorted(installed & {'torch', 'onnxruntime-gpu', 'onnx', 'scikit-learn'})}"

    # -- docker run: volumes, the token secret, ENV + overrides, the ENTRYPOINT ------------
    models = fs.path("/models")
    cache = fs.path("/cache")
    for folder in (models, cache, fs.path("/run/secrets")):
        folder.mkdir(parents=True, exist_ok=True)
    shutil.copy2(per_example_model, models / "digits.onnx")
    fs.path("/run/secrets/scorer_token").write_text(TOKEN + "\n")
    x, y = digits["x"][:64], digits["y"][:64]
    keys = [digit_key(i) for i in range(64)]
    precomputed = _reference_outputs(str(models / "digits.onnx"), {"x": x[:32], "y": y[:32]})
    with CacheFileWriter(cache / "digits.cache", model_version(models / "digits.onnx"), dataset="digits") as writer:
        for i in range(32):
            writer.add(keys[i], {name: value[i] for name, value in precomputed.items()})

    port_file = tmp_path / "ports.json"  # the server binds ports the kernel picks and writes them here
    run_env = _base_env(tmp_path / "home")
    for inst in runtime.all("ENV"):
        _apply_env(inst, run_env, fs)
    run_env.update({
        "JEST_HOST": "127.0.0.1", "JEST_PORT": "0", "JEST_PORT_FILE": str(port_file),
        "JEST_METRICS_HOST": "127.0.0.1", "JEST_METRICS_PORT": "0",
        "JEST_MODEL": f"digits={models / 'digits.onnx'}",
        "JEST_CACHE_FILE": str(cache / "digits.cache"),
        "JEST_TOKEN_FILE": str(fs.path("/run/secrets/scorer_token")),
        "JEST_INTRA_OP_THREADS": "1", "JEST_WORKERS": "4", "JEST_GRACE": "10",
    })
    entrypoint = df.entrypoint()
    resolved = shutil.which(entrypoint[0], path=run_env["PATH"])
    assert resolved is not None and Path(resolved).is_relative_to(venv), \
        f"{entrypoint[0]} resolves to {resolved}, not the fresh venv {venv}"
    cmd = runtime.last("CMD")
    argv = entrypoint + ((cmd.exec_form() or []) if cmd else [])
    workdir = fs.path(runtime.last("WORKDIR").args.strip()) if runtime.last("WORKDIR") else fs.root
    log = tmp_path / "scorer.log"
    proc = subprocess.Popen(argv, env=run_env, cwd=workdir, stdout=log.open("w"), stderr=subprocess.STDOUT)
    try:
        ports = read_port_file(str(port_file), proc=proc, timeout=120, log_path=str(log))
        port, metrics_port = ports.port, ports.metrics_port
        check = df.healthcheck()
        health_cmd = [fs.rewrite(a) for a in check.command]
        timeout = (check.seconds("start-period", 0)
                   + int(check.options.get("retries", 3)) * check.seconds("interval", 30))
        # The HEALTHCHECK sees JEST_PORT as the port the server listens on (as in a container).
        healthy = _wait_healthy(health_cmd, {**run_env, "JEST_PORT": str(port)}, workdir, proc, timeout,
                                check.seconds("timeout", 30), log)
        assert "SERVING" in healthy.stdout

        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        stub = pb_grpc.ScorerStub(channel)
        request = pb.SelectRequest(model="digits", job_id="deploy-test/rank0of1", keys=keys, n_select=16,
                                   dataset="digits",
                                   seed=7)
        codec.encode_map({"x": x, "y": y}, request.inputs)
        learner_losses = np.random.default_rng(0).uniform(0.1, 3.0, size=64).astype(np.float32)
        codec.encode(learner_losses, request.learner.losses)
        with pytest.raises(grpc.RpcError) as refused:
            stub.Select(request, timeout=30)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        metadata = (("authorization", f"Bearer {TOKEN}"),)
        reply = stub.Select(request, timeout=60, metadata=metadata)
        indices = list(reply.indices)
        assert len(indices) == 16 == len(set(indices)) and all(0 <= i < 64 for i in indices)
        assert (reply.cache_hits, reply.cache_misses) == (32, 32), "the /cache file's 32 keys should hit"
        channel.close()

        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
            metrics = r.read().decode()
        assert _sample(metrics, "jest_calls_total", method="Select", code="OK") == 1.0, metrics

        # docker stop: SIGTERM, then the server drains and exits 0.
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    print(f"\nfresh venv + install line: {install_seconds:.1f} s", file=sys.stderr)
