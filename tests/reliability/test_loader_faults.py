"""Faults: a scorer unreachable at start or killed mid-run. With fallback="uniform"
training goes on with uniform sub-batches (the step's seed) and every fallback is
counted; with fallback="raise" a clear error. Configuration errors always raise."""
from __future__ import annotations

import signal
import time

import numpy as np
import pytest
import torch
from support import KeyedDigits, refusing_port
from torch.utils.data import DataLoader

from jest_stream import JESTLoader, LocalScorer, RemoteScorer, per_example_cross_entropy
from jest_stream.client import ScorerRejected, ScorerUnavailable
from jest_stream.client.loader import step_seed
from jest_stream.samplers import uniform
from jest_stream.selection import make_rng

B, b = 64, 16


def Digits(digits, n: int = 640) -> KeyedDigits:
    """The keyed digits with each item's row index (what the fallbacks are checked against)."""
    return KeyedDigits(digits, n, row=True)


torch.manual_seed(0)
MODEL = torch.nn.Linear(64, 10)


def score(batch):
    return per_example_cross_entropy(MODEL(batch["x"]), batch["y"])


def loader_for(data, scorer, **kw) -> JESTLoader:
    return JESTLoader(DataLoader(data, batch_size=B), score, scorer, n_select=b, seed=4, **kw)


def test_unreachable_at_start_falls_back_to_uniform(digits):
    with RemoteScorer(f"127.0.0.1:{refusing_port()}", timeout=2.0) as scorer:
        loader = loader_for(Digits(digits), scorer)
        subs = list(loader)
    assert len(subs) == 10 and all(len(s["row"]) == b for s in subs)
    assert loader.stats.fallbacks == 10 and loader.stats.scored == 0
    assert loader.stats.fallback_reasons.get("scorer_unavailable", 0) >= 1
    for t, sub in enumerate(subs):  # uniform with the step's seed: reproducible fallbacks
        expected = t * B + uniform(B, b, make_rng(step_seed(4, 0, t)))
        assert sub["row"].tolist() == expected.tolist()


def test_unreachable_at_start_raises_when_asked(digits):
    port = refusing_port()
    with RemoteScorer(f"127.0.0.1:{port}", timeout=2.0) as scorer:
        loader = loader_for(Digits(digits), scorer, fallback="raise")
        with pytest.raises(ScorerUnavailable, match=rf"127\.0\.0\.1:{port}.*UNAVAILABLE.*fallback='raise'"):
            next(iter(loader))


@pytest.mark.timeout(120)
def test_scorer_killed_mid_run_then_back(start_server, per_example_model, digits):
    server = start_server({"digits": per_example_model})
    data = Digits(digits, n=1792)  # 28 super-batches
    with RemoteScorer(server.target, timeout=3.0, reconnect_backoff_max=0.5) as lenient_scorer, \
            RemoteScorer(server.target, timeout=3.0) as strict_scorer:
        lenient = loader_for(data, lenient_scorer, retry_after=0.2)
        strict = loader_for(data, strict_scorer, fallback="raise")
        lenient_it, strict_it = iter(lenient), iter(strict)
        for _ in range(3):
            next(lenient_it), next(strict_it)
        assert lenient.stats.fallbacks == strict.stats.fallbacks == 0

        server.stop(signal.SIGKILL)
        with pytest.raises(ScorerUnavailable, match="fallback='raise'"):
            next(strict_it)
        during = [next(lenient_it) for _ in range(5)]  # training goes on
        assert all(len(s["row"]) == b for s in during)
        assert lenient.stats.fallbacks == 5 and lenient.stats.scored == 3

        start_server({"digits": per_example_model}, port=server.port)  # the scorer comes back
        deadline = time.monotonic() + 30
        while lenient.stats.scored == 3 and time.monotonic() < deadline:
            next(lenient_it)
            time.sleep(0.05)
        assert lenient.stats.scored == 4, "the loader did not reconnect to the restarted scorer"
        fallbacks = lenient.stats.fallbacks
        for _ in range(3):
            next(lenient_it)
        assert lenient.stats.fallbacks == fallbacks and lenient.stats.scored == 7
    rows = np.concatenate([s["row"].numpy() for s in during])
    assert len(np.unique(rows)) == len(rows)  # nothing delivered twice


def test_configuration_errors_raise_even_with_uniform_fallback(start_server, per_example_model, digits, tmp_path):
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    server = start_server({"digits": per_example_model}, "--token-file", str(token))
    with RemoteScorer(server.target, token="wrong") as scorer:
        with pytest.raises(ScorerRejected, match="UNAUTHENTICATED.*wrong token"):
            next(iter(loader_for(Digits(digits), scorer)))
    with RemoteScorer(server.target, token="s3cret") as scorer:
        assert len(list(loader_for(Digits(digits, n=128), scorer))) == 2
        with pytest.raises(ScorerRejected, match="model: 'nope' is not served"):
            next(iter(loader_for(Digits(digits), scorer, model="nope")))
    with LocalScorer(per_example_model) as scorer:
        bad_inputs = loader_for(Digits(digits), scorer, reference_inputs=lambda batch: {"x": batch["x"]})
        with pytest.raises(ValueError, match=r"reference_inputs: returned \['x'\] but model 'digits' needs"):
            next(iter(bad_inputs))


def test_nonfinite_learner_scores_fall_back_and_are_counted(per_example_model, digits):
    def nan_score(batch):
        losses = score(batch)
        losses.values[0] = np.nan
        return losses

    with LocalScorer(per_example_model) as scorer:
        loader = JESTLoader(DataLoader(Digits(digits, n=128), batch_size=B), nan_score, scorer, n_select=b)
        assert len(list(loader)) == 2
        assert loader.stats.fallback_reasons == {"nonfinite_learner_scores": 2}
        strict = JESTLoader(DataLoader(Digits(digits, n=128), batch_size=B), nan_score, scorer, n_select=b,
                            fallback="raise")
        with pytest.raises(ValueError, match="NaN or inf"):
            next(iter(strict))


def test_evicted_reference_cache_entries_are_resent(start_server, per_example_model, digits):
    """Caches far smaller than an epoch evict keys the client believes cached: the
    Select without inputs is refused and resent with them; selections do not change."""
    server = start_server({"digits": per_example_model}, "--cache-bytes", "4096")
    data = Digits(digits, n=512)
    with LocalScorer(per_example_model) as roomy:
        roomy_loader = loader_for(data, roomy)
        expected = [s["row"].tolist() for _ in range(2) for s in roomy_loader]
    with LocalScorer(per_example_model, cache_bytes=4096) as tiny_local, \
            RemoteScorer(server.target) as tiny_remote:
        for scorer in (tiny_local, tiny_remote):
            loader = loader_for(data, scorer)
            got = [s["row"].tolist() for _ in range(2) for s in loader]
            assert got == expected
            assert loader.stats.fallbacks == 0 and loader.stats.cache_misses > len(data)
