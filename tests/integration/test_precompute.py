"""``jest-stream precompute``: shards -> reference cache file -> the server answers from it
exactly as live scoring does; an interrupted run resumes without duplicating records."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import grpc
import numpy as np
import pytest

from jest_stream.options import SelectOptions
from jest_stream import codec
from jest_stream.cachefile import read_cache_file
from jest_stream.outputs import Embeddings, Losses
from jest_stream.server.precompute import expand_braces, precompute, shard_paths
from jest_stream.v1 import scorer_pb2 as pb
from jest_stream.v1 import scorer_pb2_grpc as pb_grpc


@pytest.fixture(scope="module")
def digit_shards(tmp_path_factory):
    """The demo's noisy training split (1137 digits, fields x and y) as 9 WebDataset shards."""
    from jest_stream.demo.data import make_classification, write_shards

    data = make_classification(noise=0.3, seed=0)
    out = tmp_path_factory.mktemp("shards")
    paths = write_shards(data.train, out, prefix="train", per_shard=128, fields=("x", "y"))
    return {"dir": str(out), "paths": paths, "keys": data.train.keys, "fields": data.train.fields}


@pytest.fixture(scope="module")
def pair_shards(tmp_path_factory):
    """Contrastive pairs (fields image and text) as WebDataset shards."""
    from jest_stream.demo.data import make_contrastive, write_shards

    data = make_contrastive(noise=0.3, seed=0)
    out = tmp_path_factory.mktemp("pairs")
    paths = write_shards(data.train, out, prefix="pairs", per_shard=400, fields=("image", "text"))
    return {"paths": paths, "keys": data.train.keys, "fields": data.train.fields}


def _records(path: str) -> tuple[str, list[tuple[str, dict]]]:
    version, records = read_cache_file(path)
    return version, list(records)


def test_expand_braces():
    assert expand_braces("train-{000..002}.tar") == ["train-000.tar", "train-001.tar", "train-002.tar"]
    assert expand_braces("{a,b}-{8..10}") == ["a-8", "a-9", "a-10", "b-8", "b-9", "b-10"]
    assert expand_braces("plain.tar") == ["plain.tar"]
    with pytest.raises(FileNotFoundError, match="--shards"):
        shard_paths(["/nonexistent/train-{000..001}.tar"])


def test_precompute_then_serve_gives_the_live_selection(per_example_model, digit_shards, start_server,
                                                        tmp_path):
    """Keys only, no inputs: the served Select must come from the precomputed file, and pick
    exactly what the engine picks when it runs the reference live on the inputs."""
    from jest_stream.server.engine import ScoringEngine

    cache = str(tmp_path / "ref.cache")
    pattern = os.path.join(digit_shards["dir"], "train-{000..008}.tar")
    counts = precompute(per_example_model, [pattern], cache, batch_size=100, progress=False, dataset="digits")
    assert counts["written"] == len(digit_shards["keys"]) and counts["skipped"] == 0

    server = start_server({"ref": per_example_model}, "--cache-file", cache)
    live = ScoringEngine({"ref": per_example_model}, intra_op_threads=1)
    rng = np.random.default_rng(0)
    x, y = digit_shards["fields"]["x"], digit_shards["fields"]["y"]
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.ScorerStub(channel)
        for step, sampler in enumerate(["joint", "topk", "joint"]):
            rows = rng.choice(len(digit_shards["keys"]), size=160, replace=False)
            keys = [digit_shards["keys"][i] for i in rows]
            learner = rng.gamma(2.0, 1.0, size=160).astype(np.float32)
            request = pb.SelectRequest(model="ref", job_id="test", dataset="digits", keys=keys, n_select=32,
                                       sampler=sampler,
                                       score_gain=2.0, seed=100 + step)
            codec.encode(learner, request.learner.losses)
            served = stub.Select(request, timeout=30)
            assert (served.cache_hits, served.cache_misses) == (160, 0)
            want = live.select("ref", learner=Losses(learner), n_select=32,
                               inputs={"x": x[rows], "y": y[rows]},
                               options=SelectOptions(sampler=sampler, score_gain=2.0), seed=100 + step)
            np.testing.assert_array_equal(np.asarray(served.indices), want.indices)
            assert served.mean_score == pytest.approx(want.mean_score, rel=1e-5)

        reply = stub.Reference(pb.ReferenceRequest(model="ref", dataset="digits", keys=digit_shards["keys"][:50],
                                                   return_outputs=True), timeout=30)
        assert reply.cache_hits == 50
        got = codec.decode(reply.outputs["loss"], "loss")
        want = live.models["ref"].run({"x": x[:50], "y": y[:50]})["loss"]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_precomputed_embeddings_select_as_live(sigmoid_model, pair_shards, tmp_path):
    """Contrastive reference: the engine loaded from the file selects as the live engine."""
    from jest_stream.server.engine import ScoringEngine

    cache = str(tmp_path / "pairs.cache")
    precompute(sigmoid_model, pair_shards["paths"], cache, progress=False, dataset="digits")
    cached = ScoringEngine({"ref": sigmoid_model}, intra_op_threads=1, cache_file=cache)
    live = ScoringEngine({"ref": sigmoid_model}, intra_op_threads=1)
    assert len(cached.cache) == len(pair_shards["keys"])
    rng = np.random.default_rng(1)
    rows = rng.choice(len(pair_shards["keys"]), size=128, replace=False)
    z = rng.standard_normal((2, 128, 16)).astype(np.float32)
    z /= np.linalg.norm(z, axis=2, keepdims=True)
    learner = Embeddings(z[0], z[1], 10.0, -5.0)
    a = cached.select("ref", learner=learner, n_select=32, keys=[pair_shards["keys"][i] for i in rows],
                      seed=5, dataset="digits")
    b = live.select("ref", learner=learner, n_select=32, seed=5,
                    inputs={n: pair_shards["fields"][n][rows] for n in ("image", "text")})
    assert (a.cache_hits, a.cache_misses) == (128, 0)
    np.testing.assert_array_equal(a.indices, b.indices)


