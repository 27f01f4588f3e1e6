"""Tensor codec: numpy arrays <-> proto ``Tensor`` (raw row-major bytes + dtype + shape).

Decoding never copies the payload: the array is a read-only ``np.frombuffer`` view
of the message's bytes.
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

SUPPORTED_DTYPES: tuple[str, ...] = tuple(str(dt) for dt in _TO_PROTO)


class TensorDecodeError(ValueError):
    """A proto Tensor whose dtype, shape or byte length is not valid."""


def dtype_code(dtype: np.dtype | str | type, field: str = "array") -> int:
    """The proto DataType of a numpy dtype (any byte order); ValueError if it cannot travel."""
    dt = np.dtype(dtype)
    code = _TO_PROTO.get(np.dtype(dt.type))
    if code is None:
        raise ValueError(f"{field}: dtype {dt} cannot travel; use one of {', '.join(SUPPORTED_DTYPES)}")
    return code


def numpy_dtype(code: int, field: str = "dtype") -> np.dtype:
    """The numpy dtype of a proto DataType code; TensorDecodeError naming ``field`` if unknown."""
    dtype = _FROM_PROTO.get(code)
    if dtype is None:
        raise TensorDecodeError(
            f"{field}: unknown dtype code {code}; expected one of "
            f"{', '.join(pb.DataType.Name(c) for c in _FROM_PROTO)}"
        )
    return dtype


def encode(array: np.ndarray, out: pb.Tensor | None = None) -> pb.Tensor:
    """Encode ``array`` as a proto Tensor (into ``out`` if given, e.g. a map entry)."""
    arr = np.asarray(array)
    code = dtype_code(arr.dtype)
    little = arr.astype(_FROM_PROTO[code], copy=False)
    tensor = out if out is not None else pb.Tensor()
    tensor.dtype = code
    del tensor.shape[:]
    tensor.shape.extend(int(n) for n in arr.shape)
    tensor.data = np.ascontiguousarray(little).tobytes()
    return tensor


def decode(tensor: pb.Tensor, name: str = "tensor") -> np.ndarray:
    """Decode a proto Tensor into a read-only numpy view of its bytes.

    Raises TensorDecodeError naming ``name`` for an unknown dtype, a negative
    dimension or a byte length that does not match dtype x shape.
    """
    dtype = numpy_dtype(tensor.dtype, f"{name}.dtype")
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
    return arr.reshape(shape)


def encode_map(arrays: Mapping[str, np.ndarray], target) -> None:
    """Encode each array of ``arrays`` into the proto map field ``target``."""
    for key, value in arrays.items():
        encode(value, target[key])


def decode_map(tensors, field: str) -> dict[str, np.ndarray]:
    """Decode a proto ``map<string, Tensor>``; errors name ``field[key]``."""
    return {key: decode(t, f"{field}[{key!r}]") for key, t in tensors.items()}
