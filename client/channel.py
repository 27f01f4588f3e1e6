"""Where a RemoteScorer connects, and how: targets, gRPC's service config (retries,
round_robin) and channel credentials.

Targets: ``"host:port"``, a ``"dns:///name:port"`` name (e.g. a Kubernetes headless
Service) or a list of ``host:port`` addresses; every target uses gRPC's own
``round_robin`` policy, and UNAVAILABLE is retried with exponential backoff.
"""
from __future__ import annotations

import ipaddress
import json
import os
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc

SERVICE = "jest_stream.v1.Scorer"
_SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:", "vsock:")


def _split_host_port(address: str) -> tuple[str, int]:
    host, sep, port = address.strip().rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"target: {address!r} is not host:port")
    return host.strip("[]"), int(port)


def check_target(target: str | Sequence[str]) -> None:
    """Refuse a target gRPC would misread: an address without a port (gRPC dials 443)."""
    if isinstance(target, str):
        if target.strip().startswith(_SCHEMES):
            return
        addresses = [a for a in target.split(",") if a.strip()]
    else:
        addresses = list(target)
    for address in addresses:
        if not isinstance(address, str):
            raise TypeError(f"target: expected host:port strings, got {type(address).__name__}")
        host, sep, port = address.strip().rpartition(":")
        if not sep or not port.isdigit() or not host or (host.count(":") and not host.startswith("[")):
            raise ValueError(f"target: {address!r} has no port; expected host:port (e.g. 'scorer:50051'), "
                             "[ipv6]:port or dns:///name:port")
    if not addresses:
        raise ValueError("target: no address given; expected host:port, dns:///name:port or a list")


def channel_target(target: str | Sequence[str]) -> tuple[str, bool]:
    """The gRPC target string for ``target`` and whether it may name several servers.

    A list of ``host:port`` (or a comma-separated string) becomes ``ipv4:a:p,b:p``
    (or ``ipv6:``), resolving host names; a ``dns:``/``ipv4:``/... URI passes as is.
    """
    if isinstance(target, str):
        target = target.strip()
        if target.startswith(_SCHEMES):
            single = not target.startswith("dns:") and "," not in target
            return target, single
        addresses = [a for a in target.split(",") if a.strip()]
    else:
        addresses = list(target)
    if not addresses:
        raise ValueError("target: no address given; expected host:port, dns:///name:port or a list")
    if len(addresses) == 1:
        return addresses[0].strip(), True
    resolved: list[tuple[int, str, int]] = []
    for address in addresses:
        host, port = _split_host_port(address)
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            infos.sort(key=lambda info: info[0] != socket.AF_INET)  # IPv4 first
            ip = ipaddress.ip_address(infos[0][4][0])
        resolved.append((ip.version, str(ip), port))
    versions = {v for v, _, _ in resolved}
    if len(versions) != 1:
        raise ValueError(f"target: {addresses} mixes IPv4 and IPv6 addresses; gRPC needs one family")
    if versions == {4}:
        return "ipv4:" + ",".join(f"{ip}:{port}" for _, ip, port in resolved), False
    return "ipv6:" + ",".join(f"[{ip}]:{port}" for _, ip, port in resolved), False


def service_config(max_attempts: int, initial_backoff: float, max_backoff: float) -> str:
    """gRPC service config: retry UNAVAILABLE with backoff, round_robin over addresses."""
    method: dict[str, Any] = {"name": [{"service": SERVICE}]}
    if max_attempts > 1:
        method["retryPolicy"] = {
            "maxAttempts": int(max_attempts),
            "initialBackoff": f"{initial_backoff:.3f}s",
            "maxBackoff": f"{max_backoff:.3f}s",
            "backoffMultiplier": 2,
            "retryableStatusCodes": ["UNAVAILABLE"],
        }
    return json.dumps({"methodConfig": [method], "loadBalancingConfig": [{"round_robin": {}}]})


def credentials(tls: bool | str | os.PathLike | grpc.ChannelCredentials | None):
    if tls is None or tls is False:
        return None
    if tls is True:
        return grpc.ssl_channel_credentials()
    if isinstance(tls, grpc.ChannelCredentials):
        return tls
    root = Path(tls)
    if not root.is_file():
        raise FileNotFoundError(f"tls: CA certificate file {str(root)!r} does not exist; pass tls=True "
                                "for the system roots or a grpc.ChannelCredentials")
    return grpc.ssl_channel_credentials(root_certificates=root.read_bytes())
