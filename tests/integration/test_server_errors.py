"""Bad input: INVALID_ARGUMENT naming the field, RESOURCE_EXHAUSTED for an
oversize message, and the scorer keeps answering a good client afterwards."""
from __future__ import annotations

import grpc
import numpy as np
import pytest

from jest_stream import codec
from jest_stream.outputs import Embeddings, Losses
from jest_stream.v1 import scorer_pb2 as pb
from support import OrtReference, aio_stub, expect_code, inputs_for, learner_for, select_request

MAX_MESSAGE = 1 << 20
B = 32
INVALID = grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture(scope="module")
def server(start_module_server, per_example_model, sigmoid_model):
    return start_module_server({"digits": per_example_model, "sigmoid": sigmoid_model},
                               "--max-message-bytes", str(MAX_MESSAGE))


@pytest.fixture(scope="module")
def good(digits, per_example_model):
    """A good per_example request and the core's answer to it."""
    idx = np.arange(200, 200 + B)
    inputs = inputs_for("per_example", digits, idx)
    learner = learner_for("per_example", B, seed=1)
    keys = [f"good/{i}" for i in idx]
    want = OrtReference(per_example_model).select(inputs, learner, 8, seed=3).indices.tolist()
    return {"inputs": inputs, "learner": learner, "keys": keys, "want": want}


def bad_select(good, **change) -> pb.SelectRequest:
    """The good request with one thing changed (keys/inputs/learner/n_select/model/...)."""
    args = dict(model="digits", learner=good["learner"], n_select=8, keys=good["keys"], inputs=good["inputs"],
                seed=3)
    args.update(change)
    model, learner, n_select = args.pop("model"), args.pop("learner"), args.pop("n_select")
    return select_request(model, learner, n_select, **args)


def with_inputs(good, **arrays) -> dict[str, np.ndarray]:
    return {**good["inputs"], **arrays}


def nan_at(values: np.ndarray, where, value=np.nan) -> np.ndarray:
    out = np.array(values, copy=True)
    out[where] = value
    return out


def corrupt(request: pb.SelectRequest, mutate) -> pb.SelectRequest:
    mutate(request)
    return request


def _truncate_losses(r: pb.SelectRequest) -> None:
    r.learner.losses.data = r.learner.losses.data[:-3]


def _bad_dtype_code(r: pb.SelectRequest) -> None:
    r.inputs["x"].dtype = 99


def _negative_dim(r: pb.SelectRequest) -> None:
    r.inputs["x"].shape[1] = -64


def _drop_learner(r: pb.SelectRequest) -> None:
    r.ClearField("learner")


def embeds(learner: Embeddings, **change) -> Embeddings:
    fields = dict(image=learner.image, text=learner.text, logit_scale=learner.logit_scale,
                  logit_bias=learner.logit_bias)
    fields.update(change)
    return Embeddings(**fields)


# (case id, function of `good` -> request, words the message must contain)
CASES = [
    ("inputs-dtype", lambda g: bad_select(g, inputs=with_inputs(g, x=g["inputs"]["x"].astype(np.float64))),
     ["inputs['x']", "dtype"]),
    ("inputs-shape", lambda g: bad_select(g, inputs=with_inputs(g, x=g["inputs"]["x"][:, :60].copy())),
     ["inputs['x']", "shape"]),
    ("inputs-rank", lambda g: bad_select(g, inputs=with_inputs(g, y=g["inputs"]["y"][:, None].copy())),
     ["inputs['y']", "shape"]),
    ("inputs-missing", lambda g: bad_select(g, inputs={"x": g["inputs"]["x"]}), ["inputs", "missing", "y"]),
    ("inputs-unknown", lambda g: bad_select(g, inputs=with_inputs(g, z=g["inputs"]["x"])),
     ["inputs", "unexpected", "z"]),
    ("inputs-nan", lambda g: bad_select(g, inputs=with_inputs(g, x=nan_at(g["inputs"]["x"], (3, 5)))),
     ["inputs['x']", "NaN"]),
    ("inputs-rows", lambda g: bad_select(g, inputs={k: v[:-1] for k, v in g["inputs"].items()}),
     ["inputs[", "rows"]),
    ("learner-nan", lambda g: bad_select(g, learner=Losses(nan_at(g["learner"].values, 4))),
     ["learner.losses", "NaN"]),
    ("learner-inf", lambda g: bad_select(g, learner=Losses(nan_at(g["learner"].values, 0, np.inf))),
     ["learner.losses", "inf"]),
    ("learner-shape", lambda g: bad_select(g, learner=Losses(np.stack([g["learner"].values] * 2, 1))),
     ["learner.losses", "shape"]),
    ("learner-missing", lambda g: corrupt(bad_select(g), _drop_learner), ["learner.losses"]),
    ("keys-vs-learner", lambda g: bad_select(g, keys=g["keys"][:-2]), ["keys", f"{B - 2} keys"]),
    ("inputs-vs-learner", lambda g: bad_select(g, learner=Losses(g["learner"].values[:-4]), keys=None),
     ["inputs[", "rows", f"B={B - 4}"]),
    ("n_select-too-big", lambda g: bad_select(g, n_select=B + 1), ["n_select", f"B={B}"]),
    ("n_select-zero", lambda g: bad_select(g, n_select=0), ["n_select"]),
    ("unknown-model", lambda g: bad_select(g, model="nope"), ["model", "'nope'", "digits"]),
    ("empty-model", lambda g: bad_select(g, model=""), ["model"]),
    ("empty-key", lambda g: bad_select(g, keys=["" if i == 5 else k for i, k in enumerate(g["keys"])]),
     ["keys[5]", "empty"]),
    ("duplicate-key", lambda g: bad_select(g, keys=[g["keys"][0] if i == 9 else k
                                                    for i, k in enumerate(g["keys"])]),
     ["keys[9]", "duplicate", "keys[0]"]),
    ("sampler", lambda g: bad_select(g, sampler="greedy"), ["sampler", "greedy"]),
    ("score", lambda g: bad_select(g, score="loss"), ["score", "loss"]),
    ("corrupt-bytes", lambda g: corrupt(bad_select(g), _truncate_losses), ["learner.losses.data", "bytes"]),
    ("corrupt-dtype", lambda g: corrupt(bad_select(g), _bad_dtype_code), ["inputs['x'].dtype"]),
    ("corrupt-shape", lambda g: corrupt(bad_select(g), _negative_dim), ["inputs['x'].shape"]),
]


