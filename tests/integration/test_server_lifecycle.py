"""Health goes NOT_SERVING -> SERVING as the models load; SIGTERM drains a call in flight
before the process exits 0; a model that breaks the contract stops the scorer at start."""
from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
import warnings

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from jest_stream.server.app import ScoringServer, ServerConfig
from jest_stream.v1 import scorer_pb2 as pb
from support import aio_stub, expect_code, inputs_for, learner_for, select_request

HS = health_pb2.HealthCheckResponse


async def test_health_is_not_serving_until_the_models_are_loaded(per_example_model, digits):
    """In process: between bind() and load() the port answers health NOT_SERVING and Scorer
    calls UNAVAILABLE; a Watch sees NOT_SERVING -> SERVING, and NOT_SERVING again on stop."""
    server = ScoringServer(ServerConfig(models={"digits": per_example_model}, host="127.0.0.1", port=0,
                                        intra_op_threads=1, grace_s=1))
    port = await server.bind()
    channel, stub = aio_stub(f"127.0.0.1:{port}")
    health = health_pb2_grpc.HealthStub(channel)
    seen: list[int] = []
    try:
        reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert reply.status == HS.NOT_SERVING
        watch = health.Watch(health_pb2.HealthCheckRequest(service="jest_stream.v1.Scorer"))

        async def follow():
            try:
                async for update in watch:
                    seen.append(update.status)
            except grpc.aio.AioRpcError as exc:  # the stream ends when the server stops
                assert exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)

        follower = asyncio.ensure_future(follow())
        while not seen:
            await asyncio.sleep(0.01)
        err = await expect_code(stub.ListModels(pb.ListModelsRequest(), timeout=10), grpc.StatusCode.UNAVAILABLE)
        assert "loading" in err.details()
        learner = learner_for("per_example", 8, seed=0)
        await expect_code(stub.Select(select_request("digits", learner, 2, inputs=inputs_for(
            "per_example", digits, np.arange(8))), timeout=10), grpc.StatusCode.UNAVAILABLE)

        await server.load()
        reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert reply.status == HS.SERVING
        models = await stub.ListModels(pb.ListModelsRequest(), timeout=10)
        assert [m.name for m in models.models] == ["digits"]
        while len(seen) < 2:
            await asyncio.sleep(0.01)
        await server.stop(1)
        await asyncio.wait_for(follower, 10)
    finally:
        await channel.close()
        await server.stop(0)
    assert seen[:2] == [HS.NOT_SERVING, HS.SERVING]
    assert seen[-1] == HS.NOT_SERVING


def test_sigterm_drains_a_call_in_flight(start_server, softmax_model, digits):
    """A slow Select (softmax joint selection, B=2048) is in flight when SIGTERM arrives: it
    completes OK, new calls are refused, and the process exits 0."""
    server = start_server({"softmax": softmax_model})
    batch, n_select = 2048, 512
    idx = np.arange(batch) % 1797
    request = select_request("softmax", learner_for("softmax_contrastive", batch, seed=0), n_select,
                             inputs=inputs_for("softmax_contrastive", digits, idx), seed=0, job_id="slow")
    channel = grpc.insecure_channel(server.target, options=[("grpc.max_send_message_length", 64 << 20)])
    from jest_stream.v1 import scorer_pb2_grpc as pb_grpc

    stub = pb_grpc.ScorerStub(channel)
    future = stub.Select.future(request, timeout=120)
    try:
        while server.metric("jest_inflight_calls") < 1 and not future.done():
            time.sleep(0.01)
        assert not future.done(), "the slow call finished before SIGTERM could be sent"
        server.proc.send_signal(signal.SIGTERM)
        reply = future.result(timeout=120)
    finally:
        channel.close()
    assert len(reply.indices) == n_select
    assert len(set(reply.indices)) == n_select
    assert server.proc.wait(timeout=30) == 0
    log = server.log()
    assert "SIGTERM" in log and "draining" in log and "stopped" in log


def test_sigterm_when_idle_exits_zero(start_server, per_example_model):
    server = start_server({"digits": per_example_model})
    assert server.stop(signal.SIGTERM) == 0


def test_model_breaking_the_contract_stops_the_scorer(tmp_path, digits):
    """A plain ONNX file without jest metadata: the scorer logs a ContractError and exits non-zero."""
    import torch

    plain = tmp_path / "plain.onnx"
    model = torch.nn.Sequential(torch.nn.Linear(64, 10))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, (torch.from_numpy(digits["x"][:2]),), str(plain), input_names=["x"],
                          output_names=["logits"], dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}},
                          dynamo=False)
    proc = subprocess.run([sys.executable, "-m", "jest_stream.server", "--host", "127.0.0.1", "--port", "0",
                           "--model", f"plain={plain}"], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "jest.kind" in out and "plain" in out and "export_reference" in out
