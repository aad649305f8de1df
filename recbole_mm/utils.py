"""Plugin mechanics: look in recbole-mm first, then fall back to RecBole.

``get_model`` / ``get_trainer`` / ``create_dataset`` / ``data_preparation`` mirror RecBole's
functions of the same names (as RecBole-GNN's ``utils`` does); each lives in its own layer
(:mod:`recbole_mm.model.registry`, :mod:`recbole_mm.trainer.registry`,
:mod:`recbole_mm.data.preparation`) and is gathered here for users. Nothing here imports
``recbole.quick_start`` (which imports ray) or any LLM library.
"""

from __future__ import annotations

from recbole_mm.data.preparation import check_dataset_files, create_dataset, data_preparation
from recbole_mm.model.registry import MODELS, get_model, recbole_model_names
from recbole_mm.trainer.registry import TRAINERS, get_trainer

__all__ = ["MODELS", "TRAINERS", "check_dataset_files", "create_dataset", "data_preparation", "get_model",
           "get_trainer", "rebuild_data_and_model", "recbole_model_names"]


def rebuild_data_and_model(config):
    """``(model, dataset, train_data, valid_data, test_data)`` for a stored run's ``config``, seeded as
    the run was (untrained model on ``config["device"]``; the caller loads the weights)."""
    from recbole.utils import init_logger, init_seed

    init_seed(config["seed"], config["reproducibility"])
    init_logger(config)
    dataset = create_dataset(config)
    train_data, valid_data, test_data = data_preparation(config, dataset)
    init_seed(config["seed"], config["reproducibility"])
    model = get_model(config["model"])(config, train_data._dataset).to(config["device"])
    return model, dataset, train_data, valid_data, test_data
