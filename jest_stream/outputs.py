"""What a model says about a super-batch of B examples: per-example losses (``Losses``)
or contrastive embeddings (``Embeddings``), one type per loss kind family.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

LOSS_KINDS: tuple[str, ...] = ("per_example", "sigmoid_contrastive", "softmax_contrastive")


def check_finite(array: np.ndarray, field: str) -> None:
    """Raise ValueError naming ``field`` if ``array`` holds NaN or inf."""
    if not np.all(np.isfinite(array)):
        bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
        raise ValueError(f"{field}: {bad} value(s) are NaN or inf; scores must be finite")


@dataclass(frozen=True)
class Losses:
    """Per-example losses of one model on a super-batch: shape (B,)."""

    values: np.ndarray

    def validated(self, field: str) -> Losses:
        """Return a float64 copy checked for shape and finiteness."""
        v = np.asarray(self.values)
        if v.ndim != 1:
            raise ValueError(f"{field}.losses: expected shape (B,), got {v.shape}")
        if not np.issubdtype(v.dtype, np.number):
            raise ValueError(f"{field}.losses: expected a numeric array, got dtype {v.dtype}")
        v = v.astype(np.float64)
        check_finite(v, f"{field}.losses")
        return Losses(v)

    @property
    def batch_size(self) -> int:
        return int(np.shape(self.values)[0])


@dataclass(frozen=True)
class Embeddings:
    """Contrastive outputs of one model: image and text embeddings (B, d) each,
    its logit scale alpha (already exponentiated) and bias beta."""

    image: np.ndarray
    text: np.ndarray
    logit_scale: float = 1.0
    logit_bias: float = 0.0

    def validated(self, field: str) -> Embeddings:
        """Return a float32 copy checked for shapes, widths and finiteness."""
        zi, zt = np.asarray(self.image), np.asarray(self.text)
        for name, z in (("image", zi), ("text", zt)):
            if z.ndim != 2:
                raise ValueError(f"{field}.{name}: expected shape (B, d), got {z.shape}")
            if not np.issubdtype(z.dtype, np.number):
                raise ValueError(f"{field}.{name}: expected a numeric array, got dtype {z.dtype}")
        if zi.shape[0] != zt.shape[0]:
            raise ValueError(
                f"{field}: image has {zi.shape[0]} rows but text has {zt.shape[0]}; both must be B"
            )
        if zi.shape[1] != zt.shape[1]:
            raise ValueError(
                f"{field}: image width {zi.shape[1]} != text width {zt.shape[1]}; "
                "embeddings must share one width d"
            )
        zi = np.ascontiguousarray(zi, dtype=np.float32)
        zt = np.ascontiguousarray(zt, dtype=np.float32)
        check_finite(zi, f"{field}.image")
        check_finite(zt, f"{field}.text")
        for name, v in (("logit_scale", self.logit_scale), ("logit_bias", self.logit_bias)):
            if not np.isfinite(v):
                raise ValueError(f"{field}.{name}: must be finite, got {v}")
        return Embeddings(zi, zt, float(self.logit_scale), float(self.logit_bias))

    @property
    def batch_size(self) -> int:
        return int(np.shape(self.image)[0])
