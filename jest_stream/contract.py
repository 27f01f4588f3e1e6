"""The reference-model contract, read from ONNX ``metadata_props``, and ModelSpec, what a
loaded model looks like to everyone (core, engine, client, wire).

A reference model is an ONNX file whose metadata says what it is:

- ``jest.kind``: per_example, sigmoid_contrastive or softmax_contrastive;
- ``jest.inputs``: JSON object, input name -> meaning (e.g. {"x": "features", "y": "labels"});
- ``jest.outputs``: JSON list of output names: ["loss"] for per_example models (loss per
  example, shape (B,)), ["image_embeds", "text_embeds"] for contrastive ones ((B, d) each);
- ``jest.logit_scale`` and ``jest.logit_bias`` (contrastive only): alpha (already
  exponentiated) and beta.

Pure Python: the server and the embedded scorer both check a model with it at load.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from jest_stream.outputs import LOSS_KINDS, Embeddings, Losses

KIND_KEY = "jest.kind"
INPUTS_KEY = "jest.inputs"
OUTPUTS_KEY = "jest.outputs"
SCALE_KEY = "jest.logit_scale"
BIAS_KEY = "jest.logit_bias"

OUTPUTS_BY_KIND: dict[str, tuple[str, ...]] = {
    "per_example": ("loss",),
    "sigmoid_contrastive": ("image_embeds", "text_embeds"),
    "softmax_contrastive": ("image_embeds", "text_embeds"),
}


class ContractError(ValueError):
    """A model whose metadata or graph breaks the reference-model contract."""


@dataclass(frozen=True)
class ModelContract:
    """What a reference model computes and how to call it."""

    kind: str
    inputs: dict[str, str]
    outputs: tuple[str, ...]
    logit_scale: float = 1.0
    logit_bias: float = 0.0
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def contrastive(self) -> bool:
        return self.kind != "per_example"

    def to_metadata(self) -> dict[str, str]:
        """The ``metadata_props`` entries that describe this contract."""
        meta = {
            KIND_KEY: self.kind,
            INPUTS_KEY: json.dumps(self.inputs),
            OUTPUTS_KEY: json.dumps(list(self.outputs)),
        }
        if self.contrastive:
            meta[SCALE_KEY] = repr(float(self.logit_scale))
            meta[BIAS_KEY] = repr(float(self.logit_bias))
        meta.update(self.extra)
        return meta

    @classmethod
    def from_metadata(cls, meta: Mapping[str, str], graph_inputs: Sequence[str],
                      graph_outputs: Sequence[str], source: str = "model") -> ModelContract:
        """Parse and check the contract of a model whose graph has these input/output names.

        Raises ContractError naming ``source``, the metadata key and the fix.
        """
        def fail(msg: str) -> ContractError:
            return ContractError(f"{source}: {msg} (export the model with "
                                 "jest_stream.client.export_reference to get valid metadata)")

        kind = meta.get(KIND_KEY)
        if kind is None:
            raise fail(f"metadata {KIND_KEY!r} is missing; expected one of {', '.join(LOSS_KINDS)}")
        if kind not in LOSS_KINDS:
            raise fail(f"metadata {KIND_KEY!r} is {kind!r}; expected one of {', '.join(LOSS_KINDS)}")
        try:
            inputs = json.loads(meta.get(INPUTS_KEY, "null"))
            outputs = json.loads(meta.get(OUTPUTS_KEY, "null"))
        except json.JSONDecodeError as exc:
            raise fail(f"metadata {INPUTS_KEY!r}/{OUTPUTS_KEY!r} is not valid JSON: {exc}") from None
        if not isinstance(inputs, dict) or not all(isinstance(k, str) for k in inputs):
            raise fail(f"metadata {INPUTS_KEY!r} must be a JSON object of input name -> meaning")
        if not isinstance(outputs, list) or not all(isinstance(o, str) for o in outputs):
            raise fail(f"metadata {OUTPUTS_KEY!r} must be a JSON list of output names")
        want = OUTPUTS_BY_KIND[kind]
        if tuple(outputs) != want:
            raise fail(f"kind {kind!r} needs outputs {list(want)}, metadata says {outputs}")
        missing_in = sorted(set(inputs) - set(graph_inputs))
        if missing_in or set(graph_inputs) - set(inputs):
            raise fail(f"metadata {INPUTS_KEY!r} names inputs {sorted(inputs)} but the graph has "
                       f"{sorted(graph_inputs)}")
        missing_out = [o for o in want if o not in graph_outputs]
        if missing_out:
            raise fail(f"graph lacks output(s) {missing_out}; it has {list(graph_outputs)}")
        scale, bias = 1.0, 0.0
        if kind != "per_example":
            try:
                scale = float(meta[SCALE_KEY])
                bias = float(meta.get(BIAS_KEY, "0"))
            except KeyError:
                raise fail(f"contrastive models need metadata {SCALE_KEY!r}") from None
            except ValueError:
                raise fail(f"metadata {SCALE_KEY!r}/{BIAS_KEY!r} must be numbers") from None
        known = {KIND_KEY, INPUTS_KEY, OUTPUTS_KEY, SCALE_KEY, BIAS_KEY}
        extra = {k: v for k, v in meta.items() if k.startswith("jest.") and k not in known}
        return cls(kind, dict(inputs), tuple(outputs), scale, bias, extra)


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: name, numpy dtype, shape (-1 for a dynamic axis)."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]


@dataclass(frozen=True)
class ModelSpec:
    """A loaded reference model as ListModels reports it: name, loss kind, inputs and
    outputs in the order the graph declares them, version (content hash), logit scale
    and bias. One type for the engine, the wire and the client."""

    name: str
    kind: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...] = ()
    version: str = ""
    logit_scale: float = 1.0
    logit_bias: float = 0.0

    def input(self, name: str) -> TensorSpec:
        """The input called ``name`` (KeyError if the model has none)."""
        for spec in self.inputs:
            if spec.name == name:
                return spec
        raise KeyError(name)

    @property
    def input_names(self) -> list[str]:
        return [s.name for s in self.inputs]

    def outputs_from(self, arrays: Mapping[str, Any]) -> Losses | Embeddings:
        """This model's outputs by name (B rows each) as the core takes them: Losses
        (``loss``) or Embeddings (``image_embeds``, ``text_embeds``, its scale and bias)."""
        if self.kind == "per_example":
            return Losses(arrays["loss"].reshape(-1))
        return Embeddings(arrays["image_embeds"], arrays["text_embeds"], self.logit_scale, self.logit_bias)


def model_version(path: str | os.PathLike) -> str:
    """A short content hash of the model file: cache entries are keyed by it."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]
