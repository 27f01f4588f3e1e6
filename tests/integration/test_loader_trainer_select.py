"""Selection where the embeddings are: ``JESTLoader(select_on="trainer")`` fetches only the
reference outputs and selects in the trainer; it picks the same sub-batches as scorer-side
selection for the same seed, with the embedded LocalScorer and with a real server."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from jest_stream import (JESTLoader, LocalScorer, RemoteScorer, per_example_cross_entropy,
                         sigmoid_contrastive_embeddings, softmax_contrastive_embeddings)
from jest_stream.outputs import Embeddings, Losses

from support import TwoTower, refusing_port, text_view

B, F = 128, 0.75


class Pairs(Dataset):
    """Digits as dict items: x/y for the classifier, image/text for the two-tower."""

    def __init__(self, digits, n: int = 640):
        self.x = torch.from_numpy(digits["x"][:n])
        self.y = torch.from_numpy(digits["y"][:n])
        self.text = torch.from_numpy(text_view(digits["x"][:n], 1))

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict:
        return {"x": self.x[i], "y": self.y[i], "image": self.x[i], "text": self.text[i],
                "__key__": f"pair-{i:05d}"}


def score_fn(kind: str):
    """A learner (not the reference) scoring a super-batch the way the kind needs."""
    torch.manual_seed(7)
    if kind == "per_example":
        model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
        # float64 torch losses (the exact path), float32-representable so the wire keeps them.
        return lambda b: Losses(torch.nn.functional.cross_entropy(model(b["x"]), b["y"], reduction="none")
                                .float().double())
    tower = TwoTower.build(seed=11)
    helper = sigmoid_contrastive_embeddings if kind == "sigmoid_contrastive" else softmax_contrastive_embeddings
    extra = (torch.tensor(-4.0),) if kind == "sigmoid_contrastive" else ()
    return lambda b: helper(*tower(b["image"], b["text"]), torch.tensor(8.0), *extra)


def keys_per_step(loader) -> list[list[str]]:
    return [list(sub["__key__"]) for _ in range(2) for sub in loader]


@pytest.fixture(scope="module")
def models(per_example_model, sigmoid_model, softmax_model):
    return {"per_example": per_example_model, "sigmoid_contrastive": sigmoid_model,
            "softmax_contrastive": softmax_model}


@pytest.mark.parametrize("kind", ["per_example", "sigmoid_contrastive", "softmax_contrastive"])
@pytest.mark.parametrize("sampler", ["joint", "topk"])
def test_trainer_and_scorer_side_agree_with_a_local_scorer(models, digits, kind, sampler):
    data = Pairs(digits)
    common = dict(filter_ratio=F, sampler=sampler, seed=5, n_chunks=4, score_gain=2.0)
    with LocalScorer(models[kind], name="ref", intra_op_threads=1) as scorer:
        on_scorer = JESTLoader(DataLoader(data, batch_size=B), score_fn(kind), scorer, **common)
        on_trainer = JESTLoader(DataLoader(data, batch_size=B), score_fn(kind), scorer,
                                select_on="trainer", **common)
        a, b = keys_per_step(on_scorer), keys_per_step(on_trainer)
    assert a == b and len(a) == 10 and all(len(k) == 32 for k in a)
    for loader in (on_scorer, on_trainer):
        assert loader.stats.fallbacks == 0 and loader.stats.mean_score > loader.stats.mean_score_all
    assert on_trainer.stats.cache_hits >= len(data)  # epoch 2 came from the reference cache
    # The same loss diagnostics (what the loader's reference watch reads) on both sides.
    for name in ("mean_learner_loss", "mean_reference_loss", "mean_reference_above"):
        assert getattr(on_trainer.stats, name) == pytest.approx(getattr(on_scorer.stats, name), rel=1e-5)


@pytest.mark.parametrize("kind", ["sigmoid_contrastive", "softmax_contrastive"])
def test_torch_learner_embeddings_select_where_they_are(models, digits, kind):
    """score_fn returns the learner's torch tensors: the trainer selects on them (in torch
    where the core supports it), the scorer side gets them as host arrays; the picks agree."""
    tower = TwoTower.build(seed=11)
    bias = -4.0 if kind == "sigmoid_contrastive" else 0.0
    as_tensors = lambda b: Embeddings(*tower(b["image"], b["text"]), 8.0, bias)  # noqa: E731
    data = Pairs(digits)
    common = dict(filter_ratio=F, seed=5, n_chunks=4, score_gain=2.0)
    with LocalScorer(models[kind], name="ref", intra_op_threads=1) as scorer:
        on_scorer = keys_per_step(JESTLoader(DataLoader(data, batch_size=B), as_tensors, scorer, **common))
        on_trainer = keys_per_step(JESTLoader(DataLoader(data, batch_size=B), as_tensors, scorer,
                                              select_on="trainer", **common))
    overlap = np.mean([len(set(a) & set(b)) / len(a) for a, b in zip(on_scorer, on_trainer)])
    assert len(on_scorer) == len(on_trainer) == 10 and overlap >= 0.99


def test_trainer_and_scorer_side_agree_with_a_real_server(start_server, models, digits):
    server = start_server({"pe": models["per_example"], "sig": models["sigmoid_contrastive"]})
    data = Pairs(digits)
    for model, kind in (("pe", "per_example"), ("sig", "sigmoid_contrastive")):
        common = dict(model=model, filter_ratio=F, seed=9, n_chunks=4, job=f"trainer-{kind}")
        with RemoteScorer(server.target, embeddings_dtype="float32") as remote:
            on_scorer = JESTLoader(DataLoader(data, batch_size=B), score_fn(kind), remote, **common)
            a = keys_per_step(on_scorer)
        with RemoteScorer(server.target) as remote:
            on_trainer = JESTLoader(DataLoader(data, batch_size=B), score_fn(kind), remote,
                                    select_on="trainer", **{**common, "job": f"trainer-{kind}-t"})
            b = keys_per_step(on_trainer)
        assert a == b and on_trainer.stats.fallbacks == 0
    # The trainer-side jobs made no Select call at all: only Reference calls.
    selects = sum(server.metric("jest_calls_total", method="Select", job=f"trainer-{k}-t/rank0of1")
                  for k in ("per_example", "sigmoid_contrastive"))
    references = server.metric("jest_calls_total", method="Reference", job="trainer-per_example-t/rank0of1")
    assert server.metric("jest_calls_total", method="Select", job="trainer-per_example/rank0of1") >= 10
    assert selects == 0 and references >= 10


def test_trainer_side_reference_outputs_follow_the_learner():
    from jest_stream.client.trainer_select import place_like

    ref = Embeddings(np.ones((4, 2), np.float32), np.ones((4, 2), np.float32), 2.0, -1.0)
    torch_learner = Embeddings(torch.zeros(4, 2), torch.zeros(4, 2))
    placed = place_like(ref, torch_learner)
    assert isinstance(placed.image, torch.Tensor) and placed.image.device == torch_learner.image.device
    assert (placed.logit_scale, placed.logit_bias) == (2.0, -1.0)
    assert isinstance(place_like(ref, Embeddings(np.zeros((4, 2)), np.zeros((4, 2)))).image, np.ndarray)


def test_bad_placement_is_refused_naming_the_option(per_example_model, digits):
    data = Pairs(digits, 128)
    with pytest.raises(ValueError, match="select_on: unknown value 'gpu'"):
        JESTLoader(data, score_fn("per_example"), None, select_on="gpu", reference="batch")
    with pytest.raises(ValueError, match="reference: unknown value 'disk'"):
        JESTLoader(data, score_fn("per_example"), None, reference="disk")
    with pytest.raises(TypeError, match="scorer: None needs reference='batch'"):
        JESTLoader(data, score_fn("per_example"), None)
    with pytest.raises(ValueError, match="select_on: reference='batch' selects on the trainer"):
        JESTLoader(data, score_fn("per_example"), None, select_on="scorer", reference="batch")


def test_trainer_step_bench_runs_the_batch_reference_path(capsys):
    import json

    from jest_stream.cli import main

    assert main(["bench", "trainer-step", "--sizes", "256", "--dim", "16", "--repeats", "1", "--json"]) == 0
    cases = json.loads(capsys.readouterr().out)["cases"]
    assert [(c["kind"], c["B"], c["b"], c["device"]) for c in cases] == [
        ("sigmoid_contrastive", 256, 51, "cpu"), ("softmax_contrastive", 256, 51, "cpu")]
    assert all(c["step_ms"] > 0 for c in cases)


def test_trainer_side_falls_back_when_the_scorer_is_down(digits):
    data = Pairs(digits, 256)
    with RemoteScorer(f"127.0.0.1:{refusing_port()}", timeout=1.0, max_attempts=1) as down:
        loader = JESTLoader(DataLoader(data, batch_size=B), score_fn("per_example"), down, select_on="trainer",
                            filter_ratio=F, seed=1, retry_after=0.0)
        subs = [sub for sub in loader]
    assert [len(s["__key__"]) for s in subs] == [32, 32]
    assert loader.stats.fallbacks == 2 and set(loader.stats.fallback_reasons) <= {"scorer_unavailable",
                                                                                  "scorer_down"}
