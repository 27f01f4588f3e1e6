"""The ``jest-stream`` command: one entry point, each subcommand in the module that owns it.

Subcommand modules are imported only when called, so ``jest-stream serve`` never
imports torch and ``jest-stream --help`` imports nothing heavy.
"""
from __future__ import annotations

import importlib
import logging
import sys
from collections.abc import Sequence

from jest_stream import __version__
from jest_stream.extras import install_hint, is_third_party

# name -> (module with main(argv) -> int, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("jest_stream.server.cli", "run the gRPC scoring server (reference models in ONNX Runtime)"),
    "health": ("jest_stream.server.health_probe", "ask a scorer's grpc.health.v1 service; exit 0 if SERVING"),
    "precompute": ("jest_stream.server.precompute", "fill a reference cache file from WebDataset shards"),
    "demo": ("jest_stream.demo.cli", "train on noisy digits with uniform, RHO-LOSS and JEST selection"),
}
# The extra each command needs (benchmarks: by name).
EXTRAS: dict[str, str] = {"serve": "server", "health": "server", "precompute": "server", "demo": "demo",
                          "server": "local", "loader": "local", "soak": "local",
                          "threads": "local"}
BENCHES: dict[str, tuple[str, str]] = {
    "selection": ("jest_stream.bench.selection", "selection speed vs the matmul floor and a B x B implementation"),
    "gpu": ("jest_stream.bench.gpu", "paper-scale joint selection on torch-CUDA and CuPy beside its matmul floor"),
    "server": ("jest_stream.bench.server", "served vs in-process throughput, cache hits, concurrency, fairness"),
    "loader": ("jest_stream.bench.loader", "JESTLoader overhead, local and remote"),
    "soak": ("jest_stream.bench.soak", "16 jobs against one scorer: errors, latency, memory growth"),
    "wire": ("jest_stream.bench.wire", "bytes and selection overlap of float16/bfloat16 learner embeddings"),
    "trainer-step": ("jest_stream.bench.trainer_step", "trainer-side selection step (select_on='trainer')"),
    "isolation": ("jest_stream.bench.isolation", "a good job beside floods, heavy jobs and unauthenticated "
                  "giants: p99, RSS, wrong answers"),
    "threads": ("jest_stream.bench.threads", "a local Select inside a training step vs idle, threads bounded or not"),
}


def _usage() -> str:
    lines = ["usage: jest-stream [--version] COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<12} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["  bench NAME   benchmarks, printing JSON with --json:"]
    lines += [f"    {name:<10} {help_}" for name, (_, help_) in BENCHES.items()]
    lines += ["", "Run 'jest-stream COMMAND --help' for a command's options."]
    return "\n".join(lines)


def _run(table: dict[str, tuple[str, str]], name: str, argv: list[str], what: str) -> int:
    if name not in table:
        print(f"jest-stream: unknown {what} {name!r}; expected one of {', '.join(table)}\n", file=sys.stderr)
        print(_usage(), file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(table[name][0])
        return int(module.main(argv) or 0)
    except ModuleNotFoundError as exc:
        if not is_third_party(exc):
            raise
        label = f"bench {name}" if table is BENCHES else name
        print(f"jest-stream: {install_hint(exc.name, f'jest-stream {label}', EXTRAS.get(name))}", file=sys.stderr)
        return 2


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch ``jest-stream COMMAND ...`` to the command's own ``main(argv)``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(_usage())
        return 0 if args else 2
    if args[0] in ("-V", "--version"):
        print(f"jest-stream {__version__}")
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args[0] == "bench":
        if len(args) < 2 or args[1] in ("-h", "--help"):
            print(_usage())
            return 0 if len(args) > 1 else 2
        return _run(BENCHES, args[1], args[2:], "benchmark")
    return _run(COMMANDS, args[0], args[1:], "command")


if __name__ == "__main__":
    sys.exit(main())
