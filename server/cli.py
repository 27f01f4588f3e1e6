"""``jest-stream serve``: flags, each also settable as an environment variable JEST_<FLAG>
(e.g. JEST_PORT=50051, JEST_MODEL="ref=/models/ref.onnx,clip=/models/clip.onnx")."""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence

from jest_stream.cachefile import CacheFileError
from jest_stream.contract import ContractError

from .app import ServerConfig, serve
from .device import DEVICES, DeviceUnavailable, require_cuda
from .limits import RequestLimits, default_inflight_bytes

log = logging.getLogger(__name__)


def _env(flag: str) -> str:
    return "JEST_" + flag.lstrip("-").replace("-", "_").upper()


def _model(value: str) -> tuple[str, str]:
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"--model: expected NAME=PATH, got {value!r}")
    return name, path


def _flag_adder(p: argparse.ArgumentParser):
    """``add(flag, help, **kw)``: an argparse flag whose default comes from $JEST_<FLAG> if set
    (a bad value stops with one line naming the variable)."""
    def add(flag: str, help_: str, **kw):
        env = _env(flag)
        default = kw.pop("default", None)
        if env in os.environ:
            raw = os.environ[env]
            if kw.get("action") == "append":  # applied after parsing, unless the flag is given
                conv = kw.get("type", str)
                p.set_defaults(**{"_env_" + flag.lstrip("-").replace("-", "_"):
                                  [conv(v.strip()) for v in raw.split(",") if v.strip()]})
            elif kw.get("action") == "store_true":
                default = raw.lower() in ("1", "true", "yes", "on")
            else:
                conv = kw.get("type", str)
                try:
                    default = conv(raw)
                except (ValueError, argparse.ArgumentTypeError) as exc:
                    raise SystemExit(f"{env}={raw!r}: not a valid {flag} "
                                     f"({getattr(conv, '__name__', 'value')} expected: {exc})") from None
        p.add_argument(flag, default=default, help=f"{help_} [env {env}]", **kw)
    return add


