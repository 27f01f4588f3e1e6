"""Where the scorer computes: ``--device cuda`` refuses a host without CUDA in one line,
``--device cpu`` serves on the CPU provider, float16 reference models are served (outputs
widened for selection), and, on a CUDA host only (marked ``gpu``), a GPU scorer selects
as the CPU one does."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from jest_stream import RemoteScorer, codec, select
from jest_stream.client.scorer import SelectCall
from jest_stream.outputs import Embeddings
from jest_stream.options import SelectOptions
from jest_stream.server.device import DeviceUnavailable, cuda_problem
from jest_stream.server.engine import ScoringEngine
from jest_stream.v1 import scorer_pb2 as pb

from support import TwoTower, text_view

CUDA = cuda_problem() is None
needs_cuda = pytest.mark.skipif(not CUDA, reason=f"no CUDA here: {cuda_problem()}" if not CUDA else "")
no_cuda = pytest.mark.skipif(CUDA, reason="this host has CUDA")


@pytest.fixture(scope="module")
def fp16_model(tmp_path_factory, digits) -> str:
    """The sigmoid two-tower of conftest, exported with float16 outputs."""
    from jest_stream.client.export import export_reference

    class Half(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = TwoTower.build(seed=3)

        def forward(self, image, text):
            zi, zt = self.inner(image, text)
            return zi.half(), zt.half()

    image = torch.from_numpy(digits["x"][:4])
    path = str(tmp_path_factory.mktemp("fp16") / "half.onnx")
    export_reference(Half(), None, path, example_inputs=(image, torch.from_numpy(text_view(digits["x"][:4]))),
                     input_names=("image", "text"), kind="sigmoid_contrastive", logit_scale=10.0, logit_bias=-5.0)
    return path


def _batch(digits, n: int, seed: int):
    rng = np.random.default_rng(seed)
    rows = rng.choice(len(digits["x"]), size=n, replace=False)
    inputs = {"image": digits["x"][rows], "text": text_view(digits["x"][rows], seed)}
    z = rng.standard_normal((2, n, 16)).astype(np.float32)
    z /= np.linalg.norm(z, axis=2, keepdims=True)
    return Embeddings(z[0], z[1], 8.0, -4.0), inputs


@no_cuda
def test_device_cuda_without_cuda_says_so_in_one_line(sigmoid_model):
    proc = subprocess.run([sys.executable, "-m", "jest_stream.server", "--model", f"ref={sigmoid_model}",
                           "--device", "cuda", "--port", "0", "--host", "127.0.0.1"],
                          capture_output=True, text=True, timeout=60)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("--device cuda: ") and "--device cpu" in lines[0]
    with pytest.raises(DeviceUnavailable, match="--device cuda"):
        ScoringEngine({"ref": sigmoid_model}, device="cuda")
    with pytest.raises(ValueError, match="device: unknown value 'tpu'"):
        ScoringEngine({"ref": sigmoid_model}, device="tpu")


def test_a_bad_device_from_the_environment_names_the_variable(sigmoid_model):
    proc = subprocess.run([sys.executable, "-m", "jest_stream.server", "--model", f"ref={sigmoid_model}"],
                          capture_output=True, text=True, timeout=60, env={**os.environ, "JEST_DEVICE": "tpu"})
    assert proc.returncode != 0 and "--device: 'tpu' is not one of cpu, cuda (JEST_DEVICE)" in proc.stderr


def test_device_cpu_serves_on_the_cpu_provider(start_server, sigmoid_model):
    server = start_server({"ref": sigmoid_model}, "--device", "cpu")
    assert "CPUExecutionProvider" in server.log()
    engine = ScoringEngine({"ref": sigmoid_model}, device="cpu", intra_op_threads=1)
    assert engine.models["ref"].session.get_providers() == ["CPUExecutionProvider"]


def test_float16_reference_model_is_served(start_server, fp16_model, sigmoid_model, digits):
    """Outputs travel and are cached as float16; selection equals the float32 model's outputs
    rounded to float16."""
    server = start_server({"half": fp16_model})
    full = ScoringEngine({"ref": sigmoid_model}, intra_op_threads=1)
    options = SelectOptions(n_chunks=4, score_gain=2.0)
    with RemoteScorer(server.target, embeddings_dtype="float32") as remote:
        assert {s.dtype for s in remote.models()["half"].outputs} == {np.dtype(np.float16)}
        for seed in range(2):
            learner, inputs = _batch(digits, 200, seed)
            keys = [f"h{seed}-{i}" for i in range(200)]
            served = remote.select(SelectCall("half", "fp16", learner, 40, keys=keys, inputs=lambda: inputs,
                                              options=options, seed=seed))
            ref = full.reference("ref", None, inputs).outputs
            rounded = Embeddings(ref["image_embeds"].astype(np.float16), ref["text_embeds"].astype(np.float16),
                                 10.0, -5.0)
            want = select(40, kind="sigmoid_contrastive", learner=learner, reference=rounded, options=options,
                          seed=seed)
            np.testing.assert_array_equal(served.indices, want.indices)
            outputs = remote.reference("half", "fp16", keys, None).outputs  # from the cache
            assert outputs["image_embeds"].dtype == np.float16
            np.testing.assert_array_equal(outputs["image_embeds"], rounded.image)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("kind", ["sigmoid_contrastive", "softmax_contrastive"])
def test_gpu_scorer_selects_as_the_cpu_scorer(start_server, sigmoid_model, softmax_model, digits, kind):
    model = sigmoid_model if kind == "sigmoid_contrastive" else softmax_model
    server = start_server({"ref": model}, "--device", "cuda")
    assert "CUDAExecutionProvider" in server.log()
    cpu = ScoringEngine({"ref": model}, device="cpu", intra_op_threads=1)
    overlaps = []
    with RemoteScorer(server.target, embeddings_dtype="float32") as remote:
        for seed in range(3):
            learner, inputs = _batch(digits, 512, seed)
            call = SelectCall("ref", "gpu", learner, 128, inputs=lambda: inputs, seed=seed)
            served = remote.select(call)
            want = cpu.select("ref", learner=learner, n_select=128, inputs=inputs, seed=seed)
            overlaps.append(len(np.intersect1d(served.indices, want.indices)) / 128)
            got = remote.reference("ref", "gpu", None, lambda: inputs).outputs
            ref = cpu.reference("ref", None, inputs).outputs
            np.testing.assert_allclose(got["image_embeds"], ref["image_embeds"], rtol=1e-3, atol=1e-4)
    assert np.mean(overlaps) >= 0.95, overlaps


@pytest.mark.gpu
@needs_cuda
def test_gpu_inference_outputs_stay_on_the_device(sigmoid_model, digits):
    import cupy

    engine = ScoringEngine({"ref": sigmoid_model}, device="cuda")
    _, inputs = _batch(digits, 64, 0)
    out = engine.models["ref"].run(inputs)
    assert all(isinstance(v, cupy.ndarray) for v in out.values())
    cpu = ScoringEngine({"ref": sigmoid_model}, device="cpu").models["ref"].run(inputs)
    np.testing.assert_allclose(out["text_embeds"].get(), cpu["text_embeds"], rtol=1e-3, atol=1e-4)
    assert codec.encode(out["text_embeds"].get()).dtype == pb.DT_FLOAT32
