"""Where selection work runs: light work in the shared worker pool, heavy work in a lane
of its own, so that one job's heavy selections can never hold every worker.

A selection is heavy when its estimated work (``limits.selection_work``) is past
``heavy_work``. Heavy selections run in a pool of ``heavy_workers`` threads, at most
``per_job`` of them per job at once; a job past its cap waits (an awaiting coroutine,
no thread held) and waiting jobs are served round-robin, one selection per turn. Light
selections (a small super-batch, the usual case) never queue behind heavy ones.
"""
from __future__ import annotations

import asyncio
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any


class SelectionLanes:
    """Run selection steps in the light pool or the heavy lane, by cost."""

    def __init__(self, light: ThreadPoolExecutor, heavy_workers: int, heavy_work: int, per_job: int = 1):
        if heavy_workers < 1 or per_job < 1:
            raise ValueError(f"heavy_workers/per_job: must be >= 1, got {heavy_workers}/{per_job}")
        self.light = light
        self.heavy = ThreadPoolExecutor(max_workers=heavy_workers, thread_name_prefix="jest-heavy")
        self.heavy_work = int(heavy_work)
        self.per_job = int(per_job)
        self._free = int(heavy_workers)
        self._running: dict[str, int] = {}
        self._waiting: OrderedDict[str, deque[asyncio.Future]] = OrderedDict()

    async def run(self, job: str, work: int, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` in a worker thread: the heavy lane if ``work`` is past the threshold."""
        loop = asyncio.get_running_loop()
        if work <= self.heavy_work:
            return await loop.run_in_executor(self.light, fn, *args)
        await self._acquire(job)
        try:
            return await loop.run_in_executor(self.heavy, fn, *args)
        finally:
            self._release(job)

    def _can_start(self, job: str) -> bool:
        return self._free > 0 and self._running.get(job, 0) < self.per_job

    def _start(self, job: str) -> None:
        self._free -= 1
        self._running[job] = self._running.get(job, 0) + 1

    async def _acquire(self, job: str) -> None:
        if self._can_start(job) and job not in self._waiting:
            self._start(job)
            return
        slot = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(job, deque()).append(slot)
        try:
            await slot
        except asyncio.CancelledError:
            if slot.done() and not slot.cancelled():
                self._release(job)  # granted just as the caller went away: hand it on
            else:
                self._forget(job, slot)
            raise

    def _forget(self, job: str, slot: asyncio.Future) -> None:
        waiting = self._waiting.get(job)
        if waiting is not None and slot in waiting:
            waiting.remove(slot)
            if not waiting:
                del self._waiting[job]

    def _release(self, job: str) -> None:
        self._free += 1
        left = self._running.get(job, 1) - 1
        if left:
            self._running[job] = left
        else:
            self._running.pop(job, None)
        for other in list(self._waiting):  # the next job in round-robin order that may start
            if not self._can_start(other):
                continue
            waiting = self._waiting.pop(other)
            while waiting and waiting[0].done():  # cancelled while waiting
                waiting.popleft()
            if not waiting:
                continue
            slot = waiting.popleft()
            if waiting:
                self._waiting[other] = waiting  # back of the line
            self._start(other)
            slot.set_result(None)
            return

    def close(self) -> None:
        self.heavy.shutdown(wait=False, cancel_futures=True)
