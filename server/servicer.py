"""The Scorer gRPC service: proto in, engine steps in worker threads, proto out.

Transport concerns only: decoding and encoding, bounding the calls in flight, mapping
errors to status codes. The work is the engine's, step by step (plan, infer, finish),
with the inference step going through the dynamic batcher so that concurrent requests
share ONNX Runtime batches and no thread waits while a request is queued.
"""
from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor

import grpc

from jest_stream import codec, wire
from jest_stream.v1 import scorer_pb2 as pb
from jest_stream.v1 import scorer_pb2_grpc as pb_grpc

from .batcher import Batcher, Overloaded
from .engine import ScoringEngine, SelectPlan
from .metrics import Metrics

log = logging.getLogger(__name__)

RETRY_KEYS = ("retry-after-ms", "grpc-retry-pushback-ms")


class ScorerServicer(pb_grpc.ScorerServicer):
    """Select, Reference and ListModels over one ScoringEngine and its Batcher."""

    def __init__(self, metrics: Metrics, workers: int = 4, max_inflight: int = 256):
        self.engine: ScoringEngine | None = None
        self.batcher: Batcher | None = None
        self.metrics = metrics
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="jest-rpc")
        self.max_inflight = max_inflight
        self.inflight = 0
        self.arriving = 0  # calls between admission and the batcher (they may bring rows)

    def attach(self, engine: ScoringEngine, batcher: Batcher) -> None:
        """Start answering with this engine (until then calls get UNAVAILABLE)."""
        self.batcher = batcher
        self.engine = engine

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)

    async def _work(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    async def _call(self, context, steps, request):
        """Run ``steps(request)`` with admission control and the error -> status mapping."""
        if self.engine is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "models are still loading; retry shortly")
        if self.inflight >= self.max_inflight:
            self.metrics.rejected.labels(getattr(request, "model", "") or "-").inc()
            await self._refuse(context, Overloaded(
                f"server: {self.inflight} calls in flight (bound --max-inflight {self.max_inflight}); "
                "retry in 0.10s", 0.1))
        self.inflight += 1
        self.metrics.inflight.set(self.inflight)
        try:
            return await steps(request)
        except Overloaded as exc:
            await self._refuse(context, exc)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except Exception as exc:  # a server fault: say so, keep serving
            log.exception("job=%s %s failed", getattr(request, "job_id", "") or "-", type(request).__name__)
            await context.abort(grpc.StatusCode.INTERNAL, f"server: {type(exc).__name__}: {exc}")
        finally:
            self.inflight -= 1
            self.metrics.inflight.set(self.inflight)

    async def _refuse(self, context, exc: Overloaded) -> None:
        ms = str(max(1, int(exc.retry_after * 1000)))
        context.set_trailing_metadata(tuple((k, ms) for k in RETRY_KEYS))
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))

    def _count(self, model: str, job_id: str, hits: int, misses: int, examples: int) -> None:
        self.metrics.cache_hits.labels(model).inc(hits)
        self.metrics.cache_misses.labels(model).inc(misses)
        self.metrics.cache_bytes.set(self.engine.cache.bytes)
        self.metrics.cache_entries.set(len(self.engine.cache))
        if examples:
            self.metrics.examples.labels(self.metrics.job_label(job_id)).inc(examples)

    # -- Select ---------------------------------------------------------------------------

    def _plan_select(self, request: pb.SelectRequest):
        engine = self.engine
        model = engine.model(request.model)  # looked up once: the plan carries it on
        plan = engine.plan_select(
            request.model, learner=wire.learner_from_proto(request.learner, model.spec),
            n_select=int(request.n_select), keys=list(request.keys) or None,
            inputs=codec.decode_map(request.inputs, "inputs") or None,
            options=wire.options_from_proto(request), seed=wire.seed_from_proto(request))
        if plan.run_inputs is None:  # everything cached: finish in the same hop
            return plan, self._finish_select(request, plan, None)
        return plan, None

    def _finish_select(self, request: pb.SelectRequest, plan: SelectPlan, fresh) -> pb.SelectResponse:
        selection = self.engine.finish_select(plan, fresh)
        self._count(request.model, request.job_id, selection.cache_hits, selection.cache_misses,
                    plan.learner.batch_size)
        return wire.selection_to_proto(selection)

    async def _planned(self, fn, request):
        """Run a plan step, counted as 'arriving' so the batcher may wait for its rows."""
        self.arriving += 1
        try:
            return await self._work(fn, request)
        finally:
            self.arriving -= 1

    async def _select(self, request: pb.SelectRequest) -> pb.SelectResponse:
        plan, response = await self._planned(self._plan_select, request)
        if response is not None:
            return response
        fresh = await self.batcher.infer(plan.model.name, request.job_id, plan.run_inputs)
        return await self._work(self._finish_select, request, plan, fresh)

    async def Select(self, request, context):
        return await self._call(context, self._select, request)

    # -- Reference ------------------------------------------------------------------------

    def _plan_reference(self, request: pb.ReferenceRequest):
        inputs = codec.decode_map(request.inputs, "inputs")
        return self.engine.plan_reference(request.model, list(request.keys) or None, inputs or None)

    def _finish_reference(self, request: pb.ReferenceRequest, plan, fresh) -> pb.ReferenceResponse:
        result = self.engine.complete_reference(plan, fresh)
        self._count(request.model, request.job_id, result.hits, result.misses, 0)
        response = pb.ReferenceResponse(cache_hits=result.hits, cache_misses=result.misses,
                                        model_version=result.version)
        if request.return_outputs:
            codec.encode_map(result.outputs, response.outputs)
        return response

    async def _reference(self, request: pb.ReferenceRequest) -> pb.ReferenceResponse:
        plan = await self._planned(self._plan_reference, request)
        fresh = None
        if plan.run_inputs is not None:
            fresh = await self.batcher.infer(plan.model.name, request.job_id, plan.run_inputs)
        return await self._work(self._finish_reference, request, plan, fresh)

    async def Reference(self, request, context):
        return await self._call(context, self._reference, request)

    # -- ListModels -----------------------------------------------------------------------

    async def ListModels(self, request, context):
        if self.engine is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "models are still loading; retry shortly")
        response = pb.ListModelsResponse()
        for spec in self.engine.list_models():
            wire.spec_to_proto(spec, response.models.add())
        return response
