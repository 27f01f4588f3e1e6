"""The scoring engine in-process (what LocalScorer embeds): the same answers as the core,
the reference cache (LRU under a byte budget), and the cache file it loads at start."""
from __future__ import annotations

import logging
import sys

import numpy as np
import onnx
import pytest
from support import OrtReference, inputs_for, learner_for, text_view

from jest_stream.contract import TensorSpec
from jest_stream.options import SelectOptions
from jest_stream.cachefile import CacheFileError, CacheFileWriter, iter_cache_file, read_cache_file
from jest_stream.contract import ContractError, model_version
from jest_stream.outputs import Losses
from jest_stream.server.cache import ENTRY_OVERHEAD, ReferenceCache
from jest_stream.server.engine import ScoringEngine, UnknownModel


@pytest.fixture(scope="module")
def paths(per_example_model, sigmoid_model, softmax_model):
    return {"digits": per_example_model, "sigmoid": sigmoid_model, "softmax": softmax_model}


@pytest.fixture(scope="module")
def engine(paths):
    return ScoringEngine(paths, intra_op_threads=1)


KIND = {"digits": "per_example", "sigmoid": "sigmoid_contrastive", "softmax": "softmax_contrastive"}


def rows_inputs(digits, kind, rows):
    if kind == "per_example":
        return inputs_for(kind, digits, rows)
    return {"image": digits["x"][rows], "text": text_view(digits["x"], seed=1)[rows]}


@pytest.mark.parametrize("name", list(KIND))
def test_engine_select_is_the_core_select(engine, paths, digits, name):
    kind = KIND[name]
    ref = OrtReference(paths[name])
    rows = np.arange(64) + 500
    inputs = rows_inputs(digits, kind, rows)
    learner = learner_for(kind, 64, seed=2)
    for sampler in ("joint", "topk", "uniform"):
        got = engine.select(name, learner=learner, n_select=16, keys=[f"e{r}" for r in rows], inputs=inputs,
                            options=SelectOptions(sampler=sampler, n_chunks=4), seed=5)
        want = ref.select(inputs, learner, 16, sampler=sampler, seed=5, n_chunks=4)
        np.testing.assert_array_equal(got.indices, want.indices)
        assert got.mean_score == pytest.approx(want.mean_score, rel=1e-6, abs=1e-9)
    # the three calls: the first ran all rows, the next two were all cache hits
    assert (got.cache_hits, got.cache_misses) == (64, 0)


def test_reference_mixes_cached_and_fresh_rows(engine, paths, digits):
    ref = OrtReference(paths["softmax"])
    a = rows_inputs(digits, "softmax_contrastive", np.arange(0, 40))
    engine.reference("softmax", [f"m{i}" for i in range(0, 40)], a)
    rows = np.arange(20, 70)
    both = rows_inputs(digits, "softmax_contrastive", rows)
    got = engine.reference("softmax", [f"m{i}" for i in rows], both)
    assert (got.hits, got.misses, got.version) == (20, 30, model_version(paths["softmax"]))
    want = ref.outputs(both)
    for name in want:
        np.testing.assert_allclose(got.outputs[name], want[name], rtol=1e-5, atol=1e-6)
    # all cached now: no inputs needed
    again = engine.reference("softmax", [f"m{i}" for i in rows], None)
    np.testing.assert_array_equal(again.outputs["image_embeds"], got.outputs["image_embeds"])


def test_engine_errors_name_the_field(engine, digits):
    inputs = rows_inputs(digits, "per_example", np.arange(8))
    learner = learner_for("per_example", 8, seed=0)
    cases = [
        (dict(model="nope"), "model"),
        (dict(n_select=9), "n_select"),
        (dict(keys=["k"] * 8), "keys[1]"),
        (dict(keys=[f"new{i}" for i in range(8)], inputs=None), "inputs"),
        (dict(inputs={"x": inputs["x"], "y": inputs["y"].astype(np.int32)}), "inputs['y']"),
        (dict(learner=Losses(np.r_[learner.values[:7], np.nan])), "learner.losses"),
        (dict(learner=learner_for("sigmoid_contrastive", 8, 0)), "learner"),
        (dict(sampler="gibbs"), "sampler"),
        (dict(score_gain=float("inf")), "score_gain"),
        (dict(seed=-1), "seed"),
    ]
    for change, field in cases:
        kw = {"model": "digits", "learner": learner, "n_select": 4, "inputs": inputs, **change}
        with pytest.raises(ValueError) as info:
            rule = {k: kw.pop(k) for k in ("sampler", "score_gain") if k in kw}
            engine.select(kw.pop("model"), options=SelectOptions(**rule), **kw)
        assert field in str(info.value), (change, str(info.value))
    with pytest.raises(UnknownModel):
        engine.model("nope")


