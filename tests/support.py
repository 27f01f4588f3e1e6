"""What the tests share besides their pytest fixtures (those are in conftest.py): the keyed
digits dataset, the reference models' torch modules, Select requests built from digits, and
what the core says for the same super-batch with ONNX Runtime called directly (the reference
the served answers are compared with). Every test folder imports it as ``support``."""
from __future__ import annotations

import socket
from collections.abc import Mapping, Sequence

import grpc
import numpy as np

from jest_stream import codec
from jest_stream.outputs import Embeddings, Losses
from jest_stream.options import SelectOptions
from jest_stream.selection import select
from jest_stream.v1 import scorer_pb2 as pb
from jest_stream.v1 import scorer_pb2_grpc as pb_grpc

# -- real data: scikit-learn's digits, keyed ------------------------------------------------


def load_digits_arrays() -> dict[str, np.ndarray]:
    """The digits set as float32 features in [0, 1] (x: (1797, 64)) and int64 labels (y),
    as the demo and the benchmarks load them."""
    from jest_stream.demo.data import load_digits_scaled

    x, y = load_digits_scaled()
    return {"x": x, "y": y}


def digit_key(i: int) -> str:
    """The key of digit ``i`` (what a WebDataset shard would call it)."""
    return f"digit-{int(i):05d}"


class KeyedDigits:
    """The first ``n`` digits as a map-style torch dataset of {"x", "y", "__key__"} items
    (plus "row", the index, with ``row=True``); default_collate makes dict super-batches."""

    def __init__(self, digits: Mapping[str, np.ndarray], n: int | None = None, *, row: bool = False):
        import torch

        self.x = torch.from_numpy(np.ascontiguousarray(digits["x"][:n]))
        self.y = torch.from_numpy(np.ascontiguousarray(digits["y"][:n]))
        self.row = row

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict:
        item = {"x": self.x[i], "y": self.y[i], "__key__": digit_key(i)}
        if self.row:
            item["row"] = i
        return item


def text_view(x: np.ndarray, seed: int = 0) -> np.ndarray:
    """The 'text' of an image: a second, noisy view of the same digit."""
    rng = np.random.default_rng(seed)
    return np.clip(x + 0.1 * rng.standard_normal(x.shape), 0, 1).astype(np.float32)


# -- the reference models' torch modules (torch imported lazily) --------------------------


def mlp(inp: int, out: int, seed: int):
    """inp -> 32 -> out, seeded."""
    import torch

    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(inp, 32), torch.nn.ReLU(), torch.nn.Linear(32, out))


