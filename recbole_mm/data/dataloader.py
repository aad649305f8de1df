"""Evaluation dataloader for full ranking of sequential models."""

from __future__ import annotations

import numpy as np
import torch
from recbole.data.dataloader import FullSortEvalDataLoader


class UserHistory:
    """Items each user interacted with in the training data, as a CSR index (user -> items)."""

    def __init__(self, users: np.ndarray, items: np.ndarray, n_users: int):
        pairs = np.unique(np.stack([users, items], 1), axis=0)
        self.items = torch.as_tensor(pairs[:, 1], dtype=torch.long)
        self.indptr = torch.as_tensor(np.r_[0, np.cumsum(np.bincount(pairs[:, 0], minlength=n_users))], dtype=torch.long)

    def index(self, uids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(row, item) pairs for a batch of users, row = position of the user in ``uids``."""
        starts, ends = self.indptr[uids], self.indptr[uids + 1]
        counts = ends - starts
        rows = torch.repeat_interleave(torch.arange(len(uids)), counts)
        offsets = torch.arange(int(counts.sum())) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
        return rows, self.items[torch.repeat_interleave(starts, counts) + offsets]


def user_history(train_dataset, config) -> UserHistory:
    """Training history of every user: each training target and every item of each input sequence."""
    feat = train_dataset.inter_feat
    uid = feat[train_dataset.uid_field].numpy()
    seq = feat[train_dataset.iid_field + config["LIST_SUFFIX"]].numpy()
    users = np.concatenate([uid, np.repeat(uid, seq.shape[1])])
    items = np.concatenate([feat[train_dataset.iid_field].numpy(), seq.reshape(-1)])
    keep = items > 0
    return UserHistory(users[keep], items[keep], train_dataset.user_num)


class SequentialFullSortEvalDataLoader(FullSortEvalDataLoader):
    """RecBole's full-sort loader for sequential models, with the answer kept out of the batch.

    RecBole joins the target item's id and ``.item`` features into every batch; here they are
    removed before the batch reaches ``full_sort_predict`` (the evaluator gets the answer through
    ``positive_i`` as before). With a :class:`UserHistory`, the user's training items and the
    items of the input sequence are excluded from the ranking (``mask_history``).
    """

    def __init__(self, config, dataset, sampler, history: UserHistory | None = None):
        self.history = history
        item_fields = set(dataset.item_feat.columns) if dataset.item_feat is not None else set()
        self._answer_fields = item_fields | {dataset.iid_field}
        self._seq_field = config["ITEM_ID_FIELD"] + config["LIST_SUFFIX"]
        super().__init__(config, dataset, sampler, shuffle=False)

    def collate_fn(self, index):
        interaction, _, positive_u, positive_i = super().collate_fn(index)
        for field in self._answer_fields & set(interaction.columns):
            del interaction.interaction[field]
        history_index = None
        if self.history is not None:
            seq = interaction[self._seq_field]
            seq_rows, seq_cols = torch.nonzero(seq, as_tuple=True)
            hist_rows, hist_items = self.history.index(interaction[self.uid_field])
            history_index = (torch.cat([seq_rows, hist_rows]), torch.cat([seq[seq_rows, seq_cols], hist_items]))
        return interaction, history_index, positive_u, positive_i
