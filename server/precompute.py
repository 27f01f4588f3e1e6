"""``jest-stream precompute``: fill a reference cache file from WebDataset shards, offline
(or, with ``--write-shards``, write the outputs into new shards: server/reference_shards.py).

Reference outputs never change (the model is frozen), so they can be computed once,
ahead of training, and loaded by the server at start (``--cache-file``): the first
epoch then costs no reference inference either. This command reads every sample of
the shards, runs the reference model in batches in ONNX Runtime and appends
(key -> outputs) records to the cache file, with a progress bar.

Resumable: keys the file already holds (for this model version) are skipped, so an
interrupted run is finished by running the same command again, without duplicates.

Shards are read with the standard library's ``tarfile`` (WebDataset's own reader
imports torch, which the scorer host does not have). A sample's members are
``{key}.{field}.{ext}``; each model input is read from the member whose field is the
input's name, decoded by extension (``npy``, ``cls``/``index``/``id``, ``txt``,
``json``), and cast to the input's dtype.
"""
from __future__ import annotations

import argparse
import glob
import io
import json
import logging
import os
import re
import sys
import tarfile
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

log = logging.getLogger(__name__)

_BRACE_RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")


def expand_braces(pattern: str) -> list[str]:
    """Expand WebDataset-style brace patterns: ``train-{000..009}.tar`` (zero-padded
    ranges) and ``{a,b}`` alternatives, nested left to right."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if m is None:
        return [pattern]
    head, body, tail = pattern[:m.start()], m.group(1), pattern[m.end():]
    rng = _BRACE_RANGE.fullmatch("{" + body + "}")
    if rng:
        lo, hi = rng.group(1), rng.group(2)
        width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
        step = 1 if int(hi) >= int(lo) else -1
        items = [str(i).zfill(width) for i in range(int(lo), int(hi) + step, step)]
    else:
        items = body.split(",")
    return [p for item in items for p in expand_braces(head + item + tail)]


def shard_paths(patterns: Sequence[str]) -> list[str]:
    """Shard files named by brace patterns, globs or plain paths (in the order given);
    raises FileNotFoundError naming a pattern that matches nothing."""
    paths: list[str] = []
    for pattern in patterns:
        for item in expand_braces(pattern):
            found = sorted(glob.glob(item)) if glob.has_magic(item) else [item]
            if not found or not all(os.path.isfile(p) for p in found):
                missing = [p for p in found if not os.path.isfile(p)] or [item]
                raise FileNotFoundError(f"--shards: {missing[0]!r} (from {pattern!r}) is not a file")
            paths.extend(found)
    return paths


def split_member(name: str) -> tuple[str, str] | None:
    """WebDataset's member naming: ``dir/key.field.ext`` -> (``dir/key``, ``field.ext``)."""
    directory, _, base = name.rpartition("/")
    key, dot, suffix = base.partition(".")
    if not dot or not key:
        return None
    return (f"{directory}/{key}" if directory else key), suffix


def decode_member(suffix: str, data: bytes) -> object:
    """A member's value by its extension: npy -> array, cls/index/id -> int, txt -> str,
    json -> object, anything else -> the raw bytes."""
    ext = suffix.rsplit(".", 1)[-1].lower()
    if ext == "npy":
        return np.load(io.BytesIO(data), allow_pickle=False)
    if ext in ("cls", "index", "id"):
        return int(data.decode().strip())
    if ext == "txt":
        return data.decode()
    if ext == "json":
        return json.loads(data)
    return data


