"""Where the scorer computes: ``--device cpu`` (ONNX Runtime's CPU provider, selection in
numpy) or ``--device cuda`` (ONNX Runtime's CUDA provider with inputs and outputs bound
on the GPU, and selection in CuPy on the same GPU). Without ``--device``, ONNX Runtime
uses CUDA when it has it and selection stays on the host, as before.

CuPy and the CUDA provider come with the ``gpu`` extra (onnxruntime-gpu, cupy-cuda13x);
neither is imported unless ``--device cuda`` asks for it. Never torch.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

DEVICES: tuple[str, ...] = ("cpu", "cuda")
CUDA_PROVIDER = "CUDAExecutionProvider"


class DeviceUnavailable(RuntimeError):
    """``--device cuda`` on a host that cannot run it (no CUDA provider, CuPy or GPU)."""


def cuda_problem(device_id: int = 0) -> str | None:
    """Why CUDA cannot serve here, in one line, or None when it can."""
    import onnxruntime as ort

    providers = ort.get_available_providers()
    if CUDA_PROVIDER not in providers:
        return (f"onnxruntime {ort.__version__} has no {CUDA_PROVIDER} (it has {', '.join(providers)}); "
                "install the gpu extra (onnxruntime-gpu, cupy-cuda13x) on a CUDA host, or use --device cpu")
    try:
        import cupy
    except ImportError as exc:
        return f"CuPy is not installed ({exc}); install the gpu extra (cupy-cuda13x), or use --device cpu"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # CUDARuntimeError without a driver or device
        return f"no CUDA device is visible ({type(exc).__name__}: {exc}); use --device cpu"
    if device_id >= count:
        return f"CUDA device {device_id} does not exist ({count} visible); use --device cpu"
    return None


def require_cuda(device_id: int = 0) -> None:
    """Raise DeviceUnavailable (one line: why, and the fix) unless CUDA can serve."""
    problem = cuda_problem(device_id)
    if problem is not None:
        raise DeviceUnavailable(f"--device cuda: {problem}")


def is_device_array(x: Any) -> bool:
    """True for a CuPy array (the only device arrays the scorer holds)."""
    return type(x).__module__.startswith("cupy")


def to_host(x: Any) -> np.ndarray:
    """A numpy array of ``x`` (a copy off the GPU for CuPy; numpy as it is)."""
    return x.get() if is_device_array(x) else np.asarray(x)


def to_device(x: Any) -> Any:
    """``x`` as a CuPy array on the current GPU (CuPy arrays as they are)."""
    import cupy

    return cupy.asarray(x)


def ortvalue_to_cupy(value: Any, dtype: np.dtype, device_id: int = 0) -> Any:
    """A CuPy view of an OrtValue held on GPU ``device_id`` (no copy; the view keeps it alive)."""
    import cupy

    shape = tuple(value.shape())
    nbytes = math.prod(shape) * np.dtype(dtype).itemsize
    memory = cupy.cuda.UnownedMemory(value.data_ptr(), nbytes, value, device_id)
    return cupy.ndarray(shape, dtype=dtype, memptr=cupy.cuda.MemoryPointer(memory, 0))


def on_device(outputs: Any) -> Any:
    """Losses or Embeddings with their arrays moved to the GPU (CuPy), for selection there."""
    if hasattr(outputs, "values"):
        return dataclasses.replace(outputs, values=to_device(outputs.values))
    return dataclasses.replace(outputs, image=to_device(outputs.image), text=to_device(outputs.text))
