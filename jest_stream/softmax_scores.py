"""Conditional scores for CLIP's softmax contrastive loss.

The batch loss of a set S is the *sum* over its members k of
ell_k(S) = 0.5 * [(R_k(S) - x_kk) + (C_k(S) - x_kk)], with R_k(S) = log sum_{j in S} e^{x_kj}
(image k against S's texts) and C_k(S) = log sum_{j in S} e^{x_jk} (text k against S's
images): the same sum-over-members convention as the sigmoid score, so a set's score is
its batch loss and the per-member mean is that over |S|. It does not decompose into
pairs, so the candidate score is recomputed each chunk from running log-sum-exps:

- ``marginal`` (the default): the exact marginal gain L(S + {i}) - L(S) =
  ell_i(S + {i}) + 0.5 * sum_{k in S} [softplus(x_ki - R_k(S)) + softplus(x_ik - C_k(S))],
  its own loss within S + {i} *and* how much each selected member's loss rises when i
  joins that member's softmax. O(B * |S| * d) per chunk, in blocks of S.
- ``own``: the candidate's own loss ell_i(S + {i}) alone (O(B * |C| * d) per chunk), an
  approximation that ignores what i does to the members already chosen.

With ``lookahead="in_batch"`` (the default) every softmax in L(S) sums over S plus the
share rho = (b - |S| - 1) / (B - |S| - 1) of the rest of the super-batch: the set's loss
as if a uniformly random draw completed it to b, from the in-batch log-sum-exps (one
B x B x d pass per model, in row blocks). A candidate i is then already rho-counted in
each member's context and adds (1 - rho) of its term. Without lookahead, the first
chunk's context (and ``topk``'s) is the whole super-batch.

``marginal`` is the default: it measured better on the quality tests' harness than
``own``. The lookahead is the default because it measured better where it counts, in
the large-batch learning benchmark (docs/demo.md); on the harness (J of 20 seeds, gain
30, without / with lookahead) it is ahead in four settings of six: B=256 f=0.5 0.202 /
0.265, f=0.8 0.521 / 0.572, f=0.9 0.659 / 0.629; B=1024 f=0.5 -0.108 / -0.084, f=0.8
0.284 / 0.324, f=0.9 0.571 / 0.558 (topk: 0.217, 0.398, 0.370, -0.124, 0.069, 0.158).
The price of ``marginal`` is compute: the members' term recomputes |S| rows per chunk,
about N/2 times the products of ``own``.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from jest_stream import xp as xp_util
from jest_stream.logits import completion_share, logsumexp, softplus_colsum, towers
from jest_stream.outputs import Embeddings


class SoftmaxScores:
    """CLIP's softmax loss, conditioned on the selected set (see the module docstring)."""

    pairwise = True

    def __init__(self, learner: Embeddings | None, reference: Embeddings | None,
                 score: str = "learnability", mode: str = "marginal", lookahead: str = "in_batch"):
        self._towers = towers(learner, reference, score, with_bias=False)
        first = self._towers[0][1]
        self._xp, self._b, self._mode = first.xp, first.batch, mode
        self._lookahead = lookahead == "in_batch"
        self._device = xp_util.device_of(first.diag)
        self._lse_rows: list[Any] = []
        self._lse_cols: list[Any] = []
        self._members: list[Any] = []
        self._n_select = self._n = 0
        # Per model, each example's log-sum-exp over the whole super-batch (its row, its column).
        self._batch_rows: list[Any] = []
        self._batch_cols: list[Any] = []
        self._diag: Any = None

    @property
    def batch_size(self) -> int:
        return self._b

    def _full(self, value: float) -> Any:
        return self._xp.full(self._b, value, dtype=self._xp.float64, device=self._device)

    def diagonal(self) -> Any:
        """Each example's loss score against the whole super-batch (its in-batch score)."""
        if self._diag is None:
            xp = self._xp
            c = self._full(0.0)
            for w, t in self._towers:
                rows = self._full(0.0)
                cols = self._full(-xp.inf)
                for start, stop in t.blocks():
                    x = t.block(start, stop)  # x[i, j] for i in the block, every j
                    rows[start:stop] = logsumexp(xp.asarray(x, copy=True), axis=1)
                    cols = xp.logaddexp(cols, logsumexp(x, axis=0))
                self._batch_rows.append(rows)
                self._batch_cols.append(cols)
                c += w * 0.5 * ((rows - t.diag) + (cols - t.diag))
            self._diag = c
        return self._diag

    def per_example(self) -> Any:
        """The score ``topk`` ranks by: the whole-super-batch loss score."""
        return self.diagonal()

    def initial(self, n_select: int) -> Any:
        """The first chunk's scores (S empty), for a sub-batch of ``n_select``."""
        self._lse_rows = [self._full(-self._xp.inf) for _ in self._towers]
        self._lse_cols = [self._full(-self._xp.inf) for _ in self._towers]
        self._members = []
        self._n_select, self._n = n_select, 0
        diag = self.diagonal()
        return self._scores() if self._lookahead else self._xp.asarray(diag, copy=True)

    def update(self, chunk: Any) -> Any:
        """Fold the new chunk into the running log-sum-exps; return each candidate's score."""
        xp = self._xp
        for m, (_, t) in enumerate(self._towers):
            self._lse_rows[m] = xp.logaddexp(self._lse_rows[m], logsumexp(t.rows(chunk), axis=0))
            self._lse_cols[m] = xp.logaddexp(self._lse_cols[m], logsumexp(t.cols(chunk), axis=0))
        self._members.append(chunk)
        self._n += int(chunk.shape[0])
        return self._scores()

    def _scores(self) -> Any:
        """L(S + {i}) - L(S) (``marginal``) or ell_i(S + {i}) (``own``) for every i, every
        softmax's context being S, plus with lookahead the share rho of the rest."""
        xp = self._xp
        rho = completion_share(self._n_select, self._n, self._b) if self._lookahead else 0.0
        c = self._full(0.0)
        for (w, t), lr, lc, br, bc in zip(self._towers, self._lse_rows, self._lse_cols,
                                          self._batch_rows, self._batch_cols):
            # Candidate i's own loss: its positive x_ii joins a context that leaves it out.
            ctx_r = self._completed(lr, br, rho, without=t.diag)
            ctx_c = self._completed(lc, bc, rho, without=t.diag)
            c += w * 0.5 * ((xp.logaddexp(ctx_r, t.diag) - t.diag) + (xp.logaddexp(ctx_c, t.diag) - t.diag))
        if self._mode == "marginal" and self._members and rho < 1.0:
            c += self._members_rise(rho)
        return c

    def _completed(self, in_set: Any, in_batch: Any, rho: float, without: Any = None) -> Any:
        """log(sum over S + rho * sum over the rest of the super-batch) from the log-sum-exps
        over S and over the whole batch; ``without``, the logit of an example outside S
        that the rest leaves out (a candidate's own positive)."""
        if rho <= 0.0:
            return in_set
        xp = self._xp
        rest = 1.0 - xp.exp(in_set - in_batch)
        if without is not None:
            rest = rest - xp.exp(without - in_batch)
        log_rest = in_batch + xp.log(xp.clip(rest, min=1e-300))
        return xp.logaddexp(in_set, log_rest + float(np.log(rho)))

    def _members_rise(self, rho: float) -> Any:
        """0.5 * sum_{k in S} [softplus(x_ki - R_k) + softplus(x_ik - C_k)] for every i,
        weighted per model: how much the selected members' losses rise if i joins. With
        lookahead, R_k and C_k hold the share rho of i already: i adds (1 - rho) of its term."""
        xp = self._xp
        members = xp.concat(self._members)
        step = xp_util.block_rows(members, self._b)
        rise = self._full(0.0)
        already = float(np.log1p(-rho))
        for (w, t), lr, lc, br, bc in zip(self._towers, self._lse_rows, self._lse_cols,
                                          self._batch_rows, self._batch_cols):
            for start in range(0, members.shape[0], step):
                block = members[start:start + step]
                ctx_r = self._completed(xp.take(lr, block), xp.take(br, block), rho)
                ctx_c = self._completed(xp.take(lc, block), xp.take(bc, block), rho)
                x = t.cols(block)  # x[k, i]: member k's image against candidate i's text
                x -= xp.astype(ctx_r - already, t.zi.dtype)[:, None]
                rise += (0.5 * w) * softplus_colsum(x)
                x = t.rows(block)  # x[i, k]: candidate i's image against member k's text
                x -= xp.astype(ctx_c - already, t.zi.dtype)[:, None]
                rise += (0.5 * w) * softplus_colsum(x)
        return rise
