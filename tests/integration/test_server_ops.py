"""Operating the scorer: health (NOT_SERVING until the models are loaded) and server
reflection on an in-process server, the Reference RPC (cache warming and outputs), and
flags taken from JEST_<FLAG> environment variables. Token/TLS: test_server_auth.py;
SIGTERM drain and bad models at start: test_server_lifecycle.py."""
from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from support import OrtReference, inputs_for

from jest_stream import codec
from jest_stream.server import health_probe
from jest_stream.server.app import SERVICE_NAME, ScoringServer, ServerConfig
from jest_stream.v1 import scorer_pb2 as pb
from jest_stream.v1 import scorer_pb2_grpc


async def test_health_goes_from_not_serving_to_serving(per_example_model):
    """In-process: the port answers health NOT_SERVING (and Scorer calls UNAVAILABLE)
    before the models are loaded, SERVING after; reflection lists the services."""
    server = ScoringServer(ServerConfig(models={"digits": per_example_model}, host="127.0.0.1", port=0,
                                        intra_op_threads=1))
    port = await server.bind()
    target = f"127.0.0.1:{port}"
    loop = asyncio.get_running_loop()
    try:
        async with grpc.aio.insecure_channel(target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for service in ("", SERVICE_NAME):
                reply = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
                assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
            assert await loop.run_in_executor(None, health_probe.main, ["--target", target]) == 1
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await scorer_pb2_grpc.ScorerStub(channel).ListModels(pb.ListModelsRequest(), timeout=5)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE

            await server.load()
            for service in ("", SERVICE_NAME):
                reply = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
            assert await loop.run_in_executor(None, health_probe.main, ["--target", target]) == 0
            models = await scorer_pb2_grpc.ScorerStub(channel).ListModels(pb.ListModelsRequest(), timeout=5)
            assert models.models[0].name == "digits"

        def reflected_services():
            from grpc_reflection.v1alpha.proto_reflection_descriptor_database import \
                ProtoReflectionDescriptorDatabase

            with grpc.insecure_channel(target) as ch:
                return set(ProtoReflectionDescriptorDatabase(ch).get_services())

        services = await loop.run_in_executor(None, reflected_services)
        assert {SERVICE_NAME, "grpc.health.v1.Health"} <= services
    finally:
        await server.stop(grace=1)


def test_reference_rpc_and_flags_from_the_environment(start_server, per_example_model, digits):
    """Every flag can come from JEST_<FLAG> (the Docker image sets them so)."""
    server = start_server({}, env={"JEST_MODEL": f"ref={per_example_model}", "JEST_CACHE_BYTES": "100000",
                                   "JEST_MAX_BATCH": "64"})
    inputs = inputs_for("per_example", digits, np.arange(100))
    with grpc.insecure_channel(server.target) as channel:
        stub = scorer_pb2_grpc.ScorerStub(channel)
        reply = stub.Reference(pb.ReferenceRequest(model="ref", job_id="envjob", keys=[f"r{i}" for i in range(100)],
                                                   inputs={k: codec.encode(v) for k, v in inputs.items()},
                                                   return_outputs=True), timeout=30)
        np.testing.assert_allclose(codec.decode(reply.outputs["loss"]),
                                   OrtReference(per_example_model).outputs(inputs)["loss"], rtol=1e-5)
        assert (reply.cache_hits, reply.cache_misses) == (0, 100)
    assert server.metric("jest_batch_rows_count", model="ref") == 1  # one request: one batch
    assert server.metric("jest_calls_total", method="Reference", job="envjob", code="OK") == 1
    assert "ref" in server.log() and "SERVING" in server.log()


def test_health_probe_follows_the_port_file(start_server, per_example_model, tmp_path, capsys):
    """`jest-stream health --port-file` (env JEST_PORT_FILE, as the image's HEALTHCHECK gets
    it): a server on a kernel-chosen port is asked on the port written in its port file."""
    from jest_stream.server.portfile import BoundPorts, write_port_file

    server = start_server({"digits": per_example_model})
    port_file = tmp_path / "ports.json"
    assert health_probe.main(["--target", "127.0.0.1:0", "--port-file", str(port_file)]) == 1
    assert "not written yet" in capsys.readouterr().err
    write_port_file(str(port_file), BoundPorts(server.port, server.metrics_port))
    assert health_probe.main(["--target", "127.0.0.1:0", "--port-file", str(port_file)]) == 0
    assert capsys.readouterr().out.strip() == f"127.0.0.1:{server.port}: SERVING"
