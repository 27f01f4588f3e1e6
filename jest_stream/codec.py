"""Tensor codec: numpy arrays <-> proto ``Tensor`` (raw row-major bytes + dtype + shape).

Decoding never copies the payload: the array is a read-only ``np.frombuffer`` view
of the message's bytes. The one exception is bfloat16, which numpy has no dtype for:
its bytes decode to a float32 array (exact: bfloat16 is the top half of a float32),
and it is encoded from ``ml_dtypes.bfloat16`` arrays or, with ``wire_dtype="bfloat16"``,
from any float array, without needing ml_dtypes or torch.
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from jest_stream.v1 import scorer_pb2 as pb

_TO_PROTO: dict[np.dtype, int] = {
    np.dtype(np.float16): pb.DT_FLOAT16,
    np.dtype(np.float32): pb.DT_FLOAT32,
    np.dtype(np.float64): pb.DT_FLOAT64,
    np.dtype(np.int32): pb.DT_INT32,
    np.dtype(np.int64): pb.DT_INT64,
    np.dtype(np.uint8): pb.DT_UINT8,
    np.dtype(np.bool_): pb.DT_BOOL,
}
# Wire bytes are little-endian whatever the host.
_FROM_PROTO: dict[int, np.dtype] = {code: dt.newbyteorder("<") for dt, code in _TO_PROTO.items()}

BFLOAT16 = "bfloat16"
SUPPORTED_DTYPES: tuple[str, ...] = (*(str(dt) for dt in _TO_PROTO), BFLOAT16)
# Wire dtypes a float array may be narrowed to when it is encoded.
WIRE_FLOATS: tuple[str, ...] = ("float32", "float16", BFLOAT16)


class TensorDecodeError(ValueError):
    """A proto Tensor whose dtype, shape or byte length is not valid."""


def dtype_code(dtype: np.dtype | str | type, field: str = "array") -> int:
    """The proto DataType of a numpy dtype (any byte order); ValueError if it cannot travel."""
    dt = np.dtype(dtype)
    if dt.name == BFLOAT16:  # ml_dtypes.bfloat16
        return pb.DT_BFLOAT16
    code = _TO_PROTO.get(np.dtype(dt.type))
    if code is None:
        raise ValueError(f"{field}: dtype {dt} cannot travel; use one of {', '.join(SUPPORTED_DTYPES)}")
    return code


def numpy_dtype(code: int, field: str = "dtype") -> np.dtype:
    """The numpy dtype of a proto DataType code (float32 for bfloat16, which decodes to it);
    TensorDecodeError naming ``field`` if unknown."""
    if code == pb.DT_BFLOAT16:
        return np.dtype("<f4")
    dtype = _FROM_PROTO.get(code)
    if dtype is None:
        raise TensorDecodeError(
            f"{field}: unknown dtype code {code}; expected one of "
            f"{', '.join(pb.DataType.Name(c) for c in (*_FROM_PROTO, pb.DT_BFLOAT16))}"
        )
    return dtype


def bfloat16_bits(array: np.ndarray) -> np.ndarray:
    """The bfloat16 bit patterns (uint16) of a float array, rounded to nearest even
    (NaN stays NaN). An ``ml_dtypes.bfloat16`` array gives its own bits."""
    arr = np.asarray(array)
    if arr.dtype.name == BFLOAT16:
        return np.ascontiguousarray(arr).view(np.uint16)
    bits = np.ascontiguousarray(arr, dtype="<f4").view("<u4")
    rounded = ((bits + (0x7FFF + ((bits >> 16) & 1))) >> 16).astype("<u2")
    nan = np.isnan(arr)
    if nan.any():
        rounded[nan] = 0x7FC0
    return rounded


def bfloat16_to_float32(bits: np.ndarray) -> np.ndarray:
    """float32 values of bfloat16 bit patterns (exact: the low 16 bits are zero)."""
    return (np.asarray(bits, dtype="<u2").astype("<u4") << 16).view("<f4")


def encode(array: np.ndarray, out: pb.Tensor | None = None, wire_dtype: str | None = None) -> pb.Tensor:
    """Encode ``array`` as a proto Tensor (into ``out`` if given, e.g. a map entry).

    ``wire_dtype`` (one of WIRE_FLOATS) narrows or widens a float array on the way.
    """
    arr = np.asarray(array)
    if wire_dtype is not None:
        if wire_dtype not in WIRE_FLOATS:
            raise ValueError(f"wire_dtype: {wire_dtype!r}; expected one of {', '.join(WIRE_FLOATS)}")
        if wire_dtype != BFLOAT16:
            arr = arr.astype(wire_dtype, copy=False)
    tensor = out if out is not None else pb.Tensor()
    if wire_dtype == BFLOAT16 or arr.dtype.name == BFLOAT16:
        tensor.dtype = pb.DT_BFLOAT16
        payload = bfloat16_bits(arr)
    else:
        tensor.dtype = dtype_code(arr.dtype)
        payload = arr.astype(_FROM_PROTO[tensor.dtype], copy=False)
    del tensor.shape[:]
    tensor.shape.extend(int(n) for n in arr.shape)
    tensor.data = np.ascontiguousarray(payload).tobytes()
    return tensor


def decode(tensor: pb.Tensor, name: str = "tensor") -> np.ndarray:
    """Decode a proto Tensor into a read-only numpy view of its bytes (bfloat16: float32).

    Raises TensorDecodeError naming ``name`` for an unknown dtype, a negative
    dimension or a byte length that does not match dtype x shape.
    """
    dtype = numpy_dtype(tensor.dtype, f"{name}.dtype")
    bf16 = tensor.dtype == pb.DT_BFLOAT16
    if bf16:
        dtype = np.dtype("<u2")
    shape = tuple(int(n) for n in tensor.shape)
    if any(n < 0 for n in shape):
        raise TensorDecodeError(f"{name}.shape: dimensions must be >= 0, got {list(shape)}")
    count = 1
    for n in shape:
        count *= n
    expected = count * dtype.itemsize
    if len(tensor.data) != expected:
        raise TensorDecodeError(
            f"{name}.data: {len(tensor.data)} bytes, but shape {list(shape)} of "
            f"{pb.DataType.Name(tensor.dtype)} needs {expected} bytes"
        )
    arr = np.frombuffer(tensor.data, dtype=dtype, count=count)
    return (bfloat16_to_float32(arr) if bf16 else arr).reshape(shape)


def encode_map(arrays: Mapping[str, np.ndarray], target) -> None:
    """Encode each array of ``arrays`` into the proto map field ``target``."""
    for key, value in arrays.items():
        encode(value, target[key])


def decode_map(tensors, field: str) -> dict[str, np.ndarray]:
    """Decode a proto ``map<string, Tensor>``; errors name ``field[key]``."""
    return {key: decode(t, f"{field}[{key!r}]") for key, t in tensors.items()}
