"""A weak or overtaken reference is reported: the scorer's loss diagnostics (each model's
mean loss on the super-batch, the share of examples where the reference's is higher),
the loader's stats, and the one warning, with a real LocalScorer on real digits."""
from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch

from jest_stream import wire
from jest_stream.client.loader import JESTLoader
from jest_stream.client.local import LocalScorer
from jest_stream.client.reference_watch import ReferenceWatch
from jest_stream.demo import classification, contrastive
from jest_stream.demo.models import TwoTower, train_classifier, train_two_tower
from jest_stream.demo.training import SuperBatches, super_batch_loader
from jest_stream.conditional import conditional_scores
from jest_stream.diagnostics import loss_summary, sample_rows
from jest_stream.options import SelectOptions
from jest_stream.outputs import Embeddings, Losses
from jest_stream.v1 import scorer_pb2 as pb
from jest_stream.selection import Selection
from support import text_view

WARNING = "reference's loss has been above the learner's"


def _plain_in_batch(emb: Embeddings, kind: str) -> np.ndarray:
    """Each example's in-batch loss from the full B x B logit matrix."""
    x = emb.logit_scale * emb.image.astype(np.float64) @ emb.text.astype(np.float64).T
    if kind == "sigmoid_contrastive":
        x = x + emb.logit_bias
        y = 2.0 * np.eye(x.shape[0]) - 1.0
        nll = np.logaddexp(0.0, -y * x)
        off = nll - np.diag(np.diag(nll))
        return np.diag(nll) + off.sum(axis=1) + off.sum(axis=0)
    i2t = np.log(np.exp(x).sum(axis=1)) - np.diag(x)
    t2i = np.log(np.exp(x).sum(axis=0)) - np.diag(x)
    return 0.5 * (i2t + t2i)


def _embeddings(rng: np.random.Generator, batch: int, scale: float, bias: float) -> Embeddings:
    zi, zt = rng.standard_normal((2, batch, 16)).astype(np.float32)
    zt = zt + 2.0 * zi  # paired rows closer than the rest, as a trained model's are
    zi /= np.linalg.norm(zi, axis=1, keepdims=True)
    zt /= np.linalg.norm(zt, axis=1, keepdims=True)
    return Embeddings(zi, zt, scale, bias)


@pytest.mark.parametrize("kind", ["sigmoid_contrastive", "softmax_contrastive"])
@pytest.mark.parametrize("batch", [60, 1000])
def test_contrastive_loss_summary_is_the_plain_in_batch_loss(kind, batch):
    rng = np.random.default_rng(batch)
    bias = -5.0 if kind == "sigmoid_contrastive" else 0.0
    learner, reference = _embeddings(rng, batch, 8.0, bias), _embeddings(rng, batch, 12.0, bias)
    got = loss_summary(kind, learner, reference)
    rows = sample_rows(batch)  # every row when B <= 128, else 128 evenly spaced ones
    assert rows.size == min(batch, 128)
    ours, theirs = _plain_in_batch(learner, kind)[rows], _plain_in_batch(reference, kind)[rows]
    assert got.mean_learner_loss == pytest.approx(ours.mean(), rel=1e-5)
    assert got.mean_reference_loss == pytest.approx(theirs.mean(), rel=1e-5)
    assert got.reference_above_learner == pytest.approx(np.mean(theirs > ours))
    only = loss_summary(kind, learner, None)
    assert only.mean_learner_loss == got.mean_learner_loss and math.isnan(only.reference_above_learner)


@pytest.mark.parametrize("kind", ["sigmoid_contrastive", "softmax_contrastive"])
def test_contrastive_losses_are_what_topk_ranks_one_model_by(kind):
    """The core's per-example score of one model alone (score rule hard_learner)."""
    emb = _embeddings(np.random.default_rng(7), 100, 10.0, -4.0 if kind == "sigmoid_contrastive" else 0.0)
    want = conditional_scores(kind, emb.validated("learner"), None, "hard_learner").per_example()
    got = loss_summary(kind, emb, None).mean_learner_loss
    assert got == pytest.approx(float(np.mean(want)), rel=1e-5)


def test_per_example_summary_and_the_wire_keep_the_figures():
    learner, reference = Losses(np.array([1.0, 2.0, 3.0, 4.0])), Losses(np.array([2.0, 1.0, 5.0, 0.0]))
    got = loss_summary("per_example", learner, reference)
    assert (got.mean_learner_loss, got.mean_reference_loss, got.reference_above_learner) == (2.5, 2.0, 0.5)
    sel = Selection(np.array([2, 0]), 1.0, 0.5, **got.as_fields())
    back = wire.selection_from_proto(wire.selection_to_proto(sel))
    assert (back.mean_learner_loss, back.mean_reference_loss, back.reference_above_learner) == (2.5, 2.0, 0.5)
    request = pb.SelectRequest()
    wire.options_to_proto(SelectOptions(), request)  # score_gain None: the kind's default, sent as 0
    assert wire.options_from_proto(request) == SelectOptions()
    unset = wire.selection_to_proto(Selection(np.array([1]), 0.0, 0.0))  # NaN: left unset
    assert not unset.HasField("mean_learner_loss")
    assert math.isnan(wire.selection_from_proto(unset).reference_above_learner)


