"""The reference cache FILE: precomputed reference outputs the server loads at start.

Format: a stream of msgpack maps, appended one after another.

1. a header ``{"format": "jest-stream-cache", "format_version": 2, "model_version": V,
   "dataset": D}`` where V is ``jest_stream.contract.model_version`` of the ONNX file and
   D the dataset the keys belong to (the server caches the records under it; requests
   naming that dataset hit them). Version 1 files recorded no dataset and are refused
   with a message saying how to rewrite them;
2. one record per sample ``{"k": key, "o": {output_name: [dtype, shape, raw bytes]}}``
   with the outputs of that one sample (no batch axis), raw little-endian row-major bytes.

Appending keeps writing cheap and resumable: an interrupted writer leaves at worst a
truncated last record, which the reader ignores (with a warning) and a resuming writer
cuts off. Anything else that is not a valid record (garbage, a length past what a
record may hold, wrong field types) raises CacheFileError: one line naming the file
and the problem.

API (numpy and msgpack only, so the precompute command and the server share it):

- ``CacheFileWriter(path, model_version, dataset=D, resume=True)``: ``.add(key, outputs)`` appends
  one sample (False if the key is already in the file), ``.keys`` the keys written so far
  (including those of a resumed file), ``.flush()``, ``.close()``; a context manager.
- ``read_cache_file(path) -> (model_version, records)``: records iterates (key, outputs);
  ``records.dataset`` is the file's dataset.
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
FORMAT_VERSION = 2
_MAX_RECORD = 1 << 30  # the largest record (or field) a reader accepts


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
    out = {}
    for name, (dt, shape, data) in raw.items():
        dtype = np.dtype(dt)
        if dtype.kind not in "biuf":
            raise ValueError(f"output {name!r}: dtype {dtype} is not numeric")
        out[name] = np.frombuffer(data, dtype=dtype).reshape(shape)
    return out


def _claimed_end(buf: bytes, pos: int = 0) -> int:
    """Where the msgpack object starting at ``buf[pos]`` says it ends (its lengths read,
    its payloads skipped; may lie past the end of ``buf``): tells a torn last record from
    one that claims an impossible length. IndexError if ``buf`` ends inside a header."""
    b = buf[pos]
    fixed = {0xc0: 1, 0xc2: 1, 0xc3: 1, 0xca: 5, 0xcb: 9, 0xcc: 2, 0xcd: 3, 0xce: 5, 0xcf: 9,
             0xd0: 2, 0xd1: 3, 0xd2: 5, 0xd3: 9, 0xd4: 3, 0xd5: 4, 0xd6: 6, 0xd7: 10, 0xd8: 18}
    if b <= 0x7f or b >= 0xe0:
        return pos + 1
    if b in fixed:
        return pos + fixed[b]
    if 0xa0 <= b <= 0xbf:
        return pos + 1 + (b & 0x1f)
    sized = {0xc4: 1, 0xc5: 2, 0xc6: 4, 0xd9: 1, 0xda: 2, 0xdb: 4, 0xc7: 1, 0xc8: 2, 0xc9: 4}
    if b in sized:
        width = sized[b]
        if pos + 1 + width > len(buf):
            raise IndexError(pos)
        n = int.from_bytes(buf[pos + 1:pos + 1 + width], "big")
        return pos + 1 + width + n + (1 if b in (0xc7, 0xc8, 0xc9) else 0)
    if 0x80 <= b <= 0x8f or 0x90 <= b <= 0x9f:
        count, pos = (b & 0x0f) * (2 if b <= 0x8f else 1), pos + 1
    elif b in (0xdc, 0xdd, 0xde, 0xdf):
        width = 2 if b in (0xdc, 0xde) else 4
        count = int.from_bytes(buf[pos + 1:pos + 1 + width], "big") * (2 if b >= 0xde else 1)
        pos += 1 + width
    else:
        raise ValueError(f"byte 0x{b:02x} starts no msgpack object")
    for _ in range(count):
        if pos >= len(buf):
            return pos
        pos = _claimed_end(buf, pos)
    return pos


def _torn_tail(fh: BinaryIO, end: int, path: str) -> None:
    """The bytes after the last complete record: a torn record (a warning) or a record
    that claims more than a record may hold (CacheFileError)."""
    size = os.fstat(fh.fileno()).st_size
    if size <= end:
        return
    fh.seek(end)
    head = fh.read(1 << 16)
    try:
        claimed = _claimed_end(head) if head else 0
    except IndexError:
        claimed = len(head)
    except (ValueError, RecursionError) as exc:
        raise CacheFileError(f"{path}: corrupt record at offset {end}: {exc}") from None
    if claimed > _MAX_RECORD:
        raise CacheFileError(f"{path}: the record at offset {end} claims {claimed} bytes, more than a record "
                             f"may hold ({_MAX_RECORD}); the file is corrupt")
    log.warning("%s: ignoring a truncated last record (%d bytes at offset %d)", path, size - end, end)


def _scan(fh: BinaryIO, path: str) -> Iterator[tuple[int, dict]]:
    """Yield (end offset, record) for every complete record; stop at a truncated tail
    (with a warning); raise CacheFileError on anything that is not a record."""
    unpacker = msgpack.Unpacker(fh, raw=False, max_buffer_size=_MAX_RECORD)
    end = 0
    while True:
        try:
            record = unpacker.unpack()
        except msgpack.OutOfData:
            _torn_tail(fh, end, path)
            return
        except (msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, msgpack.BufferFull,
                ValueError, TypeError) as exc:
            raise CacheFileError(f"{path}: corrupt record at offset {end}: "
                                 f"{str(exc) or type(exc).__name__} (not msgpack)") from None
        end = unpacker.tell()
        yield end, record


def _check_header(record: object, path: str) -> tuple[str, str]:
    """(model version, dataset) of a header record; CacheFileError naming the problem."""
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise CacheFileError(f"{path}: not a jest-stream cache file (no {FORMAT!r} header); "
                             "write one with `jest-stream precompute`")
    version = record.get("format_version")
    if version == 1:
        raise CacheFileError(f"{path}: format_version 1 records no dataset; rewrite it with "
                             "`jest-stream precompute --dataset NAME`")
    if version != FORMAT_VERSION:
        raise CacheFileError(f"{path}: format_version {version!r} is not supported; expected {FORMAT_VERSION}")
    model, dataset = record.get("model_version"), record.get("dataset")
    if not isinstance(model, str) or not model or not isinstance(dataset, str) or not dataset:
        raise CacheFileError(f"{path}: the header lacks a model_version or a dataset name")
    return model, dataset


class CacheRecords:
    """The records of an open cache file: iterate for (key, outputs); closes the file at
    the end, on ``close()`` or on leaving a ``with`` block."""

    def __init__(self, fh: BinaryIO, scan: Iterator[tuple[int, dict]], path: str, dataset: str = ""):
        self._fh = fh
        self._scan = scan
        self.path = path
        self.dataset = dataset

    def __iter__(self) -> Iterator[tuple[str, dict[str, np.ndarray]]]:
        try:
            for _, rec in self._scan:
                try:
                    key, outputs = rec["k"], _decode_outputs(rec["o"])
                    if not isinstance(key, str):
                        raise TypeError(f"key {key!r} is not a string")
                except (KeyError, TypeError, ValueError) as exc:
                    raise CacheFileError(f"{self.path}: malformed record ({exc!r}); expected "
                                         "{'k': key, 'o': {name: [dtype, shape, bytes]}}") from None
                yield key, outputs
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
        version, dataset = _check_header(first[1], path)
    except BaseException:
        fh.close()
        raise
    return version, CacheRecords(fh, scan, path, dataset)


def iter_cache_file(path: str | os.PathLike) -> Iterator[tuple[str, str, dict[str, np.ndarray]]]:
    """Every record of a cache file as (model_version, key, outputs)."""
    version, records = read_cache_file(path)
    with records:
        for key, outputs in records:
            yield version, key, outputs


class CacheFileWriter:
    """Append reference outputs of ``dataset`` to a cache file; with ``resume`` (default), an
    existing file of the same model version and dataset is kept and its keys are known (``keys``)."""

    def __init__(self, path: str | os.PathLike, model_version: str, *, dataset: str, resume: bool = True):
        if not dataset or not isinstance(dataset, str):
            raise ValueError("dataset: name the dataset the keys belong to (e.g. --dataset cc3m-train)")
        self.path = os.fspath(path)
        self.model_version = model_version
        self.dataset = dataset
        self.keys: set[str] = set()
        good_end = 0
        if resume and os.path.exists(self.path) and os.path.getsize(self.path) > 0:
            with open(self.path, "rb") as fh:
                scan = _scan(fh, self.path)
                first = next(scan, None)
                if first is None:
                    good_end = 0
                else:
                    version, held = _check_header(first[1], self.path)
                    if (version, held) != (model_version, dataset):
                        raise CacheFileError(
                            f"{self.path}: holds model version {version} of dataset {held!r}, not "
                            f"{model_version} of {dataset!r}; use another --out or delete the file")
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
                                          "model_version": model_version, "dataset": dataset}))
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