def test_list_models(engine, paths):
    infos = {m.name: m for m in engine.list_models()}
    f32, i64 = np.dtype("float32"), np.dtype("int64")
    assert infos["digits"].inputs == (TensorSpec("x", f32, (-1, 64)), TensorSpec("y", i64, (-1,)))
    assert infos["softmax"].outputs == (TensorSpec("image_embeds", f32, (-1, 16)),
                                        TensorSpec("text_embeds", f32, (-1, 16)))
    assert infos["sigmoid"].version == model_version(paths["sigmoid"])
    assert (infos["sigmoid"].logit_scale, infos["sigmoid"].logit_bias) == (10.0, -5.0)


# -- the LRU cache --------------------------------------------------------------------------

def entry_size(key: str, row_bytes: int) -> int:
    return sys.getsizeof(key) + row_bytes + ENTRY_OVERHEAD


def test_cache_evicts_least_recently_used_under_the_budget():
    per = entry_size("k000", 8 * 4)
    cache = ReferenceCache(per * 100)
    block = lambda lo, hi: {"z": np.arange(lo * 8, hi * 8, dtype=np.float32).reshape(-1, 8)}  # noqa: E731
    keys = lambda lo, hi: [f"k{i:03d}" for i in range(lo, hi)]  # noqa: E731
    cache.put_batch("v", keys(0, 60), block(0, 60))
    cache.get("v", keys(0, 10))               # 0..9 are now the most recent
    cache.put_batch("v", keys(60, 120), block(60, 120))
    assert cache.bytes <= cache.max_bytes
    out, missing = cache.get("v", keys(0, 10))
    assert missing.size == 0                  # touched: kept
    np.testing.assert_array_equal(out["z"], block(0, 10)["z"])
    _, missing = cache.get("v", keys(10, 20))
    assert missing.size == 10                 # oldest: evicted
    out, missing = cache.get("v", keys(110, 120))
    assert missing.size == 0 and np.array_equal(out["z"], block(110, 120)["z"])
    assert len(cache) * per == cache.bytes and cache.evictions >= 20


def test_cache_versions_are_separate_and_partial_hits_are_filled():
    cache = ReferenceCache(1 << 20)
    cache.put_batch("v1", ["a", "b"], {"loss": np.array([1.0, 2.0], np.float32)})
    cache.put_batch("v2", ["a"], {"loss": np.array([9.0], np.float32)})
    out, missing = cache.get("v1", ["b", "x", "a"])
    assert missing.tolist() == [1]
    assert out["loss"][[0, 2]].tolist() == [2.0, 1.0]
    assert cache.get("v2", ["a"])[0]["loss"].tolist() == [9.0]
    assert cache.get("v3", ["a"])[0] is None
    cache.put_batch("v1", ["a"], {"loss": np.array([5.0], np.float32)})  # overwrite
    assert cache.get("v1", ["a"])[0]["loss"].tolist() == [5.0]
    assert len(cache) == 3
    with pytest.raises(ValueError, match="outputs"):
        cache.put_batch("v1", ["c"], {"other": np.zeros(1, np.float32)})


def test_cache_with_no_budget_holds_nothing():
    cache = ReferenceCache(0)
    cache.put_batch("v", ["a"], {"loss": np.zeros(1, np.float32)})
    assert len(cache) == 0 and cache.get("v", ["a"])[0] is None


# -- the cache file -------------------------------------------------------------------------

