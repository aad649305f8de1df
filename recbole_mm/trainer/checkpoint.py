"""Checkpoints that load with ``torch.load(weights_only=True)`` and are written atomically."""

from __future__ import annotations

import enum
import os
import pickle
import re

import torch

from recbole_mm.files import atomic_output
from recbole_mm.errors import CheckpointError


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


def safe_load(path: str, map_location=None, what: str = "checkpoint") -> dict:
    """Load a checkpoint with ``weights_only=True``; a missing, empty, corrupt or unsafe file is a
    one-line :class:`~recbole_mm.errors.CheckpointError` that says what to do (never to turn safe
    loading off)."""
    path = str(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{what} {path} does not exist (or is not a file); check the path")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"{what} {path} is empty (0 bytes, an interrupted save?); use another checkpoint")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        text = str(err)
        found = re.search(r"GLOBAL (\S+) was not an allowed global", text)
        if found or "Unsupported global" in text:
            what_object = f" ({found.group(1)})" if found else ""
            raise CheckpointError(
                f"{what} {path} is refused: it holds a pickled Python object{what_object}, which safe loading "
                f"(torch.load weights_only=True) does not run. It was probably written by RecBole's own "
                f"trainer, which pickles its Config object; retrain with recbole-mm (run_recbole_mm.py) "
                f"to get a weights-only checkpoint") from None
        detail = re.search(r"WeightsUnpickler error:\s*(.+)", text)
        raise _unreadable(what, path, detail.group(1) if detail else type(err).__name__) from None
    except Exception as err:  # torch raises RuntimeError, EOFError, KeyError, ... for damaged files
        raise _unreadable(what, path, err) from None


def _unreadable(what: str, path: str, err) -> CheckpointError:
    text = str(err)
    reason = text.splitlines()[0].split(". ")[0][:160] if text.strip() else type(err).__name__
    if "weights_only" in reason:
        reason = type(err).__name__
    return CheckpointError(f"{what} {path} is not a readable PyTorch checkpoint (truncated or corrupt: "
                           f"{reason}); use a .pth file written by a recbole-mm run")


def checkpoint_entries(checkpoint, path: str, keys=("config", "state_dict")) -> dict:
    """``checkpoint`` if it is a dict with ``keys`` (a recbole-mm run checkpoint), else a one-line error."""
    if not isinstance(checkpoint, dict) or any(k not in checkpoint for k in keys):
        found = sorted(checkpoint)[:8] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise CheckpointError(f"checkpoint {path} is not a recbole-mm run checkpoint (needs {list(keys)}, "
                              f"found {found}); use the .pth file a run_recbole_mm run saved")
    return checkpoint


def load_model_state(model, state_dict, path: str, trained_on: str | None = None, dataset: str | None = None):
    """``model.load_state_dict(state_dict)``; tensors of other shapes (another dataset or model size)
    or other names are a one-line :class:`~recbole_mm.errors.CheckpointError`."""
    try:
        model.load_state_dict(state_dict)
    except (RuntimeError, TypeError, AttributeError) as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        detail = lines[1] if len(lines) > 1 else (lines[0] if lines else type(err).__name__)
        where = f" (trained on dataset {trained_on!r}, this run uses {dataset!r})" if trained_on and dataset else ""
        raise CheckpointError(f"checkpoint {path} does not fit this model{where}: {detail[:200]}; use a "
                              f"checkpoint of the same model, settings and dataset") from None
