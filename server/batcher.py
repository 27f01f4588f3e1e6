"""Dynamic batching of reference inference across concurrent requests, fair across jobs.

Requests queue per model and, within a model, per job. One worker task per model
forms a batch by taking requests from the jobs in round-robin order (one request per
job per turn) until ``max_batch`` rows, runs it in ONNX Runtime on a worker thread, and
hands each request its rows back. With more than one worker per model (CPU hosts, one
intra-op thread each), a worker takes only its share of the waiting requests while
other workers are idle, so that two requests run side by side on two cores instead of
one after the other in one batch. Fairness is by request: jobs that send super-batches
of the same size get the same examples/s, however many calls each keeps in flight.

Waiting for company costs latency, so the worker waits (at most ``max_delay``) only
while other calls are on their way to the queue (``arriving()`` > 0, as the servicer
counts them); a lone job never waits. While a batch runs, new requests queue up, so a
busy server batches without any delay at all.

The queue is bounded in rows: past ``max_queue_rows`` a request is refused at once
(Overloaded, with a retry hint from the recent batch times), never left to hang.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from .metrics import Metrics
from .models import ModelOutputError, ReferenceModel
from .names import shown

log = logging.getLogger(__name__)


class Overloaded(RuntimeError):
    """A bound is reached (the inference queue, the calls in flight): the request is
    refused with RESOURCE_EXHAUSTED and a hint to retry after ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: float):
        super().__init__(message)
        self.retry_after = retry_after


class ModelInputError(ValueError):
    """The reference model failed on one request's own inputs (e.g. labels out of range):
    that request gets INVALID_ARGUMENT, the requests batched with it are served."""


@dataclass
class _Pending:
    inputs: Mapping[str, np.ndarray]
    rows: int
    job: str
    future: asyncio.Future = field(repr=False)


class _ModelQueue:
    def __init__(self) -> None:
        self.jobs: OrderedDict[str, deque[_Pending]] = OrderedDict()
        self.rows = 0
        self.wakeup = asyncio.Event()


