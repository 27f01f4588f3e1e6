"""Stats reach the user's tools: ``stats.scalars()`` is a flat dict of numbers, logged to
TensorBoard with one line; with a served scorer the first-contact cache figures tell
rows inferred (epoch 1) from rows served from the cache (epoch 2), though the
prefetch makes every Select a cache hit."""
from __future__ import annotations

import torch
from support import KeyedDigits
from torch.utils.data import DataLoader

from jest_stream import JESTLoader, RemoteScorer, per_example_cross_entropy

B = 64


def test_served_cache_figures_and_tensorboard(start_server, per_example_model, digits, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    server = start_server({"digits": per_example_model})
    model = torch.nn.Linear(64, 10)
    writer = SummaryWriter(str(tmp_path / "tb"))
    with RemoteScorer(server.target) as scorer:
        loader = JESTLoader(DataLoader(KeyedDigits(digits, 320), batch_size=B, shuffle=True),
                            lambda b: per_example_cross_entropy(model(b["x"]), b["y"]), scorer,
                            n_select=16, seed=0)
        per_epoch = []
        for _ in range(2):
            for _batch in loader:
                for name, value in loader.stats.scalars("jest/").items():  # the documented line
                    writer.add_scalar(name, value, loader.step)
            per_epoch.append((loader.stats.reference_inferred, loader.stats.reference_cached,
                              loader.stats.cache_hits, loader.stats.cache_misses))
    writer.close()
    (inferred1, cached1, hits1, misses1), (inferred2, cached2, hits2, misses2) = per_epoch
    assert (inferred1, cached1) == (320, 0)  # epoch 1: every row ran through the reference model
    assert (inferred2, cached2) == (320, 320)  # epoch 2: all from the cache
    assert hits1 == 320 and misses1 == 0  # what the Selects alone say: warmed by the prefetch
    flat = loader.stats.scalars()
    assert all(isinstance(v, float) for v in flat.values())
    assert flat["reference_cached_fraction"] == 0.5 and flat["sub_batches"] == 10.0
    events = EventAccumulator(str(next((tmp_path / "tb").glob("events.out.tfevents.*"))))
    events.Reload()
    assert events.Scalars("jest/reference_inferred")[-1].value == 320.0
    assert events.Scalars("jest/sub_batches")[-1].step == 10
