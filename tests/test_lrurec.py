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