@pytest.mark.parametrize("make,words", [pytest.param(m, w, id=i) for i, m, w in CASES])
async def test_bad_select_is_invalid_argument_naming_the_field(server, good, make, words):
    channel, stub = aio_stub(server.target)
    async with channel:
        err = await expect_code(stub.Select(make(good), timeout=30), INVALID)
        for word in words:
            assert word in err.details(), f"{word!r} not in {err.details()!r}"
        # the next good call is answered as usual
        reply = await stub.Select(bad_select(good), timeout=30)
        assert list(reply.indices) == good["want"]


def _contrastive_request(digits, learner, **kw) -> pb.SelectRequest:
    idx = np.arange(500, 500 + B)
    return select_request("sigmoid", learner, 8, inputs=inputs_for("sigmoid_contrastive", digits, idx), **kw)


@pytest.mark.parametrize("change,words", [
    pytest.param(lambda e: embeds(e, image=nan_at(e.image, (2, 3))), ["learner.image", "NaN"], id="image-nan"),
    pytest.param(lambda e: embeds(e, text=nan_at(e.text, (0, 0), -np.inf)), ["learner.text", "inf"],
                 id="text-inf"),
    pytest.param(lambda e: embeds(e, text=e.text[:, :8].copy()), ["learner", "width"], id="width"),
    pytest.param(lambda e: embeds(e, text=e.text[:-1]), ["learner", "rows"], id="rows"),
    pytest.param(lambda e: embeds(e, logit_scale=float("nan")), ["learner.logit_scale"], id="scale-nan"),
    pytest.param(lambda e: Losses(np.ones(B, np.float32)), ["learner", "image_embeds"], id="losses-for-contrastive"),
])
async def test_bad_embeddings_are_invalid_argument(server, digits, change, words):
    learner = change(learner_for("sigmoid_contrastive", B, seed=2))
    channel, stub = aio_stub(server.target)
    async with channel:
        err = await expect_code(stub.Select(_contrastive_request(digits, learner), timeout=30), INVALID)
        for word in words:
            assert word in err.details(), f"{word!r} not in {err.details()!r}"


async def test_bad_reference_requests(server, good):
    channel, stub = aio_stub(server.target)
    async with channel:
        err = await expect_code(stub.Reference(pb.ReferenceRequest(model="nope", keys=["a"]), timeout=30), INVALID)
        assert "model" in err.details()
        err = await expect_code(stub.Reference(pb.ReferenceRequest(model="digits"), timeout=30), INVALID)
        assert "inputs" in err.details()
        request = pb.ReferenceRequest(model="digits", keys=good["keys"][:-1])
        codec.encode_map(good["inputs"], request.inputs)
        err = await expect_code(stub.Reference(request, timeout=30), INVALID)
        assert "inputs[" in err.details() and "rows" in err.details()


async def test_oversize_message_is_resource_exhausted(server, good, digits):
    big = 2 * MAX_MESSAGE // (64 * 4)  # rows of x that make a request twice the limit
    idx = np.arange(big) % 1797
    inputs = inputs_for("per_example", digits, idx)
    learner = learner_for("per_example", big, seed=0)
    channel, stub = aio_stub(server.target)
    async with channel:
        err = await expect_code(stub.Select(select_request("digits", learner, 8, inputs=inputs), timeout=30),
                                grpc.StatusCode.RESOURCE_EXHAUSTED)
        assert "larger than max" in err.details() or "message" in err.details().lower()
        reply = await stub.Select(bad_select(good), timeout=30)
        assert list(reply.indices) == good["want"]
    assert server.proc.poll() is None
