"""The Scorer gRPC service: proto in, engine steps in worker threads, proto out.

Transport concerns only: checking what enters (names, and every request's sizes
against the limits before anything is decoded), decoding and encoding, bounding the
calls in flight, mapping errors to status codes. The work is the engine's, step by
step (plan, infer, finish), with the inference step going through the dynamic batcher
so that concurrent requests share ONNX Runtime batches and no thread waits while a
request is queued, and the selection step in the lane its cost calls for (scheduler.py).

"These keys are not cached" is FAILED_PRECONDITION with trailing metadata
``jest-not-cached: <count>``: a signal a client acts on (resend the inputs), never a
message to parse. Every error message is bounded (about 1 KiB).
"""
from __future__ import annotations

import asyncio
import logging
import os
from concurrent.futures import ThreadPoolExecutor

import grpc

from jest_stream import codec, wire
from jest_stream.v1 import scorer_pb2 as pb
from jest_stream.v1 import scorer_pb2_grpc as pb_grpc

from .batcher import Batcher, Overloaded
from .engine import NotCached, ScoringEngine, SelectPlan
from .limits import LimitExceeded, RequestLimits
from .metrics import Metrics
from .names import PRIVATE_PREFIX, check_name, namespace, shown
from .scheduler import SelectionLanes

log = logging.getLogger(__name__)

RETRY_KEYS = ("retry-after-ms", "grpc-retry-pushback-ms")
NOT_CACHED_KEY = "jest-not-cached"
MAX_MESSAGE = 1024  # characters of an error message
MAX_DATASETS_LISTED = 64


def bounded(message: str, limit: int = MAX_MESSAGE) -> str:
    """An error message cut to ``limit`` characters (gRPC carries it in a header)."""
    return message if len(message) <= limit else message[:limit - 20] + f"... ({len(message)} chars)"