@pytest.mark.parametrize(("share", "window"), [(1.0, 5), (-0.1, 5), (0.5, 0), (0.5, 2.5)])
def test_reference_watch_refuses_bad_thresholds(share, window):
    with pytest.raises(ValueError, match="reference_watch"):
        ReferenceWatch(share=share, window=window)


def _digits_batches(digits, fields: dict[str, np.ndarray], seed: int = 0):
    keys = [f"d{i}" for i in range(digits["x"].shape[0])]
    return super_batch_loader(SuperBatches(keys, fields), 64, seed)


def _run(loader: JESTLoader, steps: int, train=None) -> None:
    done = 0
    while done < steps:
        for batch in loader:
            if train is not None:
                train(batch)
            done += 1
            if done >= steps:
                return


def _classifier_reference(tmp_path, digits, rows: int, steps: int) -> LocalScorer:
    model = train_classifier(digits["x"][:rows], digits["y"][:rows], steps=steps, seed=1)
    path = classification.export(model, str(tmp_path / f"ref-{rows}.onnx"))
    return LocalScorer(path, name="ref", intra_op_threads=1)


def _warnings(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno == logging.WARNING and WARNING in r.getMessage()]


def test_a_weak_reference_and_a_trained_learner_warn_once(tmp_path, digits, caplog):
    """Reference: 20 rows, 30 steps; learner: 1500 rows, 300 steps. Over 60 steps (the
    default window is 50) the reference's loss is above the learner's on most examples."""
    learner = train_classifier(digits["x"][:1500], digits["y"][:1500], steps=300, seed=2)
    with _classifier_reference(tmp_path, digits, rows=20, steps=30) as scorer:
        loader = JESTLoader(_digits_batches(digits, {"x": digits["x"], "y": digits["y"]}),
                            classification.score_fn(learner), scorer, n_select=16, sampler="topk", seed=0)
        with caplog.at_level(logging.WARNING, logger="jest_stream.client.loader"):
            _run(loader, 60)
    assert len(_warnings(caplog)) == 1  # once, not every step after the window filled
    stats = loader.stats
    assert stats.loss_steps == 60 and stats.mean_reference_above > 0.5
    assert stats.mean_reference_loss > stats.mean_learner_loss
    assert stats.as_dict()["mean_reference_loss"] == stats.mean_reference_loss


def test_a_good_reference_does_not_warn(tmp_path, digits, caplog):
    """Reference: 1000 clean rows, 300 steps; a fresh learner trained on what the loader yields."""
    torch.manual_seed(3)
    learner = classification.TASK.new_learner()
    opt = torch.optim.Adam(learner.parameters(), lr=2e-3)

    def train(batch):
        loss = classification.loss(learner, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()

    with _classifier_reference(tmp_path, digits, rows=1000, steps=300) as scorer:
        loader = JESTLoader(_digits_batches(digits, {"x": digits["x"], "y": digits["y"]}),
                            classification.score_fn(learner), scorer, n_select=16, seed=0)
        with caplog.at_level(logging.WARNING, logger="jest_stream.client.loader"):
            _run(loader, 60, train)
    assert _warnings(caplog) == []
    assert loader.stats.loss_steps == 60 and loader.stats.mean_reference_above < 0.5


@pytest.mark.parametrize("loss", ["sigmoid", "softmax"])
def test_an_untrained_contrastive_reference_warns(tmp_path, digits, caplog, loss):
    """Contrastive kinds: an untrained two-tower reference against a trained learner."""
    text = text_view(digits["x"], seed=1)
    learner = train_two_tower(digits["x"], text, steps=150, batch=64, seed=4, loss=loss)
    torch.manual_seed(5)
    weak = TwoTower(loss=loss).eval()
    path = contrastive._export(weak, str(tmp_path / f"weak-{loss}.onnx"))
    with LocalScorer(path, name="ref", intra_op_threads=1) as scorer:
        loader = JESTLoader(_digits_batches(digits, {"image": digits["x"], "text": text}),
                            contrastive._score_fn(learner), scorer, n_select=16, seed=0,
                            reference_watch=ReferenceWatch(share=0.5, window=10))
        with caplog.at_level(logging.WARNING, logger="jest_stream.client.loader"):
            _run(loader, 12)
    assert len(_warnings(caplog)) == 1
    assert loader.stats.mean_reference_above > 0.5