def test_cache_file_round_trip_and_resume(tmp_path):
    path = tmp_path / "c.jsc"
    rows = {f"s{i}": {"image_embeds": np.full(4, i, np.float32), "text_embeds": np.full(4, -i, np.float32)}
            for i in range(10)}
    with CacheFileWriter(path, "ver1", dataset="ds") as w:
        for key in list(rows)[:6]:
            assert w.add(key, rows[key])
        assert not w.add("s0", rows["s0"])  # already there
    size = path.stat().st_size
    with open(path, "ab") as fh:               # an interrupted writer: half a record at the end
        fh.write(b"\x82\xa1k\xa2s6\xa1o")
    version, records = read_cache_file(path)
    assert version == "ver1" and [k for k, _ in records] == [f"s{i}" for i in range(6)]
    with CacheFileWriter(path, "ver1", dataset="ds") as w:   # resume: keys known, the torn tail cut off
        assert w.keys == {f"s{i}" for i in range(6)}
        assert path.stat().st_size == size
        for key in list(rows)[6:]:
            w.add(key, rows[key])
    got = {key: out for _, key, out in iter_cache_file(path)}
    assert list(got) == list(rows)
    for key in rows:
        for name in rows[key]:
            np.testing.assert_array_equal(got[key][name], rows[key][name])
    with pytest.raises(CacheFileError, match="model version"):
        CacheFileWriter(path, "ver2", dataset="ds")


def test_not_a_cache_file(tmp_path):
    bad = tmp_path / "x.jsc"
    bad.write_bytes(b"\x93\x01\x02\x03")
    with pytest.raises(CacheFileError, match="not a jest-stream cache file"):
        read_cache_file(bad)
    (tmp_path / "empty.jsc").write_bytes(b"")
    with pytest.raises(CacheFileError, match="empty"):
        read_cache_file(tmp_path / "empty.jsc")


def test_engine_loads_cache_file(paths, digits, tmp_path, caplog):
    ref = OrtReference(paths["digits"])
    rows = np.arange(100)
    out = ref.outputs(inputs_for("per_example", digits, rows))
    path = tmp_path / "digits.jsc"
    with CacheFileWriter(path, model_version(paths["digits"]), dataset="ds") as w:
        for i in rows:
            w.add(f"d{i}", {"loss": out["loss"][i]})
    stale = tmp_path / "old.jsc"
    with CacheFileWriter(stale, "0123456789abcdef", dataset="ds") as w:
        w.add("d0", {"loss": np.float32(1.0)})
    with caplog.at_level(logging.WARNING):
        engine = ScoringEngine({"digits": paths["digits"]}, cache_file=[path, stale], intra_op_threads=1)
    assert "no loaded model has" in caplog.text
    got = engine.reference("digits", [f"d{i}" for i in rows], None, dataset="ds")
    assert (got.hits, got.misses) == (100, 0)
    np.testing.assert_array_equal(got.outputs["loss"], out["loss"])
    # a budget smaller than the file keeps the most recent records and says so
    small = ScoringEngine({"digits": paths["digits"]}, cache_file=path, intra_op_threads=1,
                          cache_bytes=40 * entry_size("d00", 4))
    assert 0 < len(small.cache) <= 40
    assert small.cache.get(model_version(paths["digits"]), ["d99"], "ds")[1].size == 0


def test_cache_file_of_the_wrong_shape_is_refused(paths, tmp_path):
    path = tmp_path / "bad.jsc"
    with CacheFileWriter(path, model_version(paths["sigmoid"]), dataset="ds") as w:
        w.add("a", {"image_embeds": np.zeros(3, np.float32), "text_embeds": np.zeros(3, np.float32)})
    with pytest.raises(CacheFileError, match="row shape"):
        ScoringEngine({"sigmoid": paths["sigmoid"]}, cache_file=path, intra_op_threads=1)


# -- the contract check at load ------------------------------------------------------------

def test_fixed_batch_axis_is_refused(tmp_path, per_example_model):
    proto = onnx.load(per_example_model)
    proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 4
    fixed = tmp_path / "fixed.onnx"
    onnx.save(proto, fixed)
    with pytest.raises(ContractError, match="dynamic batch axis"):
        ScoringEngine({"fixed": fixed}, intra_op_threads=1)


def test_wrong_kind_metadata_is_refused(tmp_path, per_example_model):
    proto = onnx.load(per_example_model)
    for prop in proto.metadata_props:
        if prop.key == "jest.kind":
            prop.value = "sigmoid_contrastive"
    bad = tmp_path / "lying.onnx"
    onnx.save(proto, bad)
    with pytest.raises(ContractError, match="needs outputs"):
        ScoringEngine({"lying": bad}, intra_op_threads=1)


def test_missing_model_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        ScoringEngine({"m": tmp_path / "nope.onnx"})


