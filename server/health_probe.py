"""``jest-stream health``: ask a scorer's grpc.health.v1 service; exit 0 iff SERVING.

Used as the Docker HEALTHCHECK. Flags may come from the environment
(JEST_HEALTH_TARGET, JEST_TLS_CA).
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check(target: str, *, service: str = "", timeout: float = 3.0, tls_ca: bytes | None = None,
          tls: bool = False) -> str:
    """The serving status name of ``service`` at ``target`` (e.g. 'SERVING')."""
    if tls or tls_ca:
        channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=tls_ca))
    else:
        channel = grpc.insecure_channel(target)
    with channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=timeout)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="jest-stream health", description=__doc__)
    p.add_argument("--target", default=os.environ.get("JEST_HEALTH_TARGET", "127.0.0.1:50051"),
                   help="host:port of the scorer [env JEST_HEALTH_TARGET]")
    p.add_argument("--service", default="", help="service name to ask about ('' = the whole server)")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds to wait")
    p.add_argument("--tls-ca", default=os.environ.get("JEST_TLS_CA"),
                   help="PEM CA certificate: connect with TLS [env JEST_TLS_CA]")
    p.add_argument("--tls", action="store_true", help="connect with TLS using the system roots")
    args = p.parse_args(argv)
    ca = None
    if args.tls_ca:
        with open(args.tls_ca, "rb") as fh:
            ca = fh.read()
    try:
        status = check(args.target, service=args.service, timeout=args.timeout, tls_ca=ca, tls=args.tls)
    except grpc.RpcError as exc:
        print(f"{args.target}: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    print(f"{args.target}: {status}")
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())