def test_interrupted_precompute_resumes_without_duplicates(per_example_model, digit_shards, tmp_path):
    full = str(tmp_path / "full.cache")
    precompute(per_example_model, digit_shards["paths"], full, batch_size=64, progress=False, dataset="digits")
    _, reference = _records(full)

    part = str(tmp_path / "part.cache")
    first = precompute(per_example_model, digit_shards["paths"], part, batch_size=64, progress=False,
                       dataset="digits",
                       limit=300)
    assert first["written"] == 300
    with open(part, "r+b") as fh:  # a kill in the middle of writing the last record
        fh.truncate(os.path.getsize(part) - 7)
    _, partial = _records(part)
    assert len(partial) == 299  # the cut record is ignored ...

    second = precompute(per_example_model, digit_shards["paths"], part, batch_size=64, progress=False,
                        dataset="digits")
    assert second["skipped"] == 299  # ... and rewritten on resume
    assert second["written"] == len(digit_shards["keys"]) - 299
    third = precompute(per_example_model, digit_shards["paths"], part, progress=False, dataset="digits")
    assert third == {**third, "written": 0, "skipped": len(digit_shards["keys"])}

    version, resumed = _records(part)
    keys = [k for k, _ in resumed]
    assert len(keys) == len(set(keys)) == len(digit_shards["keys"])
    assert set(keys) == set(digit_shards["keys"])
    by_key = dict(resumed)
    for key, outputs in reference:
        np.testing.assert_allclose(by_key[key]["loss"], outputs["loss"], rtol=1e-5, atol=1e-6)


def test_cli_shows_progress_and_imports_no_torch(per_example_model, digit_shards, tmp_path):
    cache = str(tmp_path / "cli.cache")
    pattern = os.path.join(digit_shards["dir"], "train-{000..008}.tar")
    code = ("import sys\nfrom jest_stream.server.precompute import main\n"
            "rc = main(sys.argv[1:])\n"
            "assert not [m for m in sys.modules if m.split('.')[0] == 'torch'], 'precompute imported torch'\n"
            "sys.exit(rc)\n")
    proc = subprocess.run([sys.executable, "-c", code, "--model", per_example_model, "--shards", pattern,
                           "--out", cache, "--threads", "1", "--dataset", "digits"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    counts = json.loads(proc.stdout.strip().splitlines()[-1])
    assert counts["written"] == len(digit_shards["keys"])
    assert "precompute" in proc.stderr and f"{len(digit_shards['keys'])}/{len(digit_shards['keys'])}" in proc.stderr

    missing = subprocess.run([sys.executable, "-m", "jest_stream.server.precompute", "--model", per_example_model,
                              "--shards", str(tmp_path / "nope-{0..1}.tar"), "--out", cache, "--dataset", "digits"],
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "--shards" in missing.stderr
