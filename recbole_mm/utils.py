"""Plugin mechanics: look in recbole-mm first, then fall back to RecBole.

``get_model`` / ``get_trainer`` / ``create_dataset`` / ``data_preparation`` mirror RecBole's
functions of the same names (as RecBole-GNN does). Nothing here imports ``recbole.quick_start``
(which imports ray) or any LLM library.
"""

from __future__ import annotations

import difflib
import importlib
import os
from logging import getLogger

from recbole.utils import ModelType

from recbole_mm.errors import ConfigError, DatasetNotFoundError, UserError

# name -> module that defines the class of that name. Modules are imported on demand so that
# heavy dependencies stay behind the models that need them.
MODELS = {
    "LRURec": "recbole_mm.model.lrurec",
    "PRIME": "recbole_mm.model.prime",
    "VLM4Rec": "recbole_mm.model.vlm4rec",
}

_RECBOLE_SUBMODULES = (
    "sequential_recommender",
    "general_recommender",
    "context_aware_recommender",
    "knowledge_aware_recommender",
    "exlib_recommender",
)


def recbole_model_names() -> list[str]:
    """Names of RecBole's built-in models (from its shipped property files, no imports)."""
    import recbole

    folder = os.path.join(os.path.dirname(recbole.__file__), "properties", "model")
    return sorted(f[:-5] for f in os.listdir(folder) if f.endswith(".yaml"))


def get_model(model_name: str):
    """Return the model class called ``model_name``: recbole-mm's first, then RecBole's."""
    if model_name in MODELS:
        return getattr(importlib.import_module(MODELS[model_name]), model_name)
    import recbole

    model_dir = os.path.join(os.path.dirname(recbole.__file__), "model")
    for sub in _RECBOLE_SUBMODULES:
        if not os.path.isfile(os.path.join(model_dir, sub, f"{model_name.lower()}.py")):
            continue
        try:
            module = importlib.import_module(f"recbole.model.{sub}.{model_name.lower()}")
        except ModuleNotFoundError as err:
            raise UserError(f"RecBole model {model_name} needs the package {err.name!r}: "
                              f"pip install {err.name}") from None
        if hasattr(module, model_name):
            return getattr(module, model_name)
    known = sorted(MODELS) + recbole_model_names()
    close = difflib.get_close_matches(model_name, known, n=3, cutoff=0.6)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise ConfigError(
        f"Unknown model {model_name!r}.{hint}\n"
        f"recbole-mm models: {', '.join(sorted(MODELS))}\n"
        f"RecBole models: {', '.join(recbole_model_names())}")


# model name -> "module:Class" of a trainer that replaces RecBole's for that model.
TRAINERS: dict[str, str] = {
    "PRIME": "recbole_mm.trainer.prime:PRIMETrainer",
    "VLM4Rec": "recbole_mm.trainer.vlm4rec:VLM4RecTrainer",
}


def get_trainer(model_type, model_name: str):
    """Return the trainer class for a model, with recbole-mm's safe checkpoints and timings."""
    from recbole_mm.trainer import with_recbole_mm_features

    if model_name in TRAINERS:
        module, cls = TRAINERS[model_name].split(":")
        base = getattr(importlib.import_module(module), cls)
    else:
        from recbole.utils import get_trainer as recbole_get_trainer

        base = recbole_get_trainer(model_type, model_name)
    return with_recbole_mm_features(base)


def create_dataset(config):
    """Build the dataset: ``recbole_mm.data.dataset.<Model>Dataset`` if it exists, else RecBole's choice."""
    check_dataset_files(config)
    module = importlib.import_module("recbole_mm.data.dataset")
    cls = getattr(module, config["model"] + "Dataset", None)
    if cls is not None:
        return cls(config)
    from recbole.data import create_dataset as recbole_create_dataset

    return recbole_create_dataset(config)


def recbole_download_names() -> set[str]:
    """Dataset names RecBole downloads by itself when their files are missing (its ``url.yaml``)."""
    import recbole
    import yaml

    with open(os.path.join(os.path.dirname(recbole.__file__), "properties", "dataset", "url.yaml"),
              encoding="utf-8") as f:
        return set(yaml.safe_load(f) or {})


