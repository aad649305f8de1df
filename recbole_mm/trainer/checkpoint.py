"""Checkpoints that load with ``torch.load(weights_only=True)`` and are written atomically."""

from __future__ import annotations

import enum

import torch

from recbole_mm.data.atomic import atomic_output


def plain_config(config, external_only: bool = False) -> dict:
    """The config as plain data (str/int/float/bool/None/list/dict): safe to unpickle.

    ``external_only``: only what the user set (files, dict, command line), from which
    ``Config(model, dataset, config_dict=...)`` rebuilds the same configuration.
    """

    def plain(value):
        if isinstance(value, (str, int, float, bool)) or value is None:
            return value
        if isinstance(value, enum.Enum):
            return str(value)
        if isinstance(value, dict):
            return {str(k): plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
            return value.item()
        return str(value)

    return plain(dict(config.external_config_dict if external_only else config.final_config_dict))


def atomic_save(obj, path: str) -> None:
    """``torch.save`` through a temporary file in the same folder, then rename over ``path``.

    Temporaries that killed saves left in that folder (unlocked ``.*.part`` files) are removed first.
    """
    with atomic_output(path, "wb", sweep=True) as f:
        torch.save(obj, f)


def safe_load(path: str, map_location=None) -> dict:
    """Load a checkpoint with ``weights_only=True``; explain what to do when that is refused."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint {path} does not exist") from None
    except Exception as err:
        raise RuntimeError(
            f"checkpoint {path} cannot be loaded safely (weights_only=True): {err}. It was probably "
            f"written by RecBole's own trainer, which pickles its Config object; retrain with "
            f"recbole-mm (run_recbole_mm.py) to get a weights-only checkpoint.") from None
