"""Export a torch reference model to ONNX with the jest-stream contract in its metadata.

``per_example`` models are exported together with their loss: the graph takes the
model's inputs plus the labels (the last input) and outputs ``loss``, one value per
example. Contrastive models output ``image_embeds`` and ``text_embeds``; their logit
scale and bias go into the metadata. The batch axis is dynamic, and the file is checked
by running it in ONNX Runtime against torch on the example input.
"""
from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch

from jest_stream.contract import OUTPUTS_BY_KIND, ModelContract
from jest_stream.extras import require
from jest_stream.options import check_name
from jest_stream.outputs import LOSS_KINDS

log = logging.getLogger(__name__)

# The contract key of a classifier's class count (the scorer checks labels against it).
NUM_CLASSES_KEY = "jest.num_classes"


class _WithLoss(torch.nn.Module):
    """model + per-example loss: (*model inputs, labels) -> loss (B,)."""

    def __init__(self, model: torch.nn.Module, loss_fn: Callable):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(self.model(*inputs[:-1]), inputs[-1]).reshape(-1)


class _Towers(torch.nn.Module):
    """A two-tower model whose forward returns (image_embeds, text_embeds)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *inputs: torch.Tensor):
        zi, zt = self.model(*inputs)[:2]
        return zi, zt


def _as_float(value, field: str) -> float:
    if value is None:
        raise ValueError(f"{field}: contrastive models need it (alpha = exp(log scale) as a number)")
    value = float(value.detach().reshape(()) if isinstance(value, torch.Tensor) else value)
    if not np.isfinite(value):
        raise ValueError(f"{field}: must be finite, got {value}")
    return value


def export_reference(model: torch.nn.Module, loss_fn: Callable | None, path: str | os.PathLike, *,
                     example_inputs: Sequence[torch.Tensor] | Mapping[str, torch.Tensor],
                     input_names: Sequence[str] | None = None, kind: str,
                     logit_scale: float | torch.Tensor | None = None,
                     logit_bias: float | torch.Tensor | None = 0.0,
                     input_meanings: Mapping[str, str] | None = None, opset: int = 17,
                     check: bool = True) -> ModelContract:
    """Write ``model`` (+ ``loss_fn`` for per_example) to ``path`` as a reference model.

    ``example_inputs`` are tensors in the order of ``input_names`` (for per_example, the
    labels last), or a dict name -> tensor in that order (then ``input_names`` may be
    left out); a batch of at least 2 rows. ``loss_fn(outputs, labels)`` must return one
    loss per example (e.g. ``torch.nn.CrossEntropyLoss(reduction="none")``). The file is
    checked in ONNX Runtime against torch, on the example batch and on a larger one (the
    batch axis is dynamic). Returns the contract written.
    """
    require("onnx", "export_reference", "local")
    check_name(kind, LOSS_KINDS, "kind")
    input_names, example_inputs = _named_batch(example_inputs, input_names)
    wrapped, scale, bias = _wrap(model, loss_fn, kind, example_inputs, logit_scale, logit_bias)
    outputs = OUTPUTS_BY_KIND[kind]
    meanings = dict(input_meanings or {})
    for i, name in enumerate(input_names):
        default = "labels" if kind == "per_example" and i == len(input_names) - 1 else "model input"
        meanings.setdefault(name, default)
    extra = {NUM_CLASSES_KEY: str(classes)} if kind == "per_example" and (
        classes := _num_classes(model, example_inputs)) else {}
    contract = ModelContract(kind, {n: meanings[n] for n in input_names}, outputs, scale, bias, extra)

    path = os.fspath(path)
    _check_outputs(wrapped, kind, outputs, example_inputs)
    dynamic = {name: {0: "batch"} for name in (*input_names, *outputs)}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(wrapped, example_inputs, path, input_names=list(input_names),
                          output_names=list(outputs), dynamic_axes=dynamic, opset_version=opset,
                          dynamo=False)
    import onnx

    proto = onnx.load(path)
    del proto.metadata_props[:]
    for key, value in contract.to_metadata().items():
        proto.metadata_props.add(key=key, value=value)
    onnx.save(proto, path)
    if check:
        _check_against_torch(wrapped, example_inputs, input_names, outputs, path)
        bigger = tuple(torch.cat([t] * 3 + [t[:1]]) for t in example_inputs)  # 3B+1 rows
        _check_against_torch(wrapped, bigger, input_names, outputs, path)
    log.info("exported %s reference model to %s", kind, path)
    return contract


def _named_batch(example_inputs: Sequence[torch.Tensor] | Mapping[str, torch.Tensor],
                 input_names: Sequence[str] | None) -> tuple[tuple[str, ...], tuple[torch.Tensor, ...]]:
    """The example inputs as (names, tensors), checked: one batch of at least 2 rows."""
    if isinstance(example_inputs, Mapping):
        if input_names is not None and tuple(input_names) != tuple(example_inputs):
            raise ValueError(f"input_names: {list(input_names)} differ from the example_inputs keys "
                             f"{list(example_inputs)}; give one or the other")
        input_names = tuple(example_inputs)
        example_inputs = tuple(example_inputs.values())
    if input_names is None:
        raise ValueError("input_names: name each example input (or pass example_inputs as a dict)")
    example_inputs = tuple(example_inputs)
    input_names = tuple(input_names)
    if len(example_inputs) != len(input_names):
        raise ValueError(f"input_names: {len(input_names)} names for {len(example_inputs)} example inputs")
    if not all(isinstance(t, torch.Tensor) and t.dim() >= 1 for t in example_inputs):
        raise ValueError("example_inputs: give tensors with a leading batch axis")
    batch = example_inputs[0].shape[0]
    if batch < 2 or any(t.shape[0] != batch for t in example_inputs):
        raise ValueError(f"example_inputs: every input needs the same batch of at least 2 rows, got "
                         f"{[tuple(t.shape) for t in example_inputs]}")
    return input_names, example_inputs


def _wrap(model: torch.nn.Module, loss_fn: Callable | None, kind: str, example_inputs: tuple,
          logit_scale: float | torch.Tensor | None,
          logit_bias: float | torch.Tensor | None) -> tuple[torch.nn.Module, float, float]:
    """The module that is exported (model + loss, or the two towers), its logit scale and bias."""
    if kind == "per_example":
        if loss_fn is None:
            raise ValueError("loss_fn: per_example models are exported with their per-example loss, "
                             "e.g. torch.nn.CrossEntropyLoss(reduction='none')")
        if len(example_inputs) < 2:
            raise ValueError("example_inputs: per_example models take the model inputs and then the labels")
        return _WithLoss(model, loss_fn), 1.0, 0.0
    if loss_fn is not None:
        raise ValueError("loss_fn: contrastive models output embeddings; pass loss_fn=None")
    return _Towers(model), _as_float(logit_scale, "logit_scale"), _as_float(logit_bias or 0.0, "logit_bias")


def _check_outputs(wrapped: torch.nn.Module, kind: str, outputs: Sequence[str], example_inputs: tuple) -> None:
    """Run the wrapped module on the example batch: one loss per example, or (B, d) embeddings."""
    batch = example_inputs[0].shape[0]
    wrapped.eval()
    with torch.no_grad():
        probe = wrapped(*example_inputs)
    probe = [probe] if isinstance(probe, torch.Tensor) else list(probe)
    for name, value in zip(outputs, probe):
        if kind == "per_example" and tuple(value.shape) != (batch,):
            raise ValueError(f"loss_fn: gives shape {tuple(value.shape)} for a batch of {batch}; a per_example "
                             "model needs one loss per example (use reduction='none')")
        if kind != "per_example" and (value.dim() != 2 or value.shape[0] != batch):
            raise ValueError(f"model: output {name!r} has shape {tuple(value.shape)}; contrastive models "
                             f"return (image_embeds, text_embeds) of shape (B, d), B={batch}")


def _num_classes(model: torch.nn.Module, example_inputs: tuple) -> int | None:
    """The class count of a classifier (integer labels, (B, C) logits), or None if it is not one:
    the scorer then refuses labels outside [0, C) with a clear error."""
    labels = example_inputs[-1]
    if labels.dim() != 1 or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        return None
    model.eval()
    with torch.no_grad():
        logits = model(*example_inputs[:-1])
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != labels.shape[0]:
        return None
    return int(logits.shape[1])


def _check_against_torch(wrapped: torch.nn.Module, example_inputs, input_names, outputs, path: str) -> None:
    """Run the file in ONNX Runtime and torch on the same input; raise if they differ."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(path, sess_options=options, providers=["CPUExecutionProvider"])
    feed = {n: t.detach().cpu().numpy() for n, t in zip(input_names, example_inputs)}
    got = session.run(list(outputs), feed)
    with torch.no_grad():
        want = wrapped(*example_inputs)
    want = [want] if isinstance(want, torch.Tensor) else list(want)
    for name, g, w in zip(outputs, got, want):
        w = w.detach().cpu().numpy()
        if g.shape != w.shape or not np.allclose(g, w, rtol=1e-4, atol=1e-5):
            raise RuntimeError(f"export check: output {name!r} of {path} differs between ONNX Runtime "
                               f"and torch (max abs diff {np.abs(g - w).max() if g.shape == w.shape else 'shape'})")