def build_parser() -> argparse.ArgumentParser:
    """Every ``jest-stream serve`` flag, each also settable as $JEST_<FLAG>."""
    p = argparse.ArgumentParser(prog="jest-stream serve", description=__doc__)
    add = _flag_adder(p)
    add("--model", "reference model NAME=PATH (repeatable; env: comma-separated)", action="append", type=_model)
    add("--host", "address to bind", default="0.0.0.0")
    add("--port", "gRPC port (0 picks a free one)", type=int, default=50051)
    add("--cache-bytes", "reference cache budget in bytes", type=int, default=1 << 30)
    add("--cache-file", "precomputed reference cache file (repeatable)", action="append")
    add("--token-file", "file holding the bearer token clients must send")
    add("--tls-cert", "PEM certificate chain: serve TLS")
    add("--tls-key", "PEM private key for --tls-cert")
    add("--max-message-bytes", "largest request/response in bytes", type=int, default=256 << 20)
    add("--metrics-port", "serve Prometheus metrics on this port (0 picks a free one)", type=int)
    add("--metrics-host", "address of the metrics endpoint (0.0.0.0 where Prometheus scrapes from "
        "another host)", default="127.0.0.1")
    add("--intra-op-threads", "ONNX Runtime intra-op threads (default: ORT's choice)", type=int)
    add("--inter-op-threads", "ONNX Runtime inter-op threads", type=int)
    add("--providers", "ONNX Runtime execution providers, comma-separated (default: CUDA if available, "
        "else CPU)")
    add("--device", "cuda: reference inference on ONNX Runtime's CUDA provider with inputs and outputs "
        "on the GPU, and selection there in CuPy (the gpu extra); cpu: the CPU only (default: CUDA for "
        "inference if ONNX Runtime has it, selection on the host)", choices=DEVICES)
    add("--workers", "threads decoding requests and running selection", type=int, default=4)
    add("--max-inflight", "calls in flight before RESOURCE_EXHAUSTED", type=int, default=256)
    add("--max-batch", "most rows per reference inference batch", type=int, default=8192)
    add("--inference-workers", "batches of one model run at once (with --intra-op-threads 1, up to the "
        "number of cores)", type=int, default=1)
    add("--max-delay-ms", "longest wait to fill an inference batch", type=float, default=2.0)
    add("--max-queue-rows", "rows allowed to wait for inference before RESOURCE_EXHAUSTED", type=int,
        default=262144)
    add("--grace", "seconds in-flight calls get to finish after SIGTERM", type=float, default=30.0)
    add("--port-file", "once the ports are bound, write them here as JSON {\"port\", \"metrics_port\"} "
        "(how a parent learns the ports of --port 0)")
    limits = RequestLimits()
    add("--max-examples", "most examples (B) per request", type=int, default=limits.max_examples)
    add("--max-embed-dim", "widest learner embedding (d) per request", type=int, default=limits.max_embed_dim)
    add("--max-chunks", "most joint-sampler chunks per request", type=int, default=limits.max_chunks)
    add("--max-select-work", "most selection work per request (about B*b*(d+48), B*B*(d+48) for softmax, "
        "in ~1 ns units)", type=int, default=limits.max_select_work)
    add("--max-inflight-bytes", "request bytes the calls in flight may hold together (default: a quarter "
        "of the host's memory, at most 4 GiB)", type=int, default=default_inflight_bytes())
    add("--heavy-workers", "threads for heavy selections, one per job at a time (default: workers / 2, "
        "at most cores - 1)",
        type=int)
    add("--log-level", "logging level", default="INFO")
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse flags; environment variables fill what the command line leaves unset."""
    args = build_parser().parse_args(argv)
    for name in list(vars(args)):
        if name.startswith("_env_"):
            dest = name[len("_env_"):]
            if getattr(args, dest) is None:
                setattr(args, dest, getattr(args, name))
            delattr(args, name)
    return args


def _read(path: str | None, flag: str) -> bytes | None:
    if not path:
        return None
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError as exc:
        raise SystemExit(f"{flag}: cannot read {path!r}: {exc.strerror}") from None


def _token(path: str | None) -> str | None:
    """The bearer token in ``path``: printable ASCII (it travels in a header), not empty."""
    raw = _read(path, "--token-file")
    if raw is None:
        return None
    try:
        token = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        raise SystemExit(f"--token-file: {path!r} is not ASCII text; a bearer token travels in an HTTP "
                         "header, so use printable ASCII (e.g. `openssl rand -hex 32`)") from None
    if not token:
        raise SystemExit(f"--token-file: {path!r} is empty")
    if not all(" " < c <= "~" for c in token):
        raise SystemExit(f"--token-file: {path!r} holds spaces or control characters; use printable "
                         "ASCII without spaces (e.g. `openssl rand -hex 32`)")
    return token


def _check_tls_pair(cert: str, key: str) -> None:
    """The certificate and key must load and belong together (ssl says which is wrong)."""
    import ssl

    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        reason = "the key does not match the certificate" if "KEY_VALUES_MISMATCH" in str(exc) or \
            "key values mismatch" in str(exc) else f"they do not load as PEM ({exc.reason or exc})"
        raise SystemExit(f"--tls-cert/--tls-key: {cert!r} and {key!r}: {reason}") from None


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    """Check the parsed flags and turn them into a ServerConfig."""
    if not args.model:
        raise SystemExit("--model: give at least one reference model as NAME=PATH (or JEST_MODEL)")
    if args.device is not None and args.device not in DEVICES:
        raise SystemExit(f"--device: {args.device!r} is not one of {', '.join(DEVICES)} (JEST_DEVICE)")
    if bool(args.tls_cert) != bool(args.tls_key):
        raise SystemExit("--tls-cert/--tls-key: give both or neither")
    token_str = _token(args.token_file)
    tls_cert, tls_key = _read(args.tls_cert, "--tls-cert"), _read(args.tls_key, "--tls-key")
    if tls_cert:
        _check_tls_pair(args.tls_cert, args.tls_key)
    return ServerConfig(
        models=dict(args.model), host=args.host, port=args.port, cache_bytes=args.cache_bytes,
        cache_files=list(args.cache_file or []), token=token_str,
        tls_cert=tls_cert, tls_key=tls_key,
        max_message_bytes=args.max_message_bytes, metrics_port=args.metrics_port,
        metrics_host=args.metrics_host, intra_op_threads=args.intra_op_threads,
        inter_op_threads=args.inter_op_threads, workers=args.workers, max_inflight=args.max_inflight,
        providers=[p for p in args.providers.split(",") if p] if args.providers else None,
        max_batch=args.max_batch, max_delay_ms=args.max_delay_ms, inference_workers=args.inference_workers,
        max_queue_rows=args.max_queue_rows, grace_s=args.grace, port_file=args.port_file,
        device=args.device,
        limits=RequestLimits(args.max_examples, args.max_embed_dim, args.max_chunks, args.max_select_work),
        max_inflight_bytes=args.max_inflight_bytes, heavy_workers=args.heavy_workers)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    config = config_from_args(args)
    if config.device == "cuda":
        try:
            require_cuda()
        except DeviceUnavailable as exc:
            raise SystemExit(str(exc)) from None
    for flag, value in (("--port", config.port), ("--max-message-bytes", config.max_message_bytes - 1),
                        ("--workers", config.workers - 1), ("--max-inflight", config.max_inflight - 1),
                        ("--max-batch", config.max_batch - 1), ("--max-queue-rows", config.max_queue_rows - 1),
                        ("--inference-workers", config.inference_workers - 1),
                        ("--cache-bytes", config.cache_bytes),
                        ("--max-examples", config.limits.max_examples - 1),
                        ("--max-embed-dim", config.limits.max_embed_dim - 1),
                        ("--max-chunks", config.limits.max_chunks - 1),
                        ("--max-select-work", config.limits.max_select_work - 1),
                        ("--max-inflight-bytes", config.max_inflight_bytes - 1),
                        ("--heavy-workers", (config.heavy_workers or 1) - 1)):
        if value < 0:
            raise SystemExit(f"{flag}: must be {'>= 0' if flag in ('--port', '--cache-bytes') else '>= 1'}")
    try:
        import uvloop
        runner = uvloop.run
    except ImportError:  # e.g. Windows
        runner = asyncio.run
    try:
        runner(serve(config))
    except (ContractError, CacheFileError, DeviceUnavailable, FileNotFoundError, OSError) as exc:
        log.error("cannot serve: %s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
