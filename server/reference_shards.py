"""``jest-stream precompute --write-shards OUT``: new WebDataset shards that carry each
sample's reference outputs beside its data, so training on them needs no scorer.

Every input shard becomes a shard of the same name under OUT holding each sample's
members unchanged plus:

- ``jest.loss.npy`` (per_example) or ``jest.image_embeds.npy`` and
  ``jest.text_embeds.npy`` (contrastive): the sample's reference outputs;
- ``jest.version.txt`` (the model's content hash), ``jest.kind.txt`` and, for
  contrastive models, ``jest.logit_scale.txt`` and ``jest.logit_bias.txt``.

The JESTLoader reads them with ``reference="batch"``. A shard is written to a
temporary name and renamed when complete, so an interrupted run leaves no half shard.
"""
from __future__ import annotations

import io
import logging
import os
import sys
import tarfile
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from .precompute import count_samples, iter_samples, sample_inputs, shard_paths

log = logging.getLogger(__name__)

PREFIX = "jest."


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def _groups(samples: Iterable[tuple[str, dict[str, bytes]]], size: int) -> Iterator[list]:
    group: list[tuple[str, dict[str, bytes]]] = []
    for sample in samples:
        group.append(sample)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


def _add(tar: tarfile.TarFile, name: str, data: bytes, mtime: float) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), mtime, 0o644
    tar.addfile(info, io.BytesIO(data))


def model_fields(model) -> dict[str, bytes]:
    """The text fields every sample gets: the model's version, kind, scale and bias."""
    fields = {"version.txt": model.version, "kind.txt": model.contract.kind}
    if model.contract.contrastive:
        fields["logit_scale.txt"] = repr(float(model.contract.logit_scale))
        fields["logit_bias.txt"] = repr(float(model.contract.logit_bias))
    return {PREFIX + k: v.encode() for k, v in fields.items()}


def write_shard(model, source: str, dest: Path, batch_size: int, bar) -> tuple[int, int]:
    """One output shard from one input shard; returns (samples, samples with non-finite outputs)."""
    inputs = {spec.name: np.dtype(spec.dtype) for spec in model.inputs}
    outputs = list(model.contract.outputs)
    fixed = model_fields(model)
    written = nonfinite = 0
    part = dest.with_name(dest.name + ".part")
    mtime = time.time()
    with tarfile.open(part, "w") as tar:
        for group in _groups(iter_samples([source]), batch_size):
            rows = [sample_inputs(key, members, inputs) for key, members in group]
            result = model.run({n: np.stack([r[n] for r in rows]) for n in inputs})
            for row, (key, members) in enumerate(group):
                for suffix, data in members.items():
                    if not suffix.startswith(PREFIX):  # a rewrite replaces old reference fields
                        _add(tar, f"{key}.{suffix}", data, mtime)
                for suffix, data in fixed.items():
                    _add(tar, f"{key}.{suffix}", data, mtime)
                finite = True
                for name in outputs:
                    value = np.asarray(result[name][row])
                    finite = finite and bool(np.all(np.isfinite(value)))
                    _add(tar, f"{key}.{PREFIX}{name}.npy", _npy(value), mtime)
                nonfinite += not finite
            written += len(group)
            bar.update(len(group))
    os.replace(part, dest)
    return written, nonfinite


def write_reference_shards(model_path: str | os.PathLike, shards: Sequence[str], out_dir: str | os.PathLike, *,
                           batch_size: int = 256, intra_op_threads: int | None = 1,
                           progress: bool = True) -> dict[str, int | str]:
    """Write every shard of ``shards`` again under ``out_dir`` with its samples' reference
    outputs as fields; returns counts (shards, samples, nonfinite) and the model version."""
    from tqdm import tqdm

    from jest_stream.server.models import ReferenceModel

    if batch_size < 1:
        raise ValueError(f"--batch-size: expected at least 1, got {batch_size}")
    paths = shard_paths(shards)
    names = [Path(p).name for p in paths]
    if len(set(names)) != len(names):
        raise ValueError("--write-shards: input shards share file names; give shards with distinct names")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if any(Path(p).resolve().parent == out.resolve() for p in paths):
        raise ValueError(f"--write-shards: {str(out)!r} holds the input shards; write to another directory")
    model = ReferenceModel("reference", model_path, intra_op_threads=intra_op_threads)
    bar = tqdm(total=count_samples(paths) if progress else None, unit="sample", desc="write-shards",
               disable=not progress, file=sys.stderr, dynamic_ncols=True)
    samples = nonfinite = 0
    try:
        for path, name in zip(paths, names):
            n, bad = write_shard(model, path, out / name, batch_size, bar)
            samples, nonfinite = samples + n, nonfinite + bad
    finally:
        bar.close()
    if nonfinite:
        log.warning("%d sample(s) got non-finite reference outputs; a batch holding one is refused by "
                    "the loader's selection", nonfinite)
    log.info("wrote %d shard(s), %d samples, under %s (model version %s)", len(paths), samples, out,
             model.version)
    return {"shards": len(paths), "samples": samples, "nonfinite": nonfinite, "model_version": model.version}
