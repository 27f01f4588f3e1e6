"""One selection implementation over numpy, torch and CuPy: the same indices for the same seed.

Float64 inputs take the exact path, where numpy and torch must agree index for index;
float32 (what devices run) may differ in the last bits of a matmul, so there the
selections must overlap by at least 99%. CUDA tests are marked ``gpu`` and skipped
where there is no device.
"""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from core_harness import clustered_pair
from jest_stream import Embeddings, Losses, SelectOptions, select

torch = pytest.importorskip("torch")

KINDS = ("per_example", "sigmoid_contrastive", "softmax_contrastive")
SAMPLERS = ("joint", "topk", "uniform")
B, N_SELECT = 1024, 205


def _outputs(kind: str, dtype, move):
    """Learner and reference outputs of one super-batch, as numpy arrays passed through ``move``."""
    if kind == "per_example":
        rng = np.random.default_rng(4)
        return (Losses(move(rng.uniform(0, 3, B).astype(dtype))),
                Losses(move(rng.uniform(0, 1, B).astype(dtype))))
    pair = clustered_pair(4, B)
    return tuple(Embeddings(move(m.image.astype(dtype)), move(m.text.astype(dtype)),
                            m.logit_scale, m.logit_bias) for m in pair)


def _select(kind: str, sampler: str, dtype, move, seed: int = 3) -> np.ndarray:
    learner, reference = _outputs(kind, dtype, move)
    got = select(N_SELECT, kind=kind, learner=learner, reference=reference,
                 options=SelectOptions(sampler=sampler), seed=seed)
    assert isinstance(got.indices, np.ndarray) and got.indices.dtype == np.int64
    assert np.isfinite(got.mean_score) and np.isfinite(got.mean_score_all)
    return got.indices


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("kind", KINDS)
def test_numpy_and_torch_cpu_agree_exactly_in_float64(kind, sampler):
    ours = _select(kind, sampler, np.float64, np.asarray)
    theirs = _select(kind, sampler, np.float64, torch.from_numpy)
    assert ours.tolist() == theirs.tolist()


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("kind", KINDS)
def test_numpy_and_torch_cpu_overlap_99_percent_in_float32(kind, sampler):
    ours = _select(kind, sampler, np.float32, np.asarray)
    theirs = _select(kind, sampler, np.float32, torch.from_numpy)
    assert len(set(ours.tolist()) & set(theirs.tolist())) >= 0.99 * N_SELECT


def test_torch_half_precision_embeddings_compute_in_float32():
    learner, reference = _outputs("sigmoid_contrastive", np.float32, lambda a: torch.from_numpy(a).half())
    assert learner.validated("learner").image.dtype == torch.float32
    idx = select(N_SELECT, kind="sigmoid_contrastive", learner=learner, reference=reference, seed=0).indices
    assert len(set(idx.tolist())) == N_SELECT


def test_torch_nan_is_refused_naming_the_field():
    learner, reference = _outputs("sigmoid_contrastive", np.float32, torch.from_numpy)
    learner.text[5, 2] = float("nan")
    with pytest.raises(ValueError, match=r"learner\.text: 1 value\(s\) are NaN"):
        select(10, kind="sigmoid_contrastive", learner=learner, reference=reference, seed=0)


def test_mixed_array_libraries_are_refused_naming_the_field():
    learner, reference = _outputs("sigmoid_contrastive", np.float32, np.asarray)
    mixed = Embeddings(torch.from_numpy(learner.image), learner.text, 10.0, -5.0)
    with pytest.raises(ValueError, match="learner: image and text must come from one array library"):
        select(10, kind="sigmoid_contrastive", learner=mixed, reference=reference, seed=0)


def test_the_core_imports_neither_torch_nor_cupy():
    code = ("import sys, numpy as np, jest_stream, jest_stream.selection, jest_stream.xp\n"
            "from jest_stream import Embeddings, SelectOptions, select\n"
            "z = np.eye(8, dtype=np.float32)\n"
            "select(3, kind='softmax_contrastive', learner=Embeddings(z, z), reference=Embeddings(z, z), seed=0)\n"
            "print(sorted(m for m in ('torch', 'cupy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def _cuda_move(a: np.ndarray):
    return torch.from_numpy(a).cuda()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("kind", KINDS)
def test_torch_cuda_agrees_with_numpy(kind, sampler):
    exact = _select(kind, sampler, np.float64, np.asarray)
    assert _select(kind, sampler, np.float64, _cuda_move).tolist() == exact.tolist()
    ours = _select(kind, sampler, np.float32, np.asarray)
    theirs = _select(kind, sampler, np.float32, _cuda_move)
    assert len(set(ours.tolist()) & set(theirs.tolist())) >= 0.99 * N_SELECT


@pytest.mark.gpu
@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("kind", KINDS)
def test_cupy_agrees_with_numpy(kind, sampler):
    cupy = pytest.importorskip("cupy")
    try:
        cupy.cuda.runtime.getDeviceCount()
    except Exception:  # noqa: BLE001 (no driver, no device: the same skip)
        pytest.skip("no CUDA device")
    exact = _select(kind, sampler, np.float64, np.asarray)
    assert _select(kind, sampler, np.float64, cupy.asarray).tolist() == exact.tolist()
    ours = _select(kind, sampler, np.float32, np.asarray)
    theirs = _select(kind, sampler, np.float32, cupy.asarray)
    assert len(set(ours.tolist()) & set(theirs.tolist())) >= 0.99 * N_SELECT


@pytest.mark.parametrize("shape", [(512, 1024), (37, 1000), (5, 31), (1, 1)])
@pytest.mark.parametrize("axis", [0, 1])
def test_float64_sums_of_float32_torch_cpu_tensors_match_numpy(shape, axis):
    """Torch's CPU path sums runs of 32 in float32 before float64 (ten times faster there);
    the partial runs at the edges included, the sums stay within 1e-6 of numpy's float64."""
    from jest_stream.xp import sum64

    a = np.random.default_rng(1).exponential(2.0, shape).astype(np.float32)
    want = a.sum(axis=axis, dtype=np.float64)
    got = sum64(torch.from_numpy(a), axis)
    assert got.dtype == torch.float64 and tuple(got.shape) == want.shape
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-6)
