"""A Docker engine of the deploy tests' own, on a machine that reaches no container registry.

Debian's engine (``docker.io``) is installed with apt when missing and started as a child
process with no bridge network (every container uses the host's network, so traffic stays
on loopback or goes where the host's own does: the package registries), in a data root
of its own, and stopped by its PID whatever happens. Images build on a Debian base made
with debootstrap from the host's apt mirror; pip inside a build reaches the host's package
index through build secrets (a pip.conf and the CA bundle, kept in no layer).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from pip_mirror import PipMirror

log = logging.getLogger(__name__)

STATE = Path(os.environ.get("JEST_DOCKER_STATE", "/var/lib/jest-stream-docker"))
RUN_DIR = Path("/run/jest-stream-docker")
SUITE = "bookworm"  # the public image's Debian (python:3.11-slim-bookworm): Python 3.11 too
BASE_IMAGE = f"jest-stream-base:{SUITE}"
BASE_PACKAGES = "python3,python3-venv,python-is-python3,ca-certificates"
LABEL = "jest-stream.test=1"  # on every container the tests start (docker ps --filter)
PACKAGES = {"dockerd": "docker.io", "debootstrap": "debootstrap", "docker-compose": "docker-compose"}
# Debian's CLI matches its engine and builds with BuildKit without the buildx plugin.
CLI_CANDIDATES = ("/usr/bin/docker", "docker")
REPORT: dict = {}  # the session's timings and sizes (tests/deploy/conftest.py prints them)


class EngineUnavailable(RuntimeError):
    """The engine cannot run here (not root, no apt, dockerd does not start): tests skip."""


class BuildFailed(RuntimeError):
    """``docker build`` exited non-zero; the message ends with the build log's tail."""


def _run(argv: list[str], *, timeout: float = 600, check: bool = True, **kw) -> subprocess.CompletedProcess:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kw)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:4])}... exited {result.returncode}:\n"
                           f"{result.stdout[-3000:]}{result.stderr[-3000:]}")
    return result


# -- installing ------------------------------------------------------------------------------

def ensure_installed() -> float:
    """Install the engine, debootstrap and docker-compose with apt if any is missing;
    returns the seconds it took. A policy-rc.d keeps apt from starting a system engine
    (whose default bridge would add a 172.17 interface)."""
    if os.geteuid() != 0:
        raise EngineUnavailable("docker tests need root (to install and start dockerd); run as root")
    missing = sorted({pkg for tool, pkg in PACKAGES.items() if shutil.which(tool) is None})
    if not missing:
        return 0.0
    if shutil.which("apt-get") is None:
        raise EngineUnavailable(f"docker tests: {', '.join(missing)} missing and no apt-get to install them")
    started = time.monotonic()
    policy = Path("/usr/sbin/policy-rc.d")
    ours = not policy.exists()
    if ours:
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing]
        if subprocess.run(install, capture_output=True, env=env, timeout=600).returncode != 0:
            _run(["apt-get", "update", "-q"], env=env)
            result = subprocess.run(install, capture_output=True, text=True, env=env, timeout=600)
            if result.returncode != 0:
                raise EngineUnavailable(f"docker tests: apt-get install {' '.join(missing)} failed: "
                                        f"{result.stderr.strip().splitlines()[-1:]}")
    finally:
        if ours:
            policy.unlink()
    return time.monotonic() - started


def debian_mirror() -> str:
    """The Debian archive the host's apt uses (deb822 or one-line sources), for debootstrap;
    $JEST_DEBIAN_MIRROR overrides it."""
    if os.environ.get("JEST_DEBIAN_MIRROR"):
        return os.environ["JEST_DEBIAN_MIRROR"]
    sources = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for path in sources:
        if not path.is_file() or not path.name.endswith((".list", ".sources")):
            continue
        text = path.read_text(errors="replace")
        for stanza in re.split(r"\n\s*\n", text):  # deb822: URIs + Suites in one stanza
            uris = re.search(r"^URIs:\s*(\S+)", stanza, re.M)
            suites = re.search(r"^Suites:(.*)$", stanza, re.M)
            if uris and suites and SUITE in suites.group(1).split():
                return uris.group(1)
        for m in re.finditer(rf"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+{SUITE}\s", text, re.M):
            return m.group(1)
    return "http://deb.debian.org/debian"


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of the Prometheus samples ``name`` in ``text`` whose labels match (a value
    ending in ``*`` matches as a prefix)."""
    from prometheus_client.parser import text_string_to_metric_families

    def match(have: dict[str, str]) -> bool:
        return all(have.get(k, "").startswith(v[:-1]) if v.endswith("*") else have.get(k) == v
                   for k, v in labels.items())

    return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
               if s.name == name and match(s.labels))


def for_container_user(path: Path, mode: int) -> Path:
    """Give ``path`` to the images' user (10001) with ``mode``: a bind mount keeps the
    host's owner and mode, and the containers run as that user."""
    os.chown(path, 10001, 10001)
    path.chmod(mode)
    return path


