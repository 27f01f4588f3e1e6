"""RemoteScorer: the shared gRPC scoring server, spoken to over a gRPC channel.

The training loop calls plain blocking methods. A Select (on the step's critical
path) is a blocking call made from the calling thread itself: no hop to another
thread and back, which costs a measurable part of a loopback round trip. A reference
prefetch is started as a gRPC future and runs while the user trains (gRPC's own
threads complete it). The channel is created on first use, in the process that uses
it: a RemoteScorer built before DataLoader workers fork holds no gRPC state, and a
forked child that uses one gets its own (fork safety).

Targets: ``"host:port"``, a ``"dns:///name:port"`` name (e.g. a Kubernetes headless
Service) or a list of ``host:port`` addresses; every target uses gRPC's own
``round_robin`` policy. Every call has a deadline; UNAVAILABLE is retried with
exponential backoff by gRPC's retry policy (service config), and a dropped
connection is re-established by gRPC in the background.

Bandwidth: with a single-address target the client remembers which keys it has
already sent to the server (by a successful Reference or Select), and sends Selects
for such super-batches without their inputs; if the server evicted them it answers
FAILED_PRECONDITION with the trailing-metadata signal ``jest-not-cached`` and the
Select is resent with inputs (on that signal only; a message is never parsed). With
several replicas behind the target each may hold different keys, so inputs are
always sent.
"""
from __future__ import annotations

import atexit
import logging
import os
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from jest_stream import codec, wire
from jest_stream.client.channel import channel_target, check_target, credentials, service_config
from jest_stream.client.learner import on_host
from jest_stream.client.scorer import (InputsFn, KeyMemory, NotCached, ReferenceOutputs, ScorerRejected,
                                       ScorerUnavailable, SelectCall, memory_name)
from jest_stream.contract import ModelSpec
from jest_stream.options import check_name
from jest_stream.selection import Selection
from jest_stream.v1 import scorer_pb2 as pb
from jest_stream.v1 import scorer_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

# Codes after which a later call may succeed: the loader's fallback covers these.
TRANSIENT = frozenset({
    grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.ABORTED,
    grpc.StatusCode.CANCELLED,
})
NOT_CACHED_KEY = "jest-not-cached"  # the server's "send the inputs" signal (trailing metadata)


def _not_cached(exc: grpc.RpcError) -> bool:
    trailing = exc.trailing_metadata() if callable(getattr(exc, "trailing_metadata", None)) else None
    return exc.code() == grpc.StatusCode.FAILED_PRECONDITION and any(
        key == NOT_CACHED_KEY for key, _ in (trailing or ()))


@dataclass
class _Runtime:
    pid: int
    channel: grpc.Channel
    stub: pb_grpc.ScorerStub


@dataclass
class _Prefetch:
    """A Reference call in flight and the keys it warms (a prefetch handle for select)."""

    future: grpc.Future
    model: str
    keys: list[str]
    outputs: bool = False
    cache_hits: int | None = None  # the Reference reply's figures, once it came
    cache_misses: int | None = None


_LIVE: weakref.WeakSet[RemoteScorer] = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    for scorer in list(_LIVE):
        scorer.close()


