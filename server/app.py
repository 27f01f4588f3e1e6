"""Build and run the scoring server: grpc.aio on uvloop, health, reflection, metrics,
auth, TLS, and a SIGTERM drain."""
from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Mapping
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from jest_stream.v1 import scorer_pb2, scorer_pb2_grpc

from .batcher import Batcher
from .engine import ScoringEngine
from .interceptors import BearerTokenInterceptor, DecodeInterceptor, InflightBytes, MetricsInterceptor
from .limits import RequestLimits, default_inflight_bytes
from .metrics import Metrics
from .portfile import BoundPorts, write_port_file
from .servicer import ScorerServicer

log = logging.getLogger(__name__)

SERVICE_NAME = scorer_pb2.DESCRIPTOR.services_by_name["Scorer"].full_name


@dataclass
class ServerConfig:
    """Everything ``jest-stream serve`` takes (see server/cli.py for the flags)."""

    models: Mapping[str, str]
    host: str = "0.0.0.0"
    port: int = 50051
    cache_bytes: int = 1 << 30
    cache_files: list[str] = field(default_factory=list)
    token: str | None = None
    tls_cert: bytes | None = None
    tls_key: bytes | None = None
    max_message_bytes: int = 256 << 20
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    intra_op_threads: int | None = None
    inter_op_threads: int | None = None
    workers: int = 4
    max_inflight: int = 256
    providers: list[str] | None = None
    device: str | None = None
    max_batch: int = 8192
    max_delay_ms: float = 2.0
    max_queue_rows: int = 262144
    inference_workers: int = 1
    grace_s: float = 30.0
    port_file: str | None = None
    limits: RequestLimits = field(default_factory=RequestLimits)
    max_inflight_bytes: int = field(default_factory=default_inflight_bytes)
    heavy_workers: int | None = None
    drain_s: float = 1.0


