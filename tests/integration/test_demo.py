"""The demo, small: each task end to end (shards, reference, export, JESTLoader, table, PNG),
plus the pieces whose numbers the README quotes (label noise, pair mismatches, metrics)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from jest_stream.demo import cli as demo
from jest_stream.demo.data import (flip_labels, make_classification, make_contrastive, mismatch_pairs,
                                          read_shards, write_shards)
from jest_stream.demo.report import MethodRuns, cost_per_example, steps_to_reach, summarize

SMALL = ["--seeds", "1", "--steps", "20", "--eval-every", "5", "--super-batch", "80"]


def _check_png(path: str) -> None:
    from matplotlib.image import imread

    img = imread(path)
    assert img.ndim == 3 and img.shape[0] >= 200 and img.shape[1] >= 300
    assert float(img[..., :3].std()) > 0.01  # something was drawn


def test_classification_demo_prints_table_and_png(tmp_path, capsys):
    assert demo.main(SMALL + ["--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("method"))
    rows = {line.split()[0]: line for line in lines[header + 2:header + 5]}
    assert set(rows) == {"uniform", "topk", "joint"}
    assert "B=80, b=16 (f=0.8), 20 steps" in out
    png = tmp_path / "demo-classification.png"
    assert f"plot: {png}" in out
    _check_png(str(png))
    assert sorted(p.name for p in (tmp_path / "shards-classification").iterdir())[0] == "train-000.tar"


def test_contrastive_demo_json(tmp_path, capsys):
    assert demo.main(SMALL + ["--task", "contrastive", "--out", str(tmp_path), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["task"] == "contrastive"
    assert result["metric"] == "retrieval_accuracy"
    assert set(result["methods"]) == {"uniform", "topk", "joint"}
    for m in result["methods"].values():
        assert 0.0 <= m["final_acc"] <= 1.0
        assert "steps_to_uniform_final" in m
        assert m["fallbacks"] == 0
    assert result["methods"]["uniform"]["steps_to_uniform_final"] <= 20
    _check_png(result["plot"])


def test_remote_demo_selects_as_the_embedded_scorer_does(tmp_path, capsys):
    """--remote starts a real server; the same seeds give the same selections, hence the
    same learning curves, as the embedded scorer."""
    argv = SMALL + ["--methods", "joint", "--json"]
    assert demo.main(argv + ["--out", str(tmp_path / "local")]) == 0
    local = json.loads(capsys.readouterr().out)
    assert demo.main(argv + ["--out", str(tmp_path / "remote"), "--remote"]) == 0
    remote = json.loads(capsys.readouterr().out)
    assert remote["config"]["scorer"].startswith("remote")
    assert remote["methods"]["joint"]["fallbacks"] == 0
    for method in ("uniform", "joint"):
        assert remote["methods"][method]["final_acc_per_seed"] == pytest.approx(
            local["methods"][method]["final_acc_per_seed"], abs=1e-6)


def test_demo_trains_against_a_running_scorer_with_a_token(tmp_path, capsys, start_server):
    """--remote TARGET --token-file: the compose trainers' way to share one scorer."""
    argv = SMALL + ["--methods", "joint", "--json"]
    assert demo.main(argv + ["--out", str(tmp_path / "local")]) == 0
    local = json.loads(capsys.readouterr().out)
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    server = start_server({demo.MODEL_NAME: str(tmp_path / "local" / "reference-classification.onnx")},
                          "--token-file", str(token))
    argv += ["--out", str(tmp_path / "remote"), "--remote", server.target, "--token-file", str(token)]
    assert demo.main(argv) == 0
    remote = json.loads(capsys.readouterr().out)
    assert remote["config"]["scorer"] == f"remote ({server.target})"
    assert remote["methods"]["joint"]["fallbacks"] == 0
    assert remote["methods"]["joint"]["final_acc_per_seed"] == pytest.approx(
        local["methods"]["joint"]["final_acc_per_seed"], abs=1e-6)


def test_flip_labels_flips_exactly_the_fraction_to_other_classes():
    labels = np.arange(1000) % 10
    noisy, flipped = flip_labels(labels, 0.3, np.random.default_rng(0))
    assert flipped.sum() == 300
    assert np.all(noisy[flipped] != labels[flipped])
    assert np.all(noisy[~flipped] == labels[~flipped])
    assert set(np.unique(noisy)) == set(range(10))


