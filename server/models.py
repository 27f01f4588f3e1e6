"""Reference models: one ONNX Runtime session per model, checked against the contract.

By default the CUDA provider (with IOBinding, so outputs land in host memory in one
copy) is used when onnxruntime-gpu sees a GPU; otherwise the CPU provider. With
``device="cuda"`` inputs are copied to the GPU once and outputs stay there, returned
as CuPy arrays (server/device.py); ``device="cpu"`` uses the CPU provider only.
float16 models are accepted: their outputs are widened where selection needs it.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
import numpy as np
import onnxruntime as ort

from jest_stream.contract import ContractError, ModelContract, ModelSpec, TensorSpec, model_version

from . import device as devices

log = logging.getLogger(__name__)

NUM_CLASSES_KEY = "jest.num_classes"  # written by the export helper for classifiers
PROBE_ROWS = 3


class ModelOutputError(RuntimeError):
    """The reference model answered with outputs that break its contract (rows, dtype, width)."""

_ORT_DTYPES = {
    "tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
    "tensor(int32)": np.int32, "tensor(int64)": np.int64, "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


def _spec(arg) -> TensorSpec:
    dtype = _ORT_DTYPES.get(arg.type)
    if dtype is None:
        raise ContractError(f"input/output {arg.name!r}: type {arg.type} is not supported; "
                            f"use one of {sorted(_ORT_DTYPES)}")
    shape = tuple(d if isinstance(d, int) else -1 for d in arg.shape)
    return TensorSpec(arg.name, np.dtype(dtype), shape)


def default_providers(device: str | None = None, device_id: int = 0) -> list:
    """The providers for ``device``: CPU only, CUDA (on ``device_id``) then CPU, or, with
    no device named, CUDA first when this onnxruntime build has it, then CPU."""
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device == "cuda":
        return [(devices.CUDA_PROVIDER, {"device_id": device_id}), "CPUExecutionProvider"]
    available = ort.get_available_providers()
    return [p for p in (devices.CUDA_PROVIDER, "CPUExecutionProvider") if p in available]


class ReferenceModel:
    """A frozen reference model in ONNX Runtime: load, check the contract, run on numpy."""

    def __init__(self, name: str, path: str | os.PathLike, *, intra_op_threads: int | None = None,
                 inter_op_threads: int | None = None, providers: Sequence[str] | None = None,
                 device: str | None = None, device_id: int = 0):
        self.name = name
        self.device, self.device_id = device, device_id
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"--model {name}={self.path}: no such file")
        self.version = model_version(self.path)
        options = ort.SessionOptions()
        if intra_op_threads:
            options.intra_op_num_threads = intra_op_threads
        if inter_op_threads:
            options.inter_op_num_threads = inter_op_threads
        self.providers = list(providers) if providers else default_providers(device, device_id)
        try:
            self.session = ort.InferenceSession(self.path, sess_options=options, providers=self.providers)
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph types
            raise ContractError(f"model {name!r} ({self.path}): ONNX Runtime cannot load it: {exc}") from exc
        self.inputs = [_spec(a) for a in self.session.get_inputs()]
        self.outputs = [_spec(a) for a in self.session.get_outputs()]
        meta = self.session.get_modelmeta().custom_metadata_map
        self.contract = ModelContract.from_metadata(
            meta, [s.name for s in self.inputs], [s.name for s in self.outputs],
            source=f"model {name!r} ({self.path})")
        for spec in self.inputs + self.outputs:
            if not spec.shape or spec.shape[0] != -1:
                raise ContractError(f"model {name!r}: {spec.name!r} has shape {list(spec.shape)}; "
                                    "the first axis must be a dynamic batch axis")
        self.spec = ModelSpec(name, self.contract.kind, tuple(self.inputs), tuple(self.outputs), self.version,
                              self.contract.logit_scale, self.contract.logit_bias)
        self.use_iobinding = self.session.get_providers()[0] == devices.CUDA_PROVIDER
        if device == "cuda" and not self.use_iobinding:
            raise devices.DeviceUnavailable(f"--device cuda: model {name!r} did not get the CUDA provider "
                                            f"(ONNX Runtime gave {self.session.get_providers()})")
        self._out_dtypes = {s.name: s.dtype for s in self.outputs}
        self.num_classes = self._num_classes()
        self._probe()
        log.info("loaded model %s (%s, version %s) on %s", name, self.contract.kind, self.version,
                 self.session.get_providers()[0])

    def _num_classes(self) -> int | None:
        raw = self.contract.extra.get(NUM_CLASSES_KEY)
        if raw is None:
            return None
        try:
            classes = int(raw)
        except ValueError:
            classes = 0
        if classes < 1:
            raise ContractError(f"model {self.name!r}: metadata {NUM_CLASSES_KEY!r} is {raw!r}; expected a "
                                "positive integer")
        return classes

    def _probe_inputs(self) -> dict[str, np.ndarray]:
        """A small batch the model must take: zeros (valid labels), dynamic inner axes of 1."""
        feed = {}
        for spec in self.inputs:
            shape = (PROBE_ROWS, *(d if d > 0 else 1 for d in spec.shape[1:]))
            feed[spec.name] = np.zeros(shape, dtype=spec.dtype)
        return feed

    def _probe(self) -> None:
        """Run the model once at load: rows out = rows in for every output, dtypes and widths
        as the contract says, finite outputs, a finite positive logit scale. ContractError
        naming the output otherwise (so a model that would shift or poison scores never serves)."""
        where = f"model {self.name!r} ({self.path})"
        if self.contract.contrastive:
            scale, bias = self.contract.logit_scale, self.contract.logit_bias
            if not (np.isfinite(scale) and scale > 0) or not np.isfinite(bias):
                raise ContractError(f"{where}: logit scale {scale} / bias {bias}; the scale must be finite "
                                    "and positive, the bias finite")
        try:
            outputs = self.run(self._probe_inputs())
        except ModelOutputError as exc:
            raise ContractError(f"{where}: on a probe batch of {PROBE_ROWS} rows: {exc}") from None
        except Exception as exc:  # ORT's own failure types
            raise ContractError(f"{where}: fails on a probe batch of {PROBE_ROWS} rows of zeros: {exc}") from None
        for name, value in outputs.items():
            value = devices.to_host(value)
            if value.dtype.kind != "f":
                raise ContractError(f"{where}: output {name!r} has dtype {value.dtype}; reference outputs "
                                    "must be floating point")
            if not np.all(np.isfinite(value)):
                raise ContractError(f"{where}: output {name!r} is not finite (NaN or inf) on a probe batch of "
                                    f"{PROBE_ROWS} rows of zeros")

    def check_rows(self, outputs: Mapping[str, np.ndarray], rows: int) -> None:
        """Every output must have ``rows`` rows and the contract's shape: ModelOutputError naming it."""
        widths = {s.name: s.shape for s in self.outputs}
        for name in self.contract.outputs:
            value = outputs[name]
            shape = np.shape(value)
            if shape[:1] != (rows,):
                raise ModelOutputError(f"output {name!r}: {shape[:1][0] if shape else 'no'} rows for {rows} "
                                       "input rows; a reference model must give one row per input row")
            per_example = self.contract.kind == "per_example"
            if per_example and shape[1:] not in ((), (1,)) or not per_example and len(shape) != 2 or any(w not in (-1, g) for w, g in zip(widths[name][1:], shape[1:])):
                raise ModelOutputError(f"output {name!r}: shape {list(shape)}; the contract needs "
                                       f"{['B' if d == -1 else d for d in widths[name]]}"
                                       + (" (one loss per example)" if per_example else " ((B, d) embeddings)"))

    def check_inputs(self, inputs: Mapping[str, np.ndarray], rows: int | None, field: str = "inputs") -> int:
        """Check names, dtypes and shapes of a request's inputs; return the batch size.

        Raises ValueError naming ``field[name]`` and what the model expects.
        """
        want = {s.name: s for s in self.inputs}
        missing = sorted(set(want) - set(inputs))
        extra = sorted(set(inputs) - set(want))
        if missing or extra:
            raise ValueError(f"{field}: model {self.name!r} takes inputs {sorted(want)}; "
                             f"missing {missing}, unexpected {extra}")
        batch = rows
        for name, spec in want.items():
            arr = inputs[name]
            if arr.dtype != spec.dtype:
                raise ValueError(f"{field}[{name!r}]: dtype {arr.dtype}, model {self.name!r} expects {spec.dtype}")
            if arr.ndim != len(spec.shape) or any(w not in (-1, g) for w, g in zip(spec.shape, arr.shape)):
                raise ValueError(f"{field}[{name!r}]: shape {list(arr.shape)}, model {self.name!r} expects "
                                 f"{['B' if d == -1 else d for d in spec.shape]}")
            if batch is None:
                batch = arr.shape[0]
            elif arr.shape[0] != batch:
                raise ValueError(f"{field}[{name!r}]: {arr.shape[0]} rows, expected B={batch} "
                                 "(one row per key / per learner score)")
            if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
                raise ValueError(f"{field}[{name!r}]: holds NaN or inf")
            if self.num_classes and self.contract.inputs.get(name) == "labels" and arr.size \
                    and arr.dtype.kind in "iu" and (arr.min() < 0 or arr.max() >= self.num_classes):
                raise ValueError(f"{field}[{name!r}]: labels must be class indices in [0, {self.num_classes}) "
                                 f"for model {self.name!r}; got values in [{arr.min()}, {arr.max()}]")
        return int(batch or 0)

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the model on a batch; returns the contract's outputs by name, their rows and
        shapes checked (ModelOutputError)."""
        names = list(self.contract.outputs)
        rows = int(next(iter(inputs.values())).shape[0])
        if self.device == "cuda":
            outputs = self._run_on_device(inputs, names)
            self.check_rows(outputs, rows)
            return outputs
        if self.use_iobinding:
            binding = self.session.io_binding()
            for name, arr in inputs.items():
                binding.bind_cpu_input(name, np.ascontiguousarray(arr))
            for name in names:
                binding.bind_output(name, "cpu")
            self.session.run_with_iobinding(binding)
            values = binding.copy_outputs_to_cpu()
        else:
            values = self.session.run(names, {k: np.ascontiguousarray(v) for k, v in inputs.items()})
        outputs = dict(zip(names, values))
        self.check_rows(outputs, rows)
        return outputs

    def _run_on_device(self, inputs: Mapping[str, np.ndarray], names: list[str]) -> dict:
        """Inputs copied to the GPU once, outputs bound there: CuPy views, no host copy."""
        binding = self.session.io_binding()
        for name, arr in inputs.items():
            value = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(devices.to_host(arr)), "cuda",
                                                     self.device_id)
            binding.bind_ortvalue_input(name, value)
        for name in names:
            binding.bind_output(name, "cuda", self.device_id)
        self.session.run_with_iobinding(binding)
        return {name: devices.ortvalue_to_cupy(value, self._out_dtypes[name], self.device_id)
                for name, value in zip(names, binding.get_outputs())}
