"""The Scorer gRPC service: proto in, engine call in a worker thread, proto out.

Transport concerns only: decoding and encoding, mapping errors to status codes. The
work is the engine's; reference inference goes through the dynamic batcher.
"""
from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor

import grpc

from jest_stream import codec
from jest_stream.scores import Embeddings, Losses
from jest_stream.v1 import scorer_pb2 as pb
from jest_stream.v1 import scorer_pb2_grpc as pb_grpc

from .batcher import Batcher, QueueFull
from .engine import ScoringEngine
from .metrics import Metrics

log = logging.getLogger(__name__)


def learner_from_proto(msg: pb.LearnerScores, kind: str, model: str):
    """The learner's scores as the core wants them; errors name the proto field."""
    if kind == "per_example":
        if not msg.HasField("losses"):
            raise ValueError(f"learner.losses: required for per_example model {model!r} (one loss per example)")
        return Losses(codec.decode(msg.losses, "learner.losses"))
    for name in ("image_embeds", "text_embeds"):
        if not msg.HasField(name):
            raise ValueError(f"learner.{name}: required for {kind} model {model!r} ((B, d) embeddings)")
    return Embeddings(codec.decode(msg.image_embeds, "learner.image_embeds"),
                      codec.decode(msg.text_embeds, "learner.text_embeds"),
                      msg.logit_scale, msg.logit_bias)


class ScorerServicer(pb_grpc.ScorerServicer):
    """Select, Reference and ListModels over one ScoringEngine."""

    def __init__(self, metrics: Metrics, workers: int = 16):
        self.engine: ScoringEngine | None = None
        self.batcher: Batcher | None = None
        self.metrics = metrics
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="jest-rpc")
        self.loop: asyncio.AbstractEventLoop | None = None

    def attach(self, engine: ScoringEngine, batcher: Batcher) -> None:
        """Start answering with this engine (until then calls get UNAVAILABLE)."""
        engine.infer = self._infer_via_batcher
        self.batcher = batcher
        self.engine = engine

    def _infer_via_batcher(self, model, job_id, inputs):
        future = asyncio.run_coroutine_threadsafe(self.batcher.infer(model.name, job_id, inputs), self.loop)
        return future.result()

    async def _call(self, context, fn, *args):
        self.loop = asyncio.get_running_loop()
        if self.engine is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "models are still loading; retry shortly")
        try:
            return await self.loop.run_in_executor(self.pool, fn, *args)
        except QueueFull as exc:
            await context.send_initial_metadata((("retry-after-ms", str(int(exc.retry_after * 1000))),))
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))

    def _count_cache(self, model: str, hits: int, misses: int) -> None:
        self.metrics.cache_hits.labels(model).inc(hits)
        self.metrics.cache_misses.labels(model).inc(misses)
        self.metrics.cache_bytes.set(self.engine.cache.bytes)
        self.metrics.cache_entries.set(len(self.engine.cache))

    def _select(self, request: pb.SelectRequest) -> pb.SelectResponse:
        model = self.engine.model(request.model)
        learner = learner_from_proto(request.learner, model.contract.kind, request.model)
        inputs = codec.decode_map(request.inputs, "inputs")
        if request.n_select == 0:
            raise ValueError("n_select: must be between 1 and the super-batch size B, got 0")
        result = self.engine.select(
            request.model, learner=learner, n_select=int(request.n_select), keys=list(request.keys) or None,
            inputs=inputs or None, score=request.score or "learnability", sampler=request.sampler or "joint",
            n_chunks=int(request.n_chunks) or 16, score_gain=float(request.score_gain) or 1.0,
            seed=int(request.seed) if request.HasField("seed") else None, job_id=request.job_id)
        self._count_cache(request.model, result.hits, result.misses)
        self.metrics.examples.labels(request.job_id).inc(learner.batch_size)
        sel = result.selection
        return pb.SelectResponse(indices=sel.indices.tolist(), mean_score=sel.mean_score,
                                 mean_score_all=sel.mean_score_all, cache_hits=result.hits,
                                 cache_misses=result.misses, model_version=result.version)

    def _reference(self, request: pb.ReferenceRequest) -> pb.ReferenceResponse:
        inputs = codec.decode_map(request.inputs, "inputs")
        result = self.engine.reference(request.model, list(request.keys) or None, inputs or None, request.job_id)
        self._count_cache(request.model, result.hits, result.misses)
        response = pb.ReferenceResponse(cache_hits=result.hits, cache_misses=result.misses,
                                        model_version=result.version)
        if request.return_outputs:
            codec.encode_map(result.outputs, response.outputs)
        return response

    async def Select(self, request, context):
        return await self._call(context, self._select, request)

    async def Reference(self, request, context):
        return await self._call(context, self._reference, request)

    async def ListModels(self, request, context):
        if self.engine is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "models are still loading; retry shortly")
        response = pb.ListModelsResponse()
        for info in self.engine.list_models():
            m = response.models.add(name=info.name, kind=info.kind, version=info.version,
                                    logit_scale=info.logit_scale, logit_bias=info.logit_bias)
            for specs, target in ((info.inputs, m.inputs), (info.outputs, m.outputs)):
                for name, (dtype, shape) in specs.items():
                    target.add(name=name, dtype=codec.dtype_code(dtype, name), shape=shape)
        return response
