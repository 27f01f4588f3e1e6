"""Cross-cutting concerns as gRPC interceptors, one concern each: bearer-token auth,
undecodable requests and the request bytes in flight, and per-call metrics/logs.

An interceptor sees a call's metadata before its body is read. A refused call gets a
handler that never reads the body (a client-streaming handler whose request iterator
is left untouched, its deserializer ignoring any bytes), so an unauthenticated request
costs neither the parse nor, past the transport's flow-control window, the bytes.
"""
from __future__ import annotations

import hmac
import logging
import threading
import time
import weakref

import grpc

from .metrics import Metrics
from .names import shown

log = logging.getLogger(__name__)

OPEN_PREFIXES = ("/grpc.health.v1.Health/",)
RETRY_KEYS = ("retry-after-ms", "grpc-retry-pushback-ms")


def _ignore(raw: bytes) -> None:
    """A deserializer for refused calls: the bytes are never parsed."""
    return None


class InflightBytes:
    """Request bytes held by calls in flight, within a budget (``--max-inflight-bytes``)."""

    def __init__(self, budget: int):
        self.budget = int(budget)
        self.held = 0
        self._lock = threading.Lock()

    def reserve(self, n: int) -> bool:
        with self._lock:
            if self.held and self.held + n > self.budget:
                return False
            self.held += n
            return True

    def release(self, n: int) -> None:
        with self._lock:
            self.held -= n


class Received:
    """A decoded request and the bytes it holds against the in-flight budget (released when
    the call ends, or when this object is dropped)."""

    def __init__(self, message, nbytes: int, budget: InflightBytes | None):
        self.message = message
        self.nbytes = nbytes
        self._done = weakref.finalize(self, budget.release, nbytes) if budget is not None else None

    @property
    def job_id(self) -> str:
        return getattr(self.message, "job_id", "")

    def release(self) -> None:
        if self._done is not None:
            self._done()


class _OverBudget:
    """What a request deserializes to when the in-flight bytes budget is spent (not parsed)."""

    def __init__(self, nbytes: int, budget: InflightBytes):
        self.nbytes, self.held, self.budget = nbytes, budget.held, budget.budget


class _Undecodable:
    """What a request that is not a valid message deserializes to (answered INVALID_ARGUMENT,
    rather than gRPC's UNKNOWN and a logged traceback per garbage request)."""

    def __init__(self, error: Exception):
        self.error = error


def _receiving(deserializer, budget: InflightBytes | None):
    """A deserializer that reserves the request's bytes first (unparsed if over budget) and
    turns an undecodable request into ``_Undecodable``."""
    if deserializer is None:
        return None

    def deserialize(raw: bytes):
        n = len(raw)
        if budget is not None and not budget.reserve(n):
            return _OverBudget(n, budget)
        try:
            message = deserializer(raw)
        except Exception as exc:  # protobuf's DecodeError, or whatever a custom one raises
            if budget is not None:
                budget.release(n)
            return _Undecodable(exc)
        return Received(message, n, budget)
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
    """A handler that answers UNAUTHENTICATED without reading the request: client-streaming
    (the request iterator is never touched) whatever the method's shape."""
    async def deny_unary(request_iterator, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def deny_stream(request_iterator, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover - makes this an async generator

    kw = dict(request_deserializer=_ignore, response_serializer=handler.response_serializer)
    if handler.unary_unary or handler.stream_unary:
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
    UNKNOWN and a logged traceback per garbage request); with a ``budget``, a request whose
    bytes would take the calls in flight past it gets RESOURCE_EXHAUSTED, unparsed."""

    def __init__(self, budget: InflightBytes | None = None):
        self.budget = budget

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or not handler.unary_unary:
            return handler
        method = details.method.rsplit("/", 1)[-1]

        def wrap(behavior):
            async def checked(request, context):
                if isinstance(request, _Undecodable):
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                        f"request: not a valid {method} request message: {shown(request.error, 200)}")
                if isinstance(request, _OverBudget):
                    context.set_trailing_metadata(tuple((k, "200") for k in RETRY_KEYS))
                    await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                        f"request: {request.nbytes} bytes, but calls in flight hold {request.held} "
                                        f"of the {request.budget}-byte budget (server flag --max-inflight-bytes); "
                                        "retry in 0.20s")
                try:
                    return await behavior(request.message, context)
                finally:
                    request.release()
            return checked

        return _wrap(handler, wrap, _receiving(handler.request_deserializer, self.budget))


class MetricsInterceptor(grpc.aio.ServerInterceptor):
    """Counts every unary call and its latency by method, job id and status code."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        method = details.method.rsplit("/", 1)[-1]
        if handler is not None and handler.stream_unary and not handler.unary_unary:
            # a refusal (unauthenticated): counted, never under the job id it may claim
            return grpc.stream_unary_rpc_method_handler(
                self._observe(method, handler.stream_unary, refused=True),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        return _wrap(handler, lambda behavior: self._observe(method, behavior))

    def _observe(self, method: str, behavior, refused: bool = False):
        async def observed(request, context):
            job = "-" if refused else self.metrics.job_label(getattr(request, "job_id", ""))
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
                    log.info("job=%s %s -> %s (%.1f ms)", shown(job), method, code.name, elapsed * 1e3)
        return observed
