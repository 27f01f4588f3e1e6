"""Hugging Face Trainer: JESTTrainer trains a tiny config-built model (no download) for 2
epochs on selected sub-batches, and its selection stats reach TensorBoard."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import PretrainedConfig, PreTrainedModel, TrainingArguments  # noqa: E402
from transformers.modeling_outputs import SequenceClassifierOutput  # noqa: E402

from support import KeyedDigits  # noqa: E402

from jest_stream import LocalScorer  # noqa: E402
from jest_stream.client.hf import JESTTrainer  # noqa: E402

B, b = 64, 16


class DigitsConfig(PretrainedConfig):
    model_type = "jest-digits"

    def __init__(self, hidden: int = 32, num_labels: int = 10, **kwargs):
        super().__init__(num_labels=num_labels, **kwargs)
        self.hidden = hidden


class DigitsModel(PreTrainedModel):
    config_class = DigitsConfig

    def __init__(self, config: DigitsConfig):
        super().__init__(config)
        self.net = torch.nn.Sequential(torch.nn.Linear(64, config.hidden), torch.nn.ReLU(),
                                       torch.nn.Linear(config.hidden, config.num_labels))
        self.post_init()

    def forward(self, x, labels=None):
        logits = self.net(x)
        loss = None if labels is None else torch.nn.functional.cross_entropy(logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)


class LabelledDigits(KeyedDigits):
    """The keyed digits with the label under the name HF models take: ``labels``."""

    def __getitem__(self, i: int) -> dict:
        item = super().__getitem__(i)
        item["labels"] = item.pop("y")
        return item


class Recorder(transformers.TrainerCallback):
    def __init__(self):
        self.epochs: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.epochs.append(state.epoch)


def test_two_epochs_on_selected_sub_batches(per_example_model, digits, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    torch.manual_seed(0)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=B, num_train_epochs=2,
                             learning_rate=0.05, logging_steps=1, save_strategy="no", use_cpu=True,
                             report_to=["tensorboard"],
                             dataloader_num_workers=0, disable_tqdm=True, seed=0)
    recorder = Recorder()
    with LocalScorer(per_example_model, intra_op_threads=1) as scorer:
        trainer = JESTTrainer(model=DigitsModel(DigitsConfig()), args=args, train_dataset=LabelledDigits(digits, 640),
                              scorer=scorer, callbacks=[recorder],
                              jest={"n_select": b, "seed": 0,
                                    "reference_inputs": lambda batch: {"x": batch["x"], "y": batch["labels"]}})
        result = trainer.train()
    loader = trainer.jest_loader
    assert result.global_step == 20  # 10 super-batches of 64 per epoch, 2 epochs
    assert loader.epoch == 2 and loader.stats.sub_batches == 20
    assert loader.stats.examples_selected == 20 * b and loader.stats.fallbacks == 0
    assert recorder.epochs[-1] == pytest.approx(2.0)
    runs = sorted((tmp_path / "out").rglob("events.out.tfevents.*"))
    assert runs, "no TensorBoard event file"
    events = EventAccumulator(str(runs[-1]))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert "train/jest/sub_batches" in tags and "train/jest/reference_inferred" in tags
    assert events.Scalars("train/jest/sub_batches")[-1].value == 20.0
