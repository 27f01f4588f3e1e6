"""The reference cache FILE: precomputed reference outputs the server loads at start.

Format: a stream of msgpack maps, appended one after another.

1. a header ``{"format": "jest-stream-cache", "format_version": 1, "model_version": V}``
   where V is ``jest_stream.contract.model_version`` of the ONNX file;
2. one record per sample ``{"k": key, "o": {output_name: [dtype, shape, raw bytes]}}``
   with the outputs of that one sample (no batch axis), raw little-endian row-major bytes.

Appending keeps writing cheap and resumable: an interrupted writer leaves at worst a
truncated last record, which the reader ignores and a resuming writer cuts off.

API (numpy and msgpack only, so the precompute command and the server share it):

- ``CacheFileWriter(path, model_version, resume=True)``: ``.add(key, outputs)`` appends
  one sample (False if the key is already in the file), ``.keys`` the keys written so far
  (including those of a resumed file), ``.flush()``, ``.close()``; a context manager.
- ``read_cache_file(path) -> (model_version, records)``: records iterates (key, outputs).
- ``iter_cache_file(path)``: (model_version, key, outputs) for every record.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping
from typing import BinaryIO

import msgpack
import numpy as np

log = logging.getLogger(__name__)

FORMAT = "jest-stream-cache"
FORMAT_VERSION = 1


class CacheFileError(ValueError):
    """A cache file that is not one, or belongs to another model version."""


def _encode_outputs(outputs: Mapping[str, np.ndarray]) -> dict:
    out = {}
    for name, value in outputs.items():
        # np.asarray, not np.ascontiguousarray: that one turns a 0-d row (a per_example
        # loss) into shape (1,); tobytes() writes C order whatever the layout
        arr = np.asarray(value)
        little = arr.astype(arr.dtype.newbyteorder("<"), copy=False)
        out[name] = [little.dtype.str, list(arr.shape), little.tobytes(order="C")]
    return out


def _decode_outputs(raw: Mapping) -> dict[str, np.ndarray]:
    return {name: np.frombuffer(data, dtype=np.dtype(dt)).reshape(shape)
            for name, (dt, shape, data) in raw.items()}


def _scan(fh: BinaryIO, path: str) -> Iterator[tuple[int, dict]]:
    """Yield (end offset, record) for every complete record; stop at a truncated tail."""
    unpacker = msgpack.Unpacker(fh, raw=False, max_buffer_size=1 << 30)
    while True:
        try:
            record = unpacker.unpack()
        except msgpack.OutOfData:
            return
        except (msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, ValueError) as exc:
            log.warning("%s: stopping at a corrupt record (%s)", path, exc)
            return
        yield unpacker.tell(), record


def _check_header(record: object, path: str) -> str:
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise CacheFileError(f"{path}: not a jest-stream cache file (no {FORMAT!r} header); "
                             "write one with `jest-stream precompute`")
    if record.get("format_version") != FORMAT_VERSION:
        raise CacheFileError(f"{path}: format_version {record.get('format_version')} is not supported; "
                             f"expected {FORMAT_VERSION}")
    return str(record["model_version"])


class CacheRecords:
    """The records of an open cache file: iterate for (key, outputs); closes the file at
    the end, on ``close()`` or on leaving a ``with`` block."""

    def __init__(self, fh: BinaryIO, scan: Iterator[tuple[int, dict]], path: str):
        self._fh = fh
        self._scan = scan
        self.path = path

    def __iter__(self) -> Iterator[tuple[str, dict[str, np.ndarray]]]:
        try:
            for _, rec in self._scan:
                try:
                    yield rec["k"], _decode_outputs(rec["o"])
                except (KeyError, TypeError, ValueError) as exc:
                    raise CacheFileError(f"{self.path}: malformed record ({exc!r}); expected "
                                         "{'k': key, 'o': {name: [dtype, shape, bytes]}}") from None
        finally:
            self.close()

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> CacheRecords:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_cache_file(path: str | os.PathLike) -> tuple[str, CacheRecords]:
    """Open a cache file: its model version, and its records as an iterator of
    (key, outputs) that closes the file when done (or use it in a ``with`` block)."""
    path = os.fspath(path)
    fh = open(path, "rb")
    scan = _scan(fh, path)
    try:
        first = next(scan, None)
        if first is None:
            raise CacheFileError(f"{path}: empty file; expected a {FORMAT!r} header")
        version = _check_header(first[1], path)
    except BaseException:
        fh.close()
        raise
    return version, CacheRecords(fh, scan, path)


def iter_cache_file(path: str | os.PathLike) -> Iterator[tuple[str, str, dict[str, np.ndarray]]]:
    """Every record of a cache file as (model_version, key, outputs)."""
    version, records = read_cache_file(path)
    with records:
        for key, outputs in records:
            yield version, key, outputs


class CacheFileWriter:
    """Append reference outputs to a cache file; with ``resume`` (default), an existing
    file of the same model version is kept and its keys are known (``keys``)."""

    def __init__(self, path: str | os.PathLike, model_version: str, *, resume: bool = True):
        self.path = os.fspath(path)
        self.model_version = model_version
        self.keys: set[str] = set()
        good_end = 0
        if resume and os.path.exists(self.path) and os.path.getsize(self.path) > 0:
            with open(self.path, "rb") as fh:
                scan = _scan(fh, self.path)
                first = next(scan, None)
                if first is None:
                    good_end = 0
                else:
                    version = _check_header(first[1], self.path)
                    if version != model_version:
                        raise CacheFileError(
                            f"{self.path}: holds model version {version}, not {model_version}; "
                            "use another --out or delete the file")
                    good_end = first[0]
                    for end, rec in scan:
                        self.keys.add(rec["k"])
                        good_end = end
        self._fh = open(self.path, "r+b" if good_end else "wb")
        if good_end:
            self._fh.truncate(good_end)  # drop a record cut short by an interruption
            self._fh.seek(good_end)
        else:
            self._fh.write(msgpack.packb({"format": FORMAT, "format_version": FORMAT_VERSION,
                                          "model_version": model_version}))
        self._packer = msgpack.Packer(use_bin_type=True)

    def add(self, key: str, outputs: Mapping[str, np.ndarray]) -> bool:
        """Append one sample's outputs (no batch axis); False if the key is already there."""
        if key in self.keys:
            return False
        self._fh.write(self._packer.pack({"k": key, "o": _encode_outputs(outputs)}))
        self.keys.add(key)
        return True

    def flush(self) -> None:
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        if not self._fh.closed:
            self.flush()
            self._fh.close()

    def __enter__(self) -> CacheFileWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
