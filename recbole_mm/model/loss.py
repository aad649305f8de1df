"""Losses of recbole-mm models: PRIME's odds-ratio preference loss over candidate sets.

Everything is computed from log-probabilities, so a set whose likelihood is close to 1 neither
overflows nor takes the log of a ``1 - P`` that rounds to 0.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from recbole_mm.errors import ConfigError

SET_LIKELIHOODS = ("mean", "product")


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x <= 0``, accurate on both sides of ``-log 2`` (Maechler, 2012).

    Both branches are evaluated on safe inputs only, so neither the value nor the gradient of the
    branch not taken can be ``nan``. ``x == 0`` gives ``-inf`` (a set of probability exactly 1).
    """
    x = x.clamp(max=0.0)
    near = x > -math.log(2.0)
    safe_near = torch.where(near, x, torch.full_like(x, -1.0))
    safe_far = torch.where(near, torch.full_like(x, -1.0), x)
    return torch.where(near, torch.log(-torch.expm1(safe_near)), torch.log1p(-torch.exp(safe_far)))


def set_log_likelihood(log_probs: torch.Tensor, sets: torch.Tensor, mode: str = "mean") -> tuple[torch.Tensor, torch.Tensor]:
    """``(log P(c|x), log(1 - P(c|x)))`` of each row's candidate set.

    Args:
        log_probs: ``[B, n_items]`` log-softmax of the retriever (``-inf`` allowed, e.g. padding).
        sets: ``[B, k]`` distinct item ids per row.
        mode: ``product`` (PRIME Eq. 4: the product of the item probabilities) or ``mean`` (the
            reference code: the mean of the item probabilities).

    ``1 - P`` is never formed by subtraction where it could cancel: for ``mean`` it equals
    ``((k - 1) + sum of the probabilities outside the set) / k``, a log-sum-exp of the items not in
    the set; for ``product`` with ``k == 1`` it is the mass outside the set; for ``product`` with
    ``k >= 2``, ``P <= k ** -k <= 1/4``, where :func:`log1mexp` is exact.
    """
    if mode not in SET_LIKELIHOODS:
        raise ConfigError(f"pref_set_likelihood must be one of {SET_LIKELIHOODS}, not {mode!r}")
    k = sets.size(1)
    picked = log_probs.gather(1, sets)
    outside = log_probs.scatter(1, sets, float("-inf")).logsumexp(1)
    if mode == "product":
        log_p = picked.sum(1)
        log_not = outside if k == 1 else log1mexp(log_p)
    else:
        log_p = picked.logsumexp(1) - math.log(k)
        log_not = (torch.logaddexp(outside, torch.full_like(outside, math.log(k - 1))) if k > 1 else outside) - math.log(k)
    return log_p, log_not


def log_odds(log_p: torch.Tensor, log_not: torch.Tensor) -> torch.Tensor:
    """``log(P / (1 - P))`` from the two logs of :func:`set_log_likelihood`."""
    return log_p - log_not


def odds_ratio_loss(log_probs: torch.Tensor, chosen: torch.Tensor, rejected: torch.Tensor,
                    mode: str = "mean") -> torch.Tensor:
    """PRIME Eq. 7 per row: ``-log sigmoid(log odds(c_w|x) - log odds(c_l|x))``."""
    odds_w = log_odds(*set_log_likelihood(log_probs, chosen, mode))
    odds_l = log_odds(*set_log_likelihood(log_probs, rejected, mode))
    return -F.logsigmoid(odds_w - odds_l)


def preference_loss(logits: torch.Tensor, target: torch.Tensor, chosen: torch.Tensor, rejected: torch.Tensor,
                    beta: float, mode: str = "mean") -> tuple[torch.Tensor, dict]:
    """PRIME Eq. 8: ``CE(retriever) + beta * L_or``, averaged over the batch; also the parts."""
    log_probs = logits.log_softmax(1)
    ce = F.nll_loss(log_probs, target)
    odds = odds_ratio_loss(log_probs, chosen, rejected, mode).mean()
    return ce + beta * odds, {"ce": float(ce.detach()), "odds_ratio": float(odds.detach())}
