"""Where the Docker engine cannot run, the Docker tests skip with one line saying why
(these run in the default run: no engine is started)."""
from __future__ import annotations

import fcntl
import os

import pytest
from docker_engine import Engine, EngineUnavailable, ensure_installed


def test_not_root_skips_with_one_line(monkeypatch) -> None:
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    with pytest.raises(EngineUnavailable) as refused:
        ensure_installed()
    assert str(refused.value) == "docker tests need root (to install and start dockerd); run as root"


def test_data_root_held_by_another_session_skips_with_one_line(tmp_path, monkeypatch) -> None:
    held = os.open(tmp_path / "lock", os.O_CREAT | os.O_RDWR, 0o600)
    fcntl.flock(held, fcntl.LOCK_EX)
    monkeypatch.setenv("JEST_DOCKER_LOCK_WAIT", "0")
    engine = Engine(state=tmp_path, run_dir=tmp_path / "run")
    try:
        with pytest.raises(EngineUnavailable) as refused:
            engine.start()
        assert "\n" not in str(refused.value) and "in use by another session" in str(refused.value)
        assert engine.proc is None, "dockerd started without the lock"
    finally:
        os.close(held)
        engine.stop()
