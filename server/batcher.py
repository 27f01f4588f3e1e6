"""Dynamic batching of reference inference across concurrent requests, fair across jobs.

Requests queue per model and per job. A batch is formed by taking requests from the
jobs in round-robin order until ``max_batch`` rows (or the queue is empty), after
waiting at most ``max_delay`` for company. The queue is bounded in rows: past the bound
a request is refused at once (QueueFull), never left to hang.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from .metrics import Metrics
from .models import ReferenceModel

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """The inference queue is at its bound; retry after ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: float):
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class _Pending:
    inputs: Mapping[str, np.ndarray]
    rows: int
    future: asyncio.Future = field(repr=False)


class _ModelQueue:
    def __init__(self) -> None:
        self.jobs: OrderedDict[str, deque[_Pending]] = OrderedDict()
        self.rows = 0
        self.wakeup = asyncio.Event()


class Batcher:
    """Per-model inference queues drained by one worker task each."""

    def __init__(self, models: Mapping[str, ReferenceModel], metrics: Metrics, *, max_batch: int = 8192,
                 max_delay: float = 0.002, max_queue_rows: int = 262144):
        self.models = models
        self.metrics = metrics
        self.max_batch = max_batch
        self.max_delay = max_delay
        self.max_queue_rows = max_queue_rows
        self.queues = {name: _ModelQueue() for name in models}
        self._pool = ThreadPoolExecutor(max_workers=max(1, len(models)), thread_name_prefix="jest-infer")
        self._tasks: list[asyncio.Task] = []
        self._recent_batch_s = 0.01

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._worker(name)) for name in self.models]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._pool.shutdown(wait=False)

    async def infer(self, model: str, job_id: str, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Queue ``inputs`` (B rows) for ``model`` and wait for their outputs."""
        rows = next(iter(inputs.values())).shape[0]
        q = self.queues[model]
        if q.rows + rows > self.max_queue_rows and q.rows > 0:
            self.metrics.rejected.labels(model).inc()
            retry = max(0.01, self._recent_batch_s * (q.rows / max(1, self.max_batch) + 1))
            raise QueueFull(f"queue: {q.rows} rows already wait for model {model!r} (bound "
                            f"{self.max_queue_rows}); retry in {retry:.2f}s", retry)
        pending = _Pending(inputs, rows, asyncio.get_running_loop().create_future())
        q.jobs.setdefault(job_id, deque()).append(pending)
        q.rows += rows
        self.metrics.queue_rows.labels(model).set(q.rows)
        q.wakeup.set()
        return await pending.future

    def _take_batch(self, q: _ModelQueue) -> list[_Pending]:
        """Round-robin over jobs, one request each turn, until max_batch rows."""
        batch: list[_Pending] = []
        rows = 0
        while q.jobs and (not batch or rows < self.max_batch):
            job, waiting = next(iter(q.jobs.items()))
            if batch and rows + waiting[0].rows > self.max_batch:
                break
            item = waiting.popleft()
            batch.append(item)
            rows += item.rows
            q.jobs.move_to_end(job)  # this job goes to the back of the line
            if not waiting:
                del q.jobs[job]
        q.rows -= rows
        return batch

    async def _worker(self, name: str) -> None:
        q = self.queues[name]
        model = self.models[name]
        loop = asyncio.get_running_loop()
        while True:
            if not q.jobs:
                q.wakeup.clear()
                await q.wakeup.wait()
            if q.rows < self.max_batch and self.max_delay > 0:
                await asyncio.sleep(self.max_delay)
            batch = [p for p in self._take_batch(q) if not p.future.cancelled()]
            self.metrics.queue_rows.labels(name).set(q.rows)
            if not batch:
                continue
            inputs = {k: np.concatenate([p.inputs[k] for p in batch]) if len(batch) > 1 else batch[0].inputs[k]
                      for k in batch[0].inputs}
            rows = sum(p.rows for p in batch)
            start = time.perf_counter()
            try:
                outputs = await loop.run_in_executor(self._pool, model.run, inputs)
            except Exception as exc:  # hand the failure to every waiter, keep serving
                log.exception("inference failed for model %s", name)
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(exc)
                continue
            elapsed = time.perf_counter() - start
            self._recent_batch_s = 0.8 * self._recent_batch_s + 0.2 * elapsed
            self.metrics.inference.labels(name).observe(elapsed)
            self.metrics.batch_rows.labels(name).observe(rows)
            offset = 0
            for p in batch:
                if not p.future.done():
                    p.future.set_result({k: v[offset:offset + p.rows] for k, v in outputs.items()})
                offset += p.rows
