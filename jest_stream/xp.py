"""Array-library helpers for the selection core: one code path over numpy, torch and CuPy.

The samplers and conditional scores are written against the array API standard
(through ``array-api-compat``), so the same lines run on numpy arrays (the CPU
scorer), torch tensors (the trainer, CPU or CUDA) and CuPy arrays (the GPU scorer).
What the standard leaves out and the hot loops need lives here: in-place
elementwise updates (no fresh B-sized temporaries per pass), a top-k, row-wise dot
products, and moving small host arrays (the Gumbel noise) to where the data is.

Nothing here imports torch or CuPy: a namespace is only ever looked up from arrays
the caller already holds.
"""
from __future__ import annotations

from types import ModuleType
from typing import Any

import array_api_compat as compat
import numpy as np

# Largest (rows x B) block of logits that one pass holds: 2**23 float32 elements
# (32 MiB) on the host; GPUs get bigger blocks, since many small matmuls starve them.
HOST_BLOCK_ELEMENTS = 1 << 23
DEVICE_BLOCK_ELEMENTS = 1 << 27


def namespace(*arrays: Any) -> ModuleType:
    """The array-API namespace of ``arrays`` (numpy, torch or CuPy, as array-api-compat wraps it)."""
    return compat.array_namespace(*arrays)


def is_array(x: Any) -> bool:
    """True for a numpy, torch or CuPy array (anything array-api-compat knows)."""
    return compat.is_array_api_obj(x) and not isinstance(x, (int, float, bool))


def _native(x: Any) -> Any:
    """The library module behind ``x`` for the few calls the standard lacks."""
    if compat.is_torch_array(x):
        import torch  # already imported by whoever made x
        return torch
    if compat.is_cupy_array(x):
        import cupy
        return cupy
    return np


def on_host(x: Any) -> bool:
    """True where ``x`` lives in host memory (numpy, or a CPU torch tensor)."""
    if compat.is_numpy_array(x):
        return True
    return compat.is_torch_array(x) and x.device.type == "cpu"


def block_rows(x: Any, batch: int) -> int:
    """How many rows of a (rows x batch) logit block fit the block budget of ``x``'s device."""
    budget = HOST_BLOCK_ELEMENTS if on_host(x) else DEVICE_BLOCK_ELEMENTS
    return max(1, min(batch, budget // max(batch, 1)))


def to_host(x: Any) -> np.ndarray:
    """``x`` as a numpy array (a copy off the device; numpy input is returned as is)."""
    if compat.is_numpy_array(x):
        return x
    if compat.is_torch_array(x):
        return x.detach().cpu().numpy()
    if compat.is_cupy_array(x):
        return x.get()
    return np.asarray(x)


def from_host(a: np.ndarray, like: Any) -> Any:
    """The host array ``a`` placed where ``like`` lives (no copy for numpy)."""
    if compat.is_numpy_array(like):
        return a
    xp = namespace(like)
    return xp.asarray(a, device=compat.device(like))


def exp_(x: Any) -> Any:
    """exp in place."""
    if compat.is_torch_array(x):
        return x.exp_()
    return _native(x).exp(x, out=x)


def log_(x: Any) -> Any:
    """Natural log in place."""
    if compat.is_torch_array(x):
        return x.log_()
    return _native(x).log(x, out=x)


def clip_max_(x: Any, limit: float) -> Any:
    """min(x, limit) in place."""
    if compat.is_torch_array(x):
        return x.clamp_(max=limit)
    return _native(x).minimum(x, limit, out=x)


# Torch on the CPU sums float32 into float64 ten times slower than into float32 (a cast per
# element; numpy fuses it): there, runs of this many values are summed in float32 first
# (relative error ~1e-8 to 1e-7 measured on softplus values) and the partial sums in float64.
_TORCH_SUM_GROUP = 32


def sum64(x: Any, axis: int) -> Any:
    """Sums of the 2-D float array ``x`` along ``axis`` (0 or 1), accumulated in float64."""
    if not (compat.is_torch_array(x) and on_host(x) and x.dtype == _native(x).float32):
        return namespace(x).sum(x, axis=axis, dtype=namespace(x).float64)
    torch = _native(x)
    g = _TORCH_SUM_GROUP
    n = x.shape[axis]
    full = n - n % g
    head = x.narrow(axis, 0, full)
    shape = (full // g, g, x.shape[1]) if axis == 0 else (x.shape[0], full // g, g)
    total = head.reshape(shape).sum(dim=axis + 1).sum(dim=axis, dtype=torch.float64)
    if full < n:
        total += x.narrow(axis, full, n - full).sum(dim=axis, dtype=torch.float64)
    return total


def rowdot(a: Any, b: Any) -> Any:
    """Row-wise dot products sum_j a[i, j] * b[i, j], shape (B,), without a (B, d) temporary."""
    return _native(a).einsum("ij,ij->i", a, b)


def top_indices(values: Any, k: int) -> Any:
    """Indices of the k largest ``values``, largest first (the library's own top-k)."""
    n = values.shape[0]
    if compat.is_torch_array(values):
        return _native(values).topk(values, k, sorted=True).indices
    lib = _native(values)
    top = lib.argpartition(-values, k - 1)[:k] if k < n else lib.arange(n)
    return top[lib.argsort(-values[top], kind="stable")]


def float_dtype(x: Any) -> Any:
    """float64 if ``x`` is float64, else float32: the dtype selection computes in."""
    xp = namespace(x)
    return xp.float64 if x.dtype == xp.float64 else xp.float32


def device_of(x: Any) -> Any:
    """The device ``x`` lives on (``"cpu"`` for numpy)."""
    return compat.device(x)


def contiguous_float(*arrays: Any) -> tuple[Any, ...]:
    """``arrays`` as C-contiguous float64 (when all are float64) or float32, on their device."""
    xp = namespace(*arrays)
    wide = all(a.dtype == xp.float64 for a in arrays)
    dtype = xp.float64 if wide else xp.float32
    out = []
    for a in arrays:
        if compat.is_numpy_array(a):
            out.append(np.ascontiguousarray(a, dtype=dtype))
        elif compat.is_torch_array(a):
            out.append(a.detach().to(dtype).contiguous())
        else:
            out.append(_native(a).ascontiguousarray(a, dtype=dtype))
    return tuple(out)
