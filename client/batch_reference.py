"""Reference outputs in the data: the JESTLoader's ``reference="batch"``.

``jest-stream precompute --write-shards OUT`` writes WebDataset shards whose samples
carry their reference outputs as fields beside the data:

- ``jest.loss.npy`` (per_example) or ``jest.image_embeds.npy`` and
  ``jest.text_embeds.npy`` (contrastive): the reference model's outputs for the sample;
- ``jest.version.txt``: the version (content hash) of the model that computed them;
- ``jest.kind.txt``, and for contrastive models ``jest.logit_scale.txt`` and
  ``jest.logit_bias.txt``: what the selection needs to know about the model.

``BatchReference`` reads them from each super-batch (a dict batch, as WebDataset
yields, with the fields under those names, extension optional), so a job on such
data runs with no scorer at all. It refuses a batch whose samples disagree on the
model version, or whose version is not the one expected: the scorer's model version
when a scorer is given too, else the first batch's.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from jest_stream.client.batches import to_numpy
from jest_stream.client.scorer import InputsFn, ReferenceOutputs, ScorerRejected
from jest_stream.contract import OUTPUTS_BY_KIND, ModelSpec
from jest_stream.outputs import LOSS_KINDS

PREFIX = "jest."
NAME = "reference"


def field(batch: Any, name: str) -> Any:
    """The batch's ``jest.<name>`` field (``jest.<name>.<ext>`` too); ScorerRejected naming it if absent."""
    if isinstance(batch, Mapping):
        want = PREFIX + name
        for key in batch:
            if isinstance(key, str) and (key == want or key.startswith(want + ".")):
                return batch[key]
    have = sorted(k for k in batch if isinstance(k, str)) if isinstance(batch, Mapping) else type(batch).__name__
    raise ScorerRejected(f"reference='batch': the batch has no field {PREFIX}{name} (it has {have}); "
                         "write the shards with jest-stream precompute --write-shards")


def _texts(value: Any, name: str, size: int) -> list[str]:
    if isinstance(value, (str, bytes)):
        value = [value]
    rows = [v.decode() if isinstance(v, bytes) else str(v) for v in value]
    if len(rows) != size:
        raise ScorerRejected(f"reference='batch': {PREFIX}{name} has {len(rows)} rows for B={size}")
    return [r.strip() for r in rows]


def _one(batch: Any, name: str, size: int) -> str:
    """The value every sample of the batch records in text field ``name`` (they must agree)."""
    rows = _texts(field(batch, name), name, size)
    distinct = sorted(set(rows))
    if len(distinct) != 1:
        more = f" and {len(distinct) - 3} more" if len(distinct) > 3 else ""
        shown = ", ".join(repr(v) for v in distinct[:3]) + more
        raise ScorerRejected(f"reference='batch': the samples of one super-batch record different "
                             f"{PREFIX}{name} values ({shown}); their reference outputs come from different "
                             "models: rewrite the shards with one model")
    return distinct[0]


class BatchReference:
    """Reference outputs read from the super-batch itself (see the module docstring).

    ``scorer``, if given, names the expected model version (its only model's); without
    one, every batch must record the version of the first.
    """

    def __init__(self, scorer: Any = None, name: str = NAME):
        self.scorer = scorer
        self.name = name
        self._spec: ModelSpec | None = None

    def __repr__(self) -> str:
        return f"BatchReference(expected={self._spec.version if self._spec else None!r})"

    def _expected(self) -> str | None:
        if self._spec is not None:
            return self._spec.version
        if self.scorer is not None:
            models = self.scorer.models()
            if len(models) == 1:
                return next(iter(models.values())).version
        return None

    def read(self, batch: Any, size: int) -> ReferenceOutputs:
        """The batch's reference outputs, checked against the expected model version."""
        version = _one(batch, "version", size)
        expected = self._expected()
        if expected is not None and version != expected:
            raise ScorerRejected(f"reference='batch': the batch's reference outputs are from model version "
                                 f"{version!r}, but this job expects {expected!r}; rewrite the shards with "
                                 "jest-stream precompute --write-shards and the current model")
        if self._spec is None:
            self._spec = self._spec_of(batch, size, version)
        outputs = {}
        for name in OUTPUTS_BY_KIND[self._spec.kind]:
            array = to_numpy(field(batch, name), field=f"{PREFIX}{name}")
            if array.ndim == 0 or array.shape[0] != size:
                raise ScorerRejected(f"reference='batch': {PREFIX}{name} has shape {list(array.shape)} for "
                                     f"B={size}; one row per sample")
            outputs[name] = array
        return ReferenceOutputs(outputs, cache_hits=size, model_version=version)

    def _spec_of(self, batch: Any, size: int, version: str) -> ModelSpec:
        kind = _one(batch, "kind", size)
        if kind not in LOSS_KINDS:
            raise ScorerRejected(f"reference='batch': {PREFIX}kind is {kind!r}; expected one of {LOSS_KINDS}")
        scale, bias = 1.0, 0.0
        if kind != "per_example":
            try:
                scale, bias = (float(_one(batch, n, size)) for n in ("logit_scale", "logit_bias"))
            except ValueError:
                raise ScorerRejected(f"reference='batch': {PREFIX}logit_scale/logit_bias must be numbers") from None
        return ModelSpec(self.name, kind, (), (), version, scale, bias)

    # -- what TrainerSelect asks of a reference source -------------------------------------

    def models(self) -> dict[str, ModelSpec]:
        if self._spec is None:
            raise ScorerRejected("reference='batch': the model is known once the first batch is read")
        return {self.name: self._spec}

    def prefetch(self, model: str, job_id: str, keys: Sequence[str], inputs: InputsFn,
                 outputs: bool = True, dataset: str = "") -> None:
        return None

    def reference(self, model: str, job_id: str, keys: Sequence[str] | None, inputs: InputsFn | None,
                  prefetched: ReferenceOutputs | None = None, dataset: str = "") -> ReferenceOutputs:
        if not isinstance(prefetched, ReferenceOutputs):
            raise ScorerRejected("reference='batch': this super-batch's reference fields were not read")
        return prefetched

    def close(self) -> None:
        if self.scorer is not None and callable(getattr(self.scorer, "close", None)):
            self.scorer.close()
