"""Shared fixtures: real data (scikit-learn's digits), real reference models exported by our
own helper, and real scorer processes on loopback ports the kernel assigns (started by
jest_stream.server.launch, the harness the demo and the benchmarks use too)."""
from __future__ import annotations

import os
import signal
import tempfile

import pytest
from support import TwoTower, load_digits_arrays, mlp, text_view

from jest_stream.server.launch import ScorerProcess, start_scorer

os.environ.setdefault("OMP_NUM_THREADS", "1")

# What every test scorer runs with: 1 ORT thread, 8 workers, a 10 s grace.
TEST_FLAGS = ("--intra-op-threads", "1", "--workers", "8", "--grace", "10")


@pytest.fixture(scope="session")
def digits():
    """The digits set as float32 features in [0, 1] (x: (1797, 64)) and int64 labels (y)."""
    return load_digits_arrays()


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def per_example_model(model_dir, digits) -> str:
    """A per_example classifier (inputs x (B, 64) float32, y (B,) int64; output loss (B,)),
    trained briefly on 500 clean digits and exported with export_reference."""
    import torch

    from jest_stream.client.export import export_reference

    model = mlp(64, 10, seed=0)
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


def launch_server(log_dir, models: dict, *extra: str, port: int = 0, wait: bool = True,
                  env: dict | None = None, tls_ca: bytes | None = None) -> ScorerProcess:
    """Start a scorer with the tests' flags (``TEST_FLAGS``) and /metrics on loopback
    ports the kernel assigns (``port`` only to restart one where another listened), its
    log in ``log_dir``; with ``wait``, return once health says SERVING."""
    fd, log_path = tempfile.mkstemp(prefix="server-", suffix=".log", dir=str(log_dir))
    os.close(fd)
    return start_scorer(models, log_path, *TEST_FLAGS, *extra, port=port, metrics=True, env=env, wait=wait,
                        tls_ca=tls_ca)


def _server_factory(log_dir):
    started: list[ScorerProcess] = []

    def start(models: dict, *extra: str, **kw) -> ScorerProcess:
        server = launch_server(log_dir, models, *extra, **kw)
        started.append(server)
        return server

    return start, started


def _stop_all(started: list[ScorerProcess]) -> None:
    for server in started:
        server.stop(signal.SIGKILL if server.proc.poll() is None else signal.SIGTERM, timeout=5)


@pytest.fixture
def start_server(tmp_path):
    """Factory: ``start_server({"name": path}, *extra_flags, port=0, wait=True, env=None,
    tls_ca=None)`` starts ``python -m jest_stream.server`` on loopback (the harness of
    jest_stream.server.launch) and returns its ScorerProcess; all are stopped at teardown."""
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
