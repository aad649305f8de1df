"""Candidate sets for an LMM ranker (PRIME): sampled negatives for training prompts, the answer
shuffled in among them, and a retriever's top-k for evaluation.

Everything is vectorised over rows and items (numpy / torch); the only Python loops run over
rejection rounds and, rarely, over the few rows that rejection could not fill.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from recbole.sampler.sampler import AbstractSampler

from recbole_mm.errors import ConfigError

DISTRIBUTIONS = ("popularity", "uniform")


def _numpy_rng(generator: Any) -> np.random.Generator | None:
    """A numpy Generator from a numpy Generator, a torch.Generator, an int seed or ``None``."""
    if generator is None or isinstance(generator, np.random.Generator):
        return generator
    if isinstance(generator, torch.Generator):
        return np.random.default_rng(int(torch.randint(0, 2 ** 62, (1,), generator=generator)))
    return np.random.default_rng(int(generator))


class RankerNegativeSampler(AbstractSampler):
    """Distinct negative items per row for the ranker's training prompts.

    Args:
        dataset: a RecBole dataset; popularity is the item's frequency in its ``inter_feat`` (pass
            the training split: for sequential data that is one row per training prefix, whose
            ``item_id`` is the target).
        distribution: ``popularity`` (probability proportional to ``frequency ** alpha``; the
            PRIME code) or ``uniform`` over the catalogue (LlamaRec).
        alpha: popularity exponent.
        seed: seed of the sampler's own random generator (used when :meth:`sample` gets none);
            ``None``: drawn from numpy's global random state (fixed by RecBole's ``init_seed``).

    Item 0 (``[PAD]``) is never drawn. With ``popularity``, items never seen in training have
    probability 0; a row that cannot be filled from the seen items is completed uniformly from
    the unseen ones (rare: only when the exclusions cover nearly all seen items).
    """

    def __init__(self, dataset: Any, distribution: str = "popularity", alpha: float = 1.0, seed: int | None = None,
                 counts: Any = None):
        self.dataset = dataset
        # counts: per-item counts to use instead of the training targets' (e.g. the reference code's
        # train + validation + 1, recbole_mm.trainer.prime.popularity_counts); length item_num
        self.counts = None if counts is None else np.asarray(counts, dtype=np.int64)
        self.iid_field = getattr(dataset, "iid_field", None) or "item_id"
        self.item_num = int(dataset.item_num)
        if self.item_num < 2:
            raise ValueError(f"the dataset has no items to sample (item_num={self.item_num})")
        # no seed: seeded from numpy's global state, which RecBole's ``init_seed`` fixes
        self.rng = np.random.default_rng(np.random.randint(0, 2 ** 31 - 1) if seed is None else seed)
        super().__init__(distribution, alpha)

    # -- RecBole AbstractSampler interface ------------------------------------------------------
    def set_distribution(self, distribution: str) -> None:
        if distribution not in DISTRIBUTIONS:
            raise ConfigError(f"distribution must be one of {DISTRIBUTIONS}, not {distribution!r}")
        self.distribution = distribution
        if distribution == "uniform":
            weights = np.ones(self.item_num, dtype=np.float64)
        else:
            counts = (self.counts if self.counts is not None else
                      np.bincount(np.asarray(self._get_candidates_list(), dtype=np.int64), minlength=self.item_num))
            if len(counts) < self.item_num:
                raise ValueError(f"counts has {len(counts)} entries; need one per item ({self.item_num})")
            weights = counts[: self.item_num].astype(np.float64) ** float(self.alpha)
            weights[counts[: self.item_num] == 0] = 0.0  # 0 ** 0 would be 1
        weights[0] = 0.0
        if weights.sum() <= 0:
            raise ValueError("no item has a positive sampling weight (empty training data?)")
        self.weights = weights
        self.prob = weights / weights.sum()
        self._cdf = np.cumsum(self.prob)
        self._cdf[-1] = 1.0

    def get_used_ids(self):
        return None  # exclusions are given per call to :meth:`sample`

    def _get_candidates_list(self):
        feat = self.dataset.inter_feat[self.iid_field]
        return feat.numpy() if isinstance(feat, torch.Tensor) else np.asarray(feat)

    def _uni_sampling(self, sample_num: int) -> np.ndarray:
        return self.rng.integers(1, self.item_num, size=sample_num)

    def _pop_sampling(self, sample_num: int) -> np.ndarray:
        return self._draw(self.rng, sample_num)

    # -- sampling -------------------------------------------------------------------------------
    def _draw(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """``n`` independent draws from the sampler's distribution."""
        if self.distribution == "uniform":
            return rng.integers(1, self.item_num, size=n)
        idx = np.searchsorted(self._cdf, rng.random(n), side="right")
        return np.minimum(idx, self.item_num - 1)

    def _forbidden_keys(self, answers: np.ndarray, exclude: Any) -> np.ndarray:
        """Sorted unique ``row * item_num + item`` of every forbidden (row, item) pair."""
        n, rows = self.item_num, len(answers)
        keys = [np.arange(rows, dtype=np.int64) * n + answers]
        if exclude is not None:
            r, items = _exclusion_pairs(exclude, rows)
            ok = (items >= 0) & (items < n)
            keys.append(r[ok] * n + items[ok])
        return np.unique(np.concatenate(keys))

    def sample(self, answers: torch.Tensor, k: int, exclude: Any = None, generator: Any = None,
               max_rounds: int = 64) -> torch.Tensor:
        """``k`` distinct negatives per row: ``LongTensor [B, k]``.

        Args:
            answers: the true item of each row, ``[B]`` (never drawn for its row).
            k: negatives per row.
            exclude: items not to draw, per row: a sequence of ``B`` iterables of item ids (sets,
                lists, tensors), a CSR tuple ``(indptr [B+1], indices)``, a ``scipy.sparse``
                matrix ``[B, item_num]``, or a ``[B, m]`` tensor / array of item ids (0 = padding,
                e.g. the history ``item_id_list``).
            generator: ``torch.Generator``, ``numpy.random.Generator`` or int seed (default: the
                sampler's own generator).
        """
        rng = _numpy_rng(generator) or self.rng
        ans = (answers.detach().cpu().numpy() if isinstance(answers, torch.Tensor)
               else np.asarray(answers)).astype(np.int64).reshape(-1)
        rows, n, k = len(ans), self.item_num, int(k)
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        if rows == 0 or k == 0:
            return torch.zeros((rows, k), dtype=torch.long)
        forbidden = self._forbidden_keys(ans, exclude)
        free = (n - 1) - np.bincount(forbidden // n, weights=(forbidden % n != 0), minlength=rows)
        if (free < k).any():
            row = int(np.argmax(free < k))
            raise ValueError(f"row {row} has only {int(free[row])} items left to draw {k} distinct negatives from "
                             f"(catalogue of {n - 1} items minus the answer and the excluded items)")
        out = self._draw(rng, rows * k).reshape(rows, k)
        row_base = np.arange(rows, dtype=np.int64)[:, None] * n
        bad = self._invalid(out, row_base, forbidden)
        for _ in range(max_rounds):  # redraw the bad entries; recheck only the rows that had some
            todo = np.flatnonzero(bad.any(1))
            if not len(todo):
                break
            sub, sub_bad = out[todo], bad[todo]
            sub[sub_bad] = self._draw(rng, int(sub_bad.sum()))
            out[todo] = sub
            bad[todo] = self._invalid(sub, row_base[todo], forbidden)
        if bad.any():  # leftover rows (most of the mass excluded): exact completion, row by row
            for r in np.flatnonzero(bad.any(1)):
                self._complete_row(out, bad, r, forbidden, rng)
        return torch.from_numpy(out).long()

    def _invalid(self, out: np.ndarray, row_base: np.ndarray, forbidden: np.ndarray) -> np.ndarray:
        """Entries that are forbidden, item 0, or repeat an earlier entry of their row."""
        keys = row_base + out
        pos = np.searchsorted(forbidden, keys)
        hit = forbidden[np.minimum(pos, len(forbidden) - 1)] == keys
        order = np.argsort(out, axis=1, kind="stable")
        srt = np.take_along_axis(out, order, axis=1)
        dup_sorted = np.zeros_like(srt, dtype=bool)
        dup_sorted[:, 1:] = srt[:, 1:] == srt[:, :-1]
        dup = np.zeros_like(dup_sorted)
        np.put_along_axis(dup, order, dup_sorted, axis=1)
        return hit | dup | (out <= 0)

    def _complete_row(self, out, bad, r, forbidden, rng) -> None:
        n = self.item_num
        lo, hi = np.searchsorted(forbidden, [r * n, (r + 1) * n])
        allowed = np.ones(n, dtype=bool)
        allowed[0] = False
        allowed[forbidden[lo:hi] - r * n] = False
        keep = ~bad[r]
        allowed[out[r, keep]] = False
        need = int(bad[r].sum())
        # weighted sampling without replacement (Gumbel top-k); unseen items after all seen ones
        g = rng.gumbel(size=n)
        with np.errstate(divide="ignore"):
            key = np.where(self.weights > 0, np.log(self.weights) + g, g - 1e6)
        key[~allowed] = -np.inf
        out[r, ~keep] = np.argpartition(-key, need - 1)[:need]
        bad[r] = False


def _exclusion_pairs(exclude: Any, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """``(row ids, item ids)`` int64 arrays of an exclusion structure (see ``sample``)."""
    if hasattr(exclude, "tocsr"):  # scipy.sparse matrix [B, item_num]
        csr = exclude.tocsr()
        return _csr_pairs(np.asarray(csr.indptr), np.asarray(csr.indices), rows)
    if isinstance(exclude, tuple) and len(exclude) == 2:  # CSR (indptr, indices)
        indptr, indices = (np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x, dtype=np.int64)
                           for x in exclude)
        return _csr_pairs(indptr, indices, rows)
    if isinstance(exclude, (torch.Tensor, np.ndarray)) and exclude.ndim == 2:  # [B, m], 0 = padding
        e = np.asarray(exclude.detach().cpu() if isinstance(exclude, torch.Tensor) else exclude, dtype=np.int64)
        if len(e) != rows:
            raise ValueError(f"need one exclusion row per row: got {len(e)} for {rows} rows")
        return np.repeat(np.arange(rows, dtype=np.int64), e.shape[1]), e.reshape(-1)
    if len(exclude) != rows:
        raise ValueError(f"need one exclusion set per row: got {len(exclude)} for {rows} rows")
    lists = [np.fromiter((int(i) for i in s), dtype=np.int64) if not isinstance(s, (np.ndarray, torch.Tensor))
             else np.asarray(s.detach().cpu() if isinstance(s, torch.Tensor) else s, dtype=np.int64).reshape(-1)
             for s in exclude]
    lengths = np.fromiter((len(x) for x in lists), dtype=np.int64, count=rows)
    items = np.concatenate(lists) if lists else np.zeros(0, dtype=np.int64)
    return np.repeat(np.arange(rows, dtype=np.int64), lengths), items


def _csr_pairs(indptr: np.ndarray, indices: np.ndarray, rows: int) -> tuple[np.ndarray, np.ndarray]:
    if len(indptr) != rows + 1:
        raise ValueError(f"CSR exclusion has {len(indptr) - 1} rows, need {rows}")
    return np.repeat(np.arange(rows, dtype=np.int64), np.diff(indptr)), np.asarray(indices, dtype=np.int64)


def training_candidates(answers: torch.Tensor, negatives: torch.Tensor,
                        generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The answer shuffled in among its negatives.

    Returns ``(candidates LongTensor [B, k+1], answer_position LongTensor [B])`` with
    ``candidates[b, answer_position[b]] == answers[b]``; every row is an independent uniform
    permutation (seeded by ``generator``).
    """
    answers = torch.as_tensor(answers, dtype=torch.long).reshape(-1, 1)
    negatives = torch.as_tensor(negatives, dtype=torch.long)
    if negatives.dim() != 2 or negatives.size(0) != answers.size(0):
        raise ValueError(f"negatives must be [B, k] with B = {answers.size(0)}, got {tuple(negatives.shape)}")
    full = torch.cat([answers, negatives], dim=1)
    perm = torch.rand(full.shape, generator=generator).argsort(dim=1)
    candidates = full.gather(1, perm)
    answer_position = (perm == 0).long().argmax(dim=1)
    return candidates, answer_position


def retriever_candidates(scores: torch.Tensor, k: int, exclude_index: Any = None) -> torch.Tensor:
    """The ``k`` best items of each row of a retriever's ``scores [B, n_items]``, best first.

    Item 0 is never returned. ``exclude_index``: ``(row ids, item ids)`` pairs (RecBole's
    ``history_index`` form, or a ``[2, m]`` tensor) that are masked first; they come back only in
    a row with fewer than ``k`` other items (after every other item).
    """
    n = scores.size(-1)
    if not 0 <= k <= n - 1:
        raise ValueError(f"k must be between 0 and {n - 1} (items without [PAD]), got {k}")
    s = scores.detach().clone()
    if not s.is_floating_point():
        s = s.float()
    if exclude_index is not None:
        rows, items = exclude_index[0], exclude_index[1]
        rows = torch.as_tensor(rows, dtype=torch.long, device=s.device)
        items = torch.as_tensor(items, dtype=torch.long, device=s.device)
        s[rows, items] = torch.finfo(s.dtype).min
    s[:, 0] = float("-inf")
    return s.topk(k, dim=1).indices