class TwoTower:
    """A small image/text two-tower model (built lazily so importing this imports no torch)."""

    @staticmethod
    def build(seed: int = 0, dim: int = 16):
        import torch

        class _TwoTower(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.image = mlp(64, dim, seed)
                self.text = mlp(64, dim, seed + 1)

            def forward(self, image, text):
                zi = torch.nn.functional.normalize(self.image(image), dim=-1)
                zt = torch.nn.functional.normalize(self.text(text), dim=-1)
                return zi, zt

        return _TwoTower()


# -- addresses ---------------------------------------------------------------------------

_HELD: list[socket.socket] = []


def refusing_port() -> int:
    """A loopback port that refuses connections while the tests run: bound by this process
    (so nobody else can listen on it) and never listened on."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    _HELD.append(sock)
    return sock.getsockname()[1]


# -- Select requests and their reference answers -------------------------------------------

KINDS = ("per_example", "sigmoid_contrastive", "softmax_contrastive")
SAMPLERS = ("joint", "topk", "uniform")
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 256 << 20),
                   ("grpc.max_send_message_length", 256 << 20)]
# Learner logit scale/bias exactly representable in the proto's float32 fields.
LEARNER_SCALE, LEARNER_BIAS = 8.0, -4.0


def aio_stub(target: str, credentials: grpc.ChannelCredentials | None = None,
             options: Sequence | None = None):
    """An aio channel and a Scorer stub on it (close the channel when done)."""
    opts = list(CHANNEL_OPTIONS if options is None else options)
    if credentials is None:
        channel = grpc.aio.insecure_channel(target, options=opts)
    else:
        channel = grpc.aio.secure_channel(target, credentials, options=opts)
    return channel, pb_grpc.ScorerStub(channel)


def inputs_for(kind: str, digits: Mapping[str, np.ndarray], idx: np.ndarray) -> dict[str, np.ndarray]:
    """The reference model inputs of the digits at ``idx`` (labels for per_example,
    a noisy second view as the 'text' for two-tower models)."""
    x = digits["x"][idx]
    if kind == "per_example":
        return {"x": x, "y": digits["y"][idx]}
    return {"image": x, "text": text_view(x, seed=int(idx[0]))}


def learner_for(kind: str, batch: int, seed: int) -> Losses | Embeddings:
    """Plausible learner scores of a super-batch (float32, as a trainer would send)."""
    rng = np.random.default_rng(seed)
    if kind == "per_example":
        return Losses(rng.gamma(2.0, 1.0, batch).astype(np.float32))
    zi = rng.standard_normal((batch, 16)).astype(np.float32)
    zt = (zi + 0.5 * rng.standard_normal((batch, 16))).astype(np.float32)
    zi /= np.linalg.norm(zi, axis=1, keepdims=True)
    zt /= np.linalg.norm(zt, axis=1, keepdims=True)
    return Embeddings(zi, zt, LEARNER_SCALE, LEARNER_BIAS)


def encode_learner(learner: Losses | Embeddings, out: pb.LearnerScores) -> None:
    if isinstance(learner, Losses):
        codec.encode(learner.values, out.losses)
    else:
        codec.encode(learner.image, out.image_embeds)
        codec.encode(learner.text, out.text_embeds)
        out.logit_scale = learner.logit_scale
        out.logit_bias = learner.logit_bias


def select_request(model: str, learner: Losses | Embeddings, n_select: int, *,
                   keys: Sequence[str] | None = None, inputs: Mapping[str, np.ndarray] | None = None,
                   sampler: str = "joint", score: str = "", seed: int | None = 0, job_id: str = "test",
                   n_chunks: int = 0, dataset: str = "") -> pb.SelectRequest:
    req = pb.SelectRequest(model=model, job_id=job_id, n_select=n_select, sampler=sampler, score=score,
                           n_chunks=n_chunks, dataset=dataset)
    if seed is not None:
        req.seed = seed
    if keys is not None:
        req.keys.extend(keys)
    if inputs:
        codec.encode_map(inputs, req.inputs)
    encode_learner(learner, req.learner)
    return req


class OrtReference:
    """A reference model run by onnxruntime directly (no server), with its contract."""

    def __init__(self, path: str):
        import onnxruntime as ort

        from jest_stream.contract import ModelContract

        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        self.session = ort.InferenceSession(path, sess_options=options, providers=["CPUExecutionProvider"])
        self.contract = ModelContract.from_metadata(
            self.session.get_modelmeta().custom_metadata_map,
            [i.name for i in self.session.get_inputs()], [o.name for o in self.session.get_outputs()])

    def outputs(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = list(self.contract.outputs)
        return dict(zip(names, self.session.run(names, dict(inputs))))

    def scores(self, inputs: Mapping[str, np.ndarray]) -> Losses | Embeddings:
        out = self.outputs(inputs)
        if self.contract.kind == "per_example":
            return Losses(out["loss"].reshape(-1))
        return Embeddings(out["image_embeds"], out["text_embeds"], self.contract.logit_scale,
                          self.contract.logit_bias)

    def select(self, inputs: Mapping[str, np.ndarray], learner: Losses | Embeddings, n_select: int, *,
               sampler: str = "joint", score: str = "learnability", seed: int | None = 0,
               n_chunks: int = 16):
        """What the core selects for this super-batch (jest_stream.select, called directly)."""
        return select(n_select, kind=self.contract.kind, learner=learner, reference=self.scores(inputs),
                      options=SelectOptions(score=score, sampler=sampler, n_chunks=n_chunks), seed=seed)


async def expect_code(call, code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    """Await ``call`` and return its error, which must carry ``code``."""
    try:
        reply = await call
    except grpc.aio.AioRpcError as exc:
        assert exc.code() == code, f"expected {code.name}, got {exc.code().name}: {exc.details()}"
        return exc
    raise AssertionError(f"expected {code.name}, got a reply: {reply}")