class Batcher:
    """Per-model inference queues, each drained by ``workers_per_model`` worker tasks."""

    def __init__(self, models: Mapping[str, ReferenceModel], metrics: Metrics, *, max_batch: int = 8192,
                 max_delay: float = 0.002, max_queue_rows: int = 262144,
                 arriving: Callable[[], int] | None = None, workers_per_model: int = 1):
        if workers_per_model < 1:
            raise ValueError(f"inference_workers: must be >= 1, got {workers_per_model}")
        if max_batch < 1:
            raise ValueError(f"max_batch: must be >= 1, got {max_batch}")
        if max_queue_rows < 1:
            raise ValueError(f"max_queue_rows: must be >= 1, got {max_queue_rows}")
        self.models = models
        self.metrics = metrics
        self.max_batch = max_batch
        self.max_delay = max_delay
        self.max_queue_rows = max_queue_rows
        self.arriving = arriving or (lambda: 1)
        self.queues = {name: _ModelQueue() for name in models}
        # more than one worker per model runs batches of one model concurrently (ONNX Runtime
        # sessions take concurrent runs): useful with few intra-op threads per session
        self.workers_per_model = workers_per_model
        self._pool = ThreadPoolExecutor(max_workers=max(1, len(models) * workers_per_model),
                                        thread_name_prefix="jest-infer")
        self._tasks: list[asyncio.Task] = []
        self._batch_s = {name: 0.01 for name in models}
        self._busy = {name: 0 for name in models}  # workers of each model running a batch

    def start(self) -> None:
        """Start the worker tasks of every model (call from the running event loop)."""
        self._tasks = [asyncio.create_task(self._worker(name), name=f"batcher-{name}-{i}")
                       for name in self.models for i in range(self.workers_per_model)]

    async def stop(self) -> None:
        """Stop the workers; requests still queued get CancelledError."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for q in self.queues.values():
            for waiting in q.jobs.values():
                for p in waiting:
                    p.future.cancel()
            q.jobs.clear()
        self._pool.shutdown(wait=False)

    async def infer(self, model: str, job_id: str, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Queue ``inputs`` (B rows) for ``model`` and wait for their outputs.

        Raises Overloaded at once if the model's queue holds ``max_queue_rows`` rows.
        """
        rows = int(next(iter(inputs.values())).shape[0])
        q = self.queues[model]
        if q.rows + rows > self.max_queue_rows and q.rows > 0:
            self.metrics.rejected.labels(model).inc()
            ahead = q.rows / self.max_batch + 1
            retry = max(0.01, self._batch_s[model] * ahead)
            raise Overloaded(f"queue: {q.rows} rows already wait for model {model!r} (bound --max-queue-rows "
                            f"{self.max_queue_rows}); retry in {retry:.2f}s", retry)
        pending = _Pending(inputs, rows, job_id, asyncio.get_running_loop().create_future())
        q.jobs.setdefault(job_id, deque()).append(pending)
        q.rows += rows
        self.metrics.queue_rows.labels(model).set(q.rows)
        q.wakeup.set()
        return await pending.future

    def _take_batch(self, q: _ModelQueue, idle_workers: int = 1) -> list[_Pending]:
        """Round-robin over jobs, one request each turn, until max_batch rows, and at most
        this worker's share of the waiting requests when ``idle_workers`` could share them."""
        batch: list[_Pending] = []
        rows = 0
        share = -(-sum(map(len, q.jobs.values())) // max(1, idle_workers))
        while q.jobs and len(batch) < share:
            job, waiting = next(iter(q.jobs.items()))
            item = waiting[0]
            if item.future.cancelled():  # its caller went away
                waiting.popleft()
                q.rows -= item.rows
                if not waiting:
                    del q.jobs[job]
                continue
            if batch and rows + item.rows > self.max_batch:
                break
            waiting.popleft()
            q.rows -= item.rows
            batch.append(item)
            rows += item.rows
            q.jobs.move_to_end(job)  # this job goes to the back of the line
            if not waiting:
                del q.jobs[job]
        return batch

    async def _gather(self, q: _ModelQueue) -> None:
        """Wait up to max_delay for more rows while other calls are on their way."""
        if self.max_delay <= 0:
            return
        deadline = time.monotonic() + self.max_delay
        while q.rows < self.max_batch and self.arriving() > 0:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            q.wakeup.clear()
            try:
                await asyncio.wait_for(q.wakeup.wait(), left)
            except asyncio.TimeoutError:
                return

    async def _worker(self, name: str) -> None:
        q = self.queues[name]
        model = self.models[name]
        loop = asyncio.get_running_loop()
        while True:
            if not q.jobs:
                q.wakeup.clear()
                await q.wakeup.wait()
                continue
            await self._gather(q)
            batch = self._take_batch(q, self.workers_per_model - self._busy[name])
            self.metrics.queue_rows.labels(name).set(q.rows)
            if not batch:
                continue
            if len(batch) == 1:
                inputs = dict(batch[0].inputs)
            else:
                inputs = {k: np.concatenate([p.inputs[k] for p in batch]) for k in batch[0].inputs}
            rows = sum(p.rows for p in batch)
            start = time.perf_counter()
            self._busy[name] += 1
            try:
                outputs = await loop.run_in_executor(self._pool, model.run, inputs)
            except ModelOutputError as exc:  # the model broke its contract: no answer from it is trusted
                log.error("model %s: %s", name, exc)
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(exc)
                continue
            except Exception as exc:  # keep serving: only the request(s) the model fails on fail
                await self._run_alone(name, model, batch, exc)
                continue
            finally:
                self._busy[name] -= 1
            elapsed = time.perf_counter() - start
            self._batch_s[name] = 0.8 * self._batch_s[name] + 0.2 * elapsed
            self.metrics.inference.labels(name).observe(elapsed)
            self.metrics.batch_rows.labels(name).observe(rows)
            log.debug("model %s: batch of %d rows from %d request(s) in %.1f ms", name, rows, len(batch),
                      elapsed * 1e3)
            offset = 0
            for p in batch:
                if not p.future.done():
                    p.future.set_result({k: v[offset:offset + p.rows] for k, v in outputs.items()})
                offset += p.rows

    async def _run_alone(self, name: str, model: ReferenceModel, batch: list[_Pending], exc: Exception) -> None:
        """A batch failed: run its requests one by one, so that a request whose own inputs the
        model cannot take fails alone (ModelInputError), never the requests batched with it."""
        loop = asyncio.get_running_loop()
        for p in batch:
            if p.future.done():
                continue
            error = exc
            if len(batch) > 1:
                try:
                    outputs = await loop.run_in_executor(self._pool, model.run, dict(p.inputs))
                except Exception as own:
                    error = own
                else:
                    if not p.future.done():
                        p.future.set_result(outputs)
                    continue
            log.warning("job=%s: model %s failed on the request's inputs: %s", shown(p.job), name,
                        shown(error, 300))
            if not p.future.done():
                p.future.set_exception(ModelInputError(
                    f"inputs: reference model {name!r} failed on these inputs (values outside what the "
                    f"model takes?): {type(error).__name__}: {error}"))
