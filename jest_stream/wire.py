"""Every proto <-> domain conversion, both directions, in one place beside the codec.

The servicer decodes requests with the ``*_from_proto`` functions (their errors name
the proto field, so a bad request becomes INVALID_ARGUMENT with a useful message);
RemoteScorer encodes with ``*_to_proto`` and decodes the replies. Tensors travel as
raw bytes through ``jest_stream.codec``.
"""
from __future__ import annotations

import math

import numpy as np

from jest_stream import codec
from jest_stream.contract import ModelSpec, TensorSpec
from jest_stream.options import SelectOptions
from jest_stream.outputs import Embeddings, Losses
from jest_stream.selection import Selection
from jest_stream.v1 import scorer_pb2 as pb

_FLOAT16_MAX = float(np.finfo(np.float16).max)

# -- learner scores ---------------------------------------------------------------------


def learner_to_proto(learner: Losses | Embeddings, out: pb.LearnerScores,
                     embeddings_dtype: str = "float32") -> None:
    """Fill a LearnerScores message from Losses or Embeddings: losses as float32,
    embeddings as ``embeddings_dtype`` (float32, float16 or bfloat16). float16 keeps
    float32 for a batch whose values float16 cannot hold (beyond +-65504)."""
    if isinstance(learner, Losses):
        codec.encode(np.asarray(learner.values, dtype=np.float32), out.losses)
    else:
        for z, target in ((learner.image, out.image_embeds), (learner.text, out.text_embeds)):
            z = np.asarray(z)
            wire = embeddings_dtype
            if wire == "float16" and float(np.abs(z).max(initial=0.0)) > _FLOAT16_MAX:
                wire = "float32"
            codec.encode(z, target, wire_dtype=wire)
        out.logit_scale = float(learner.logit_scale)
        out.logit_bias = float(learner.logit_bias)


def learner_from_proto(msg: pb.LearnerScores, model: ModelSpec) -> Losses | Embeddings:
    """The learner's scores as the core wants them for ``model``'s kind; errors name the field."""
    if model.kind == "per_example":
        if not msg.HasField("losses"):
            raise ValueError(f"learner.losses: required for per_example model {model.name!r} "
                             "(one loss per example)")
        return Losses(codec.decode(msg.losses, "learner.losses"))
    for name in ("image_embeds", "text_embeds"):
        if not msg.HasField(name):
            raise ValueError(f"learner.{name}: required for {model.kind} model {model.name!r} "
                             "((B, d) embeddings)")
    return Embeddings(codec.decode(msg.image_embeds, "learner.image_embeds"),
                      codec.decode(msg.text_embeds, "learner.text_embeds"),
                      msg.logit_scale, msg.logit_bias)


# -- selection options and results -----------------------------------------------------


def options_to_proto(options: SelectOptions, request: pb.SelectRequest) -> None:
    """Write the selection rule into a SelectRequest."""
    request.score = options.score
    request.sampler = options.sampler
    request.n_chunks = options.n_chunks
    request.score_gain = 0.0 if options.score_gain is None else options.score_gain  # 0: the kind's default
    request.softmax_score = options.softmax_score
    request.lookahead = options.lookahead


def options_from_proto(request: pb.SelectRequest) -> SelectOptions:
    """The request's selection rule, unset fields taking SelectOptions' defaults (validated)."""
    return SelectOptions.from_fields(score=request.score, sampler=request.sampler,
                                     n_chunks=int(request.n_chunks), score_gain=float(request.score_gain),
                                     softmax_score=request.softmax_score, lookahead=request.lookahead)


def seed_from_proto(request: pb.SelectRequest) -> int | None:
    return int(request.seed) if request.HasField("seed") else None


DIAGNOSTICS = ("mean_learner_loss", "mean_reference_loss", "reference_above_learner")


def selection_to_proto(selection: Selection, nonfinite_reference: int = 0) -> pb.SelectResponse:
    """A Selection as a SelectResponse; NaN diagnostics are left unset; ``nonfinite_reference``
    counts the examples left out for non-finite reference outputs."""
    reply = pb.SelectResponse(indices=selection.indices.tolist(), mean_score=selection.mean_score,
                              mean_score_all=selection.mean_score_all, cache_hits=selection.cache_hits,
                              cache_misses=selection.cache_misses, model_version=selection.model_version,
                              nonfinite_reference=nonfinite_reference)
    for name in DIAGNOSTICS:
        value = getattr(selection, name)
        if math.isfinite(value):
            setattr(reply, name, value)
    return reply


def selection_from_proto(reply: pb.SelectResponse) -> Selection:
    """A SelectResponse as a Selection; unset diagnostics are NaN."""
    indices = np.fromiter(reply.indices, dtype=np.int64, count=len(reply.indices))
    diagnostics = {name: getattr(reply, name) if reply.HasField(name) else math.nan for name in DIAGNOSTICS}
    return Selection(indices, reply.mean_score, reply.mean_score_all, reply.cache_hits,
                     reply.cache_misses, reply.model_version, **diagnostics)


# -- model specs --------------------------------------------------------------------------


def spec_to_proto(spec: ModelSpec, out: pb.ModelInfo) -> None:
    """Fill a ListModels entry from a ModelSpec."""
    out.name, out.kind, out.version = spec.name, spec.kind, spec.version
    out.logit_scale, out.logit_bias = spec.logit_scale, spec.logit_bias
    for specs, target in ((spec.inputs, out.inputs), (spec.outputs, out.outputs)):
        for t in specs:
            target.add(name=t.name, dtype=codec.dtype_code(t.dtype, t.name), shape=list(t.shape))


def spec_from_proto(info: pb.ModelInfo) -> ModelSpec:
    """A ListModels entry as a ModelSpec."""
    def tensors(specs) -> tuple[TensorSpec, ...]:
        return tuple(TensorSpec(t.name, codec.numpy_dtype(t.dtype, f"models[{info.name!r}].{t.name}"),
                                tuple(int(n) for n in t.shape)) for t in specs)

    return ModelSpec(info.name, info.kind, tensors(info.inputs), tensors(info.outputs), info.version,
                     float(info.logit_scale) or 1.0, float(info.logit_bias))
