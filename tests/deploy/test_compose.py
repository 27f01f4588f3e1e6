"""docker/compose.yaml brought up for real with docker-compose: the reference job, the
scorer and the two trainer jobs, the token as a compose secret; both trainers finish their
demo runs through the shared scorer, and the second, on the same data, is served from the
cache the first one filled.

The engine has no bridge network, so docker/compose.host.yaml puts every service on the
host's network; on it, published ports mean nothing and docker-compose 1.29 refuses them,
so they are dropped from the resolved file. The trainers run one after the other (the
file lets them run at once) so that the cache hits can be told apart by job.
"""
from __future__ import annotations

import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from docker_engine import REPORT, for_container_user, metric

from jest_stream.server.launch import free_port

pytestmark = [pytest.mark.docker, pytest.mark.timeout(900)]

yaml = pytest.importorskip("yaml")
DOCKER = Path(__file__).resolve().parents[2] / "docker"
STEPS = 6  # super-batches of 160 per demo run: 960 of the 1137 training examples, none twice


def _metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return r.read().decode()


def test_compose_scorer_and_two_trainers_share_the_scorer_and_its_cache(
        deploy, scorer_image: str, trainer_image: str, tmp_path: Path) -> None:
    engine = deploy.engine
    port, metrics_port = free_port(), free_port()
    token = tmp_path / "scorer-token"
    token.write_text("compose-test-token-91c4\n")
    for_container_user(token, 0o400)
    env = {**engine.env, "JEST_SCORER_TOKEN_FILE": str(token), "JEST_SCORER_PORT": str(port),
           "JEST_METRICS_PORT": str(metrics_port), "JEST_SCORER_ADDRESS": f"127.0.0.1:{port}",
           "JEST_DEMO_STEPS": str(STEPS)}
    def compose(*args: str, files: tuple[str, ...], timeout: float = 600) -> str:
        argv = ["docker-compose", "-p", f"jest-test-{port}"]
        for f in files:
            argv += ["-f", f]
        result = subprocess.run([*argv, *args], env=env, capture_output=True, text=True, timeout=timeout)
        assert result.returncode == 0, f"docker-compose {' '.join(args)}:\n{result.stdout}{result.stderr}"
        return result.stdout

    config = yaml.safe_load(compose("config", files=(str(DOCKER / "compose.yaml"), str(DOCKER / "compose.host.yaml"))))
    for service in config["services"].values():
        assert service["network_mode"] == "host"
        service.pop("ports", None)
    resolved = tmp_path / "compose.resolved.yaml"
    resolved.write_text(yaml.safe_dump(config))
    files = (str(resolved),)

    started = time.monotonic()
    try:
        seen = []
        for trainer in ("trainer-a", "trainer-b"):
            compose("up", "-d", "--no-build", trainer, files=files)  # + reference, scorer (healthy) first
            (container,) = compose("ps", "-q", trainer, files=files).split()
            code = int(engine.docker("wait", container, timeout=600).stdout)
            logs = engine.docker("logs", container).stdout
            assert code == 0, logs + engine.docker("logs", container).stderr
            assert f"scorer=remote (127.0.0.1:{port})" in logs, logs
            seen.append(_metrics(metrics_port))
        REPORT["compose_run_s"] = round(time.monotonic() - started, 1)
        first, second = seen
        for job in ("trainer-a-", "trainer-b-"):
            assert metric(second, "jest_calls_total", method="Select", code="OK", job=job + "*") >= STEPS, \
                f"no Select calls of the jobs {job}*:\n{second}"
        assert metric(first, "jest_calls_total", job="trainer-b-*") == 0
        hits = [metric(m, "jest_cache_hits_total", model="reference") for m in seen]
        misses = [metric(m, "jest_cache_misses_total", model="reference") for m in seen]
        assert misses[0] > 0 and misses[1] == misses[0], f"the second job on the same data missed: {misses}"
        assert hits[1] - hits[0] >= STEPS * 160, f"the second job's examples were not served from the cache: {hits}"
        REPORT["compose_cache"] = {"first_job_hits_misses": [hits[0], misses[0]],
                                   "second_job_hits_misses": [hits[1] - hits[0], misses[1] - misses[0]]}
        scorer = compose("ps", "-q", "scorer", files=files).split()[0]
        assert (engine.container_state(scorer).get("Health") or {}).get("Status") == "healthy"
    finally:
        compose("down", "-v", "--remove-orphans", "-t", "35", files=files)
