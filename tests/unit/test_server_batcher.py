"""The dynamic batcher on its own: real ONNX model, real event loop, no gRPC."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest

from jest_stream.server.batcher import Batcher
from jest_stream.server.metrics import Metrics
from jest_stream.server.models import ReferenceModel


def _requests(digits, n: int, rows: int) -> list[dict[str, np.ndarray]]:
    x, y = digits["x"], digits["y"]
    return [{"x": np.ascontiguousarray(x[i * rows:(i + 1) * rows], dtype=np.float32),
             "y": np.ascontiguousarray(y[i * rows:(i + 1) * rows], dtype=np.int64)} for i in range(n)]


def _batches(metrics: Metrics) -> tuple[float, float]:
    """(batches run, rows run) from the jest_batch_rows histogram."""
    count = metrics.registry.get_sample_value("jest_batch_rows_count", {"model": "ref"})
    total = metrics.registry.get_sample_value("jest_batch_rows_sum", {"model": "ref"})
    return count, total


@pytest.mark.parametrize("workers,batches", [(1, 1), (2, 2), (3, 3)])
async def test_idle_workers_share_the_waiting_requests(per_example_model, digits, workers, batches):
    """Three requests wait at once: one worker batches them together; with two or three
    workers each idle worker takes its share, so they run side by side, not in one batch."""
    model = ReferenceModel("ref", per_example_model, intra_op_threads=1)
    metrics = Metrics()
    batcher = Batcher({"ref": model}, metrics, max_batch=4096, max_delay=0.0, workers_per_model=workers)
    batcher.start()
    try:
        requests = _requests(digits, 3, 40)
        outputs = await asyncio.gather(*(batcher.infer("ref", f"job{i}", r) for i, r in enumerate(requests)))
    finally:
        await batcher.stop()
    assert _batches(metrics) == (batches, 120)
    for request, got in zip(requests, outputs):
        np.testing.assert_allclose(got["loss"], model.run(request)["loss"], rtol=1e-5, atol=1e-6)


async def test_busy_workers_leave_the_queue_to_one_batch(per_example_model, digits):
    """While the other worker is busy, an idle worker takes every waiting request (up to
    max_batch rows): sharing is only with workers that are free to run."""
    model = ReferenceModel("ref", per_example_model, intra_op_threads=1)
    metrics = Metrics()
    batcher = Batcher({"ref": model}, metrics, max_batch=4096, max_delay=0.0, workers_per_model=2)
    batcher._busy["ref"] = 1  # as if one worker were running a long batch
    batcher.start()
    try:
        requests = _requests(digits, 4, 30)
        await asyncio.gather(*(batcher.infer("ref", f"job{i}", r) for i, r in enumerate(requests)))
    finally:
        await batcher.stop()
    assert _batches(metrics) == (1, 120)