def test_mismatched_pairs_are_really_mismatched():
    partner, mismatched = mismatch_pairs(500, 0.3, np.random.default_rng(1))
    assert mismatched.sum() == 150
    assert np.all(partner[mismatched] != np.flatnonzero(mismatched))
    assert np.all(partner[~mismatched] == np.flatnonzero(~mismatched))
    assert sorted(partner) == list(range(500))  # a permutation: every text used once


def test_splits_are_disjoint_and_shards_round_trip(tmp_path):
    data = make_classification(noise=0.3, seed=0)
    keys = [set(s.keys) for s in (data.train, data.reference, data.test)]
    assert not (keys[0] & keys[1] or keys[0] & keys[2] or keys[1] & keys[2])
    assert len(data.train) + len(data.reference) + len(data.test) == 1797
    assert abs(data.train.corrupted.mean() - 0.3) < 0.001
    paths = write_shards(data.train, tmp_path, per_shard=500)
    assert len(paths) == 3
    read_keys, columns = read_shards(paths)
    assert read_keys == data.train.keys
    np.testing.assert_array_equal(columns["x"], data.train.fields["x"])
    np.testing.assert_array_equal(columns["y"], data.train.fields["y"])
    pairs = make_contrastive(noise=0.3, seed=0)
    assert pairs.train.fields["image"].shape == pairs.train.fields["text"].shape == (len(pairs.train), 64)


def _runs(curves: dict[str, list[list[float]]]) -> dict[str, MethodRuns]:
    steps = np.arange(1, len(next(iter(curves.values()))[0]) + 1) * 10
    return {m: MethodRuns(m, steps, curves=c) for m, c in curves.items()}


def test_summary_speedups_and_compute():
    runs = _runs({
        "uniform": [[0.5, 0.7, 0.8, 0.9, 0.85], [0.5, 0.7, 0.8, 0.9, 0.85]],
        "joint": [[0.6, 0.9, 0.95, 0.95, 0.96], [0.6, 0.8, 0.95, 0.95, 0.96]],
        "topk": [[0.5, 0.6, 0.7, 0.8, 0.84], [0.5, 0.6, 0.7, 0.8, 0.84]],
    })
    config = {"super_batch": 100, "sub_batch": 20, "seeds": [0, 1]}
    s = summarize(runs, task="t", metric="test_accuracy", config=config, reference_training_F=600.0,
                  cache_fill_F=100.0)
    assert list(s["methods"]) == ["uniform", "topk", "joint"]
    assert s["target"] == pytest.approx(0.85)
    u, j, t = s["methods"]["uniform"], s["methods"]["joint"], s["methods"]["topk"]
    assert u["steps_to_uniform_final"] == 40 and u["speedup_steps"] == 1.0
    assert j["steps_to_uniform_final"] == 20  # mean curve 0.85 at step 20
    assert j["steps_to_uniform_final_per_seed"] == [20, 30]
    assert j["speedup_steps"] == pytest.approx(50 / 20)
    assert j["speedup_vs_first_reach"] == pytest.approx(40 / 20)
    # uniform: 50 steps x 20 x 3F; joint: 20 steps x 20 x (2 + 5)F cached, (2 + 10)F live
    assert j["compute_speedup"]["cached"] == pytest.approx(3 * 50 / (7 * 20))
    assert j["compute_speedup"]["uncached"] == pytest.approx(3 * 50 / (12 * 20))
    # one-off: reference training (+ its cache fill when cached) added to the method's compute
    assert j["compute_speedup_with_one_off"]["cached"] == pytest.approx(3000 / (7 * 400 + 700))
    assert j["compute_speedup_with_one_off"]["uncached"] == pytest.approx(3000 / (12 * 400 + 600))
    assert t["steps_to_uniform_final"] is None and t["speedup_steps"] is None
    assert t["compute_speedup"]["cached"] is None


def test_cost_per_example_is_design_section_3():
    assert cost_per_example("uniform", 160, 32) == {"cached": 3.0, "uncached": 3.0}
    cost = cost_per_example("joint", 160, 32)
    assert cost["cached"] / 3 == pytest.approx(2.33, abs=0.01)  # "2.33x an IID step at f = 0.8"
    assert cost["uncached"] / 3 == pytest.approx(4.0)
    assert steps_to_reach(np.array([10, 20]), np.array([0.5, 0.6]), 0.7) is None


