"""JESTLoader: wraps any iterable of super-batches and yields selected sub-batches.

Each step: fetch super-batch t (already fetched one step ahead, its reference outputs
already requested), score it with the learner's current parameters (``score_fn``,
no grad), ask the scorer for b indices, and yield the sub-batch with the input's own
structure. Before yielding, super-batch t+1 is fetched and its reference outputs
are prefetched, so that they are computed while the user trains on sub-batch t.

Reproducible: the sampler's seed of step t is derived from (seed, rank, t) with
numpy's SeedSequence, so a resumed run (``load_state_dict``) selects the same
sub-batches as an uninterrupted one, given the same data order and learner. When
the scorer is unreachable or fails, ``fallback="uniform"`` selects b examples
uniformly with that same seed (and counts it); ``fallback="raise"`` raises.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import torch

from jest_stream.client.batches import batch_size, fields_by_name, keys_of, take, to_numpy
from jest_stream.client.distributed import warn_if_unsharded
from jest_stream.client.identity import agree, distributed_rank, job_id
from jest_stream.client.learner import all_finite, as_learner_scores
from jest_stream.client.resume import EpochHook, EpochOrder, working_state_dict
from jest_stream.client.scorer import Scorer, ScorerRejected, ScorerUnavailable, SelectCall, resolve_model
from jest_stream.client.reference_watch import ReferenceWatch, ReferenceWatcher
from jest_stream.client.stats import LoaderStats
from jest_stream.client.superbatch import Breaker, SuperBatch, step_seed, sub_batch_size
from jest_stream.client.trainer_select import placement
from jest_stream.contract import ModelSpec
from jest_stream.options import SelectOptions, check_name
from jest_stream.outputs import Embeddings, Losses
from jest_stream.samplers import uniform
from jest_stream.selection import make_rng

log = logging.getLogger(__name__)

FALLBACKS = ("uniform", "raise")
STATE_VERSION = 2


class JESTLoader:
    """Online data selection (JEST / RHO-LOSS) around any iterable of super-batches.

    ``loader`` yields super-batches of B examples (a DataLoader, a WebLoader, a
    generator); ``score_fn(batch)`` returns the learner's Losses/Embeddings for one
    (see jest_stream.client.learner); ``scorer`` is a LocalScorer or RemoteScorer.
    Each yielded sub-batch holds ``n_select`` examples, or (1 - filter_ratio) * B. The selection
    rule is ``options`` (a SelectOptions) or its fields as keywords (unset: the defaults).
    ``reference_watch``: when to warn of a weak reference (see ReferenceWatch; None: never).

    ``key``: a field holding one key per example (``"__key__"``, WebDataset's, by
    default) or a function batch -> keys; without keys the scorer's reference cache
    is not used and reference inputs are sent every step. ``reference_inputs``:
    function batch -> {model input name: array}; by default, dict fields named like
    the model's inputs, or a tuple batch's items in input order. ``dataset``: see SelectCall.
    ``select_on="trainer"``: select here, from the scorer's reference outputs; ``reference="batch"``:
    read them from the batch (``jest-stream precompute --write-shards``; ``scorer`` may be None).

    Resuming (``state_dict``/``load_state_dict``) needs ``loader`` to yield the same
    super-batches in the same order when iterated again (a seeded sampler), unless it
    has a ``state_dict`` of its own (torchdata's StatefulDataLoader).
    """

    def __init__(self, loader: Iterable[Any], score_fn: Callable[[Any], Any], scorer: Scorer | None, *,
                 model: str | None = None, filter_ratio: float = 0.8, n_select: int | None = None,
                 options: SelectOptions | None = None, score: str | None = None, sampler: str | None = None,
                 n_chunks: int | None = None, score_gain: float | None = None, seed: int | None = None,
                 key: str | Callable[[Any], Any] | None = "__key__",
                 reference_inputs: Callable[[Any], Mapping[str, Any]] | None = None,
                 prefetch: bool = True, fallback: str = "uniform", retry_after: float = 2.0, dataset: str = "",
                 job: str | None = None, log_every: int = 0, select_on: str | None = None,
                 reference: str = "scorer", reference_watch: ReferenceWatch | None = ReferenceWatch()):
        self.options = SelectOptions.of(options, score=score, sampler=sampler, n_chunks=n_chunks,
                                        score_gain=score_gain)
        check_name(fallback, FALLBACKS, "fallback")
        if not 0.0 <= filter_ratio < 1.0:
            raise ValueError(f"filter_ratio: the fraction of each super-batch dropped must be in "
                             f"[0, 1), got {filter_ratio}")
        if n_select is not None and (isinstance(n_select, bool) or int(n_select) != n_select
                                     or n_select < 1):
            raise ValueError(f"n_select: expected an integer >= 1 or None, got {n_select!r}")
        if seed is not None and (isinstance(seed, bool) or int(seed) != seed or seed < 0):
            raise ValueError(f"seed: expected a non-negative integer or None, got {seed!r}")
        if not callable(score_fn):
            raise TypeError(f"score_fn: expected a callable batch -> learner scores, got "
                            f"{type(score_fn).__name__}")
        scorer, self._batch_reference = placement(scorer, select_on, reference, model)  # trainer_select.py
        for method in ("models", "prefetch", "select"):
            if not callable(getattr(scorer, method, None)):
                raise TypeError(f"scorer: {type(scorer).__name__} has no {method}(); pass a "
                                "LocalScorer or RemoteScorer")
        self._loader = loader
        self._score_fn = score_fn
        self._scorer = scorer
        self._model = model
        self.filter_ratio = float(filter_ratio)
        self.n_select = None if n_select is None else int(n_select)
        self.seed = int(seed) if seed is not None else int(np.random.SeedSequence().entropy)
        self._seed_given = seed is not None
        self._key = key
        self._reference_inputs = reference_inputs
        self.prefetch = bool(prefetch)
        self.fallback = fallback
        self._breaker = Breaker(float(retry_after))
        self._job, self.dataset = job, str(dataset)  # the keys' dataset: the scorer checks the name
        self.log_every = int(log_every)
        self.stats = LoaderStats()
        self._watcher = ReferenceWatcher(reference_watch)
        self._spec: ModelSpec | None = None
        self._rank: tuple[int, int] | None = None
        self._job_id: str | None = None
        self._step = 0
        self._epoch = 0
        self._consumed = 0
        self._largest = 0
        self._pending: dict[str, Any] | None = None  # a loaded state, applied by the next epoch
        self._inner_state: Any = None
        self._inner_save: Any = None  # the wrapped loader's working state_dict, once probed
        self._order = EpochOrder(loader, self.seed)
        self._warned_no_keys = False

    # -- identity ---------------------------------------------------------------------

    @property
    def rank(self) -> int:
        return self._ranks()[0]

    @property
    def world_size(self) -> int:
        return self._ranks()[1]

    def _ranks(self) -> tuple[int, int]:
        if self._rank is None:
            self._rank = distributed_rank()
        return self._rank

    @property
    def job_id(self) -> str:
        """``<job>/rank<r>of<w>`` (see jest_stream.client.identity): decided at the start of
        the first epoch, when every rank agrees on the job (rank 0's, broadcast)."""
        if self._job_id is None:
            rank, world = self._ranks()
            base, self.seed = agree(self._job, self.seed, self._seed_given)
            self._seed_given = True
            self._job_id = job_id(base, rank, world)
        return self._job_id

    @property
    def step(self) -> int:
        """Sub-batches yielded so far, over all epochs (the seed's step counter)."""
        return self._step

    @property
    def epoch(self) -> int:
        """The current epoch: it moves on when the wrapped loader's last super-batch is
        yielded (so a framework that stops at ``len()`` sees the right number), or with
        ``set_epoch``."""
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        """Start epoch ``epoch`` at the next ``iter()`` (frameworks call this; it is passed on
        to the wrapped loader's ``set_epoch``, its samplers' and its dataset's). The same
        epoch as a just-loaded state keeps the resume position."""
        epoch = int(epoch)
        if self._pending is not None and epoch == self._epoch:
            return
        if self._pending is not None:
            log.warning("set_epoch(%d) after loading a state in epoch %d: the resumed position is "
                        "dropped, epoch %d starts from its beginning", epoch, self._epoch, epoch)
            self._pending = None
        self._epoch, self._consumed, self._inner_state = epoch, 0, None

    @property
    def sampler(self) -> EpochHook:
        """What frameworks call ``sampler.set_epoch(e)`` on (Lightning): forwards to
        ``set_epoch``."""
        return EpochHook(self)

    def __len__(self) -> int:
        """Sub-batches per epoch: the wrapped loader's length."""
        return len(self._loader)  # type: ignore[arg-type]

    # -- iteration --------------------------------------------------------------------

    def __iter__(self) -> Iterator[Any]:
        return self._run_epoch()

    def _open(self) -> Iterator[Any]:
        """``iter()`` of the wrapped loader for the current epoch, positioned where a
        loaded state says (restored, or replayed)."""
        pending, self._pending = self._pending, None
        if pending is None and self._consumed:  # the previous epoch was left mid-way
            self._epoch, self._consumed, self._inner_state = self._epoch + 1, 0, None
        if self._inner_save is None:  # first epoch: probe the wrapped loader once
            self._inner_save = working_state_dict(self._loader) or False
            warn_if_unsharded(self._loader)
        skip = 0
        if pending is not None:
            inner = pending.get("inner")
            if inner is not None and self._inner_save:
                self._loader.load_state_dict(inner)  # type: ignore[attr-defined]
            else:
                skip = self._consumed
        self._order.seed = self.seed
        self._order.begin(self._epoch)
        source = iter(self._loader)
        for done in range(skip):  # resume mid-epoch: replay the consumed super-batches
            try:
                next(source)
            except StopIteration:
                raise RuntimeError(
                    f"resume: the wrapped loader ended after {done} super-batches, but {skip} were "
                    f"consumed in epoch {self._epoch} before the state was saved; it must yield the "
                    "same super-batches when iterated again (same data, batch size, sampler)") from None
        return source

    def _run_epoch(self) -> Iterator[Any]:
        self._ranks()
        self.job_id  # noqa: B018 - agree on the job id (a collective under torch.distributed)
        source = self._open()
        ahead = self._fetch(source)
        while ahead is not None:
            started = time.perf_counter()
            sub_batch = self._select(ahead)
            self._consumed += 1
            self._step += 1
            if self._inner_save:
                self._inner_state = self._inner_save()
            self.stats.total_seconds += time.perf_counter() - started
            ahead = self._fetch(source)
            if ahead is None:  # the last one: the epoch is over even if nobody asks for more
                self._epoch, self._consumed, self._inner_state = self._epoch + 1, 0, None
            if self.log_every and self.stats.sub_batches % self.log_every == 0:
                log.info("%s: %s", self.job_id, self.stats.summary())
            yield sub_batch

    def _fetch(self, source: Iterator[Any]) -> SuperBatch | None:
        """The next super-batch, with its reference outputs requested (prefetch)."""
        started = time.perf_counter()
        try:
            batch = next(source)
        except StopIteration:
            return None
        size = batch_size(batch)
        keys = keys_of(batch, self._key, size)
        if keys is None and not self._warned_no_keys and self._key is not None:
            log.info("batches have no %r field: the reference cache is not used (pass key=...)", self._key)
            self._warned_no_keys = True
        item = SuperBatch(batch, size, keys, self._inputs_of)
        if self._batch_reference is not None:  # reference="batch": the outputs ride in the batch
            item.prefetched = self._batch_reference.read(batch, size)
        elif self.prefetch and keys and not (self.fallback == "uniform" and self._breaker.is_open()):
            try:
                spec = self._model_spec()
                item.prefetched = self._scorer.prefetch(spec.name, self.job_id, keys, item.inputs,
                                                        dataset=self.dataset)
            except ScorerUnavailable as exc:  # the Select will fall back; counted there
                log.debug("reference prefetch failed: %s", exc)
                item.prefetch_error = str(exc)
                self._breaker.trip(exc)
        elapsed = time.perf_counter() - started
        self.stats.fetch_seconds += elapsed
        self.stats.total_seconds += elapsed
        return item

    def _model_spec(self) -> ModelSpec:
        if self._spec is None:
            self._spec = resolve_model(self._scorer, self._model)
        return self._spec

    def _inputs_of(self, batch: Any) -> dict[str, np.ndarray]:
        spec = self._model_spec()
        names = spec.input_names
        raw = (self._reference_inputs(batch) if self._reference_inputs is not None
               else fields_by_name(batch, names))
        missing = [n for n in names if n not in raw]
        if missing:
            raise ValueError(f"reference_inputs: returned {sorted(raw)} but model {spec.name!r} needs "
                             f"inputs {names}")
        return {n: to_numpy(raw[n], spec.input(n).dtype, f"reference_inputs[{n!r}]") for n in names}

    def _select(self, item: SuperBatch) -> Any:
        self._largest = max(self._largest, item.size)
        n_select = sub_batch_size(item.size, self._largest, self.n_select, self.filter_ratio)
        started = time.perf_counter()
        with torch.no_grad():
            learner = as_learner_scores(self._score_fn(item.batch))
        self.stats.learner_seconds += time.perf_counter() - started
        if learner.batch_size != item.size:
            raise ValueError(f"score_fn: scored {learner.batch_size} examples of a super-batch of "
                             f"B={item.size}; it must score every example of the batch it is given")
        seed = step_seed(self.seed, self.rank, self._step)
        indices = None
        if not all_finite(learner):
            if self.fallback == "raise":
                raise ValueError(f"score_fn: learner scores of step {self._step} hold NaN or inf "
                                 "(fallback='raise')")
            self._fall_back("nonfinite_learner_scores", "learner scores hold NaN or inf")
        elif self.fallback == "uniform" and self._breaker.is_open():
            if item.prefetch_error is not None:  # this super-batch's own call failed
                self._fall_back("scorer_unavailable", item.prefetch_error)
            else:
                self._fall_back("scorer_down", f"skipping the scorer for {self._breaker.retry_after:g}s "
                                f"after: {self._breaker.error}")
        else:
            indices = self._call_scorer(item, learner, n_select, seed)
        if indices is None:
            indices = uniform(item.size, n_select, make_rng(seed))
        self.stats.record_selection(item.size, len(indices))
        return take(item.batch, indices, item.size)

    def _call_scorer(self, item: SuperBatch, learner: Losses | Embeddings, n_select: int,
                     seed: int) -> np.ndarray | None:
        started = time.perf_counter()
        try:
            spec = self._model_spec()
            outcome = self._scorer.select(SelectCall(dataset=self.dataset,
                model=spec.name, job_id=self.job_id, learner=learner, n_select=n_select,
                keys=item.keys, inputs=item.inputs, options=self.options, seed=seed), item.prefetched)
        except ScorerUnavailable as exc:
            self._breaker.trip(exc)
            if self.fallback == "raise":
                raise ScorerUnavailable(f"{exc} (fallback='raise'; pass fallback='uniform' to keep "
                                        "training on uniform sub-batches while the scorer is down)") from exc
            self._fall_back("scorer_unavailable", str(exc))
            return None
        except ScorerRejected:
            raise  # configuration errors (unknown model, bad inputs, token): retrying will not help
        self.stats.record_latency(time.perf_counter() - started)
        self._breaker.reset()
        indices = np.asarray(outcome.indices, dtype=np.int64)
        if indices.shape != (n_select,) or (indices.size and not 0 <= indices.min() <= indices.max() < item.size):
            raise ScorerRejected(f"scorer: answered {indices.size} indices in [{indices.min(initial=0)}, "
                                 f"{indices.max(initial=0)}] for n_select={n_select} of B={item.size}")
        self.stats.record_score(outcome.mean_score, outcome.mean_score_all, outcome.cache_hits,
                                outcome.cache_misses)
        self._watcher.observe(outcome, self.stats, self.job_id, self._step)
        warmed = getattr(item.prefetched, "cache_hits", None)  # a prefetch's reply: first contact
        if warmed is not None:
            self.stats.record_reference(warmed, item.prefetched.cache_misses + outcome.cache_misses)
        else:
            self.stats.record_reference(outcome.cache_hits, outcome.cache_misses)
        return indices

    def _fall_back(self, reason: str, detail: str) -> None:
        self.stats.record_fallback(reason)
        count = self.stats.fallbacks
        if count <= 3 or count % 100 == 0:
            log.warning("%s: uniform sub-batch at step %d (fallback %d, %s): %s", self.job_id,
                        self._step, count, reason, detail)

    # -- resume -----------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Where this loader is: seed, step, epoch, super-batches consumed in the epoch,
        the shuffle generators' states, the wrapped loader's own state if it has a working
        one, and the stats."""
        if self._pending is not None:  # loaded and not yet resumed: hand the same state on
            return dict(self._pending)
        rank, world = self._ranks()
        return {
            "version": STATE_VERSION, "seed": self.seed, "rank": rank, "world_size": world,
            "step": self._step, "epoch": self._epoch, "consumed": self._consumed,
            "inner": self._inner_state if self._consumed else None,
            "stats": self.stats.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume: the next ``iter(loader)`` continues mid-epoch where ``state`` was taken."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"state: version {state.get('version')!r} is not {STATE_VERSION}; it was "
                             "saved by an incompatible jest-stream")
        rank, world = self._ranks()
        state = dict(state)
        if state["world_size"] != world:
            log.warning("resume: state was saved by rank %s of %s, loaded by rank %d of %d; "
                        "selections will differ from the interrupted run",
                        state["rank"], state["world_size"], rank, world)
        elif state["rank"] != rank:  # one checkpoint for all ranks (Lightning's, rank 0's)
            log.info("resume: rank %d loads rank %s's state: same position, this rank's own shard "
                     "is replayed", rank, state["rank"])
            state["inner"] = None  # the wrapped loader's state is rank 0's, not ours
        self.seed, self._seed_given = int(state["seed"]), True
        self._step = int(state["step"])
        self._epoch = int(state["epoch"])
        self._consumed = int(state["consumed"])
        self._inner_state = state.get("inner")
        self._pending = state
        self.stats = LoaderStats()
        self.stats.load_state_dict(state.get("stats", {}))