# -- the engine ------------------------------------------------------------------------------

def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def bridge_interfaces() -> list[str]:
    """Host interfaces an engine's bridge network would add (docker0, br-*, 172.17.x)."""
    links = _run(["ip", "-o", "link"], check=False).stdout + _run(["ip", "-o", "addr"], check=False).stdout
    return sorted({line.split()[1].rstrip(":") for line in links.splitlines()
                   if re.search(r"\b(docker0|br-[0-9a-f]+|veth\w*)\b|inet 172\.1[7-9]\.", line)})


class Engine:
    """dockerd in its own data root, socket and exec root, started by us and stopped by PID.

    A lock file serialises sessions that share the data root (it keeps the base image and
    the build cache between runs); a dockerd left running by a session that was killed
    holds no lock, so the next session stops it (by the PID in its pid file, checked to be
    a dockerd of this data root) and starts its own.
    """

    def __init__(self, state: Path = STATE, run_dir: Path = RUN_DIR, log_path: Path | None = None):
        self.state, self.run_dir = state, run_dir
        self.data_root, self.exec_root = state / "data", run_dir / "exec"
        self.socket, self.pidfile = run_dir / "docker.sock", run_dir / "dockerd.pid"
        self.log_path = log_path or state / "dockerd.log"
        self.proc: subprocess.Popen | None = None
        self._lock: int | None = None
        self.config_dir = Path(tempfile.mkdtemp(prefix="docker-config-"))  # no credential helpers
        self.cli: str | None = None  # found by start(), after ensure_installed()

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "DOCKER_HOST": f"unix://{self.socket}", "DOCKER_BUILDKIT": "1",
                "DOCKER_CONFIG": str(self.config_dir), "COMPOSE_DOCKER_CLI_BUILD": "1"}

    def docker(self, *args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
        assert self.cli, "no docker CLI"
        return _run([self.cli, *args], timeout=timeout, check=check, env=self.env)

    def start(self, timeout: float = 60) -> float:
        """Start dockerd; returns the seconds until it answered."""
        self.state.mkdir(parents=True, exist_ok=True)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._take_lock(float(os.environ.get("JEST_DOCKER_LOCK_WAIT", "1200")))
        self.cli = next((shutil.which(c) for c in CLI_CANDIDATES if shutil.which(c)), None)
        if self.cli is None or shutil.which("dockerd") is None:
            self.stop()
            raise EngineUnavailable("docker tests: no dockerd or docker CLI after installing docker.io")
        self._stop_leftover()
        started = time.monotonic()
        argv = ["dockerd", "--bridge=none", "--iptables=false", "--ip6tables=false", "--ip-forward=false",
                "--ip-masq=false", f"--data-root={self.data_root}", f"--exec-root={self.exec_root}",
                f"--pidfile={self.pidfile}", f"--host=unix://{self.socket}"]
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while self.docker("version", "--format", "{{.Server.Version}}", check=False, timeout=20).returncode:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = self.log_path.read_text(errors="replace").strip().splitlines()[-3:]
                self.stop()
                raise EngineUnavailable(f"docker tests: dockerd did not start: {' | '.join(tail)}")
            time.sleep(0.3)
        return time.monotonic() - started

    def _take_lock(self, wait: float) -> None:
        """Wait up to ``wait`` seconds for another session using this data root to finish."""
        self._lock = os.open(self.state / "lock", os.O_CREAT | os.O_RDWR, 0o600)
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(self._lock)
                    self._lock = None
                    raise EngineUnavailable(f"docker tests: {self.state} is in use by another session "
                                            f"for over {wait:.0f} s") from None
                time.sleep(1.0)

    def _stop_leftover(self) -> None:
        """Stop a dockerd of this data root that a killed session left running."""
        try:
            pid = int(self.pidfile.read_text().strip())
        except (OSError, ValueError):
            return
        if f"--data-root={self.data_root}" in _cmdline(pid):
            log.warning("stopping dockerd %d left by an earlier session", pid)
            os.kill(pid, signal.SIGTERM)
            for _ in range(150):
                if not _cmdline(pid):
                    break
                time.sleep(0.2)
            else:
                os.kill(pid, signal.SIGKILL)
        self.pidfile.unlink(missing_ok=True)

    def stop(self, timeout: float = 30) -> int | None:
        """SIGTERM our dockerd (it stops its containers and containerd), SIGKILL after
        ``timeout``; release the lock. Returns dockerd's exit code."""
        code = None
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    os.killpg(self.proc.pid, signal.SIGKILL)
            code = self.proc.wait()
            self._unmount_leftovers()
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None
        shutil.rmtree(self.config_dir, ignore_errors=True)
        return code

    def abandon(self) -> None:
        """Forget the engine as a killed session would: the lock goes, dockerd runs on."""
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def _unmount_leftovers(self) -> None:
        """Unmount what dockerd leaves mounted under its exec root (netns/default)."""
        mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
        for point in sorted((m for m in mounts if m.startswith(f"{self.exec_root}/")), reverse=True):
            subprocess.run(["umount", "-l", point], capture_output=True, timeout=30)

    def remove_leftovers(self) -> list[str]:
        """Remove every container and volume in this engine (it is ours alone: whatever is
        there an earlier run left); returns the containers' ids."""
        ids = self.docker("ps", "-aq").stdout.split()
        if ids:
            self.docker("rm", "-f", "-v", *ids)
        self.docker("volume", "prune", "-f")
        return ids

    # -- containers --------------------------------------------------------------------------

    def run_detached(self, image: str, name: str, *, mounts: dict[Path, str] | None = None,
                     env: dict[str, str] | None = None, options: tuple[str, ...] = ()) -> str:
        """``docker run -d`` on the host's network with our label, bind mounts (host path ->
        container path[:ro]) and environment; returns the container id."""
        argv = ["run", "-d", "--name", name, "--label", LABEL, "--network", "host", *options]
        for host, target in (mounts or {}).items():
            argv += ["-v", f"{host}:{target}"]
        for key, value in (env or {}).items():
            argv += ["-e", f"{key}={value}"]
        return self.docker(*argv, image).stdout.strip()

    def container_state(self, container: str) -> dict:
        return json.loads(self.docker("inspect", "--format", "{{json .State}}", container).stdout)

    def wait_healthy(self, container: str, timeout: float = 120) -> float:
        """Seconds until Docker's HEALTHCHECK says healthy; fails if it exits first."""
        started = time.monotonic()
        while True:
            state = self.container_state(container)
            if (state.get("Health") or {}).get("Status") == "healthy":
                return time.monotonic() - started
            if not state["Running"] or time.monotonic() - started > timeout:
                logs = self.docker("logs", container, check=False).stderr[-3000:]
                raise AssertionError(f"{container} not healthy ({state.get('Status')}, exit "
                                     f"{state.get('ExitCode')}, health {state.get('Health')}):\n{logs}")
            time.sleep(0.2)

    # -- images ------------------------------------------------------------------------------

    def has_image(self, tag: str) -> bool:
        return self.docker("image", "inspect", tag, check=False).returncode == 0

    def image(self, tag: str) -> dict:
        return json.loads(self.docker("image", "inspect", tag).stdout)[0]

    def build_base(self, workdir: Path) -> float:
        """Debian ``SUITE`` (minbase + Python + venv + CA certificates) from the host's apt
        mirror, imported as BASE_IMAGE, unless it exists; returns the seconds it took."""
        if self.has_image(BASE_IMAGE):
            return 0.0
        started = time.monotonic()
        rootfs = workdir / "rootfs"
        try:
            _run(["debootstrap", "--variant=minbase", f"--include={BASE_PACKAGES}", SUITE, str(rootfs),
                  debian_mirror()], timeout=900)
            for junk in ("var/cache/apt/archives", "var/lib/apt/lists", "usr/share/doc", "usr/share/man",
                         "usr/share/locale", "var/log"):
                for child in (rootfs / junk).glob("*"):
                    if child.is_dir() and not child.is_symlink():
                        shutil.rmtree(child)
                    elif child.name != "lock":
                        child.unlink()
            tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
            _run([self.cli, "import", "--change", "ENV LANG=C.UTF-8", "-", BASE_IMAGE], stdin=tar.stdout,
                 env=self.env)
            tar.wait()
        finally:
            shutil.rmtree(rootfs, ignore_errors=True)
        return time.monotonic() - started

    def build(self, dockerfile: Path, tag: str, context: Path, mirror: PipMirror, log_path: Path,
              **build_args: str) -> float:
        """``docker build`` on the host's network with the mirror's secrets; returns the
        seconds it took, or raises BuildFailed with the log's tail."""
        argv = [self.cli, "build", "--network", "host", "--progress", "plain", "-f", str(dockerfile), "-t", tag]
        for key, value in build_args.items():
            argv += ["--build-arg", f"{key}={value}"]
        for key, path in mirror.secrets.items():
            argv += ["--secret", f"id={key},src={path}"]
        started = time.monotonic()
        with open(log_path, "w") as out:
            code = subprocess.run([*argv, str(context)], stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                  timeout=1200).returncode
        if code != 0:
            tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-25:])
            raise BuildFailed(f"docker build -f {dockerfile.name} exited {code} (log {log_path}):\n{tail}")
        return time.monotonic() - started


@contextlib.contextmanager
def running_engine(**kw) -> Iterator[Engine]:
    """An Engine started for the block and stopped after it, whatever happens inside."""
    engine = Engine(**kw)
    try:
        engine.start()
        yield engine
    finally:
        engine.stop()
