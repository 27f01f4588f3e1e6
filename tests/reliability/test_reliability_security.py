"""Security: a shared scorer answers no one who lacks the token.

- Every RPC the server exposes (found by reflection, so a new RPC is covered or this
  test fails), called with no token or any wrong form of it, gets UNAUTHENTICATED; only
  grpc.health.v1 answers without one.
- TLS with a certificate made in the test (openssl): a client trusting it and holding the
  token is served; plaintext, an untrusted certificate or a missing token are not.
- The token (and the wrong ones tried) never appears in the server's logs (at DEBUG), its
  metrics, its command line, or the client's errors and logs.
"""
from __future__ import annotations

import logging
import secrets
import shutil
import subprocess

import grpc
import numpy as np
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from jest_stream import codec
from jest_stream.client import RemoteScorer, ScorerRejected
from jest_stream.client.scorer import SelectCall
from jest_stream.outputs import Losses
from jest_stream.v1 import scorer_pb2 as pb
from jest_stream.v1 import scorer_pb2_grpc as pb_grpc

HEALTH = "grpc.health.v1.Health"
REFLECTION = "grpc.reflection.v1alpha.ServerReflection"
# Every service the scorer may expose, with the descriptor of each of its methods.
DESCRIPTORS = {
    pb.DESCRIPTOR.services_by_name["Scorer"].full_name: pb.DESCRIPTOR.services_by_name["Scorer"],
    REFLECTION: reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"],
    HEALTH: health_pb2.DESCRIPTOR.services_by_name["Health"],
}


@pytest.fixture
def token(tmp_path):
    value = secrets.token_urlsafe(24)
    path = tmp_path / "token"
    path.write_text(value + "\n")
    return value, str(path)


def wrong_authorizations(token: str) -> list[tuple[tuple[str, str], ...]]:
    """No token, and every near miss of the right header."""
    return [
        (),
        (("authorization", ""),),
        (("authorization", "Bearer "),),
        (("authorization", token),),                          # no scheme
        (("authorization", f"bearer {token}"),),              # wrong case of the scheme
        (("authorization", f"Bearer  {token}"),),             # two spaces
        (("authorization", f"Bearer {token} "),),             # trailing space
        (("authorization", f"Bearer {token[:-1]}"),),          # a prefix of the token
        (("authorization", f"Bearer {token}x"),),             # the token and more
        (("authorization", f"Basic {token}"),),
        (("authorization", f"Bearer {secrets.token_urlsafe(24)}"),),
        (("x-authorization", f"Bearer {token}"),),            # right value, wrong header
    ]


