"""docker/compose.yaml brought up for real with docker-compose: the reference job, the
scorer and the two trainer jobs, the token as a compose secret; both trainers finish their
demo runs through the shared scorer, and the second, on the same data, is served from the
cache the first one filled.

The engine has no bridge network, so docker/compose.host.yaml puts every service on the
host's network; on it, published ports mean nothing and docker-compose 1.29 refuses them,
so they are dropped from the resolved file. The scorer binds ports the kernel picks and
writes them to its port file; the trainers, pointed at that port, then run one after the
other (the file lets them run at once) so that the cache hits can be told apart by job.
"""
from __future__ import annotations

import json
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from docker_engine import REPORT, for_container_user, metric

pytestmark = [pytest.mark.docker, pytest.mark.timeout(900)]

yaml = pytest.importorskip("yaml")
DOCKER = Path(__file__).resolve().parents[2] / "docker"
STEPS = 6  # super-batches per demo run: 960 of the 1137 training examples, none twice
SUPER_BATCH = 160  # the demo's


def _metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return r.read().decode()


def _settled_metrics(port: int, timeout: float = 60) -> str:
    """The metrics once the scorer is idle: a job that has exited may leave a call (its
    last prefetch) that the server finishes and counts after the job is gone."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        text = _metrics(port)
        counters = (metric(text, "jest_cache_hits_total"), metric(text, "jest_cache_misses_total"),
                    metric(text, "jest_calls_total"))
        if metric(text, "jest_inflight_calls") == 0 and counters == last or time.monotonic() > deadline:
            return text
        last = counters
        time.sleep(0.5)


def _compose(env: dict[str, str], project: str, files: tuple[str, ...], *args: str) -> str:
    argv = ["docker-compose", "-p", project]
    for f in files:
        argv += ["-f", f]
    result = subprocess.run([*argv, *args], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"docker-compose {' '.join(args)}:\n{result.stdout}{result.stderr}"
    return result.stdout


def _resolve(env: dict[str, str], project: str, out: Path) -> tuple[str, ...]:
    """compose.yaml + compose.host.yaml resolved with ``env``, minus published ports."""
    config = yaml.safe_load(_compose(env, project, (str(DOCKER / "compose.yaml"), str(DOCKER / "compose.host.yaml")),
                                     "config"))
    for service in config["services"].values():
        assert service["network_mode"] == "host"
        service.pop("ports", None)
    out.write_text(yaml.safe_dump(config))
    return (str(out),)


def test_compose_scorer_and_two_trainers_share_the_scorer_and_its_cache(
        deploy, scorer_image: str, trainer_image: str, tmp_path: Path) -> None:
    engine = deploy.engine
    token = tmp_path / "scorer-token"
    token.write_text("compose-test-token-91c4\n")
    for_container_user(token, 0o400)
    project = f"jest-test-{tmp_path.name.replace('_', '-')}"
    env = {**engine.env, "JEST_SCORER_TOKEN_FILE": str(token), "JEST_SCORER_PORT": "0", "JEST_METRICS_PORT": "0",
           "JEST_PORT_FILE": "/cache/ports.json", "JEST_DEMO_STEPS": str(STEPS)}
    files = _resolve(env, project, tmp_path / "scorer.yaml")
    started = time.monotonic()
    try:
        _compose(env, project, files, "up", "-d", "--no-build", "scorer")  # after the reference job; healthy
        (scorer,) = _compose(env, project, files, "ps", "-q", "scorer").split()
        engine.wait_healthy(scorer)  # its port file is written by then
        REPORT["compose_scorer_healthy_s"] = round(time.monotonic() - started, 1)  # reference job included
        ports = json.loads(engine.docker("exec", scorer, "cat", "/cache/ports.json").stdout)
        port, metrics_port = ports["port"], ports["metrics_port"]
        files = _resolve({**env, "JEST_SCORER_ADDRESS": f"127.0.0.1:{port}"}, project, tmp_path / "stack.yaml")
        seen = []
        for trainer in ("trainer-a", "trainer-b"):
            # --no-deps: the scorer is healthy already (and the reference job is not run again)
            _compose(env, project, files, "up", "-d", "--no-build", "--no-deps", trainer)
            (container,) = _compose(env, project, files, "ps", "-q", trainer).split()
            code = int(engine.docker("wait", container, timeout=600).stdout)
            logs = engine.docker("logs", container).stdout
            assert code == 0, logs + engine.docker("logs", container).stderr
            assert f"scorer=remote (127.0.0.1:{port})" in logs, logs
            seen.append(_settled_metrics(metrics_port))
        REPORT["compose_run_s"] = round(time.monotonic() - started, 1)
        first, second = seen
        for job in ("trainer-a-", "trainer-b-"):
            assert metric(second, "jest_calls_total", method="Select", code="OK", job=job + "*") >= STEPS, \
                f"no Select calls of the jobs {job}*:\n{second}"
        assert metric(first, "jest_calls_total", job="trainer-b-*") == 0
        hits = [metric(m, "jest_cache_hits_total", model="reference") for m in seen]
        misses = [metric(m, "jest_cache_misses_total", model="reference") for m in seen]
        # Everything the first job scored is served to the second from the cache; at most the
        # one super-batch a job prefetches past its last step is new (if the first exited
        # before its prefetch reached the scorer).
        assert misses[0] >= STEPS * SUPER_BATCH and misses[1] - misses[0] <= SUPER_BATCH, \
            f"the second job on the same data missed: {misses}"
        assert hits[1] - hits[0] >= STEPS * SUPER_BATCH, f"the second job was not served from the cache: {hits}"
        REPORT["compose_cache"] = {"first_job_hits_misses": [hits[0], misses[0]],
                                   "second_job_hits_misses": [hits[1] - hits[0], misses[1] - misses[0]]}
        assert (engine.container_state(scorer).get("Health") or {}).get("Status") == "healthy"
    finally:
        _compose(env, project, files, "down", "-v", "--remove-orphans", "-t", "35")
