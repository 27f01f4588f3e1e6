"""Shared fixtures: real data (scikit-learn's digits), real reference models exported by our
own helper, and real scorer processes on loopback ports."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field

import numpy as np
import pytest

from jest_stream.server.launch import free_port, wait_serving  # noqa: F401 - fixtures' helpers

os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def digits():
    """The digits set as float32 features in [0, 1] (x: (1797, 64)) and int64 labels (y)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    return {"x": (data.data / 16.0).astype(np.float32), "y": data.target.astype(np.int64)}


def _mlp(inp: int, out: int, seed: int):
    import torch

    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(inp, 32), torch.nn.ReLU(), torch.nn.Linear(32, out))


class TwoTower:
    """A small image/text two-tower model (built lazily so conftest imports no torch)."""

    @staticmethod
    def build(seed: int = 0, dim: int = 16):
        import torch

        class _TwoTower(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.image = _mlp(64, dim, seed)
                self.text = _mlp(64, dim, seed + 1)

            def forward(self, image, text):
                zi = torch.nn.functional.normalize(self.image(image), dim=-1)
                zt = torch.nn.functional.normalize(self.text(text), dim=-1)
                return zi, zt

        return _TwoTower()


def text_view(x: np.ndarray, seed: int = 0) -> np.ndarray:
    """The 'text' of an image: a second, noisy view of the same digit."""
    rng = np.random.default_rng(seed)
    return np.clip(x + 0.1 * rng.standard_normal(x.shape), 0, 1).astype(np.float32)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def per_example_model(model_dir, digits) -> str:
    """A per_example classifier (inputs x (B, 64) float32, y (B,) int64; output loss (B,)),
    trained briefly on 500 clean digits and exported with export_reference."""
    import torch

    from jest_stream.client.export import export_reference

    model = _mlp(64, 10, seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = torch.from_numpy(digits["x"][:500]), torch.from_numpy(digits["y"][:500])
    for _ in range(60):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    path = str(model_dir / "digits.onnx")
    export_reference(model, torch.nn.CrossEntropyLoss(reduction="none"), path,
                     example_inputs=(x[:4], y[:4]), input_names=("x", "y"), kind="per_example")
    return path


def _export_two_tower(model_dir, digits, kind: str, scale: float, bias: float) -> str:
    import torch

    from jest_stream.client.export import export_reference

    model = TwoTower.build(seed=3)
    image = torch.from_numpy(digits["x"][:4])
    text = torch.from_numpy(text_view(digits["x"][:4]))
    path = str(model_dir / f"{kind}.onnx")
    export_reference(model, None, path, example_inputs=(image, text), input_names=("image", "text"),
                     kind=kind, logit_scale=scale, logit_bias=bias)
    return path


@pytest.fixture(scope="session")
def sigmoid_model(model_dir, digits) -> str:
    """A sigmoid_contrastive two-tower (inputs image, text (B, 64) float32; outputs
    image_embeds, text_embeds (B, 16)); logit scale 10, bias -5."""
    return _export_two_tower(model_dir, digits, "sigmoid_contrastive", 10.0, -5.0)


@pytest.fixture(scope="session")
def softmax_model(model_dir, digits) -> str:
    """A softmax_contrastive two-tower, same inputs/outputs; logit scale 10."""
    return _export_two_tower(model_dir, digits, "softmax_contrastive", 10.0, 0.0)


@dataclass
class ServerProcess:
    """A scorer subprocess on a loopback port."""

    proc: subprocess.Popen
    port: int
    metrics_port: int
    log_path: str
    args: list = field(default_factory=list)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log(self) -> str:
        with open(self.log_path, errors="replace") as fh:
            return fh.read()

    def metrics(self) -> str:
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            return r.read().decode()

    def metric(self, name: str, **labels: str) -> float:
        """The value of one sample in the Prometheus text output (0 if absent)."""
        from prometheus_client.parser import text_string_to_metric_families

        total = 0.0
        for family in text_string_to_metric_families(self.metrics()):
            for s in family.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    total += s.value
        return total

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()



def launch_server(log_dir, models: dict, *extra: str, port: int | None = None, wait: bool = True,
                  env: dict | None = None, tls_ca: bytes | None = None) -> ServerProcess:
    """Start ``python -m jest_stream.server`` on loopback (1 ORT thread, 8 workers, grace 10 s),
    its log in ``log_dir``; with ``wait``, return once health says SERVING."""
    port = port or free_port()
    metrics_port = free_port()
    args = [sys.executable, "-m", "jest_stream.server", "--host", "127.0.0.1", "--port", str(port),
            "--metrics-port", str(metrics_port), "--metrics-host", "127.0.0.1",
            "--intra-op-threads", "1", "--workers", "8", "--grace", "10"]
    for name, path in models.items():
        args += ["--model", f"{name}={path}"]
    args += list(extra)
    log_path = os.path.join(str(log_dir), f"server-{port}.log")
    full_env = {**os.environ, **(env or {})}
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(args, stdout=log_file, stderr=subprocess.STDOUT, env=full_env)
    server = ServerProcess(proc, port, metrics_port, log_path, args)
    if wait:
        try:
            wait_serving(server.target, proc=proc, tls_ca=tls_ca)
        except Exception:
            server.stop(signal.SIGKILL, timeout=5)
            raise RuntimeError(f"scorer did not start:\n{server.log()}") from None
    return server


def _server_factory(log_dir):
    started: list[ServerProcess] = []

    def start(models: dict, *extra: str, **kw) -> ServerProcess:
        server = launch_server(log_dir, models, *extra, **kw)
        started.append(server)
        return server

    return start, started


def _stop_all(started: list[ServerProcess]) -> None:
    for server in started:
        server.stop(signal.SIGKILL if server.proc.poll() is None else signal.SIGTERM, timeout=5)


@pytest.fixture
def start_server(tmp_path):
    """Factory: ``start_server({"name": path}, *extra_flags, port=None, wait=True, env=None)``
    starts ``python -m jest_stream.server`` on loopback and returns a ServerProcess; all
    are stopped at teardown."""
    start, started = _server_factory(tmp_path)
    yield start
    _stop_all(started)


@pytest.fixture(scope="module")
def start_module_server(tmp_path_factory):
    """``start_server`` for a whole test module: one scorer shared by the module's tests,
    stopped after its last test."""
    start, started = _server_factory(tmp_path_factory.mktemp("servers"))
    yield start
    _stop_all(started)
