"""The selection quality harness: synthetic contrastive super-batches, a set's batch
learnability J computed the plain full-matrix way, and long Metropolis swap chains.

A super-batch holds clusters of near-duplicate concepts. The reference model tells
every example apart; the learner has learned some clusters' fine structure and not
others', so inside an unlearned cluster every pair is a hard negative the learner
gets wrong and the reference gets right (learnable), while its positive pairs still
match. A fifth of the pairs are mismatched for both models (unlearnable noise).
J(S) = (L_learner(S) - L_reference(S)) / |S|, with L the set's batch loss summed over
its members (sigmoid: sum over i, j in S of nll(i, j); softmax: CLIP's per-member
0.5 * (i2t + t2i) within S).
"""
from __future__ import annotations

import numpy as np

from jest_stream import Embeddings


def unit(z: np.ndarray) -> np.ndarray:
    return (z / np.linalg.norm(z, axis=1, keepdims=True)).astype(np.float32)


def clustered_pair(seed: int, batch: int, dim: int = 32, cluster: int = 16,
                   scale: float = 10.0, bias: float = -5.0) -> tuple[Embeddings, Embeddings]:
    """Learner and reference embeddings of one super-batch with clusters of learnable
    hard negatives (see the module docstring)."""
    rng = np.random.default_rng(seed)
    n_clusters = max(1, batch // cluster)
    labels = rng.integers(0, n_clusters, batch)
    centers = unit(rng.standard_normal((n_clusters, dim)))[labels]
    offsets = unit(rng.standard_normal((batch, dim)))
    text_offsets = offsets + 0.2 * rng.standard_normal((batch, dim))
    mismatched = rng.random(batch) < 0.2
    text_offsets[mismatched] = unit(rng.standard_normal((int(mismatched.sum()), dim)))
    # How far the learner has come in telling each cluster's members apart (0: not at all).
    learned = rng.random(n_clusters)[labels][:, None]
    ref_image = unit(0.4 * centers + offsets)
    ref_text = unit(0.4 * centers + text_offsets)
    learner_image = unit((2.0 - 1.6 * learned) * centers + offsets)
    learner_text = unit((2.0 - 1.6 * learned) * centers + text_offsets)
    return (Embeddings(learner_image, learner_text, scale, bias),
            Embeddings(ref_image, ref_text, scale, bias))


def logits(m: Embeddings, with_bias: bool) -> np.ndarray:
    """The full B x B logit matrix x_ij = a * zi_i . zt_j (+ b), float64."""
    x = m.logit_scale * (m.image.astype(np.float64) @ m.text.T.astype(np.float64))
    return x + m.logit_bias if with_bias else x


def sigmoid_matrix(learner: Embeddings, reference: Embeddings) -> np.ndarray:
    """S_ij = nll_learner(i, j) - nll_reference(i, j), the full B x B way."""
    s = 0.0
    for weight, m in ((1.0, learner), (-1.0, reference)):
        x = logits(m, with_bias=True)
        y = -np.ones_like(x)
        np.fill_diagonal(y, 1.0)
        s = s + weight * np.logaddexp(0.0, -y * x)
    return s


def sigmoid_j(s: np.ndarray, sets: np.ndarray) -> np.ndarray:
    """J of each row of ``sets`` (n_sets, b): sum over i, j in the set of S_ij, over b."""
    return s[sets[:, :, None], sets[:, None, :]].sum(axis=(1, 2)) / sets.shape[1]


def clip_set_loss(x: np.ndarray, sets: np.ndarray) -> np.ndarray:
    """CLIP batch loss, summed over members, of each row of ``sets`` from logits x."""
    sub = x[sets[:, :, None], sets[:, None, :]]  # (n, b, b)
    pos = np.diagonal(sub, axis1=1, axis2=2)
    i2t = np.logaddexp.reduce(sub, axis=2) - pos
    t2i = np.logaddexp.reduce(sub, axis=1) - pos
    return 0.5 * (i2t + t2i).sum(axis=1)


def softmax_j(xs: tuple[np.ndarray, np.ndarray], sets: np.ndarray) -> np.ndarray:
    """J of each set: (L_learner - L_reference) / b, xs the two models' logit matrices."""
    return (clip_set_loss(xs[0], sets) - clip_set_loss(xs[1], sets)) / sets.shape[1]


class SigmoidState:
    """Swap-chain state for the sigmoid set score sum_{i,j in S} S_ij (per chain)."""

    def __init__(self, s: np.ndarray, inside: np.ndarray):
        self.m = s + s.T
        self.diag = np.diag(s)
        self.r = inside.astype(float) @ self.m  # r[c, x] = sum_{k in S_c} (s_xk + s_kx)

    def delta(self, i: np.ndarray, j: np.ndarray) -> np.ndarray:
        rows = np.arange(len(i))
        return -(self.diag[i] + self.r[rows, i] - self.m[i, i]) + \
            (self.diag[j] + self.r[rows, j] - self.m[j, i])

    def swap(self, ok: np.ndarray, i: np.ndarray, j: np.ndarray) -> None:
        self.r[ok] += self.m[j[ok]] - self.m[i[ok]]


class SoftmaxState:
    """Swap-chain state for the CLIP set loss (learner minus reference), per chain:
    the exp-sums of every example's row and column over the set."""

    def __init__(self, xs: tuple[np.ndarray, np.ndarray], inside: np.ndarray):
        self.e = [np.exp(x) for x in xs]
        self.diag = [np.diag(x) for x in xs]
        self.inside = inside.copy()
        mask = inside.astype(float)
        self.zr = [mask @ e.T for e in self.e]  # zr[c, k] = sum_{j in S} e^{x_kj}
        self.zc = [mask @ e for e in self.e]    # zc[c, k] = sum_{j in S} e^{x_jk}
        self.loss = self._loss(self.zr, self.zc, self.inside)

    def _loss(self, zr, zc, inside) -> np.ndarray:
        total = 0.0
        for w, r, c, d in zip((1.0, -1.0), zr, zc, self.diag):
            per = 0.5 * (np.log(r) + np.log(c)) - d
            total = total + w * np.where(inside, per, 0.0).sum(axis=1)
        return total

    def _moved(self, i, j):
        zr = [r - e[:, i].T + e[:, j].T for r, e in zip(self.zr, self.e)]
        zc = [c - e[i] + e[j] for c, e in zip(self.zc, self.e)]
        inside = self.inside.copy()
        rows = np.arange(len(i))
        inside[rows, i], inside[rows, j] = False, True
        return zr, zc, inside

    def delta(self, i: np.ndarray, j: np.ndarray) -> np.ndarray:
        self._next = self._moved(i, j)
        self._next_loss = self._loss(*self._next)
        return self._next_loss - self.loss

    def swap(self, ok: np.ndarray, i: np.ndarray, j: np.ndarray) -> None:
        zr, zc, inside = self._next
        for m in range(2):
            self.zr[m][ok], self.zc[m][ok] = zr[m][ok], zc[m][ok]
        self.inside[ok] = inside[ok]
        self.loss[ok] = self._next_loss[ok]


def swap_chain(state_of, set_j, batch: int, size: int, gain: float, seed: int, chains: int = 4,
               block: int = 500, max_blocks: int = 40) -> float:
    """Metropolis swap chains on p(S) ~ exp(gain * L(S)), ``chains`` run side by side from
    uniform random sets until the mean J of a block of moves stops rising; that mean.
    ``state_of(inside)`` makes the chains' incremental state, ``set_j(sets)`` the J of sets."""
    rng = np.random.default_rng(seed)
    order = np.argsort(rng.random((chains, batch)), axis=1)
    members, others = order[:, :size].copy(), order[:, size:].copy()
    inside = np.zeros((chains, batch), dtype=bool)
    np.put_along_axis(inside, members, True, axis=1)
    state = state_of(inside)
    current = set_j(members) * size  # the set's batch loss L(S)
    rows = np.arange(chains)
    previous = mean = -np.inf
    for _ in range(max_blocks):
        total = 0.0
        for _ in range(block):
            a = rng.integers(0, size, chains)
            z = rng.integers(0, batch - size, chains)
            i, j = members[rows, a], others[rows, z]
            delta = state.delta(i, j)
            ok = np.log(rng.random(chains)) < gain * delta
            state.swap(ok, i, j)
            members[rows[ok], a[ok]], others[rows[ok], z[ok]] = j[ok], i[ok]
            current = current + np.where(ok, delta, 0.0)
            total += current.mean()
        mean = total / block / size
        if mean <= previous + 0.002 * abs(previous):
            break
        previous = mean
    return float(max(mean, previous))
