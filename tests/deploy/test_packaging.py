"""Packaging: the wheel carries py.typed (the annotations reach type checkers) and the
.proto wire contract, the sdist carries the proto and protos/generate.py, and the protobuf floor admits what
other gRPC clients (tritonclient[grpc]: protobuf >= 6.30, < 7) need."""
from __future__ import annotations

import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    for what in (["wheel", "--no-deps", "--no-build-isolation", "-w", str(out), str(ROOT)],):
        done = subprocess.run([sys.executable, "-m", "pip", *what], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
    done = subprocess.run([sys.executable, "-c", "import sys; from setuptools import build_meta as b; "
                           "print(b.build_sdist(sys.argv[1]))", str(out)], cwd=str(ROOT),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return out


def test_the_wheel_has_py_typed_and_the_proto(dist):
    (wheel,) = dist.glob("jest_stream-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "jest_stream/py.typed" in names
    assert "jest_stream/protos/scorer.proto" in names and "jest_stream/v1/scorer_pb2.pyi" in names
    assert "jest_stream/client/loader.py" in names and "jest_stream/__main__.py" in names


def test_the_sdist_has_protos(dist):
    (sdist,) = dist.glob("jest_stream-*.tar.gz")
    names = {n.split("/", 1)[1] for n in tarfile.open(sdist).getnames() if "/" in n}
    assert {"protos/generate.py", "protos/jest_stream/v1/scorer.proto", "jest_stream/py.typed",
            "MANIFEST.in"} <= names


def test_the_protobuf_floor_admits_tritonclient(dist):
    (wheel,) = dist.glob("jest_stream-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        meta = zf.read(next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    reqs = [Requirement(line.split(":", 1)[1].strip()) for line in meta.splitlines()
            if line.startswith("Requires-Dist:")]
    (protobuf,) = [r for r in reqs if r.name == "protobuf"]
    assert protobuf.specifier.contains("6.30.0") and protobuf.specifier.contains("4.25.1")
