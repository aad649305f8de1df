"""HaNoRec's numerics (paper Eq. 4-8, 11, 12): the DPO loss with a per-pair beta, the offline
hardness lambda of HaRS from item embeddings, and the batch responsiveness eta from reward gaps.

Pure torch, no model: :class:`recbole_mm.trainer.hanorec.HaNoRecTrainer` feeds them the
log-likelihoods of its policy and reference passes.
"""

from __future__ import annotations

from logging import getLogger

import torch
import torch.nn.functional as F

logger = getLogger(__name__)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: torch.Tensor | float) -> torch.Tensor:
    """Per-pair DPO loss (Eq. 3 / 12) ``-logsigmoid(beta_i * ((pw - rw) - (pl - rl)))``; ``beta`` is a
    number or one value per pair (HaRS's beta'). Inputs are sequence log-likelihoods; returns (n,)."""
    margin = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    beta = torch.as_tensor(beta, dtype=margin.dtype, device=margin.device)
    return -F.logsigmoid(beta * margin)


def reward_gaps(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta0: float) -> torch.Tensor:
    """Eq. 7: ``R_i = beta0 * ((pw - rw) - (pl - rl))`` per pair, detached (eta steers beta, it is
    not trained through)."""
    margin = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    return (beta0 * margin).detach()


def top_k_similarities(embeddings: torch.Tensor, items: torch.Tensor, k: int) -> torch.Tensor:
    """Eq. 4: cosine similarities (n, k) of each anchor item to its ``k`` most similar OTHER items
    (the anchor itself and the all-zero row 0 -- RecBole's padding -- are excluded), descending.

    ``embeddings`` (n_items, d) are the fused item vectors (:func:`fuse_embeddings`)."""
    unit = F.normalize(embeddings.float(), dim=1)
    sims = unit[items] @ unit.T
    sims[torch.arange(len(items)), items] = -torch.inf
    sims[:, 0] = -torch.inf
    if k >= embeddings.size(0) - 1:
        raise ValueError(f"hars_top_k={k} must be smaller than the number of items ({embeddings.size(0) - 1})")
    return sims.topk(k, dim=1).values


def fuse_embeddings(text: torch.Tensor, image: torch.Tensor | None = None) -> torch.Tensor:
    """The paper's item embedding ``h + x`` with each modality unit-normalised first (zero rows stay zero);
    text only when there is no image vector."""
    fused = F.normalize(text.float(), dim=1)
    if image is not None:
        fused = fused + F.normalize(image.float(), dim=1)
    return fused


def hars_deltas(embeddings: torch.Tensor, chosen: torch.Tensor, rejected: torch.Tensor, k: int) -> torch.Tensor:
    """Eq. 5-6: ``Delta_i = ||softmax(S_w,i) - softmax(S_l,i)||_2`` where ``S_*`` are the top-``k``
    similarities of the chosen / rejected item (descending, so the k-th entries are aligned by rank).

    The paper's "we average the scores ... before applying Softmax" is read as the plain softmax of
    the k cosine similarities (they all lie in [-1, 1]; the reference code does the same)."""
    z_w = torch.softmax(top_k_similarities(embeddings, chosen, k), dim=1)
    z_l = torch.softmax(top_k_similarities(embeddings, rejected, k), dim=1)
    return torch.linalg.vector_norm(z_w - z_l, dim=1)


def hars_lambda(deltas: torch.Tensor) -> torch.Tensor:
    """Eq. 6: ``lambda_i = sigmoid(Delta_i) / sigmoid(mean Delta)`` over all training pairs (offline, once)."""
    deltas = torch.as_tensor(deltas, dtype=torch.float64)
    return torch.sigmoid(deltas) / torch.sigmoid(deltas.mean())


class Responsiveness:
    """Eq. 8: the model's responsiveness eta from one batch's reward gaps ``R_i`` (Eq. 7).

    ``R_i`` is mean-normalised (``R_i / mean(R)``), the smallest and the largest normalised gap are
    dropped, and ``eta = sigmoid(trimmed mean) / sigmoid(R_bar)``, with ``R_bar`` "the data's
    estimated average reward gap": the running mean of the batches' mean raw gap, this batch's
    included (the paper does not say over what it is averaged; the reference code uses the batch's
    normalised mean, which is 1 by construction -- we follow the issue's running mean).

    Degenerate batches: fewer than 3 pairs cannot drop two extremes -> ``eta = 1`` (logged once per
    batch size); a mean gap of (nearly) zero cannot normalise -> the gaps are divided by their mean
    absolute value instead, and when that is zero too (every gap 0, e.g. the first step, where the
    policy equals the reference) the normalised gaps are all 0. A zero-variance batch with a nonzero
    mean normalises to all ones. The running mean is updated by every batch that has >= 3 pairs.
    """

    def __init__(self, eps: float = 1e-8):
        self.eps = eps
        self.total, self.batches = 0.0, 0
        self._warned: set[int] = set()

    @property
    def running_mean(self) -> float:
        return self.total / self.batches if self.batches else 0.0

    def __call__(self, gaps: torch.Tensor) -> float:
        gaps = torch.as_tensor(gaps, dtype=torch.float64).detach().flatten()
        n = gaps.numel()
        if n < 3:
            if n not in self._warned:
                self._warned.add(n)
                logger.info(f"[HaNoRec] responsiveness: a batch of {n} pair(s) cannot drop its min and max "
                            "(needs >= 3); eta = 1 for such batches")
            return 1.0
        mean = float(gaps.mean())
        scale = mean if abs(mean) > self.eps else float(gaps.abs().mean())
        normalised = gaps / scale if abs(scale) > self.eps else torch.zeros_like(gaps)
        trimmed = normalised.sort().values[1:-1].mean()
        self.total += mean
        self.batches += 1
        return float(torch.sigmoid(trimmed) / torch.sigmoid(torch.tensor(self.running_mean, dtype=torch.float64)))

    def state(self) -> dict:
        return {"total": self.total, "batches": self.batches}

    def load(self, state: dict) -> None:
        self.total, self.batches = float(state["total"]), int(state["batches"])


def hanorec_betas(beta0: float, eta: float, lambdas: torch.Tensor | None) -> torch.Tensor | float:
    """Eq. 11: ``beta'_i = beta0 * eta * lambda_i`` (``lambdas`` None: HaRS off, beta0 for every pair)."""
    if lambdas is None:
        return beta0
    return beta0 * eta * torch.as_tensor(lambdas, dtype=torch.float32)
