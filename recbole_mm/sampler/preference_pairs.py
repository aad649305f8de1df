"""Items a user has NOT interacted with, drawn uniformly: the candidates of HaNoRec's training
prompts and the rejected side of its DPO pairs ("a randomly sampled unobserved item")."""

from __future__ import annotations

from logging import getLogger

import torch

from recbole_mm.errors import ConfigError

logger = getLogger(__name__)


def observed_matrix(n_users: int, n_items: int, users: torch.Tensor, item_lists: list[torch.Tensor]) -> torch.Tensor:
    """A dense (n_users, n_items) bool matrix: ``True`` where the user has the item in any of
    ``item_lists`` (row-aligned with ``users``; 2-D tensors are sequences padded with 0). Column 0
    (RecBole's padding) is always ``True``: never drawn."""
    seen = torch.zeros((n_users, n_items), dtype=torch.bool)
    users = torch.as_tensor(users).long()
    for items in item_lists:
        items = torch.as_tensor(items).long()
        rows = users.unsqueeze(1).expand_as(items) if items.dim() == 2 else users
        seen[rows.reshape(-1), items.reshape(-1)] = True
    seen[:, 0] = True
    return seen


class UnobservedSampler:
    """Distinct items per row drawn uniformly from those the row's user never interacted with.

    ``observed``: the (n_users, n_items) matrix of :func:`observed_matrix` (built from every split
    the trainer sees: the training sequences and targets, the validation targets). Exact (no
    rejection): each row draws without replacement from its user's unobserved items
    (``torch.multinomial`` over the complement), in chunks of rows to bound memory.
    """

    def __init__(self, observed: torch.Tensor, chunk: int = 1024):
        self.observed = observed.bool()
        self.chunk = chunk

    def sample(self, users: torch.Tensor, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """(len(users), n) distinct unobserved items per row."""
        users = torch.as_tensor(users).long()
        free = (~self.observed[users]).sum(1)
        if len(users) and int(free.min()) < n:
            user = int(users[int(free.argmin())])
            raise ConfigError(f"user {user} has only {int(free.min())} unobserved items, fewer than the {n} to draw; "
                              "lower n_candidates")
        out = torch.empty((len(users), n), dtype=torch.long)
        for s in range(0, len(users), self.chunk):
            weights = (~self.observed[users[s:s + self.chunk]]).float()
            out[s:s + self.chunk] = torch.multinomial(weights, n, replacement=False, generator=generator)
        return out
