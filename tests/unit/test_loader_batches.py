"""Batch structure utilities and learner score helpers (no scorer needed)."""
from __future__ import annotations

import collections

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import webdataset as wds
from support import digit_key, load_digits_arrays

from jest_stream import Embeddings, Losses
from jest_stream.client.batches import batch_size, fields_by_name, keys_of, take, to_numpy
from jest_stream.client.learner import (as_learner_scores, per_example_cross_entropy,
                                        sigmoid_contrastive_embeddings, softmax_contrastive_embeddings)

DIGITS = load_digits_arrays()
X = torch.from_numpy(DIGITS["x"][:12])
Y = torch.from_numpy(DIGITS["y"][:12])
KEYS = [digit_key(i) for i in range(12)]
IDX = np.array([7, 0, 3, 11])

Pair = collections.namedtuple("Pair", "x y")


def test_tensor_dict_tuple_namedtuple_and_nested():
    assert torch.equal(take(X, IDX), X[IDX])
    sub = take({"x": X, "y": Y, "__key__": KEYS, "meta": "train", "n": 3}, IDX)
    assert torch.equal(sub["x"], X[IDX]) and torch.equal(sub["y"], Y[IDX])
    assert sub["__key__"] == [KEYS[i] for i in IDX]
    assert sub["meta"] == "train" and sub["n"] == 3
    sub = take((X, Y), IDX)
    assert isinstance(sub, tuple) and torch.equal(sub[1], Y[IDX])
    sub = take([X, Y], IDX)
    assert isinstance(sub, list) and torch.equal(sub[0], X[IDX])
    sub = take(Pair(X, Y), IDX)
    assert isinstance(sub, Pair) and torch.equal(sub.y, Y[IDX])
    sub = take({"a": (X, {"b": Y.numpy()}), "tags": [str(int(y)) for y in Y]}, IDX)
    assert np.array_equal(sub["a"][1]["b"], Y.numpy()[IDX])
    assert sub["tags"] == [str(int(Y[i])) for i in IDX]


def test_batch_size_prefers_arrays_over_metadata_lists():
    assert batch_size({"classes": ["a", "b"], "x": X}) == 12
    assert batch_size((KEYS,)) == 12
    assert batch_size({"classes": ["a", "b"], "x": X, "0d": torch.tensor(1.0)}) == 12
    with pytest.raises(ValueError, match="found no tensor"):
        batch_size({"name": "x"})


def test_metadata_list_passes_and_mismatched_rows_are_named():
    sub = take({"x": X, "classes": ["a", "b", "c"]}, IDX)
    assert sub["classes"] == ["a", "b", "c"]
    with pytest.raises(ValueError, match=r"batch\['y'\]: has 5 rows but the super-batch has 12"):
        take({"x": X, "y": Y[:5]}, IDX)
    with pytest.raises(ValueError, match="indices"):
        take(X, np.array([12]))


def test_webdataset_batches(tmp_path):
    shard = str(tmp_path / "digits-000.tar")
    with wds.TarWriter(shard) as sink:
        for i in range(12):
            sink.write({"__key__": KEYS[i], "x.npy": DIGITS["x"][i],
                        "y.cls": int(DIGITS["y"][i])})
    pipeline = wds.WebDataset(shard, shardshuffle=False).decode().batched(12)
    batch = next(iter(pipeline))
    assert batch_size(batch) == 12
    assert keys_of(batch, "__key__", 12) == KEYS
    sub = take(batch, IDX)
    assert sub["__key__"] == [KEYS[i] for i in IDX]
    assert np.array_equal(sub["x.npy"], DIGITS["x"][IDX])
    assert np.array_equal(sub["y.cls"], DIGITS["y"][IDX])
    assert set(sub) == set(batch)
    tuples = wds.WebDataset(shard, shardshuffle=False).decode().to_tuple("__key__", "x.npy").batched(12)
    sub = take(next(iter(tuples)), IDX)
    assert isinstance(sub, tuple) and sub[0] == [KEYS[i] for i in IDX]


def test_keys():
    assert keys_of({"x": X}, "__key__", 12) is None
    assert keys_of({"x": X, "id": torch.arange(12)}, "id", 12) == [str(i) for i in range(12)]
    assert keys_of((X, Y), lambda b: [f"k{i}" for i in range(len(b[0]))], 12)[3] == "k3"
    assert keys_of({"x": X, "__key__": [k.encode() for k in KEYS]}, "__key__", 12) == KEYS
    with pytest.raises(KeyError, match="no field 'id'"):
        keys_of({"x": X}, "id", 12)
    with pytest.raises(ValueError, match="3 keys for a super-batch of B=12"):
        keys_of({"k": ["a", "b", "c"]}, "k", 12)


def test_reference_input_mapping_and_dtype():
    assert set(fields_by_name({"x": X, "y": Y, "z": 1}, ["x", "y"])) == {"x", "y"}
    assert fields_by_name((X, Y), ["x", "y"])["y"] is Y
    with pytest.raises(KeyError, match=r"no field\(s\) \['y'\]"):
        fields_by_name({"x": X}, ["x", "y"])
    with pytest.raises(ValueError, match="reference_inputs=fn"):
        fields_by_name(X, ["x", "y"])
    arr = to_numpy(torch.tensor(DIGITS["x"][:4], dtype=torch.float64), np.dtype(np.float32))
    assert arr.dtype == np.float32 and arr.flags.c_contiguous


def test_per_example_cross_entropy_matches_torch():
    logits = torch.randn(12, 10, generator=torch.Generator().manual_seed(0))
    got = per_example_cross_entropy(logits, Y)
    assert isinstance(got, Losses) and got.values.dtype == np.float32
    np.testing.assert_allclose(got.values, F.cross_entropy(logits, Y, reduction="none").numpy(), rtol=1e-6)
    seq = torch.randn(3, 5, 7, generator=torch.Generator().manual_seed(1))
    tgt = torch.randint(0, 7, (3, 5), generator=torch.Generator().manual_seed(2))
    tgt[0, 3:] = -100
    got = per_example_cross_entropy(seq, tgt).values
    expect = F.cross_entropy(seq[0, :3], tgt[0, :3]).item()
    assert got[0] == pytest.approx(expect, rel=1e-5)
    with pytest.raises(ValueError, match="targets: expected shape"):
        per_example_cross_entropy(logits, Y[:3])


def test_contrastive_helpers_normalise_and_keep_scale():
    g = torch.Generator().manual_seed(3)
    zi, zt = torch.randn(6, 4, generator=g) * 5, torch.randn(6, 4, generator=g)
    sig = sigmoid_contrastive_embeddings(zi, zt, torch.tensor(10.0), torch.tensor(-10.0))
    assert isinstance(sig, Embeddings) and (sig.logit_scale, sig.logit_bias) == (10.0, -10.0)
    np.testing.assert_allclose(np.linalg.norm(sig.image, axis=1), 1.0, rtol=1e-5)
    soft = softmax_contrastive_embeddings(zi, zt, 100.0, normalize=False)
    np.testing.assert_allclose(soft.image, zi.numpy())
    assert soft.logit_bias == 0.0


def test_score_fn_results():
    assert isinstance(as_learner_scores(torch.ones(4)), Losses)
    with pytest.raises(ValueError, match=r"shape \(B,\)"):
        as_learner_scores(torch.ones(4, 2))
    with pytest.raises(TypeError, match="score_fn: returned dict"):
        as_learner_scores({"loss": 1})
