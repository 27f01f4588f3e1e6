"""Shared secret: a bearer token (--token-file) over TLS (--tls-cert/--tls-key) with a
certificate authority the test makes. No token, no answer; health stays open."""
from __future__ import annotations

import datetime
import ipaddress

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from jest_stream.server import health_probe
from jest_stream.v1 import scorer_pb2 as pb
from support import OrtReference, aio_stub, expect_code, inputs_for, learner_for, select_request

TOKEN = "s3cret-token-for-tests"
UNAUTH = grpc.StatusCode.UNAUTHENTICATED


def make_ca_and_server_cert() -> tuple[bytes, bytes, bytes]:
    """(CA certificate, server certificate chain, server key), PEM, for 127.0.0.1 and localhost."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "jest-stream test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False, encipher_only=False,
                                       decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    key_pem = key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return ca.public_bytes(pem), cert.public_bytes(pem), key_pem


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    ca, cert, key = make_ca_and_server_cert()
    d = tmp_path_factory.mktemp("tls")
    paths = {}
    for name, data in (("ca", ca), ("cert", cert), ("key", key)):
        (d / f"{name}.pem").write_bytes(data)
        paths[name] = str(d / f"{name}.pem")
    (d / "token").write_text(TOKEN + "\n")  # a trailing newline, as editors write it
    paths["token"] = str(d / "token")
    return {"ca_pem": ca, **paths}


@pytest.fixture(scope="module")
def server(start_module_server, per_example_model, tls):
    return start_module_server({"digits": per_example_model}, "--token-file", tls["token"],
                               "--tls-cert", tls["cert"], "--tls-key", tls["key"], tls_ca=tls["ca_pem"])


@pytest.fixture(scope="module")
def good(digits, per_example_model):
    idx = np.arange(64)
    inputs = inputs_for("per_example", digits, idx)
    learner = learner_for("per_example", 64, seed=5)
    want = OrtReference(per_example_model).select(inputs, learner, 16, seed=1).indices.tolist()
    return select_request("digits", learner, 16, inputs=inputs, keys=[f"auth/{i}" for i in idx], seed=1), want


def creds(tls) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(root_certificates=tls["ca_pem"])


def bearer(token: str = TOKEN):
    return (("authorization", f"Bearer {token}"),)


CALLS = {
    "Select": lambda stub, good, md: stub.Select(good[0], metadata=md, timeout=30),
    "Reference": lambda stub, good, md: stub.Reference(
        pb.ReferenceRequest(model="digits", keys=list(good[0].keys), inputs=dict(good[0].inputs)),
        metadata=md, timeout=30),
    "ListModels": lambda stub, good, md: stub.ListModels(pb.ListModelsRequest(), metadata=md, timeout=30),
}


@pytest.mark.parametrize("method", CALLS)
async def test_no_token_or_wrong_token_is_unauthenticated(server, tls, good, method):
    channel, stub = aio_stub(server.target, creds(tls))
    async with channel:
        err = await expect_code(CALLS[method](stub, good, None), UNAUTH)
        assert "authorization" in err.details() and "missing" in err.details()
        err = await expect_code(CALLS[method](stub, good, bearer("guess")), UNAUTH)
        assert "wrong token" in err.details()
        err = await expect_code(CALLS[method](stub, good, (("authorization", TOKEN),)), UNAUTH)
        await CALLS[method](stub, good, bearer())  # the right token is answered
    assert server.metric("jest_calls_total", method=method, code="UNAUTHENTICATED") >= 3


async def test_tls_round_trip_with_token(server, tls, good):
    channel, stub = aio_stub(server.target, creds(tls))
    async with channel:
        reply = await stub.Select(good[0], metadata=bearer(), timeout=30)
    assert list(reply.indices) == good[1]
    # the standard way: call credentials composed into the channel credentials
    composite = grpc.composite_channel_credentials(creds(tls), grpc.access_token_call_credentials(TOKEN))
    channel, stub = aio_stub(f"localhost:{server.port}", composite)
    async with channel:
        reply = await stub.Select(good[0], timeout=30)
        models = await stub.ListModels(pb.ListModelsRequest(), timeout=30)
    assert list(reply.indices) == good[1]
    assert [m.name for m in models.models] == ["digits"]


async def test_health_needs_no_token(server, tls):
    channel = grpc.aio.secure_channel(server.target, creds(tls))
    async with channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="jest_stream.v1.Scorer"), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_health_probe_command_over_tls(server, tls, capsys):
    assert health_probe.main(["--target", server.target, "--tls-ca", tls["ca"]]) == 0
    assert "SERVING" in capsys.readouterr().out
    # without TLS the handshake fails: the probe says so and exits 1
    assert health_probe.main(["--target", server.target, "--timeout", "2"]) == 1


async def test_plaintext_client_is_refused(server, good):
    channel, stub = aio_stub(server.target)
    async with channel:
        await expect_code(CALLS["ListModels"](stub, good, bearer()), grpc.StatusCode.UNAVAILABLE)


async def test_untrusted_certificate_is_refused(server, good):
    other_ca, _, _ = make_ca_and_server_cert()
    channel, stub = aio_stub(server.target, grpc.ssl_channel_credentials(root_certificates=other_ca))
    async with channel:
        await expect_code(CALLS["ListModels"](stub, good, bearer()), grpc.StatusCode.UNAVAILABLE)


def test_token_file_must_not_be_empty(tmp_path, per_example_model):
    from jest_stream.server.cli import build_parser, config_from_args

    empty = tmp_path / "empty"
    empty.write_text("\n")
    args = build_parser().parse_args(["--model", f"digits={per_example_model}", "--token-file", str(empty)])
    with pytest.raises(SystemExit, match="--token-file"):
        config_from_args(args)
    args = build_parser().parse_args(["--model", f"digits={per_example_model}", "--tls-cert", str(empty)])
    with pytest.raises(SystemExit, match="--tls-cert/--tls-key"):
        config_from_args(args)
