"""Evaluation dataloader for full ranking of sequential models, and the ``mask_history`` index."""

from __future__ import annotations

import numpy as np
import torch
from recbole.data.dataloader import FullSortEvalDataLoader


class PrefixHistory:
    """Every user's training items in chronological order (CSR: user -> items), for ``mask_history``.

    Built from RecBole's prefix-augmented training data (one row per prefix, a user's rows in
    chronological order): a user's sequence is the input of their first row followed by the
    target of every row. ``positions[j]`` is the number of items before the target of training
    row ``j``, so :meth:`index` with ``upto=positions[rows]`` gives the items strictly earlier than
    those rows' targets (the mask of a training prefix); without ``upto`` it gives the whole
    training sequence (the mask of a validation or test row, together with its input sequence).
    """

    def __init__(self, train_dataset, config):
        feat = train_dataset.inter_feat
        uid = feat[train_dataset.uid_field].numpy()
        target = feat[train_dataset.iid_field].numpy()
        seq = feat[train_dataset.iid_field + config["LIST_SUFFIX"]].numpy()
        length = feat[config["ITEM_LIST_LENGTH_FIELD"]].numpy()
        order = np.argsort(uid, kind="stable")
        sorted_uid = uid[order]
        starts = np.flatnonzero(np.r_[True, sorted_uid[1:] != sorted_uid[:-1]]) if len(uid) else np.zeros(0, int)
        counts = np.diff(np.r_[starts, len(uid)])
        rank = np.arange(len(uid)) - np.repeat(starts, counts)
        first = order[starts]                       # each user's first (shortest) prefix
        first_len = length[first]
        self.positions = np.empty(len(uid), dtype=np.int64)
        self.positions[order] = np.repeat(first_len, counts) + rank
        n_users = train_dataset.user_num
        sizes = np.zeros(n_users, dtype=np.int64)
        sizes[sorted_uid[starts]] = first_len + counts
        indptr = np.r_[0, np.cumsum(sizes)]
        items = np.zeros(int(indptr[-1]), dtype=np.int64)
        base = indptr[sorted_uid[starts]]
        for b, row, n in zip(base, first, first_len):
            items[b:b + n] = seq[row, :n]
        items[np.repeat(base + first_len, counts) + rank] = target[order]
        self.items = torch.as_tensor(items)
        self.indptr = torch.as_tensor(indptr)

    def index(self, uids: torch.Tensor, upto: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(row, item) pairs of the first ``upto[r]`` items (default: all) of user ``uids[r]``'s sequence."""
        uids = uids.cpu()
        starts, ends = self.indptr[uids], self.indptr[uids + 1]
        counts = ends - starts
        if upto is not None:
            counts = torch.minimum(counts, torch.as_tensor(upto).cpu())
        rows = torch.repeat_interleave(torch.arange(len(uids)), counts)
        offsets = torch.arange(int(counts.sum())) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
        return rows, self.items[torch.repeat_interleave(starts, counts) + offsets]

    def earlier_items(self, interaction, seq_field: str, uid_field: str, answers: torch.Tensor,
                      upto: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(row, item) pairs to mask for each row: its input sequence and the user's earlier items
        (``upto``: see :meth:`index`), minus the row's answer. A repeated purchase is a correct answer,
        so the answer stays rankable even when it is also an earlier item (as in RecBole's general
        loader: history minus positives)."""
        seq = interaction[seq_field].cpu()
        seq_rows, seq_cols = torch.nonzero(seq, as_tuple=True)
        hist_rows, hist_items = self.index(interaction[uid_field], upto)
        rows = torch.cat([seq_rows, hist_rows])
        items = torch.cat([seq[seq_rows, seq_cols], hist_items])
        keep = items != answers.cpu()[rows]
        return rows[keep], items[keep]


class SequentialFullSortEvalDataLoader(FullSortEvalDataLoader):
    """RecBole's full-sort loader for sequential models; a batch carries only the user's input.

    RecBole joins the whole answer interaction (its item id, rating, timestamp, other fields and
    the item's ``.item`` features) into every batch; here every field that is not the user's input
    (user id and user features, the ``*_list`` history fields and the sequence length) is removed
    before the batch reaches ``full_sort_predict`` (the evaluator gets the answer through
    ``positive_i`` as before). With a :class:`PrefixHistory` (``mask_history``), the user's earlier
    items, except the answer itself, are excluded from the ranking.
    """

    def __init__(self, config, dataset, sampler, history: PrefixHistory | None = None):
        self.history = history
        user_fields = set(dataset.user_feat.columns) if dataset.user_feat is not None else set()
        suffix = config["LIST_SUFFIX"]
        self._input_fields = user_fields | {dataset.uid_field, config["ITEM_LIST_LENGTH_FIELD"]}
        self._is_input = lambda field: field in self._input_fields or field.endswith(suffix)
        self._seq_field = config["ITEM_ID_FIELD"] + suffix
        super().__init__(config, dataset, sampler, shuffle=False)

    def collate_fn(self, index):
        interaction, _, positive_u, positive_i = super().collate_fn(index)
        for field in [f for f in interaction.columns if not self._is_input(f)]:
            del interaction.interaction[field]
        history_index = None
        if self.history is not None:
            answers = torch.zeros(len(interaction), dtype=torch.long)
            answers[positive_u] = positive_i
            history_index = self.history.earlier_items(interaction, self._seq_field, self.uid_field, answers)
        return interaction, history_index, positive_u, positive_i