def list_services(channel: grpc.Channel, metadata=()) -> list[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    replies = list(stub.ServerReflectionInfo(iter([request]), metadata=metadata, timeout=5))
    return sorted(s.name for s in replies[0].list_services_response.service)


def call_method(channel: grpc.Channel, service: str, method, metadata, timeout: float = 5.0):
    """Call any method with an empty request message (valid for every proto message);
    returns the status code."""
    path = f"/{service}/{method.name}"
    try:
        if method.client_streaming and method.server_streaming:
            list(channel.stream_stream(path)(iter([b""]), metadata=metadata, timeout=timeout))
        elif method.server_streaming:
            stream = channel.unary_stream(path)(b"", metadata=metadata, timeout=timeout)
            next(iter(stream))  # Watch streams forever: the first message is the answer
            stream.cancel()
        elif method.client_streaming:
            channel.stream_unary(path)(iter([b""]), metadata=metadata, timeout=timeout)
        else:
            channel.unary_unary(path)(b"", metadata=metadata, timeout=timeout)
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def select_request(digits, batch: int = 16) -> pb.SelectRequest:
    request = pb.SelectRequest(model="digits", job_id="sec", n_select=4, seed=1,
                               keys=[f"sec-{i}" for i in range(batch)])
    codec.encode(digits["x"][:batch], request.inputs["x"])
    codec.encode(digits["y"][:batch], request.inputs["y"])
    codec.encode(np.linspace(0, 2, batch, dtype=np.float32), request.learner.losses)
    return request


def assert_no_secret(texts: dict[str, str], secrets_: list[str]) -> None:
    for where, text in texts.items():
        for secret in secrets_:
            assert secret not in text, f"a token appears in {where}"


def test_every_rpc_but_health_needs_the_token(start_server, per_example_model, digits, token):
    value, path = token
    server = start_server({"digits": per_example_model}, "--token-file", path, "--log-level", "DEBUG")
    good = (("authorization", f"Bearer {value}"),)
    with grpc.insecure_channel(server.target) as channel:
        exposed = list_services(channel, good)
        assert set(exposed) <= set(DESCRIPTORS), f"services not covered by this test: {exposed}"
        assert pb.DESCRIPTOR.services_by_name["Scorer"].full_name in exposed and HEALTH in exposed
        for service in exposed:
            for method in DESCRIPTORS[service].methods:
                for metadata in wrong_authorizations(value):
                    code = call_method(channel, service, method, metadata)
                    if service == HEALTH:  # open (List is in the proto, not in every grpcio)
                        assert code in (grpc.StatusCode.OK, grpc.StatusCode.UNIMPLEMENTED), (
                            method.name, metadata, code)
                    else:
                        assert code == grpc.StatusCode.UNAUTHENTICATED, (service, method.name, metadata, code)
        # The refusal says what is wrong without echoing what was sent.
        stub = pb_grpc.ScorerStub(channel)
        with pytest.raises(grpc.RpcError) as missing:
            stub.ListModels(pb.ListModelsRequest(), timeout=5)
        wrong = f"Bearer {secrets.token_urlsafe(24)}"
        with pytest.raises(grpc.RpcError) as refused:
            stub.ListModels(pb.ListModelsRequest(), metadata=(("authorization", wrong),), timeout=5)
        assert "authorization" in missing.value.details() and "authorization" in refused.value.details()
        assert wrong.split()[1] not in refused.value.details()
        # With the token everything answers, and a refused request never got as far as the model.
        assert [m.name for m in stub.ListModels(pb.ListModelsRequest(), metadata=good, timeout=5).models] == \
            ["digits"]
        reply = stub.Select(select_request(digits), metadata=good, timeout=10)
        assert len(reply.indices) == 4 and reply.cache_misses == 16
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert server.metric("jest_examples_total") == 16  # only the authorised Select was scored


def make_certificate(tmp_path, name: str = "server") -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1 and localhost, and its key (PEM files)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a test certificate")
    cert, key = tmp_path / f"{name}.crt", tmp_path / f"{name}.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-days", "1", "-subj", "/CN=localhost", "-keyout", str(key), "-out", str(cert),
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True)
    return str(cert), str(key)


