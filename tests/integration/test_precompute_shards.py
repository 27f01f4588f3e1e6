"""Reference outputs in the data: ``jest-stream precompute --write-shards`` writes shards whose
samples carry their reference outputs, and ``JESTLoader(reference="batch")`` trains on them
with no scorer, selecting exactly what the scorer path selects; batches from another model
version, or mixing versions, are refused."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import webdataset as wds

from jest_stream import (JESTLoader, LocalScorer, per_example_cross_entropy,
                         sigmoid_contrastive_embeddings)
from jest_stream.client.batch_reference import BatchReference
from jest_stream.client.scorer import ScorerRejected
from jest_stream.contract import model_version

from support import TwoTower
from test_precompute import digit_shards, pair_shards  # noqa: F401 - module fixtures

B = 100


def write_shards(model: str, shards: list[str], out) -> dict:
    """Run the CLI as a user would (and check it never imports torch)."""
    code = ("import sys\nfrom jest_stream.server.precompute import main\n"
            "rc = main(sys.argv[1:])\n"
            "assert not [m for m in sys.modules if m.split('.')[0] == 'torch'], 'precompute imported torch'\n"
            "sys.exit(rc)\n")
    proc = subprocess.run([sys.executable, "-c", code, "--model", model, "--shards", *shards,
                           "--write-shards", str(out), "--threads", "1", "--batch-size", "64"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def pipeline(paths: list[str]):
    return wds.WebDataset(paths, shardshuffle=False).decode().batched(B)


def classifier_score():
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    return lambda b: per_example_cross_entropy(model(torch.from_numpy(b["x.npy"])), torch.from_numpy(b["y.cls"]))


def two_tower_score():
    tower = TwoTower.build(seed=21)
    return lambda b: sigmoid_contrastive_embeddings(
        *tower(torch.from_numpy(b["image.npy"]), torch.from_numpy(b["text.npy"])), 8.0, -4.0)


def keys(loader) -> list[list[str]]:
    return [list(sub["__key__"]) for _ in range(2) for sub in loader]


@pytest.mark.parametrize("kind", ["per_example", "sigmoid_contrastive"])
def test_written_shards_train_with_no_scorer_as_the_scorer_path_does(
        kind, per_example_model, sigmoid_model, digit_shards, pair_shards, tmp_path):  # noqa: F811
    model, shards = ((per_example_model, digit_shards) if kind == "per_example"
                     else (sigmoid_model, pair_shards))
    fields = ("x", "y") if kind == "per_example" else ("image", "text")
    score = classifier_score() if kind == "per_example" else two_tower_score()
    counts = write_shards(model, shards["paths"], tmp_path / "out")
    out = [str(tmp_path / "out" / os.path.basename(p)) for p in shards["paths"]]
    assert counts == {"shards": len(out), "samples": len(shards["keys"]), "nonfinite": 0,
                      "model_version": model_version(model)}

    first = next(iter(pipeline(out)))
    assert set(first["jest.version.txt"]) == {model_version(model)} and first["jest.kind.txt"][0] == kind
    common = dict(filter_ratio=0.8, seed=4, n_chunks=4, score_gain=2.0)
    with LocalScorer(model, name="ref", intra_op_threads=1) as scorer:
        by_scorer = JESTLoader(pipeline(shards["paths"]), score, scorer,
                               reference_inputs=lambda b: {f: b[f"{f}.npy" if f != "y" else "y.cls"]
                                                           for f in fields}, **common)
        want = keys(by_scorer)
    by_batch = JESTLoader(pipeline(out), score, None, reference="batch", **common)
    got = keys(by_batch)
    assert got == want and len(got) == 2 * -(-len(shards["keys"]) // B)
    assert by_batch.stats.fallbacks == 0 and by_batch.stats.mean_score > by_batch.stats.mean_score_all


def test_batches_from_another_model_version_are_refused(per_example_model, sigmoid_model, digit_shards,
                                                        tmp_path):  # noqa: F811
    write_shards(per_example_model, digit_shards["paths"][:2], tmp_path / "out")
    out = [str(tmp_path / "out" / os.path.basename(p)) for p in digit_shards["paths"][:2]]
    with LocalScorer(sigmoid_model, name="other", intra_op_threads=1) as other:
        loader = JESTLoader(pipeline(out), classifier_score(), other, reference="batch")
        with pytest.raises(ScorerRejected, match="model version .* but this job expects"):
            next(iter(loader))

    batch = next(iter(pipeline(out)))
    batch["jest.version.txt"] = ["0123456789abcdef"] + batch["jest.version.txt"][1:]
    with pytest.raises(ScorerRejected, match="samples of one super-batch record different jest.version"):
        BatchReference().read(batch, B)
    del batch["jest.loss.npy"]
    batch["jest.version.txt"] = [model_version(per_example_model)] * B
    with pytest.raises(ScorerRejected, match="no field jest.loss"):
        BatchReference().read(batch, B)


def test_write_shards_needs_one_destination(per_example_model, digit_shards, tmp_path):  # noqa: F811
    from jest_stream.server.precompute import main

    assert main(["--model", per_example_model, "--shards", digit_shards["paths"][0]]) == 2
    assert main(["--model", per_example_model, "--shards", digit_shards["paths"][0], "--out",
                 str(tmp_path / "c"), "--write-shards", str(tmp_path / "d")]) == 2
    assert main(["--model", per_example_model, "--shards", digit_shards["paths"][0], "--write-shards",
                 os.path.dirname(digit_shards["paths"][0])]) == 2