def iter_samples(paths: Iterable[str]) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {suffix: raw bytes}) for every sample of the shards, in file order.

    Consecutive members with the same key form one sample (WebDataset's rule).
    """
    for path in paths:
        with tarfile.open(path, mode="r|*") as tar:  # streaming: any size, gz too
            key: str | None = None
            members: dict[str, bytes] = {}
            for info in tar:
                if not info.isfile():
                    continue
                parts = split_member(info.name)
                if parts is None:
                    continue
                fh = tar.extractfile(info)
                data = fh.read() if fh is not None else b""
                if parts[0] != key:
                    if key is not None and members:
                        yield key, members
                    key, members = parts[0], {}
                members[parts[1]] = data
            if key is not None and members:
                yield key, members


def count_samples(paths: Iterable[str]) -> int:
    """Number of samples in the shards (headers only), for the progress bar's total."""
    total = 0
    for path in paths:
        with tarfile.open(path, mode="r:*") as tar:
            total += len({p[0] for p in (split_member(n) for n in tar.getnames()) if p is not None})
    return total


def sample_inputs(key: str, members: dict[str, bytes], inputs: dict[str, np.dtype]) -> dict[str, np.ndarray]:
    """One sample's model inputs: the member whose field is each input's name, decoded
    and cast to its dtype. Raises KeyError naming the sample, the input and what it has."""
    out: dict[str, np.ndarray] = {}
    for name, dtype in inputs.items():
        suffix = next((s for s in members if s == name or s.startswith(name + ".")), None)
        if suffix is None:
            raise KeyError(f"sample {key!r}: no member for model input {name!r} (it has "
                           f"{sorted(members)}); shards need a '{{key}}.{name}.npy' (or .cls) member")
        value = decode_member(suffix, members[suffix])
        if isinstance(value, (bytes, str)):
            raise ValueError(f"sample {key!r}: member {suffix!r} for input {name!r} is not numeric; "
                             "store inputs as .npy arrays or .cls integers")
        out[name] = np.asarray(value, dtype=dtype)
    return out


def batches(samples: Iterable[tuple[str, dict[str, bytes]]], inputs: dict[str, np.dtype],
            batch_size: int, skip: set[str] | frozenset[str]) -> Iterator[tuple[list[str], dict[str, np.ndarray], int]]:
    """Batches of (keys, stacked inputs, samples skipped since the last batch) over the
    samples whose key is not in ``skip`` (the ones the cache file already holds)."""
    keys: list[str] = []
    rows: dict[str, list[np.ndarray]] = {name: [] for name in inputs}
    skipped = 0
    seen: set[str] = set()
    for key, members in samples:
        if key in skip or key in seen:
            skipped += 1
            continue
        seen.add(key)
        for name, value in sample_inputs(key, members, inputs).items():
            rows[name].append(value)
        keys.append(key)
        if len(keys) == batch_size:
            yield keys, {n: np.stack(v) for n, v in rows.items()}, skipped
            keys, rows, skipped = [], {name: [] for name in inputs}, 0
    if keys or skipped:
        yield keys, ({n: np.stack(v) for n, v in rows.items()} if keys else {}), skipped


def precompute(model_path: str | os.PathLike, shards: Sequence[str], out: str | os.PathLike, *,
               batch_size: int = 256, intra_op_threads: int | None = 1, progress: bool = True,
               limit: int | None = None, dataset: str) -> dict[str, int | str]:
    """Run the reference model over every sample of ``shards`` not yet in the cache file
    ``out`` and append their outputs to it, recorded as keys of ``dataset`` (requests
    naming that dataset hit them). Returns counts: written, skipped (already in the
    file), non-finite (outputs NaN or inf: never written), total samples read, and the
    model version.

    ``limit`` stops after writing that many records (tests use it to simulate an
    interrupted run; a killed process leaves the same kind of file).
    """
    from tqdm import tqdm

    from jest_stream.cachefile import CacheFileWriter
    from jest_stream.contract import model_version
    from jest_stream.server.models import ReferenceModel

    _check_dataset(dataset)
    if batch_size < 1:
        raise ValueError(f"--batch-size: expected at least 1, got {batch_size}")
    paths = shard_paths(shards)
    version = model_version(model_path)
    model = ReferenceModel("reference", model_path, intra_op_threads=intra_op_threads)
    inputs = {spec.name: np.dtype(spec.dtype) for spec in model.inputs}
    outputs = list(model.contract.outputs)
    total = count_samples(paths) if progress else None
    written = skipped = nonfinite = 0
    with CacheFileWriter(out, version, dataset=dataset, resume=True) as writer:
        already = frozenset(writer.keys)
        log.info("%s: %d record(s) already there (model version %s); %d shard(s) to read",
                 out, len(already), version, len(paths))
        bar = tqdm(total=total, unit="sample", desc="precompute", disable=not progress,
                   file=sys.stderr, dynamic_ncols=True)
        try:
            for keys, arrays, n_skipped in batches(iter_samples(paths), inputs, batch_size, already):
                skipped += n_skipped
                bar.update(n_skipped)
                if not keys:
                    continue
                if limit is not None and written + len(keys) > limit:
                    keys = keys[:limit - written]
                    arrays = {n: v[:len(keys)] for n, v in arrays.items()}
                nonfinite += _write_finite(writer, keys, model.run(arrays), outputs)
                writer.flush()
                written += len(keys)
                bar.update(len(keys))
                if limit is not None and written >= limit:
                    break
        finally:
            bar.close()
    if nonfinite:
        log.warning("%s: %d sample(s) gave non-finite reference outputs; not written", out, nonfinite)
    log.info("%s: wrote %d record(s), skipped %d already there", out, written - nonfinite, skipped)
    return {"written": written - nonfinite, "skipped": skipped, "nonfinite": nonfinite, "read": written + skipped,
            "dataset": dataset, "model_version": version}


def _check_dataset(dataset: str) -> None:
    from jest_stream.server.names import check_name

    check_name(dataset, "--dataset")
    if not dataset:
        raise ValueError("--dataset: name the dataset the shards' keys belong to (e.g. cc3m-train)")


def _write_finite(writer, keys: Sequence[str], result: dict[str, np.ndarray], outputs: Sequence[str]) -> int:
    """Append the rows whose outputs are finite; returns how many were not (never written)."""
    from jest_stream.server.cacheload import nonfinite_rows

    bad = set(nonfinite_rows(result, len(keys)).tolist())
    for row, key in enumerate(keys):
        if row not in bad:
            writer.add(key, {name: result[name][row] for name in outputs})
    return len(bad)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="jest-stream precompute",
        description="Reference outputs for every sample of WebDataset shards, into the cache file "
                    "the server loads with --cache-file. Run it again to resume: keys already in "
                    "the file are skipped.")
    p.add_argument("--model", required=True, help="the reference model (ONNX, from export_reference)")
    p.add_argument("--shards", required=True, nargs="+",
                   help="shard files: brace patterns ('train-{000..009}.tar'), globs or paths")
    p.add_argument("--out", help="the cache file to create or extend")
    p.add_argument("--write-shards", metavar="OUT",
                   help="instead of a cache file, write each shard again under the directory OUT with "
                        "its samples' reference outputs as jest.* fields (JESTLoader(reference='batch'))")
    p.add_argument("--dataset",
                   help="the dataset the shards' keys belong to (printable ASCII, at most 128 characters); "
                        "clients naming it (JESTLoader(dataset=...)) hit these records; required with --out")
    p.add_argument("--batch-size", type=int, default=256, help="samples per inference batch (default 256)")
    p.add_argument("--threads", type=int, default=None,
                   help="ONNX Runtime intra-op threads (default: ORT's choice)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``jest-stream precompute``; prints a one-line JSON summary."""
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    if not os.path.isfile(args.model):
        print(f"jest-stream precompute: --model: {args.model!r} is not a file", file=sys.stderr)
        return 2
    if bool(args.out) == bool(args.write_shards):
        print("jest-stream precompute: give --out (a cache file) or --write-shards (a directory), "
              "not both", file=sys.stderr)
        return 2
    if args.out and not args.dataset:
        print("jest-stream precompute: --dataset: name the dataset the shards' keys belong to "
              "(clients name the same one: JESTLoader(dataset=...))", file=sys.stderr)
        return 2
    try:
        if args.write_shards:
            from .reference_shards import write_reference_shards

            counts = write_reference_shards(args.model, args.shards, args.write_shards,
                                            batch_size=args.batch_size, intra_op_threads=args.threads,
                                            progress=not args.no_progress)
        else:
            counts = precompute(args.model, args.shards, args.out, batch_size=args.batch_size,
                                intra_op_threads=args.threads, progress=not args.no_progress,
                                dataset=args.dataset)
    except (FileNotFoundError, KeyError, ValueError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"jest-stream precompute: {message}", file=sys.stderr)
        return 2
    print(json.dumps(counts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