def test_tls_with_a_certificate_made_here(start_server, per_example_model, digits, token, tmp_path, caplog):
    value, path = token
    cert, key = make_certificate(tmp_path)
    other_cert, _ = make_certificate(tmp_path, "other")
    with open(cert, "rb") as fh:
        ca = fh.read()
    server = start_server({"digits": per_example_model}, "--token-file", path, "--tls-cert", cert,
                          "--tls-key", key, "--log-level", "DEBUG", tls_ca=ca)
    caplog.set_level(logging.DEBUG)
    learner = Losses(np.linspace(0, 2, 16, dtype=np.float32))
    inputs = {"x": digits["x"][:16], "y": digits["y"][:16]}
    call = SelectCall("digits", "tls", learner, 4, [f"tls-{i}" for i in range(16)], lambda: inputs, seed=5)

    # Trusting the certificate, with the token: served, over TLS.
    with RemoteScorer(server.target, token=value, tls=cert, timeout=10) as scorer:
        assert list(scorer.models()) == ["digits"]
        outcome = scorer.select(call)
        assert len(outcome.indices) == 4 and outcome.cache_misses == 16
    # TLS without the token: refused, and the error names the header, not a secret.
    with RemoteScorer(server.target, tls=cert, timeout=10, max_attempts=1) as scorer:
        with pytest.raises(ScorerRejected, match="UNAUTHENTICATED"):
            scorer.models()
    wrong = secrets.token_urlsafe(24)
    with RemoteScorer(server.target, token=wrong, tls=cert, timeout=10, max_attempts=1) as scorer:
        with pytest.raises(ScorerRejected, match="UNAUTHENTICATED") as refused:
            scorer.select(call)
        assert wrong not in str(refused.value) and wrong not in repr(scorer)
    # Plaintext, or a certificate the client does not trust: no connection at all.
    with grpc.insecure_channel(server.target) as channel:
        with pytest.raises(grpc.RpcError) as plain:
            pb_grpc.ScorerStub(channel).ListModels(pb.ListModelsRequest(), timeout=3,
                                                   metadata=(("authorization", f"Bearer {value}"),))
        assert plain.value.code() == grpc.StatusCode.UNAVAILABLE
    with open(other_cert, "rb") as fh:
        untrusted = grpc.ssl_channel_credentials(root_certificates=fh.read())
    with grpc.secure_channel(server.target, untrusted) as channel:
        with pytest.raises(grpc.RpcError) as bad_ca:
            pb_grpc.ScorerStub(channel).ListModels(pb.ListModelsRequest(), timeout=3,
                                                   metadata=(("authorization", f"Bearer {value}"),))
        assert bad_ca.value.code() == grpc.StatusCode.UNAVAILABLE
    # Health answers over TLS without a token (the probe Docker and Kubernetes use).
    with grpc.secure_channel(server.target, grpc.ssl_channel_credentials(root_certificates=ca)) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING

    assert server.metric("jest_calls_total", method="Select", code="OK") == 1
    assert_no_secret({"client logs": caplog.text}, [value, wrong])


def test_the_token_never_appears_in_logs_metrics_or_the_command_line(
        start_server, per_example_model, digits, token, caplog):
    value, path = token
    server = start_server({"digits": per_example_model}, "--token-file", path, "--log-level", "DEBUG")
    caplog.set_level(logging.DEBUG)
    wrong = [secrets.token_urlsafe(24) for _ in range(3)]
    request = select_request(digits)
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.ScorerStub(channel)
        for attempt in [value] + wrong:
            metadata = (("authorization", f"Bearer {attempt}"),)
            for rpc, req in (("ListModels", pb.ListModelsRequest()), ("Select", request),
                             ("Reference", pb.ReferenceRequest(model="digits", keys=["sec-0"]))):
                try:
                    getattr(stub, rpc)(req, metadata=metadata, timeout=10)
                except grpc.RpcError as exc:
                    assert attempt not in (exc.details() or "")
            # A bad request with the right token: the error path logs too.
            bad = pb.SelectRequest(model="nope", job_id="sec")
            with pytest.raises(grpc.RpcError):
                stub.Select(bad, metadata=metadata, timeout=10)
    # The client library with right and wrong tokens, logging at DEBUG.
    with RemoteScorer(server.target, token=value, timeout=10) as scorer:
        scorer.models()
    with RemoteScorer(server.target, token=wrong[0], timeout=10, max_attempts=1) as scorer:
        with pytest.raises(ScorerRejected) as refused:
            scorer.models()
    metrics = server.metrics()
    assert 'code="OK"' in metrics and 'code="INVALID_ARGUMENT"' in metrics  # the calls were counted
    cmdline = " ".join(psutil.Process(server.proc.pid).cmdline())
    server.stop()  # flush everything the server had to say, drain included
    log_text = server.log()
    assert "DEBUG" in log_text  # the scan covers the most talkative level
    assert_no_secret({"server log": log_text, "metrics": metrics, "command line": cmdline,
                      "client error": str(refused.value), "client logs": caplog.text}, [value] + wrong)
