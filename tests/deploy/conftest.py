"""Session fixtures of the Docker tests: one engine of our own for the session (installed
and started here, stopped by PID at the end whatever happens), the debootstrap base, and
the images built once; their timings and sizes go to docker-report.json under the
session's temporary folder and into the terminal summary."""
from __future__ import annotations

import contextlib
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from docker_engine import (  # noqa: E402
    BASE_IMAGE,
    REPORT,
    Engine,
    EngineUnavailable,
    bridge_interfaces,
    ensure_installed,
)
from pip_mirror import PipMirror  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
IMAGES = {  # name -> (Dockerfile, tag, build args beyond the base image)
    "scorer": (ROOT / "docker" / "Dockerfile", "jest-stream-scorer:cpu", {}),
    # TORCH_INDEX empty: torch from the host's index (its CPU wheel), not PyTorch's.
    "trainer": (ROOT / "docker" / "Dockerfile.trainer", "jest-stream-trainer:cpu", {"TORCH_INDEX": ""}),
}


@dataclass
class Deploy:
    """The session's engine, pip mirror and images (each built on first use)."""

    engine: Engine
    mirror: PipMirror
    workdir: Path
    built: dict[str, str] = field(default_factory=dict)

    def image(self, name: str) -> str:
        """Build image ``name`` (once per session; the engine's build cache persists)."""
        if name not in self.built:
            dockerfile, tag, args = IMAGES[name]
            seconds = self.engine.build(dockerfile, tag, ROOT, self.mirror, self.workdir / f"build-{name}.log",
                                        PYTHON_IMAGE=BASE_IMAGE, **args)
            info = self.engine.image(tag)
            REPORT[f"build_{name}_s"] = round(seconds, 1)
            REPORT[f"image_{name}_bytes"] = info["Size"]
            REPORT[f"image_{name}_MB"] = round(info["Size"] / 1e6, 1)
            self.built[name] = tag
        return self.built[name]


@pytest.fixture(scope="session")
def deploy(tmp_path_factory) -> Deploy:
    """The engine for the whole session; skips (one reason for every Docker test) where it
    cannot run, fails where it runs but a build fails."""
    started = time.monotonic()
    workdir = tmp_path_factory.mktemp("docker")
    engine = Engine(log_path=workdir / "dockerd.log")
    try:
        try:
            REPORT["install_s"] = round(ensure_installed(), 1)
            REPORT["engine_start_s"] = round(engine.start(), 1)
        except EngineUnavailable as exc:
            REPORT["skipped"] = str(exc)
            pytest.skip(str(exc))
        REPORT["bridge_interfaces"] = bridge_interfaces()
        REPORT["leftover_containers_removed"] = len(engine.remove_leftovers())
        REPORT["debootstrap_base_s"] = round(engine.build_base(workdir), 1)
        REPORT["image_base_MB"] = round(engine.image(BASE_IMAGE)["Size"] / 1e6, 1)
        with PipMirror(workdir / "pip") as mirror:
            yield Deploy(engine, mirror, workdir)
    finally:
        if engine.proc is not None and engine.proc.poll() is None:
            with contextlib.suppress(Exception):  # the engine's stop removes them anyway
                engine.remove_leftovers()
        REPORT["dockerd_exit_code"] = engine.stop()
        REPORT["docker_part_s"] = round(time.monotonic() - started, 1)
        (workdir / "docker-report.json").write_text(json.dumps(REPORT, indent=2))
        REPORT["report_file"] = str(workdir / "docker-report.json")


@pytest.fixture(scope="session")
def scorer_image(deploy: Deploy) -> str:
    return deploy.image("scorer")


@pytest.fixture(scope="session")
def trainer_image(deploy: Deploy) -> str:
    return deploy.image("trainer")


def pytest_terminal_summary(terminalreporter) -> None:
    if "skipped" in REPORT:
        terminalreporter.write_line(f"docker part skipped: {REPORT['skipped']}")
    elif REPORT:
        terminalreporter.write_sep("-", "docker part (seconds, sizes)")
        terminalreporter.write_line(json.dumps({k: v for k, v in REPORT.items() if not k.endswith("_bytes")}))