class _SortingCache(ReferenceCache):
    """The cache with eviction by a stable sort of every entry's last tick: the plain
    statement of LRU at request granularity that the recency queue must reproduce."""

    def _evict(self, nbytes: int) -> None:
        parts = [(slab, np.flatnonzero(slab.ticks >= 0)) for slab in self._slabs.values()]
        ticks = np.concatenate([slab.ticks[used] for slab, used in parts])
        sizes = np.concatenate([slab.sizes[used] for slab, used in parts])
        order = np.argsort(ticks, kind="stable")
        chosen = order[:int(np.searchsorted(np.cumsum(sizes[order]), nbytes)) + 1]
        offset = 0
        for slab, used in parts:
            mine = chosen[(chosen >= offset) & (chosen < offset + used.size)] - offset
            offset += used.size
            rows = used[mine]
            for key in slab.keys[rows]:
                del slab.index[key]
            self.bytes -= int(slab.sizes[rows].sum())
            self.evictions += int(rows.size)
            slab.release(rows)


@pytest.mark.parametrize("seed", range(4))
def test_cache_eviction_is_exact_lru(seed):
    """Random inserts (some of cached keys) and look-ups over two model versions, keys of
    varying length, a budget that keeps evicting: the same entries survive, in the same
    rows, as with a full sort by last use; and the recency queue stays bounded."""
    rng = np.random.default_rng(seed)
    budget = 60 * (ENTRY_OVERHEAD + 40)
    ours, plain = ReferenceCache(budget), _SortingCache(budget)
    for _ in range(3000):
        version = f"v{rng.integers(2)}"
        picked = rng.choice(300, int(rng.integers(1, 20)), replace=False)
        keys = [f"k{int(i)}" + "x" * (int(i) % 7) for i in picked]
        if rng.random() < 0.4:
            rows = {"z": rng.random((len(keys), 4), dtype=np.float32)}
            ours.put_batch(version, keys, rows)
            plain.put_batch(version, keys, rows)
        else:
            got, want = ours.get(version, keys), plain.get(version, keys)
            assert got[1].tolist() == want[1].tolist()
        assert (ours.bytes, ours.evictions, len(ours)) == (plain.bytes, plain.evictions, len(plain))
        for v, slab in ours._slabs.items():
            assert slab.index == plain._slabs[v].index
    _consistent(ours)
    assert ours.evictions > 1000
    assert ours._recency_rows <= 2 * len(ours) + 4096 + 20


def test_recency_queue_stays_bounded_without_evictions():
    """Look-ups of cached keys queue their rows; a cache that never fills compacts the
    queue instead of growing it with every call."""
    cache = ReferenceCache(1 << 30)
    keys = [f"k{i}" for i in range(1000)]
    cache.put_batch("v", keys, {"loss": np.zeros(1000, np.float32)})
    for _ in range(200):
        cache.get("v", keys)
    assert cache.evictions == 0
    assert cache._recency_rows <= 2 * len(cache) + 4096 + 1000


def _consistent(cache: ReferenceCache) -> None:
    """Every row is either free or held by exactly one indexed key, and bytes add up."""
    total = 0
    for slab in cache._slabs.values():
        used = np.flatnonzero(slab.ticks >= 0)
        assert sorted(slab.index.values()) == used.tolist()
        assert all(slab.keys[row] == key for key, row in slab.index.items())
        assert slab.n_free + used.size == slab.capacity
        assert sorted(slab.free[:slab.n_free].tolist()) == np.flatnonzero(slab.ticks < 0).tolist()
        total += int(slab.sizes[used].sum())
    assert cache.bytes == total


def test_keys_given_twice_or_cached_already_keep_the_last_row():
    cache = ReferenceCache(1 << 20)
    z = lambda *v: {"loss": np.array(v, np.float32)}  # noqa: E731
    cache.put_batch("v", ["a", "b"], z(1, 2))
    cache.put_batch("v", ["a", "c", "a", "a", "d"], z(3, 4, 5, 6, 7))  # cached once, then three times more
    out, missing = cache.get("v", ["a", "b", "c", "d"])
    assert missing.size == 0 and out["loss"].tolist() == [6, 2, 4, 7]
    assert len(cache) == 4
    _consistent(cache)
    cache.put_batch("v", ["b", "b"], z(8, 9))
    assert cache.get("v", ["b"])[0]["loss"].tolist() == [9] and len(cache) == 4
    _consistent(cache)