def check_dataset_files(config):
    """The dataset's interaction file exists, or RecBole will get it itself; else a one-line
    :class:`~recbole_mm.errors.DatasetNotFoundError` that says how to make it."""
    if config["dataset"] == "ml-100k":  # RecBole always reads its bundled copy for this name
        return
    path = config["data_path"]
    inter = os.path.join(path, f"{config['dataset']}.inter")
    if os.path.isfile(inter) or config["benchmark_filename"]:
        return
    if config["dataset"] in recbole_download_names():
        return  # RecBole's own dataset name: RecBole downloads it (asking first), as it always does
    from recbole_mm.data.prepare import PREPARERS, how_to_get

    name = config["dataset"]
    make = (how_to_get(name) if name in PREPARERS else
            f"write its atomic files (`recbole-mm-data convert-amazon --name {name} ...` converts an Amazon "
            f"2014 category; `recbole-mm-data prepare` makes {', '.join(PREPARERS)}; RecBole's own names "
            f"such as amazon-beauty are downloaded by RecBole)")
    raise DatasetNotFoundError(
        f"dataset {name!r}: no interaction file at {inter}. To make it, {make}; or point "
        f"--data_path=DIR at the folder that holds {name}/{name}.inter")


def data_preparation(config, dataset):
    """Split and batch like RecBole's ``data_preparation``, plus recbole-mm's options.

    - ``train_positions: all`` keeps one training row per user (its longest prefix, and for
      sequences longer than ``MAX_ITEM_LIST_LENGTH`` one row per window) so that a model can put
      its loss at every position of the sequence instead of on RecBole's prefix samples.
    - Full-ranking evaluation of sequential models uses :class:`SequentialFullSortEvalDataLoader`:
      the answer's id and item features are removed from the batch (no model can read them) and,
      with ``mask_history: True``, the user's earlier items (except the answer) are excluded from
      the ranking. The :class:`~recbole_mm.data.dataloader.PrefixHistory` is also kept on the
      training loader (``train_data.prefix_history`` and ``train_data.prefix_positions``, the
      number of earlier items of each training row) for trainers that rank during training.
    """
    import torch
    from recbole.data.utils import create_samplers, get_dataloader

    from recbole_mm.data.dataloader import PrefixHistory, SequentialFullSortEvalDataLoader
    from recbole_mm.data.sequences import full_sequence_rows

    train_dataset, valid_dataset, test_dataset = dataset.build()
    # a list: RecBole's Sampler checks `type(datasets) != list` and refuses a tuple (BPR and other
    # negative-sampling models failed with "Phases ... and datasets ... should have the same length")
    samplers = create_samplers(config, dataset, [train_dataset, valid_dataset, test_dataset])
    sequential = config["MODEL_TYPE"] == ModelType.SEQUENTIAL

    history = PrefixHistory(train_dataset, config) if sequential and config["mask_history"] else None
    positions = history.positions if history is not None else None
    if sequential and config["train_positions"] == "all":
        rows = full_sequence_rows(train_dataset, config["MAX_ITEM_LIST_LENGTH"])
        train_dataset = train_dataset.copy(train_dataset.inter_feat[rows])
        positions = positions[rows] if positions is not None else None
    if config["MODEL_TYPE"] == ModelType.KNOWLEDGE:
        raise UserError("knowledge-aware models: use RecBole's own run_recbole")
    train_data = get_dataloader(config, "train")(config, train_dataset, samplers[0], shuffle=config["shuffle"])
    train_data.prefix_history = history
    train_data.prefix_positions = None if positions is None else torch.as_tensor(positions)

    loaders = []
    for phase, ds, sampler in (("valid", valid_dataset, samplers[1]), ("test", test_dataset, samplers[2])):
        cls = get_dataloader(config, phase)
        if sequential and cls.__name__ == "FullSortEvalDataLoader":
            loaders.append(SequentialFullSortEvalDataLoader(config, ds, sampler, history=history))
        else:
            loaders.append(cls(config, ds, sampler, shuffle=False))
    getLogger().info(f"[Training]: train_batch_size = [{config['train_batch_size']}], train rows = {len(train_dataset)}; "
                     f"[Evaluation]: eval_batch_size = [{config['eval_batch_size']}], mask_history = {config['mask_history']}")
    return train_data, loaders[0], loaders[1]


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
