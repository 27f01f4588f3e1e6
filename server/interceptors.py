"""Cross-cutting concerns as gRPC interceptors, one concern each: bearer-token auth,
undecodable requests, and per-call metrics/logs."""
from __future__ import annotations

import hmac
import logging
import time

import grpc

from .metrics import Metrics

log = logging.getLogger(__name__)

OPEN_PREFIXES = ("/grpc.health.v1.Health/",)


class _Undecodable:
    """What a request that is not a valid message deserializes to (answered INVALID_ARGUMENT,
    rather than gRPC's UNKNOWN and a logged traceback per garbage request)."""

    def __init__(self, error: Exception):
        self.error = error


def _lenient(deserializer):
    if deserializer is None:
        return None

    def deserialize(raw: bytes):
        try:
            return deserializer(raw)
        except Exception as exc:  # protobuf's DecodeError, or whatever a custom one raises
            return _Undecodable(exc)
    return deserialize


def _wrap(handler, wrap_unary, deserializer=None):
    """Rebuild ``handler`` with its unary-unary behaviour wrapped (streams left as they are),
    and its request deserializer replaced if ``deserializer`` is given."""
    if handler is None or not handler.unary_unary:
        return handler
    return grpc.unary_unary_rpc_method_handler(wrap_unary(handler.unary_unary),
                                               request_deserializer=deserializer or handler.request_deserializer,
                                               response_serializer=handler.response_serializer)


def _refusal(handler, message: str):
    """A handler of the same shape as ``handler`` that answers UNAUTHENTICATED."""
    async def deny_unary(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def deny_stream(request_or_iterator, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover - makes this an async generator

    kw = dict(request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(deny_unary, **kw)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(deny_stream, **kw)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(deny_unary, **kw)
    return grpc.stream_stream_rpc_method_handler(deny_stream, **kw)


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """No token, no answer: every RPC but health needs ``authorization: Bearer <token>``."""

    def __init__(self, token: str):
        if not token:
            raise ValueError("token: empty; put the shared secret in the --token-file")
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_PREFIXES):
            return handler
        given = dict(details.invocation_metadata or ()).get("authorization", "")
        if isinstance(given, str):
            given = given.encode()
        if not given:
            return _refusal(handler, "authorization: missing; send metadata 'authorization: Bearer <token>'")
        if not hmac.compare_digest(given, self._expected):
            return _refusal(handler, "authorization: wrong token")
        return handler


class DecodeInterceptor(grpc.aio.ServerInterceptor):
    """A request that is not a valid message gets INVALID_ARGUMENT (rather than gRPC's
    UNKNOWN and a logged traceback per garbage request)."""

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or not handler.unary_unary:
            return handler
        method = details.method.rsplit("/", 1)[-1]

        def wrap(behavior):
            async def checked(request, context):
                if isinstance(request, _Undecodable):
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                        f"request: not a valid {method} request message: {request.error}")
                return await behavior(request, context)
            return checked

        return _wrap(handler, wrap, _lenient(handler.request_deserializer))


class MetricsInterceptor(grpc.aio.ServerInterceptor):
    """Counts every unary call and its latency by method, job id and status code."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        method = details.method.rsplit("/", 1)[-1]

        def wrap(behavior):
            async def observed(request, context):
                job = self.metrics.job_label(getattr(request, "job_id", ""))
                start = time.perf_counter()
                code = grpc.StatusCode.OK
                try:
                    return await behavior(request, context)
                except BaseException:
                    code = context.code() or grpc.StatusCode.UNKNOWN
                    if not isinstance(code, grpc.StatusCode):
                        code = grpc.StatusCode.UNKNOWN
                    raise
                finally:
                    elapsed = time.perf_counter() - start
                    self.metrics.calls.labels(method, job, code.name).inc()
                    self.metrics.latency.labels(method, job).observe(elapsed)
                    if code != grpc.StatusCode.OK:
                        log.info("job=%s %s -> %s (%.1f ms)", job, method, code.name, elapsed * 1e3)
            return observed

        return _wrap(handler, wrap)
