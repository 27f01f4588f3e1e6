"""The test engine itself, as an outsider would break it: a build that fails midway still
stops the engine; a dockerd left running by a killed session (and its containers) is
replaced and cleared by the next; another engine already running is left alone; no engine
adds a bridge interface. Each of these runs a second, short-lived engine in folders of its
own beside the session's (which is the one already running)."""
from __future__ import annotations

import shutil
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from docker_engine import BuildFailed, Engine, _cmdline, bridge_interfaces, running_engine
from pip_mirror import PipMirror

pytestmark = [pytest.mark.docker, pytest.mark.timeout(300)]


@pytest.fixture
def folders(deploy) -> Iterator[dict[str, Path]]:
    """A data root and a short run folder (unix socket paths are limited to 108 bytes)."""
    top = Path(tempfile.mkdtemp(prefix="jd-", dir="/tmp"))
    yield {"state": top / "state", "run_dir": top / "run"}
    shutil.rmtree(top, ignore_errors=True)


def _mounts_under(path: Path) -> list[str]:
    return [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()
            if line.split()[1].startswith(f"{path}/")]


def test_engine_stops_when_a_build_fails_midway(deploy, folders, tmp_path: Path) -> None:
    context = tmp_path / "context"
    context.mkdir()
    (context / "present").write_text("x")
    (context / "Dockerfile").write_text("FROM scratch\nCOPY present /present\nCOPY absent /absent\n")
    with pytest.raises(BuildFailed, match="absent"):
        with running_engine(**folders, log_path=tmp_path / "dockerd.log") as engine:
            pid = engine.proc.pid
            assert _cmdline(pid), "dockerd is not running"
            engine.build(context / "Dockerfile", "broken:test", context, PipMirror(tmp_path), tmp_path / "build.log")
    assert not _cmdline(pid), f"dockerd {pid} still runs after the failed build"
    assert engine.proc.returncode == 0, (tmp_path / "dockerd.log").read_text()[-2000:]
    assert not _mounts_under(folders["run_dir"])
    # The session's engine, running all along, is untouched and still answers.
    assert deploy.engine.docker("version", "--format", "{{.Server.Version}}").stdout.strip()
    assert bridge_interfaces() == []


def test_engine_left_by_a_killed_session_is_replaced_and_cleared(deploy, folders, tmp_path: Path) -> None:
    killed = Engine(**folders, log_path=tmp_path / "killed.log")
    killed.start()
    try:
        empty = tmp_path / "empty.tar"
        with tarfile.open(empty, "w") as tar:
            tar.addfile(tarfile.TarInfo("nothing"))
        killed.docker("import", str(empty), "empty:test")
        left = killed.docker("create", "--network", "none", "empty:test", "/nothing").stdout.strip()
        killed.abandon()  # the session is killed: its lock goes with it, its dockerd runs on
        following = Engine(**folders, log_path=tmp_path / "following.log")
        following.start()
        try:
            assert killed.proc.wait(timeout=30) == 0, "the leftover dockerd was not stopped"
            assert [left[:12]] == [i[:12] for i in following.remove_leftovers()]
            assert following.docker("ps", "-aq").stdout.split() == []
        finally:
            following.stop()
        assert not _cmdline(following.proc.pid)
        assert not _mounts_under(folders["run_dir"])
    finally:
        killed.stop()
