"""First contact without an extra: every command and import path names the extra to
install, in one line (commands: no traceback). Modules are made unimportable by a
meta-path blocker loaded at interpreter start (tests/unit/blocker/sitecustomize.py)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

BLOCKER = Path(__file__).parent / "blocker"
HEAVY = "torch,grpc,onnxruntime,onnx,sklearn,matplotlib,prometheus_client,uvloop"


def run(blocked: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(BLOCKER), os.environ.get("PYTHONPATH", "")]),
           "JEST_TEST_BLOCK": blocked}
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=120)


def test_the_blocker_blocks():
    done = run("torch", "-c", "import torch")
    assert done.returncode != 0 and "ModuleNotFoundError" in done.stderr


@pytest.mark.parametrize("argv, extra", [
    (["demo"], "demo"),
    (["serve"], "server"),
    (["health", "127.0.0.1:1"], "server"),
    (["precompute", "--model", "MODEL", "--shards", "none-*.tar", "--out", "x.cache", "--dataset", "digits"],
     "server"),
    (["bench", "server"], "local"),
    (["bench", "loader"], "local"),
    (["bench", "soak"], "local"),
    (["bench", "threads"], "local"),
])
def test_a_command_without_its_extra_prints_one_line(per_example_model, argv, extra):
    argv = [per_example_model if a == "MODEL" else a for a in argv]
    done = run(HEAVY, "-m", "jest_stream", *argv)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert f"pip install 'jest-stream[{extra}]'" in lines[0] and " ".join(argv[:2 if argv[0] == "bench" else 1]) in lines[0]
    helped = run(HEAVY, "-m", "jest_stream", *argv[:2 if argv[0] == "bench" else 1], "--help")
    assert "Traceback" not in helped.stderr and helped.returncode in (0, 2)  # help alone may need nothing


def test_the_server_module_without_its_extra_prints_one_line():
    done = run("grpc", "-m", "jest_stream.server", "--help")
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        "jest-stream: jest-stream serve needs grpc, which is not installed: pip install 'jest-stream[server]'"]


def test_the_core_needs_no_extra():
    assert run(HEAVY, "-c", "import jest_stream; jest_stream.select").returncode == 0
    assert run(HEAVY, "-m", "jest_stream", "--version").stdout.strip() == "jest-stream 0.1.0"
    assert run(HEAVY, "-m", "jest_stream", "bench", "selection", "--help").returncode == 0


@pytest.mark.parametrize("blocked, code, expected", [
    ("torch", "import jest_stream.client", "needs torch, which is not installed: pip install 'jest-stream[client]'"),
    ("torch", "from jest_stream import JESTLoader", "pip install 'jest-stream[client]'"),
    ("grpc", "from jest_stream import RemoteScorer", "needs grpc, which is not installed: pip install 'jest-stream[client]'"),
    ("onnxruntime", "from jest_stream import LocalScorer; LocalScorer(PATH).models()",
     "LocalScorer (the embedded scorer) needs onnxruntime, which is not installed: pip install 'jest-stream[local]'"),
    ("onnx", "import torch; from jest_stream import export_reference; "
             "export_reference(torch.nn.Linear(2, 2), None, 'x.onnx', example_inputs=(torch.zeros(2, 2),), "
             "kind='sigmoid_contrastive')", "export_reference needs onnx"),
    ("lightning", "import jest_stream.client.lightning", "needs lightning"),
    ("transformers", "import jest_stream.client.hf", "needs transformers"),
])
def test_an_import_path_without_its_extra_names_it(per_example_model, tmp_path, blocked, code, expected):
    done = run(blocked, "-c", code.replace("PATH", repr(per_example_model)))
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("ModuleNotFoundError: ") and expected in last, done.stderr
    assert "During handling of the above exception" not in done.stderr
