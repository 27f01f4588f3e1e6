"""What a model says about a super-batch of B examples: per-example losses (``Losses``)
or contrastive embeddings (``Embeddings``), one type per loss kind family.

The arrays may be numpy arrays, torch tensors (CPU or CUDA) or CuPy arrays; they are
validated where they are (shapes, dtypes, finiteness), never copied to the host.
float64 stays float64 (the exact path); every other dtype computes in float32.
"""
from __future__ import annotations

from dataclasses import dataclass

from typing import Any

import numpy as np

from jest_stream import xp as xp_util

LOSS_KINDS: tuple[str, ...] = ("per_example", "sigmoid_contrastive", "softmax_contrastive")


def check_finite(array: Any, field: str) -> None:
    """Raise ValueError naming ``field`` if ``array`` (any supported array library) holds NaN or inf."""
    xp = xp_util.namespace(array)
    finite = xp.isfinite(array)
    if not bool(xp.all(finite)):
        bad = int(xp.sum(xp.astype(xp.logical_not(finite), xp.int64)))
        raise ValueError(f"{field}: {bad} value(s) are NaN or inf; scores must be finite")


def as_array(value: Any) -> Any:
    """A torch/CuPy/numpy array as it is; anything else (lists, scalars) through numpy."""
    return value if xp_util.is_array(value) else np.asarray(value)


def _check_numeric(z: Any, field: str) -> None:
    xp = xp_util.namespace(z)
    if not xp.isdtype(z.dtype, ("real floating", "integral")):
        raise ValueError(f"{field}: expected a numeric array, got dtype {z.dtype}")


@dataclass(frozen=True)
class Losses:
    """Per-example losses of one model on a super-batch: shape (B,)."""

    values: Any

    def validated(self, field: str) -> Losses:
        """Return float64 losses (on the array's own device) checked for shape and finiteness."""
        v = as_array(self.values)
        if v.ndim != 1:
            raise ValueError(f"{field}.losses: expected shape (B,), got {tuple(v.shape)}")
        _check_numeric(v, f"{field}.losses")
        xp = xp_util.namespace(v)
        v = xp.astype(v, xp.float64)
        check_finite(v, f"{field}.losses")
        return Losses(v)

    @property
    def batch_size(self) -> int:
        return int(as_array(self.values).shape[0])


@dataclass(frozen=True)
class Embeddings:
    """Contrastive outputs of one model: image and text embeddings (B, d) each,
    its logit scale alpha (already exponentiated) and bias beta."""

    image: Any
    text: Any
    logit_scale: float = 1.0
    logit_bias: float = 0.0

    def validated(self, field: str) -> Embeddings:
        """Return contiguous float32 embeddings (float64 if both are float64), on their own
        device, checked for shapes, widths, one array library and finiteness."""
        zi, zt = as_array(self.image), as_array(self.text)
        for name, z in (("image", zi), ("text", zt)):
            if z.ndim != 2:
                raise ValueError(f"{field}.{name}: expected shape (B, d), got {tuple(z.shape)}")
            _check_numeric(z, f"{field}.{name}")
        try:
            xp_util.namespace(zi, zt)
        except TypeError as exc:
            raise ValueError(f"{field}: image and text must come from one array library ({exc})") from None
        if zi.shape[0] != zt.shape[0]:
            raise ValueError(
                f"{field}: image has {zi.shape[0]} rows but text has {zt.shape[0]}; both must be B"
            )
        if zi.shape[1] != zt.shape[1]:
            raise ValueError(
                f"{field}: image width {zi.shape[1]} != text width {zt.shape[1]}; "
                "embeddings must share one width d"
            )
        if xp_util.device_of(zi) != xp_util.device_of(zt):
            raise ValueError(f"{field}: image is on {xp_util.device_of(zi)} but text on "
                             f"{xp_util.device_of(zt)}; put both on one device")
        zi, zt = xp_util.contiguous_float(zi, zt)
        check_finite(zi, f"{field}.image")
        check_finite(zt, f"{field}.text")
        for name, v in (("logit_scale", self.logit_scale), ("logit_bias", self.logit_bias)):
            if not np.isfinite(float(v)):
                raise ValueError(f"{field}.{name}: must be finite, got {float(v)}")
        return Embeddings(zi, zt, float(self.logit_scale), float(self.logit_bias))

    @property
    def batch_size(self) -> int:
        return int(as_array(self.image).shape[0])
