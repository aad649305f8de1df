"""Row selections over RecBole's prefix-augmented sequential training data."""

from __future__ import annotations

import numpy as np


def full_sequence_rows(train_dataset, window: int) -> np.ndarray:
    """Indices of the training rows that cover every position of every user exactly once.

    RecBole's sequential training data holds one row per prefix (``item_id_list`` = the last
    ``window`` items before the target). A model that puts its loss at every position needs only
    the longest prefix of each user; a sequence longer than ``window`` is cut into windows that
    end at the last item, ``window`` items before it, and so on (the reference LRURec's sliding
    windows). Rows of one user must be in chronological order, as RecBole builds them.
    """
    uid = train_dataset.inter_feat[train_dataset.uid_field].numpy()
    order = np.argsort(uid, kind="stable")
    sorted_uid = uid[order]
    starts = np.flatnonzero(np.r_[True, sorted_uid[1:] != sorted_uid[:-1]])
    counts = np.diff(np.r_[starts, len(uid)])
    rank = np.arange(len(uid)) - np.repeat(starts, counts)
    from_end = np.repeat(counts, counts) - 1 - rank
    keep = order[from_end % window == 0]
    return np.sort(keep)