class RemoteScorer:
    """A client of the shared scoring server (``python -m jest_stream.server``).

    ``target``: ``host:port``, ``dns:///name:port`` or a list of addresses
    (round_robin). ``token``: bearer token the server was started with. ``tls``:
    True (system roots), a CA certificate path or grpc.ChannelCredentials.
    ``timeout``: deadline of every call in seconds, retries included.
    ``max_message_bytes``: gRPC send/receive limit (the server's must be as large).
    ``embeddings_dtype``: how contrastive learner embeddings travel: ``"float16"``
    (the default: half the bytes of float32), ``"bfloat16"`` or ``"float32"``.
    """

    def __init__(self, target: str | Sequence[str], token: str | None = None,
                 tls: bool | str | os.PathLike | grpc.ChannelCredentials | None = None, *,
                 timeout: float = 10.0, max_message_bytes: int = 256 << 20, max_attempts: int = 4,
                 initial_backoff: float = 0.05, max_backoff: float = 1.0,
                 reconnect_backoff_max: float = 5.0, remember_keys: int = 1 << 20,
                 omit_cached_inputs: bool | None = None, embeddings_dtype: str = "float16",
                 channel_options: Sequence[tuple[str, Any]] = ()):
        self.embeddings_dtype = check_name(embeddings_dtype, codec.WIRE_FLOATS, "embeddings_dtype")
        if timeout <= 0:
            raise ValueError(f"timeout: must be > 0 seconds, got {timeout}")
        if max_attempts < 1:
            raise ValueError(f"max_attempts: must be >= 1, got {max_attempts}")
        check_target(target)
        self.target = target if isinstance(target, str) else list(target)
        self.timeout = float(timeout)
        self.max_message_bytes = int(max_message_bytes)
        self._token = token
        self._tls = tls
        self._service_config = service_config(max_attempts, initial_backoff, max_backoff)
        self._reconnect_max_ms = int(reconnect_backoff_max * 1000)
        self._extra_options = list(channel_options)
        self._omit = omit_cached_inputs
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._remember_keys = int(remember_keys)
        self._known = KeyMemory(self._remember_keys)
        self._lock = threading.Lock()
        self._runtime: _Runtime | None = None
        self._models: dict[str, ModelSpec] | None = None
        self._grpc_target: str | None = None
        _LIVE.add(self)

    def __repr__(self) -> str:
        return f"RemoteScorer({self.target!r})"

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.update(_lock=None, _runtime=None, _models=None, _known=None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
        self._known = KeyMemory(self._remember_keys)
        _LIVE.add(self)

    # -- runtime: the channel, per process ----------------------------------------------

    def _options(self) -> list[tuple[str, Any]]:
        return [
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.service_config", self._service_config),
            ("grpc.enable_retries", 1),
            ("grpc.per_rpc_retry_buffer_size", self.max_message_bytes),
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", max(self._reconnect_max_ms, 100)),
            ("grpc.lb_policy_name", "round_robin"),
            *self._extra_options,
        ]

    def _ensure(self) -> _Runtime:
        runtime = self._runtime
        if runtime is not None and runtime.pid == os.getpid():
            return runtime
        with self._lock:
            runtime = self._runtime
            if runtime is not None and runtime.pid == os.getpid():
                return runtime
            # A runtime from another pid was inherited through fork: its thread does not
            # exist here, so it is dropped, never touched.
            self._models = None
            try:
                target, single = channel_target(self.target)
            except (OSError, ValueError) as exc:
                raise ScorerUnavailable(f"target {self.target!r}: cannot resolve ({exc})") from exc
            self._grpc_target = target
            if self._omit is None:
                self._omit = single
            creds = credentials(self._tls)
            options = self._options()
            if creds is None:
                channel = grpc.insecure_channel(target, options=options)
            else:
                channel = grpc.secure_channel(target, creds, options=options)
            self._runtime = _Runtime(os.getpid(), channel, pb_grpc.ScorerStub(channel))
            log.debug("scorer channel to %s opened (pid %d)", target, os.getpid())
            return self._runtime

    def _submit(self, method: str, request: Any) -> grpc.Future:
        """Start a call in the background (gRPC's threads complete it); wait with ``_wait``."""
        rpc = getattr(self._ensure().stub, method)
        return rpc.future(request, timeout=self.timeout, metadata=self._metadata)

    def _wait(self, future: grpc.Future, what: str) -> Any:
        try:
            return future.result(timeout=self.timeout + 5.0)
        except grpc.RpcError as exc:
            raise self._translate(exc, what) from exc
        except grpc.FutureTimeoutError as exc:
            future.cancel()
            raise ScorerUnavailable(f"scorer {self.target!r}: {what} got no answer within "
                                    f"{self.timeout:.1f}s") from exc
        except grpc.FutureCancelledError as exc:  # closed while in flight
            raise ScorerUnavailable(f"scorer {self.target!r}: {what} was cancelled") from exc

    def _translate(self, exc: grpc.RpcError, what: str) -> Exception:
        code = exc.code() if callable(getattr(exc, "code", None)) else grpc.StatusCode.UNKNOWN
        details = exc.details() if callable(getattr(exc, "details", None)) else str(exc)
        message = f"scorer {self.target!r}: {what} failed with {code.name}: {details}"
        if code in TRANSIENT:
            return ScorerUnavailable(message)
        if _not_cached(exc):
            return NotCached(message)
        return ScorerRejected(message)

    def _call(self, method: str, request: Any) -> Any:
        """A blocking call from this thread (the deadline bounds it, retries included)."""
        rpc = getattr(self._ensure().stub, method)
        try:
            return rpc(request, timeout=self.timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise self._translate(exc, method) from exc

    # -- the Scorer interface ----------------------------------------------------------

    def models(self) -> dict[str, ModelSpec]:
        self._ensure()
        if self._models is None:
            reply = self._call("ListModels", pb.ListModelsRequest())
            self._models = {info.name: wire.spec_from_proto(info) for info in reply.models}
        return self._models

    def prefetch(self, model: str, job_id: str, keys: Sequence[str],
                 inputs: InputsFn, outputs: bool = False, dataset: str = "") -> _Prefetch | None:
        """Start a Reference call warming the cache for keys not known to be cached (or, with
        ``outputs``, fetching the outputs); returns its handle, None if nothing is sent."""
        known = memory_name(model, dataset, job_id)
        if not keys or (not outputs and self._omit and self._known.has_all(known, keys)):
            return None
        request = self._reference_request(model, job_id, keys, inputs, outputs, dataset, known)
        return _Prefetch(self._submit("Reference", request), known, list(keys), outputs)

    def _reference_request(self, model: str, job_id: str, keys: Sequence[str] | None,
                           inputs: InputsFn | None, outputs: bool, dataset: str,
                           known: str) -> pb.ReferenceRequest:
        """A Reference request, without the inputs when the server holds every key (``known``:
        the keys' KeyMemory name)."""
        request = pb.ReferenceRequest(model=model, job_id=job_id, keys=keys or (), return_outputs=outputs,
                                      dataset=dataset)
        if inputs is not None and not (keys and self._omit and self._known.has_all(known, keys)):
            codec.encode_map(inputs(), request.inputs)
        return request

    def reference(self, model: str, job_id: str, keys: Sequence[str] | None, inputs: InputsFn | None,
                  prefetched: _Prefetch | None = None, dataset: str = "") -> ReferenceOutputs:
        """The reference outputs of a super-batch: the prefetched reply when it has them,
        else a Reference call (resent with the inputs if the server evicted the keys)."""
        try:  # a prefetch that failed is asked again here, once
            reply = self._wait(prefetched.future, "Reference") if prefetched and prefetched.outputs else None
        except (ScorerUnavailable, ScorerRejected):
            reply = None
        known = memory_name(model, dataset, job_id)
        if reply is None:
            self._ensure()
            request = self._reference_request(model, job_id, keys, inputs, True, dataset, known)
            try:
                reply = self._call("Reference", request)
            except NotCached:
                if request.inputs or inputs is None:
                    raise
                self._known.forget(known)  # evicted: send the inputs
                codec.encode_map(inputs(), request.inputs)
                reply = self._call("Reference", request)
        self._known.add(known, list(keys or ()), reply.model_version)
        return ReferenceOutputs(codec.decode_map(reply.outputs, "outputs"), reply.cache_hits,
                                reply.cache_misses, reply.model_version)

    def _prefetched(self, handle: _Prefetch | None) -> bool:
        """True once the prefetch for these keys succeeded (they are in the cache)."""
        if handle is None:
            return False
        try:
            reply = self._wait(handle.future, "Reference")
        except (ScorerUnavailable, ScorerRejected) as exc:
            log.debug("reference prefetch failed, the Select sends inputs: %s", exc)
            return False
        self._known.add(handle.model, handle.keys, reply.model_version)
        handle.cache_hits, handle.cache_misses = int(reply.cache_hits), int(reply.cache_misses)
        return True

    def select_request(self, call: SelectCall, with_inputs: bool = True) -> pb.SelectRequest:
        """The SelectRequest sent for ``call`` (embeddings as ``embeddings_dtype``; inputs if ``with_inputs``)."""
        request = pb.SelectRequest(model=call.model, job_id=call.job_id, keys=list(call.keys or ()),
                                   n_select=int(call.n_select), dataset=call.dataset)
        wire.options_to_proto(call.options, request)
        if call.seed is not None:
            request.seed = int(call.seed)
        wire.learner_to_proto(on_host(call.learner), request.learner, self.embeddings_dtype)
        if with_inputs and call.inputs is not None:
            codec.encode_map(call.inputs(), request.inputs)
        return request

    def select(self, call: SelectCall, prefetched: Any = None) -> Selection:
        keys = list(call.keys) if call.keys else []
        known = memory_name(call.model, call.dataset, call.job_id)
        was_prefetched = self._prefetched(prefetched)
        omit = bool(keys) and bool(self._omit) and call.inputs is not None and (
            was_prefetched or self._known.has_all(known, keys))
        request = self.select_request(call, with_inputs=not omit)
        try:
            reply = self._call("Select", request)
        except NotCached:
            if not omit:
                raise
            # Keys were evicted from the server's cache (or never got there): send inputs.
            self._known.forget(known)
            codec.encode_map(call.inputs(), request.inputs)
            reply = self._call("Select", request)
        if keys:
            self._known.add(known, keys, reply.model_version)
        return wire.selection_from_proto(reply)

    def close(self) -> None:
        """Close the channel (in the process that owns it; calls in flight are cancelled)."""
        with self._lock:
            runtime, self._runtime = self._runtime, None
        if runtime is None or runtime.pid != os.getpid():
            return
        try:
            runtime.channel.close()
        except Exception as exc:  # closing is best effort: gRPC may be shutting down at exit
            log.debug("closing scorer channel: %s", exc)

    def __enter__(self) -> RemoteScorer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

