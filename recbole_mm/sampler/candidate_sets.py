"""Candidate-set pairs for PRIME's online preference optimization (stage 3).

Two sets of ``k`` items are drawn per row from the retriever's softmax without replacement
(Gumbel top-k: exactly sequential sampling without replacement), and labelled by PRIME's rules:
both contain the answer -> the frozen ranker decides; exactly one contains it -> that one wins;
neither -> both are drawn again, up to ``max_tries`` times, after which the answer replaces the
least likely item of the first set (``pref_answer_rule: reference``: the reference code's rule, no
redraws, the answer replaces the first item drawn).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

#: how a row's pair was labelled
BOTH, FIRST_ONLY, SECOND_ONLY, FORCED = 0, 1, 2, 3
OUTCOMES = {BOTH: "both", FIRST_ONLY: "first_only", SECOND_ONLY: "second_only", FORCED: "forced"}


def gumbel_top_k(log_probs: torch.Tensor, k: int, generator: torch.Generator | None = None,
                 draw_order: bool = False) -> torch.Tensor:
    """``k`` distinct items per row drawn without replacement with probabilities ``softmax``.

    Items whose log-probability is ``-inf`` (padding, masked items) are never drawn; a row with
    fewer than ``k`` such items is an error. The items come back most probable first, or with
    ``draw_order`` in the order sequential sampling would draw them (descending Gumbel key, as
    ``torch.multinomial(..., replacement=False)`` returns them in the reference code).
    """
    finite = torch.isfinite(log_probs).sum(1)
    if (finite < k).any():
        row = int(torch.nonzero(finite < k)[0])
        raise ValueError(f"row {row} has {int(finite[row])} items that can be drawn, fewer than the set size {k} "
                         "(lower n_candidates or check the retriever's scores)")
    u = torch.rand(log_probs.shape, generator=generator, device=log_probs.device if generator is None else "cpu")
    u = u.to(log_probs.device).clamp_(min=torch.finfo(u.dtype).tiny, max=1 - torch.finfo(u.dtype).eps)
    keys = log_probs - torch.log(-torch.log(u))
    picked = keys.topk(k, dim=1).indices
    if draw_order:
        return picked
    order = log_probs.gather(1, picked).argsort(dim=1, descending=True, stable=True)
    return picked.gather(1, order)


@dataclass
class CandidatePairs:
    """Two candidate sets per row and what the labelling needs to know about them."""

    first: torch.Tensor      # [B, k]
    second: torch.Tensor     # [B, k]
    outcome: torch.Tensor    # [B] one of BOTH, FIRST_ONLY, SECOND_ONLY, FORCED
    tries: torch.Tensor      # [B] draws it took (1 = first draw)

    def counts(self) -> dict[str, int]:
        return {name: int((self.outcome == code).sum()) for code, name in OUTCOMES.items()}


class CandidateSetSampler:
    """Draws PRIME's candidate-set pairs from a retriever's scores and labels them.

    Args:
        k: set size (the ranker's number of candidates, ``n_candidates``).
        max_tries: draws per row before the answer is forced into the first set.
        rule: ``ours``: redraw up to ``max_tries`` times, then the answer replaces the least likely
            item of the first set (sets most probable first); ``reference`` (``trainer/dpo.py:152-153``
            of the PRIME code): no redraws, the answer replaces the first item drawn (sets in draw order).
    """

    RULES = ("ours", "reference")

    def __init__(self, k: int, max_tries: int = 3, rule: str = "ours"):
        if k < 1 or max_tries < 1:
            raise ValueError(f"need k >= 1 and max_tries >= 1, got k={k}, max_tries={max_tries}")
        if rule not in self.RULES:
            from recbole_mm.errors import ConfigError

            raise ConfigError(f"pref_answer_rule={rule!r}: choose one of {self.RULES}")
        self.k, self.rule = int(k), rule
        self.max_tries = 1 if rule == "reference" else int(max_tries)

    def sample(self, log_probs: torch.Tensor, answers: torch.Tensor,
               generator: torch.Generator | None = None) -> CandidatePairs:
        """Pairs for rows with retriever log-probabilities ``[B, n_items]`` and true items ``[B]``."""
        log_probs = log_probs.detach()
        answers = answers.to(log_probs.device).view(-1, 1)
        drawn = self.rule == "reference"
        first = gumbel_top_k(log_probs, self.k, generator, drawn)
        second = gumbel_top_k(log_probs, self.k, generator, drawn)
        tries = torch.ones(len(answers), dtype=torch.long, device=log_probs.device)
        for _ in range(self.max_tries - 1):
            miss = ~((first == answers).any(1) | (second == answers).any(1))
            if not miss.any():
                break
            rows = torch.nonzero(miss).squeeze(1)
            first[rows] = gumbel_top_k(log_probs[rows], self.k, generator)
            second[rows] = gumbel_top_k(log_probs[rows], self.k, generator)
            tries[rows] += 1
        in_first, in_second = (first == answers).any(1), (second == answers).any(1)
        outcome = torch.full_like(tries, BOTH)
        outcome[in_first & ~in_second] = FIRST_ONLY
        outcome[~in_first & in_second] = SECOND_ONLY
        forced = ~in_first & ~in_second
        if forced.any():
            # ours: the least likely item gives way to the answer; reference: the first item drawn
            first[forced, 0 if drawn else -1] = answers[forced, 0]
            outcome[forced] = FORCED
        return CandidatePairs(first, second, outcome, tries)


def answer_rank(scores: torch.Tensor, candidates: torch.Tensor, answers: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """0-based rank of each row's answer under ``scores`` (ties in its favour) and its softmax share."""
    position = (candidates == answers.view(-1, 1)).float().argmax(1, keepdim=True)
    own = scores.gather(1, position)
    rank = (scores > own).sum(1)
    share = scores.float().softmax(1).gather(1, position).squeeze(1)
    return rank, share


def label_pairs(pairs: CandidatePairs, answers: torch.Tensor,
                judge: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(chosen [B, k], rejected [B, k], judged rows)`` by PRIME's rules.

    ``judge(rows, candidates)`` returns the ranker's scores ``[len(rows), k]`` of ``candidates``
    for the given rows; it is called once, only for the rows where both sets hold the answer,
    with those rows' first sets followed by their second sets. The set where the answer ranks
    higher wins; on equal ranks the set where the ranker gives the answer the larger softmax
    share wins, and on a full tie the first set.
    """
    answers = answers.to(pairs.first.device)
    first_wins = pairs.outcome != SECOND_ONLY
    rows = torch.nonzero(pairs.outcome == BOTH).squeeze(1)
    if len(rows):
        both = torch.cat([pairs.first[rows], pairs.second[rows]])
        scores = judge(torch.cat([rows, rows]), both).to(both.device)
        rank, share = answer_rank(scores, both, answers[rows].repeat(2))
        n = len(rows)
        r1, r2, s1, s2 = rank[:n], rank[n:], share[:n], share[n:]
        first_wins[rows] = (r1 < r2) | ((r1 == r2) & (s1 >= s2))
    chosen = torch.where(first_wins.unsqueeze(1), pairs.first, pairs.second)
    rejected = torch.where(first_wins.unsqueeze(1), pairs.second, pairs.first)
    return chosen, rejected, rows
