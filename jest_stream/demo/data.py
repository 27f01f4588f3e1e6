"""The demo's data: scikit-learn's handwritten digits, split, corrupted and written as shards.

Everything here is deterministic for a given seed and needs no download (the digits
ship with scikit-learn). Two tasks share one split:

- ``classification``: 64 pixel features and a label; a fraction ``noise`` of the
  training labels is flipped to another class (the noisy web data), while a small
  held-out split keeps clean labels (the curated data the reference model learns from).
- ``contrastive``: pairs of two views of one digit (the "image" and its "text", a
  second, differently corrupted view); a fraction ``noise`` of the training pairs is
  mismatched (the text is a view of another digit).

Shards follow WebDataset's conventions: each sample is a ``__key__`` plus one member per
field, named ``{key}.{field}.npy`` (arrays) or ``{key}.{field}.cls`` (integer labels), so
the field names are the reference model's input names (``x``/``y``, ``image``/``text``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

N_CLASSES = 10
N_PIXELS = 64


@dataclass(frozen=True)
class Split:
    """One split of a task: arrays by field name (rows aligned), keys, and which rows are
    corrupted (flipped labels or mismatched pairs)."""

    fields: dict[str, np.ndarray]
    keys: list[str]
    corrupted: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))

    def __len__(self) -> int:
        return len(self.keys)


@dataclass(frozen=True)
class DemoData:
    """The three splits of one task: noisy ``train``, small clean ``reference``, clean ``test``."""

    task: str
    train: Split
    reference: Split
    test: Split


def load_digits_scaled() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1797 digits as float32 pixels in [0, 1] (N, 64) and int64 labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return (digits.data / 16.0).astype(np.float32), digits.target.astype(np.int64)


def split_indices(labels: np.ndarray, n_test: int, n_reference: int, seed: int) -> tuple[np.ndarray, ...]:
    """Stratified (train, reference, test) index arrays: every class in every split."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(labels.shape[0])
    rest, test = train_test_split(idx, test_size=n_test, stratify=labels, random_state=seed)
    train, ref = train_test_split(rest, test_size=n_reference, stratify=labels[rest], random_state=seed + 1)
    return np.sort(train), np.sort(ref), np.sort(test)