class ScoringServer:
    """A running scorer: ``await start()``, ``await wait()``; ``await stop()`` drains."""

    def __init__(self, config: ServerConfig):
        self.config = config
        self.metrics = Metrics()
        self.health = health.aio.HealthServicer()
        self.server: grpc.aio.Server | None = None
        self.port: int | None = None
        self.metrics_port: int | None = None
        self.engine: ScoringEngine | None = None
        self._stopping: asyncio.Task | None = None
        self.servicer: ScorerServicer | None = None
        self.batcher: Batcher | None = None

    async def _set_health(self, status) -> None:
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    async def bind(self) -> int:
        """Start the gRPC server on its port with health NOT_SERVING; Scorer calls get
        UNAVAILABLE until ``load`` is done."""
        c = self.config
        interceptors: list[grpc.aio.ServerInterceptor] = [MetricsInterceptor(self.metrics)]
        if c.token:
            # inside the metrics interceptor, so refused calls are counted (code UNAUTHENTICATED)
            interceptors.append(BearerTokenInterceptor(c.token))
        interceptors.append(DecodeInterceptor(InflightBytes(c.max_inflight_bytes)))
        options = [("grpc.max_receive_message_length", c.max_message_bytes),
                   ("grpc.max_send_message_length", c.max_message_bytes),
                   ("grpc.so_reuseport", 0)]
        self.server = grpc.aio.server(interceptors=interceptors, options=options)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.servicer = ScorerServicer(self.metrics, c.workers, c.max_inflight, c.limits, c.heavy_workers)
        scorer_pb2_grpc.add_ScorerServicer_to_server(self.servicer, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME), self.server)
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        address = f"{c.host}:{c.port}"
        try:
            if c.tls_cert and c.tls_key:
                creds = grpc.ssl_server_credentials([(c.tls_key, c.tls_cert)])
                self.port = self.server.add_secure_port(address, creds)
            else:
                self.port = self.server.add_insecure_port(address)
        except RuntimeError:  # grpc: "Failed to bind to address"
            self.port = 0
        if not self.port:
            raise OSError(f"--port {c.port}: cannot listen on {address} (in use, or not an address of "
                          "this host); pick another with --port or JEST_PORT")
        await self.server.start()
        if c.metrics_port is not None:
            try:
                self.metrics_port = self.metrics.serve(c.metrics_port, c.metrics_host)
            except OSError as exc:
                raise OSError(f"--metrics-port {c.metrics_port}: cannot listen on {c.metrics_host}:"
                              f"{c.metrics_port} ({exc.strerror}); pick another with --metrics-port or "
                              "JEST_METRICS_PORT") from None
            log.info("metrics on http://%s:%d/metrics", c.metrics_host, self.metrics_port)
        log.info("listening on %s:%d (%s%s), loading %d model(s)", c.host, self.port,
                 "TLS" if c.tls_cert else "plaintext", ", bearer token" if c.token else "", len(c.models))
        return self.port

    async def load(self) -> None:
        """Load the models and the cache file(s) off the event loop, start batching, go SERVING."""
        c = self.config
        loop = asyncio.get_running_loop()
        self.engine = await loop.run_in_executor(None, lambda: ScoringEngine(
            c.models, cache_bytes=c.cache_bytes, cache_file=c.cache_files or None,
            intra_op_threads=c.intra_op_threads, inter_op_threads=c.inter_op_threads,
            providers=c.providers, device=c.device))
        self.batcher = Batcher(self.engine.models, self.metrics, max_batch=c.max_batch,
                               max_delay=c.max_delay_ms / 1000, max_queue_rows=c.max_queue_rows,
                               arriving=lambda: self.servicer.arriving,
                               workers_per_model=c.inference_workers)
        self.batcher.start()
        self.servicer.attach(self.engine, self.batcher)
        self.metrics.dataset_entries.source = lambda: {
            (name, ds): n for name, m in self.engine.models.items()
            for ds, n in self.servicer.dataset_entries(m.version).items()}
        self.metrics.models_loaded.set(len(self.engine.models))
        self.metrics.cache_entries.set(len(self.engine.cache))
        self.metrics.cache_bytes.set(self.engine.cache.bytes)
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        log.info("SERVING models %s", ", ".join(
            f"{n} ({m.contract.kind}, version {m.version}, {m.session.get_providers()[0]})"
            for n, m in self.engine.models.items()))

    async def stop(self, grace: float | None = None) -> None:
        """Go NOT_SERVING, refuse new calls, let in-flight calls finish (up to grace)."""
        if self._stopping is None:
            self._stopping = asyncio.ensure_future(self._stop(self.config.grace_s if grace is None else grace))
        await self._stopping

    async def _stop(self, grace: float) -> None:
        log.info("draining (grace %.0fs)", grace)
        loop = asyncio.get_running_loop()
        await self.health.enter_graceful_shutdown()
        if self.servicer is not None and grace > 0:
            # new calls get UNAVAILABLE (clients retry them on another replica) while the
            # transport still takes them; then the server stops taking calls at all
            self.servicer.draining = True
            await asyncio.sleep(min(self.config.drain_s, grace))
        if self.servicer is not None:
            deadline = loop.time() + max(0.0, grace - self.config.drain_s - 0.5)
            while self.servicer.inflight and loop.time() < deadline:
                await asyncio.sleep(0.05)
            await self.servicer.cut_inflight()  # what is left gets UNAVAILABLE, not CANCELLED
        if self.server is not None:
            await self.server.stop(0.5)
        if self.batcher is not None:
            await self.batcher.stop()
        if self.servicer is not None:
            self.servicer.close()
        self.metrics.close()
        log.info("stopped")

    async def wait(self) -> None:
        if self.server is not None:
            await self.server.wait_for_termination()


async def serve(config: ServerConfig) -> None:
    """Run until SIGTERM or SIGINT, then drain in-flight calls (up to the grace period)
    and return. A model that fails to load raises after the port is closed again."""
    server = ScoringServer(config)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda s=sig: (log.info("%s: draining", signal.Signals(s).name),
                                                    asyncio.ensure_future(server.stop())))
    await server.bind()
    try:
        if config.port_file:
            write_port_file(config.port_file, BoundPorts(server.port, server.metrics_port))
        await server.load()
    except BaseException:
        await server.stop(0)
        raise
    await server.wait()
    await server.stop()
