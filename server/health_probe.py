"""``jest-stream health``: ask a scorer's grpc.health.v1 service; exit 0 iff SERVING.

Used as the Docker HEALTHCHECK. Flags may come from the environment
(JEST_HEALTH_TARGET, JEST_TLS_CA, JEST_PORT_FILE). With a port file (a server started
with ``--port 0 --port-file PATH``) it asks the port written there.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from .portfile import read_port_file


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
    p.add_argument("--port-file", default=os.environ.get("JEST_PORT_FILE"),
                   help="the server's port file (serve --port-file): ask the port written there, "
                        "on --target's host [env JEST_PORT_FILE]")
    args = p.parse_args(argv)
    if args.port_file:
        try:
            port = read_port_file(args.port_file, timeout=0).port
        except TimeoutError:
            print(f"--port-file: {args.port_file!r} not written yet (the server has not bound its port)",
                  file=sys.stderr)
            return 1
        args.target = f"{args.target.rpartition(':')[0]}:{port}"
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