def flip_labels(labels: np.ndarray, noise: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Flip exactly round(noise * N) labels, each to a uniformly drawn *other* class.

    Returns (noisy labels, mask of flipped rows).
    """
    if not 0.0 <= noise < 1.0:
        raise ValueError(f"noise: expected a fraction in [0, 1), got {noise}")
    n = labels.shape[0]
    flipped = np.zeros(n, dtype=bool)
    flipped[rng.choice(n, size=int(round(noise * n)), replace=False)] = True
    noisy = labels.copy()
    shift = rng.integers(1, N_CLASSES, size=n)
    noisy[flipped] = (labels[flipped] + shift[flipped]) % N_CLASSES
    return noisy, flipped


def second_view(pixels: np.ndarray, rng: np.random.Generator, drop: float = 0.1,
                noise: float = 0.05) -> np.ndarray:
    """Another view of each digit: a fraction ``drop`` of its pixels blanked and Gaussian
    noise of std ``noise`` added. Fixed once per sample, so reference outputs can be cached."""
    out = pixels * (rng.random(pixels.shape) > drop)
    out = out + rng.normal(0.0, noise, pixels.shape)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def mismatch_pairs(n: int, noise: float, rng: np.random.Generator,
                   groups: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A permutation that pairs round(noise * n) rows with another row's text, and their mask.

    The chosen rows are cycled among themselves (a derangement), so every chosen pair
    really is mismatched. With ``groups`` (one id per row: the source digit of several
    views), a chosen row never gets the text of a row of its own group: the chosen rows
    are ordered by a random ranking of their groups and rolled by the largest group's
    count, which always lands outside the row's own group.
    """
    if not 0.0 <= noise < 1.0:
        raise ValueError(f"noise: expected a fraction in [0, 1), got {noise}")
    partner = np.arange(n)
    chosen = rng.choice(n, size=int(round(noise * n)), replace=False)
    mismatched = np.zeros(n, dtype=bool)
    shift = 1
    if groups is not None and chosen.size:
        rank = rng.permutation(int(groups.max()) + 1)[groups[chosen]]
        chosen = chosen[np.argsort(rank, kind="stable")]
        shift = int(np.unique(groups[chosen], return_counts=True)[1].max())
        if shift >= chosen.size:
            raise ValueError(f"noise: {chosen.size} mismatched rows cannot avoid their own group "
                             f"({shift} rows share one); raise noise or use fewer views")
    if chosen.size >= 2:
        partner[chosen] = np.roll(chosen, shift)
        mismatched[chosen] = True
    return partner, mismatched


def _keys(prefix: str, idx: np.ndarray) -> list[str]:
    return [f"{prefix}{int(i):05d}" for i in idx]


def make_classification(noise: float = 0.3, seed: int = 0, n_test: int = 360,
                        n_reference: int = 300) -> DemoData:
    """Digits with ``noise`` of the training labels flipped; clean reference and test splits."""
    pixels, labels = load_digits_scaled()
    train, ref, test = split_indices(labels, n_test, n_reference, seed)
    rng = np.random.default_rng(seed)
    noisy, flipped = flip_labels(labels[train], noise, rng)
    return DemoData(
        "classification",
        Split({"x": pixels[train], "y": noisy}, _keys("digit", train), flipped),
        Split({"x": pixels[ref], "y": labels[ref]}, _keys("digit", ref)),
        Split({"x": pixels[test], "y": labels[test]}, _keys("digit", test)),
    )


def make_contrastive(noise: float = 0.3, seed: int = 0, n_test: int = 360,
                     n_reference: int = 300, views: int = 1) -> DemoData:
    """Digit pairs (image, second view); ``noise`` of the training pairs mismatched.

    ``views`` > 1 makes that many pairs of each training and reference digit, each pair
    with its own random image and text views (a larger training pool for large
    super-batches, drawn in one vectorised pass); mismatched pairs never get a view of
    their own digit. The test split stays one clean pair per digit.
    """
    if isinstance(views, bool) or int(views) != views or views < 1:
        raise ValueError(f"views: expected an integer >= 1, got {views!r}")
    pixels, labels = load_digits_scaled()
    train, ref, test = split_indices(labels, n_test, n_reference, seed)
    rng = np.random.default_rng(seed)
    if views == 1:
        return _one_view_pairs(pixels, labels, (train, ref, test), noise, rng)
    test_images = second_view(pixels[test], rng, drop=0.05, noise=0.03)
    test_texts = second_view(pixels[test], rng, drop=0.1, noise=0.05)

    def repeated(idx: np.ndarray, prefix: str, noisy: float) -> Split:
        rows = np.repeat(idx, views)  # row r is view r % views of digit idx[r // views]
        images = second_view(pixels[rows], rng, drop=0.05, noise=0.03)
        texts = second_view(pixels[rows], rng, drop=0.1, noise=0.05)
        group = np.repeat(np.arange(idx.shape[0]), views)
        partner, mismatched = mismatch_pairs(rows.shape[0], noisy, rng, groups=group)
        view = np.tile(np.arange(views), idx.shape[0])
        keys = [f"{prefix}{int(i):05d}v{int(v):02d}" for i, v in zip(rows, view)]
        return Split({"image": images, "text": texts[partner], "label": labels[rows]}, keys, mismatched)

    return DemoData(
        "contrastive",
        repeated(train, "pair", noise),
        repeated(ref, "ref", 0.0),
        Split({"image": test_images, "text": test_texts, "label": labels[test]}, _keys("pair", test)),
    )


def _one_view_pairs(pixels: np.ndarray, labels: np.ndarray, splits: tuple[np.ndarray, ...],
                    noise: float, rng: np.random.Generator) -> DemoData:
    """One (image, text) pair per digit: the small configuration's data."""
    train, ref, test = splits
    images = second_view(pixels, rng, drop=0.05, noise=0.03)
    texts = second_view(pixels, rng, drop=0.1, noise=0.05)
    partner, mismatched = mismatch_pairs(train.shape[0], noise, rng)

    def clean(idx: np.ndarray) -> Split:
        return Split({"image": images[idx], "text": texts[idx], "label": labels[idx]}, _keys("pair", idx))

    return DemoData(
        "contrastive",
        Split({"image": images[train], "text": texts[train[partner]], "label": labels[train]},
              _keys("pair", train), mismatched),
        clean(ref),
        clean(test),
    )


def write_shards(split: Split, out_dir: str | os.PathLike, prefix: str = "train",
                 per_shard: int = 128, fields: tuple[str, ...] | None = None) -> list[str]:
    """Write ``split`` as WebDataset tar shards ``{prefix}-000.tar`` ... in ``out_dir``.

    Arrays are stored as ``{field}.npy``, integer vectors as ``{field}.cls``. Returns the
    shard paths in order.
    """
    import webdataset as wds

    os.makedirs(out_dir, exist_ok=True)
    names = tuple(split.fields) if fields is None else fields
    pattern = os.path.join(os.fspath(out_dir), f"{prefix}-%03d.tar")
    paths: list[str] = []
    with wds.ShardWriter(pattern, maxcount=per_shard, verbose=0,
                         post=lambda fname: paths.append(fname)) as sink:
        for row, key in enumerate(split.keys):
            sample = {"__key__": key}
            for name in names:
                value = split.fields[name][row]
                if np.ndim(value) == 0:
                    sample[f"{name}.cls"] = int(value)
                else:
                    sample[f"{name}.npy"] = np.asarray(value)
            sink.write(sample)
    return paths


def read_shards(paths: list[str]) -> tuple[list[str], dict[str, np.ndarray]]:
    """Read WebDataset shards back (keys in order, stacked arrays by field name)."""
    import webdataset as wds

    keys: list[str] = []
    columns: dict[str, list] = {}
    for sample in wds.WebDataset(paths, shardshuffle=False, empty_check=False).decode():
        keys.append(sample["__key__"])
        for member, value in sample.items():
            if member.startswith("__"):
                continue
            columns.setdefault(member.rsplit(".", 1)[0], []).append(value)
    return keys, {name: np.stack([np.asarray(v) for v in vals]) for name, vals in columns.items()}