def test_mismatched_views_never_get_a_view_of_their_own_digit():
    groups = np.repeat(np.arange(60), 8)  # 8 views of each of 60 digits
    partner, mismatched = mismatch_pairs(groups.size, 0.4, np.random.default_rng(2), groups=groups)
    assert mismatched.sum() == round(0.4 * groups.size)
    rows = np.flatnonzero(mismatched)
    assert np.all(groups[partner[rows]] != groups[rows])
    assert np.all(partner[~mismatched] == np.flatnonzero(~mismatched))
    assert sorted(partner) == list(range(groups.size))
    with pytest.raises(ValueError, match="noise"):  # too few rows to leave every group
        mismatch_pairs(8, 0.5, np.random.default_rng(0), groups=np.zeros(8, dtype=int))


def test_many_views_make_a_large_pool_with_clean_reference_and_test_splits():
    pairs = make_contrastive(noise=0.4, seed=0, views=4)
    assert len(pairs.train) == 4 * 1137 and len(pairs.reference) == 4 * 300 and len(pairs.test) == 360
    assert len(set(pairs.train.keys)) == len(pairs.train)
    assert abs(pairs.train.corrupted.mean() - 0.4) < 0.001
    assert not pairs.reference.corrupted.any()
    train = pairs.train.fields
    # clean pairs: the text is a view of the image's own digit, so closer than a mismatched one
    dist = np.abs(train["image"] - train["text"]).mean(axis=1)
    assert dist[~pairs.train.corrupted].mean() < 0.5 * dist[pairs.train.corrupted].mean()
    assert make_contrastive(noise=0.3, seed=0).train.keys == make_contrastive(noise=0.3, seed=0, views=1).train.keys


def test_softmax_contrastive_demo_exports_a_softmax_reference(tmp_path, capsys):
    import onnx

    argv = SMALL + ["--task", "contrastive", "--loss", "softmax", "--methods", "joint", "--json",
                    "--out", str(tmp_path)]
    assert demo.main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["config"]["variant"] == "contrastive-softmax-small"
    assert result["methods"]["joint"]["fallbacks"] == 0
    assert len(result["methods"]["joint"]["corrupted_selected_per_seed"]) == 1
    model = tmp_path / "reference-contrastive-softmax-small.onnx"
    meta = {p.key: p.value for p in onnx.load(str(model)).metadata_props}
    assert "softmax_contrastive" in meta.values()
    _check_png(result["plot"])


def test_large_super_batches_pick_the_large_preset():
    from jest_stream.demo.contrastive import preset_for, task

    assert preset_for(None) == preset_for(160) == "small" and preset_for(1280) == "large"
    big = task("sigmoid", "large")
    assert big.defaults["super_batch"] >= 1024 and big.file_suffix == "-sigmoid-large"
    assert task().file_suffix == "" and task().defaults["super_batch"] == 160
    with pytest.raises(SystemExit, match="--loss"):
        demo.main(["--task", "classification", "--loss", "softmax"])


def test_a_bad_selection_rule_is_refused_before_any_training(tmp_path):
    """The demo's rule is one SelectOptions built from the flags: a bad gain stops the run
    at once with the field's message (not a traceback after the reference has trained)."""
    with pytest.raises(SystemExit, match="score_gain: must be a positive"):
        demo.main(["--task", "contrastive", "--score-gain", "-1", "--out", str(tmp_path)])
    assert not any(tmp_path.iterdir())
    with pytest.raises(SystemExit):
        demo.main(["--task", "contrastive", "--lookahead", "sometimes", "--out", str(tmp_path)])


def test_saved_results_redraw_as_one_figure(tmp_path, capsys):
    """--json --curves results are enough to draw the docs' figure, a panel per result."""
    from jest_stream.demo.report import main as report_main

    argv = SMALL + ["--task", "contrastive", "--methods", "topk", "--json", "--curves"]
    saved = []
    for ratio in ("0.8", "0.9"):
        assert demo.main(argv + ["--filter-ratio", ratio, "--out", str(tmp_path)]) == 0
        saved.append(tmp_path / f"f{ratio}.json")
        saved[-1].write_text(capsys.readouterr().out)
    assert report_main([str(tmp_path / "grid.png"), *map(str, saved)]) == 0
    _check_png(str(tmp_path / "grid.png"))
    (tmp_path / "bare.json").write_text(json.dumps({k: v for k, v in json.loads(saved[0].read_text()).items()
                                                    if k != "curves"}))
    with pytest.raises(SystemExit, match="--curves"):
        report_main([str(tmp_path / "x.png"), str(tmp_path / "bare.json")])
