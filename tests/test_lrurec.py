"""LRURec: the every-position loss, the one-sequence-per-user rows, and training end to end."""

import numpy as np
import torch
import torch.nn.functional as F

from conftest import tiny_config
from recbole_mm.config import Config
from recbole_mm.data.sequences import full_sequence_rows
from recbole_mm.utils import create_dataset, data_preparation, get_model


def _setup(tiny_dataset, **extra):
    data_path, name = tiny_dataset
    config = Config("LRURec", name, config_dict=tiny_config(data_path, **extra))
    dataset = create_dataset(config)
    return config, dataset


def test_full_sequence_rows_cover_each_training_position_once(tiny_dataset):
    config, dataset = _setup(tiny_dataset, MAX_ITEM_LIST_LENGTH=4)
    train, _, _ = dataset.build()
    rows = full_sequence_rows(train, 4)
    uid = train.inter_feat["user_id"].numpy()
    lengths = train.inter_feat["item_length"].numpy()
    per_user_rows = np.bincount(uid)
    covered = np.bincount(uid[rows], weights=lengths[rows], minlength=len(per_user_rows))
    # a row with input length l carries l labels (the next items of its inputs, then its target)
    assert np.array_equal(covered, per_user_rows)
    assert (per_user_rows > 4).any(), "the fixture must have users longer than one window"


def test_all_positions_loss_equals_mean_of_prefix_losses(tiny_dataset):
    config, dataset = _setup(tiny_dataset, MAX_ITEM_LIST_LENGTH=20, train_positions="all")
    train, _, _ = dataset.build()
    torch.manual_seed(0)
    model = get_model("LRURec")(config, train).eval()
    feat = train.inter_feat
    user = int(feat["user_id"][0])
    mine = torch.nonzero(feat["user_id"] == user).squeeze(1)
    longest = feat[mine[-1:]]
    got = model.calculate_loss(longest)
    # independent reference: the last-position loss of every prefix of that user, averaged
    losses = []
    for i in mine.tolist():
        row = feat[torch.tensor([i])]
        hidden = model._last_hidden(row)
        losses.append(F.cross_entropy(model.logits(hidden), row["item_id"]))
    torch.testing.assert_close(got, torch.stack(losses).mean(), rtol=1e-5, atol=1e-6)


def test_start_token_adds_the_first_item_loss_of_sequences_that_begin_in_the_window(tiny_dataset):
    config, dataset = _setup(tiny_dataset, MAX_ITEM_LIST_LENGTH=8, train_positions="all", start_token=True)
    train_data, _, _ = data_preparation(config, dataset)
    torch.manual_seed(0)
    model = get_model("LRURec")(config, train_data._dataset).eval()
    batch = train_data._dataset.inter_feat[torch.arange(len(train_data._dataset))]
    seq, lengths = batch["item_id_list"], batch["item_length"]
    assert (lengths < 8).any() and (lengths == 8).any(), "the fixture must have rows inside and beyond the window"
    got = model.calculate_loss(batch)
    # independent reference: every row's per-position losses (prefix by prefix), plus, for a row that
    # starts at the user's first item (shorter than the window), the start token's loss on that item
    terms = []
    for r in range(len(seq)):
        n = int(lengths[r])
        for t in range(n):
            prefix = torch.zeros_like(seq[r:r + 1])
            prefix[0, :t + 1] = seq[r, :t + 1]
            hidden, _ = model.forward(prefix)
            label = seq[r, t + 1] if t + 1 < n else batch["item_id"][r]
            terms.append(F.cross_entropy(model.logits(hidden[-1:]), label.view(1)))
        if n < 8:
            start = model.encode(model.start_embedding.view(1, -1), torch.zeros(1, dtype=torch.long))
            terms.append(F.cross_entropy(model.logits(start), seq[r, :1]))
    torch.testing.assert_close(got, torch.stack(terms).mean(), rtol=1e-5, atol=1e-6)
    # the start token never changes what the model predicts for a real sequence
    without = get_model("LRURec")(Config("LRURec", tiny_dataset[1], config_dict=tiny_config(
        tiny_dataset[0], MAX_ITEM_LIST_LENGTH=8, train_positions="all")), train_data._dataset).eval()
    without.load_state_dict({k: v for k, v in model.state_dict().items() if k != "start_embedding"})
    torch.testing.assert_close(without.full_sort_predict(batch), model.full_sort_predict(batch))


def test_train_positions_all_selects_one_row_per_user(tiny_dataset):
    config, dataset = _setup(tiny_dataset, MAX_ITEM_LIST_LENGTH=50, train_positions="all")
    train_data, _, _ = data_preparation(config, dataset)
    uid = train_data._dataset.inter_feat["user_id"].numpy()
    assert len(uid) == len(np.unique(uid))


def test_weight_decay_groups_exclude_bias_and_layer_norm(tiny_dataset):
    config, dataset = _setup(tiny_dataset)
    model = get_model("LRURec")(config, dataset)
    decay, no_decay = model.optimizer_param_groups(0.01)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(not names[id(p)].endswith("bias") and "layer_norm" not in names[id(p)] for p in decay["params"])
    assert any("layer_norm" in names[id(p)] for p in no_decay["params"])
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.01
