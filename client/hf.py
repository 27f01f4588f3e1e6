"""Hugging Face Trainer glue: ``JESTTrainer``, a Trainer that trains on selected sub-batches.

Needs ``transformers`` (imported here only). ``get_train_dataloader`` wraps the
Trainer's own (accelerate-prepared, sharded across processes) DataLoader in a
JESTLoader, so ``per_device_train_batch_size`` is the super-batch size B and each
step trains on b of its examples; the Trainer calls ``set_epoch`` on it every epoch.
The key field (``"__key__"``) is dropped before the model sees a batch, and the
loader's ``stats.scalars("jest/")`` join every ``Trainer.log`` (TensorBoard, W&B, ...).

Resuming a Trainer checkpoint mid-epoch skips batches with accelerate's
``skip_first_batches``, which only knows DataLoaders: pass ``ignore_data_skip=True``
in TrainingArguments when resuming (the loader then starts the epoch again).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

try:
    from transformers import Trainer
except ModuleNotFoundError as exc:  # pragma: no cover - exercised by the missing-extra tests
    raise ModuleNotFoundError(f"jest_stream.client.hf needs transformers ({exc.name} is missing): "
                              "pip install transformers") from None
from torch.utils.data import default_collate

from jest_stream.client.learner import per_example_cross_entropy
from jest_stream.client.loader import JESTLoader
from jest_stream.client.scorer import Scorer


class JESTTrainer(Trainer):
    """``Trainer(..., scorer=LocalScorer(...), jest={"filter_ratio": 0.8, "seed": 0})``.

    ``jest``: JESTLoader options (``filter_ratio``, ``n_select``, ``seed``,
    ``reference_inputs``, ...). ``score_fn(model, batch)``: the learner's per-example
    scores; by default the cross-entropy of ``model(**inputs).logits`` against the
    batch's ``labels``. ``key``: the batch field holding sample keys (not passed to
    the model). Without a ``data_collator``, torch's ``default_collate`` is used: the
    Trainer's default drops string fields such as the keys.
    """

    def __init__(self, *args: Any, scorer: Scorer, jest: Mapping[str, Any] | None = None,
                 score_fn: Callable[[Any, Any], Any] | None = None, key: str = "__key__", **kwargs: Any):
        kwargs.setdefault("data_collator", default_collate)
        super().__init__(*args, **kwargs)
        self.jest_scorer = scorer
        self.jest_options = dict(jest or {})
        self.jest_score_fn = score_fn
        self.jest_key = key
        self.jest_loader: JESTLoader | None = None

    def get_train_dataloader(self) -> JESTLoader:  # type: ignore[override]
        base = super().get_train_dataloader()
        self.jest_loader = JESTLoader(base, self._jest_score, self.jest_scorer, key=self.jest_key,
                                      **self.jest_options)
        return self.jest_loader

    def _model_inputs(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in batch.items() if k != self.jest_key}

    def _jest_score(self, batch: Mapping[str, Any]) -> Any:
        if self.jest_score_fn is not None:
            return self.jest_score_fn(self.model, batch)
        labels = batch.get("labels")
        if labels is None:
            raise ValueError("score_fn: the batch has no 'labels' field; pass score_fn=(model, batch) -> "
                             "per-example losses to JESTTrainer")
        return per_example_cross_entropy(self.model(**self._model_inputs(batch)).logits, labels)

    def compute_loss(self, model: Any, inputs: Mapping[str, Any], *args: Any, **kwargs: Any) -> Any:
        return super().compute_loss(model, self._model_inputs(inputs), *args, **kwargs)

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if self.jest_loader is not None:
            logs = {**logs, **{k: v for k, v in self.jest_loader.stats.scalars("jest/").items() if v == v}}
        super().log(logs, *args, **kwargs)
