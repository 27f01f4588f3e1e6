"""Half the bytes on the wire: float16 and bfloat16 tensors round-trip through the codec,
RemoteScorer sends contrastive embeddings as float16 by default, and a float16-wire
Select on a real server picks exactly what the engine picks from the same rounded
embeddings."""
from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch

from jest_stream import RemoteScorer, codec
from jest_stream.client.scorer import SelectCall
from jest_stream.outputs import Embeddings
from jest_stream.options import SelectOptions
from jest_stream.server.engine import ScoringEngine
from jest_stream.v1 import scorer_pb2 as pb

from support import text_view

BF16 = np.dtype(ml_dtypes.bfloat16)


def _wire(tensor: pb.Tensor) -> pb.Tensor:
    return pb.Tensor.FromString(tensor.SerializeToString())


def test_bfloat16_tensors_round_trip():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.standard_normal(500) * 10.0 ** rng.integers(-30, 30, 500),
                             [0.0, -0.0, np.inf, -np.inf, 3.0e38]]).astype(BF16).reshape(5, 101)
    tensor = _wire(codec.encode(values))
    assert tensor.dtype == pb.DT_BFLOAT16 and len(tensor.data) == values.size * 2
    decoded = codec.decode(tensor)
    assert decoded.dtype == np.float32 and decoded.shape == values.shape
    np.testing.assert_array_equal(decoded, values.astype(np.float32))
    # A torch bfloat16 tensor travels through its bits (no float32 on the wire).
    t = torch.from_numpy(values.astype(np.float32)).to(torch.bfloat16)
    bits = t.view(torch.int16).numpy().view(BF16)
    np.testing.assert_array_equal(codec.decode(_wire(codec.encode(bits))), t.float().numpy())


def test_float32_narrowed_to_bfloat16_rounds_like_ml_dtypes():
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.standard_normal(10_000).astype(np.float32),
                        np.array([np.nan, np.inf, -np.inf, 3.4e38, 1e-40], np.float32)])
    tensor = _wire(codec.encode(x, wire_dtype="bfloat16"))
    assert tensor.dtype == pb.DT_BFLOAT16
    np.testing.assert_array_equal(codec.bfloat16_bits(x)[:-5], x[:-5].astype(BF16).view(np.uint16))
    np.testing.assert_array_equal(codec.decode(tensor), x.astype(BF16).astype(np.float32))


def test_float16_tensors_round_trip():
    t = torch.randn(64, 8).to(torch.float16)
    decoded = codec.decode(_wire(codec.encode(t.numpy())))
    assert decoded.dtype == np.float16
    np.testing.assert_array_equal(decoded, t.numpy())
    narrowed = codec.decode(_wire(codec.encode(t.float().numpy(), wire_dtype="float16")))
    np.testing.assert_array_equal(narrowed, t.numpy())


def test_bad_wire_dtype_names_the_option():
    with pytest.raises(ValueError, match="embeddings_dtype: unknown value 'int8'"):
        RemoteScorer("127.0.0.1:1", embeddings_dtype="int8")
    with pytest.raises(ValueError, match="wire_dtype"):
        codec.encode(np.zeros(3, np.float32), wire_dtype="float8")


def _embeddings(digits, model: ScoringEngine, n: int, seed: int) -> tuple[Embeddings, dict]:
    """Learner embeddings near the reference's own (a perturbed copy), and the inputs."""
    rng = np.random.default_rng(seed)
    rows = rng.choice(len(digits["x"]), size=n, replace=False)
    inputs = {"image": digits["x"][rows], "text": text_view(digits["x"][rows], seed)}
    ref = model.reference("sig", None, inputs).outputs
    zi = ref["image_embeds"] + 0.05 * rng.standard_normal(ref["image_embeds"].shape).astype(np.float32)
    zt = ref["text_embeds"] + 0.05 * rng.standard_normal(ref["text_embeds"].shape).astype(np.float32)
    return Embeddings(zi, zt, 8.0, -4.0), inputs


def test_float16_wire_halves_the_learner_bytes(sigmoid_model, digits):
    engine = ScoringEngine({"sig": sigmoid_model}, intra_op_threads=1)
    learner, _ = _embeddings(digits, engine, 256, 0)
    call = SelectCall("sig", "job", learner, 64)
    sizes = {dt: RemoteScorer("127.0.0.1:1", embeddings_dtype=dt).select_request(call).learner.ByteSize()
             for dt in codec.WIRE_FLOATS}
    assert sizes["float16"] <= 0.51 * sizes["float32"] and sizes["bfloat16"] == sizes["float16"]
    # Values float16 cannot hold travel as float32, not as inf.
    big = Embeddings(learner.image * 1e5, learner.text, 1.0, 0.0)
    request = RemoteScorer("127.0.0.1:1").select_request(SelectCall("sig", "job", big, 64))
    assert request.learner.image_embeds.dtype == pb.DT_FLOAT32
    assert request.learner.text_embeds.dtype == pb.DT_FLOAT16


@pytest.mark.parametrize("wire_dtype", ["float16", "bfloat16", "float32"])
def test_half_wire_select_end_to_end(start_module_server, sigmoid_model, digits, wire_dtype):
    """The served Select on narrowed embeddings equals the engine's on the same rounding."""
    server = start_module_server({"sig": sigmoid_model})
    engine = ScoringEngine({"sig": sigmoid_model}, intra_op_threads=1)
    options = SelectOptions(sampler="joint", n_chunks=4, score_gain=3.0)
    with RemoteScorer(server.target, embeddings_dtype=wire_dtype) as remote:
        for seed in range(3):
            learner, inputs = _embeddings(digits, engine, 256, seed)
            call = SelectCall("sig", "half", learner, 64, keys=[f"k{seed}-{i}" for i in range(256)],
                              inputs=lambda inputs=inputs: inputs, options=options, seed=seed)
            served = remote.select(call)
            rounded = Embeddings(*(codec.decode(codec.encode(z, wire_dtype=wire_dtype)).astype(np.float32)
                                   for z in (learner.image, learner.text)), 8.0, -4.0)
            local = engine.select("sig", learner=rounded, n_select=64, inputs=inputs, options=options,
                                  seed=seed)
            np.testing.assert_array_equal(served.indices, local.indices)
            assert served.model_version == engine.models["sig"].version


def test_wire_bench_reports_bytes_and_overlaps(capsys):
    import json

    from jest_stream.cli import main

    assert main(["bench", "wire", "--batch", "256", "--dim", "16", "--seeds", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["b"] == 51 and result["bytes"]["float16"] == result["bytes"]["bfloat16"] < result["bytes"]["float32"]
    assert set(result["overlap"]) == {"sigmoid_contrastive", "softmax_contrastive"}
    for by_wire in result["overlap"].values():
        assert set(by_wire) == {"float16", "bfloat16"}
        assert all(0.0 <= o["topk"] <= 1.0 and o["joint_min"] <= o["joint_mean"] for o in by_wire.values())