class ScorerServicer(pb_grpc.ScorerServicer):
    """Select, Reference and ListModels over one ScoringEngine and its Batcher."""

    def __init__(self, metrics: Metrics, workers: int = 4, max_inflight: int = 256,
                 limits: RequestLimits = RequestLimits(), heavy_workers: int | None = None):
        self.engine: ScoringEngine | None = None
        self.batcher: Batcher | None = None
        self.metrics = metrics
        self.limits = limits
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="jest-rpc")
        # heavy selections: their own threads, one per job at a time, a core left for light work
        default_heavy = max(1, min(workers // 2, (os.cpu_count() or 2) - 1))
        self.lanes = SelectionLanes(self.pool, heavy_workers or default_heavy,
                                    heavy_work=limits.max_select_work // 64)
        self.max_inflight = max_inflight
        self.inflight = 0
        self.arriving = 0  # calls between admission and the batcher (they may bring rows)
        self.draining = False  # after SIGTERM: new calls get UNAVAILABLE (retry elsewhere)
        self._steps: set[asyncio.Task] = set()  # the work of the calls in flight
        self._cut = False  # the grace period ran out: cut calls get UNAVAILABLE

    async def cut_inflight(self) -> None:
        """Stop the work of every call still in flight, each answered UNAVAILABLE (retryable on
        another replica) rather than the transport's CANCELLED; called when the grace runs out."""
        self._cut = True
        for task in list(self._steps):
            task.cancel()
        while self._steps:
            await asyncio.sleep(0.01)

    def attach(self, engine: ScoringEngine, batcher: Batcher) -> None:
        """Start answering with this engine (until then calls get UNAVAILABLE)."""
        self.batcher = batcher
        self.engine = engine

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.lanes.close()

    async def _work(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    async def _call(self, context, steps, request):
        """Run ``steps(request)`` with admission control and the error -> status mapping."""
        if self.engine is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "models are still loading; retry shortly")
        if self.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "server: shutting down; retry on another replica")
        if self.inflight >= self.max_inflight:
            self.metrics.rejected.labels(getattr(request, "model", "") or "-").inc()
            await self._refuse(context, Overloaded(
                f"server: {self.inflight} calls in flight (bound --max-inflight {self.max_inflight}); "
                "retry in 0.10s", 0.1))
        self.inflight += 1
        self.metrics.inflight.set(self.inflight)
        step = asyncio.ensure_future(steps(request))
        self._steps.add(step)
        try:
            try:
                return await step
            finally:
                self._steps.discard(step)
        except asyncio.CancelledError:
            if not self._cut:
                raise
            await context.abort(grpc.StatusCode.UNAVAILABLE, "server: shut down before this call finished; "
                                "retry on another replica")
        except Overloaded as exc:
            await self._refuse(context, exc)
        except LimitExceeded as exc:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, bounded(str(exc)))
        except NotCached as exc:
            context.set_trailing_metadata(((NOT_CACHED_KEY, str(exc.count)),))
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, bounded(str(exc)))
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, bounded(str(exc)))
        except Exception as exc:  # a server fault: say so, keep serving
            log.exception("job=%s %s failed", shown(getattr(request, "job_id", "") or "-"), type(request).__name__)
            await context.abort(grpc.StatusCode.INTERNAL, bounded(f"server: {type(exc).__name__}: {exc}"))
        finally:
            self.inflight -= 1
            self.metrics.inflight.set(self.inflight)

    async def _refuse(self, context, exc: Overloaded) -> None:
        ms = str(max(1, int(exc.retry_after * 1000)))
        context.set_trailing_metadata(tuple((k, ms) for k in RETRY_KEYS))
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, bounded(str(exc)))

    def _count(self, model: str, job_id: str, hits: int, misses: int, examples: int, nonfinite: int = 0) -> None:
        self.metrics.cache_hits.labels(model).inc(hits)
        self.metrics.cache_misses.labels(model).inc(misses)
        if nonfinite:
            self.metrics.nonfinite.labels(model).inc(nonfinite)
        self.metrics.cache_bytes.set(self.engine.cache.bytes)
        self.metrics.cache_entries.set(len(self.engine.cache))
        if examples:
            self.metrics.examples.labels(self.metrics.job_label(job_id)).inc(examples)

    # -- Select ---------------------------------------------------------------------------

    def _checked(self, request) -> tuple:
        """Names and sizes of a request, checked before anything is decoded: (model, namespace)."""
        check_name(request.job_id, "job_id")
        check_name(request.dataset, "dataset")
        return self.engine.model(request.model), namespace(request.dataset, request.job_id)

    def _plan_select(self, request: pb.SelectRequest, dataset: str, work: int):
        engine = self.engine
        model = engine.model(request.model)  # looked up once: the plan carries it on
        plan = engine.plan_select(
            request.model, learner=wire.learner_from_proto(request.learner, model.spec),
            n_select=int(request.n_select), keys=list(request.keys) or None,
            inputs=codec.decode_map(request.inputs, "inputs") or None,
            options=wire.options_from_proto(request), seed=wire.seed_from_proto(request), dataset=dataset)
        if plan.run_inputs is None and work <= self.lanes.heavy_work:  # all cached, light: one hop
            return plan, self._finish_select(request, plan, None)
        return plan, None

    def _finish_select(self, request: pb.SelectRequest, plan: SelectPlan, fresh) -> pb.SelectResponse:
        scored = self.engine.finish_select(plan, fresh)
        selection = scored.selection
        self._count(request.model, request.job_id, selection.cache_hits, selection.cache_misses,
                    plan.learner.batch_size, scored.nonfinite)
        return wire.selection_to_proto(selection, scored.nonfinite)

    async def _planned(self, fn, *args):
        """Run a plan step, counted as 'arriving' so the batcher may wait for its rows."""
        self.arriving += 1
        try:
            return await self._work(fn, *args)
        finally:
            self.arriving -= 1

    async def _select(self, request: pb.SelectRequest) -> pb.SelectResponse:
        model, dataset = self._checked(request)
        work = self.limits.check_select(request, model.contract.kind)
        plan, response = await self._planned(self._plan_select, request, dataset, work)
        if response is not None:
            return response
        fresh = None
        if plan.run_inputs is not None:
            fresh = await self.batcher.infer(plan.model.name, request.job_id, plan.run_inputs)
        return await self.lanes.run(request.job_id, work, self._finish_select, request, plan, fresh)

    async def Select(self, request, context):
        return await self._call(context, self._select, request)

    # -- Reference ------------------------------------------------------------------------

    def _plan_reference(self, request: pb.ReferenceRequest, dataset: str):
        inputs = codec.decode_map(request.inputs, "inputs")
        return self.engine.plan_reference(request.model, list(request.keys) or None, inputs or None,
                                          dataset=dataset)

    def _finish_reference(self, request: pb.ReferenceRequest, plan, fresh) -> pb.ReferenceResponse:
        result = self.engine.complete_reference(plan, fresh)
        nonfinite = int(result.nonfinite.size)
        self._count(request.model, request.job_id, result.hits, result.misses, 0, nonfinite)
        response = pb.ReferenceResponse(cache_hits=result.hits, cache_misses=result.misses,
                                        model_version=result.version, nonfinite_reference=nonfinite)
        if request.return_outputs:
            codec.encode_map(result.outputs, response.outputs)
        return response

    async def _reference(self, request: pb.ReferenceRequest) -> pb.ReferenceResponse:
        _, dataset = self._checked(request)
        self.limits.check_reference(request)
        plan = await self._planned(self._plan_reference, request, dataset)
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
            info = response.models.add()
            wire.spec_to_proto(spec, info)
            info.cached_entries.update(self.dataset_entries(spec.version))
        return response

    def dataset_entries(self, version: str) -> dict[str, int]:
        """Cached entries of a model version by dataset: at most 64 named datasets (the
        largest; the rest summed as "_other"), private namespaces summed as "_private"."""
        named: dict[str, int] = {}
        private = 0
        for dataset, n in self.engine.cache.entries_by_dataset(version).items():
            if dataset.startswith(PRIVATE_PREFIX):
                private += n
            else:
                named[dataset] = n
        top = dict(sorted(named.items(), key=lambda kv: -kv[1])[:MAX_DATASETS_LISTED])
        other = sum(named.values()) - sum(top.values())
        out = {**top, **({"_private": private} if private else {}), **({"_other": other} if other else {})}
        return out
