"""Regenerate the committed gRPC stubs in jest_stream/v1/ from protos/jest_stream/v1/*.proto.

Run after editing protos/jest_stream/v1/scorer.proto: ``python protos/generate.py``. The
test suite checks that the committed stubs match it, so they never drift. The wheel
carries the .proto too (as ``jest_stream.protos``, see pyproject.toml).

The committed stubs are generated with grpcio-tools 1.62 (protobuf 4.25 gencode), in
a venv of its own (``python -m venv /tmp/gt && /tmp/gt/bin/pip install
grpcio-tools==1.62.3 && /tmp/gt/bin/python protos/generate.py``): newer generators
add runtime checks that require protobuf and grpcio at least as new as themselves,
which would forbid the protobuf < 7 that other packages (tritonclient[grpc]) need.
Such old gencode runs on every newer protobuf runtime.
"""
from __future__ import annotations

import pathlib
import sys

PROTO_ROOT = pathlib.Path(__file__).resolve().parent  # imports are jest_stream/v1/*.proto
PROTOS = sorted(str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / "jest_stream").rglob("*.proto"))


def generate(out_dir: pathlib.Path) -> None:
    """Write scorer_pb2.py, .pyi and scorer_pb2_grpc.py under ``out_dir/jest_stream/v1``."""
    from grpc_tools import protoc  # build/dev-time dependency only

    args = ["protoc", f"-I{PROTO_ROOT}", f"--python_out={out_dir}", f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}", *PROTOS]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {PROTOS}")


if __name__ == "__main__":
    generate(PROTO_ROOT.parent if len(sys.argv) < 2 else pathlib.Path(sys.argv[1]))
