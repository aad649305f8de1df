"""Shared fixtures: every test runs in its own temporary working directory (RecBole writes
log/, log_tensorboard/ and saved/ into the current directory)."""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(autouse=True)
def _in_tmp_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def tiny_dataset(tmp_path):
    """A small generated multimodal dataset; returns (data_path, name)."""
    from recbole_mm.data.fixtures import FixtureSpec, make_fixture

    root = tmp_path / "data"
    make_fixture(root, "mmfix", FixtureSpec(n_users=50, n_items=30, min_len=5, max_len=14, seed=1))
    return str(root), "mmfix"


def tiny_config(data_path, **extra):
    """Config overrides that make any sequential model train in about a second."""
    return {
        "data_path": data_path,
        "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
        "epochs": 1,
        "train_batch_size": 64,
        "eval_batch_size": 64,
        "hidden_size": 16,
        "inner_size": 32,
        "MAX_ITEM_LIST_LENGTH": 8,
        "show_progress": False,
        "state": "ERROR",
        "checkpoint_dir": "saved",
        **extra,
    }
