"""The wire codec and the committed stubs."""
from __future__ import annotations

import pathlib
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from jest_stream import codec
from jest_stream.v1 import scorer_pb2 as pb

ROOT = pathlib.Path(__file__).resolve().parents[2]
DTYPES = [np.float16, np.float32, np.float64, np.int32, np.int64, np.uint8, np.bool_]


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(DTYPES).flatmap(
    lambda dt: hnp.arrays(dt, hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=6))))
def test_round_trip_every_dtype_and_shape(array):
    decoded = codec.decode(pb.Tensor.FromString(codec.encode(array).SerializeToString()))
    assert decoded.dtype == array.dtype and decoded.shape == array.shape
    np.testing.assert_array_equal(decoded, array)


@settings(max_examples=50, deadline=None)
@given(hnp.arrays(np.float32, hnp.array_shapes(min_dims=1, max_dims=3), elements=st.floats(-1e6, 1e6, width=32)))
def test_non_contiguous_and_big_endian_input_travels(array):
    for variant in (array[::-1], array.astype(">f4")):
        np.testing.assert_array_equal(codec.decode(codec.encode(variant)), variant)


def test_decode_does_not_copy_the_payload():
    tensor = codec.encode(np.arange(1000, dtype=np.float32))
    decoded = codec.decode(tensor)
    assert not decoded.flags.owndata and not decoded.flags.writeable


def test_corrupt_size_names_the_field():
    tensor = codec.encode(np.zeros((4, 3), np.float32))
    tensor.data = tensor.data[:-1]
    with pytest.raises(codec.TensorDecodeError, match=r"inputs\['x'\].data: 47 bytes.*needs 48"):
        codec.decode(tensor, "inputs['x']")


def test_unknown_dtype_and_negative_shape_are_rejected():
    with pytest.raises(codec.TensorDecodeError, match="learner.losses.dtype: unknown dtype code 42"):
        codec.decode(pb.Tensor(dtype=42, shape=[1], data=b"\0"), "learner.losses")
    with pytest.raises(codec.TensorDecodeError, match="shape: dimensions must be >= 0"):
        codec.decode(pb.Tensor(dtype=pb.DT_UINT8, shape=[-1], data=b""))


def test_unsupported_numpy_dtype_is_rejected():
    with pytest.raises(ValueError, match="dtype complex64 cannot travel"):
        codec.encode(np.zeros(3, np.complex64))


def test_maps_round_trip():
    req = pb.SelectRequest()
    codec.encode_map({"x": np.ones((2, 3), np.float32), "y": np.array([1, 2])}, req.inputs)
    back = codec.decode_map(pb.SelectRequest.FromString(req.SerializeToString()).inputs, "inputs")
    assert set(back) == {"x", "y"} and back["y"].tolist() == [1, 2]


def _stub_contents(folder) -> tuple[bytes, set[str], set[str]]:
    """What a generator version does not change: the serialized file descriptor, the
    RPC paths of the gRPC stub and the names the .pyi declares."""
    import ast
    import re

    pb2 = (folder / "scorer_pb2.py").read_text()
    descriptor = ast.literal_eval(re.search(r"AddSerializedFile\((b'.*?')\)", pb2).group(1))
    paths = set(re.findall(r"'(/jest_stream\.v1\.\w+/\w+)'", (folder / "scorer_pb2_grpc.py").read_text()))
    names = set(re.findall(r"^\s*(?:class (\w+)|(\w+): )", (folder / "scorer_pb2.pyi").read_text(), re.M))
    return descriptor, paths, {a or b for a, b in names}


def test_committed_stubs_match_the_proto(tmp_path):
    sys.path.insert(0, str(ROOT / "protos"))
    try:
        import generate
    finally:
        sys.path.pop(0)
    generate.generate(tmp_path)
    fresh = _stub_contents(tmp_path / "jest_stream" / "v1")
    committed = _stub_contents(ROOT / "jest_stream" / "v1")
    assert fresh[0] == committed[0], "jest_stream/v1/scorer_pb2.py is stale: run python protos/generate.py"
    assert fresh[1] == committed[1] and fresh[1], "jest_stream/v1/scorer_pb2_grpc.py is stale"
    assert fresh[2] == committed[2] and fresh[2], "jest_stream/v1/scorer_pb2.pyi is stale"


def test_committed_stubs_run_on_old_protobuf():
    """Generated with grpcio-tools 1.62 (protobuf 4.25 gencode): no runtime version check
    ties them to a newer protobuf, so tritonclient's protobuf < 7 can sit beside them."""
    text = (ROOT / "jest_stream" / "v1" / "scorer_pb2.py").read_text()
    assert "# Protobuf Python Version: 4.25.1" in text and "ValidateProtobufRuntimeVersion" not in text
    assert "GRPC_GENERATED_VERSION" not in (ROOT / "jest_stream" / "v1" / "scorer_pb2_grpc.py").read_text()
