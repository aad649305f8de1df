"""Datasets and data loaders as RecBole builds them, plus recbole-mm's options (``create_dataset``,
``data_preparation``; RecBole's functions of the same names)."""

from __future__ import annotations

import os
from logging import getLogger

from recbole.utils import ModelType

from recbole_mm.errors import DatasetNotFoundError, UserError

logger = getLogger(__name__)


def create_dataset(config):
    """Build the dataset: ``recbole_mm.data.dataset.<Model>Dataset`` if it exists, else
    :class:`~recbole_mm.data.dataset.MultimodalSequentialDataset` for the models that read the items'
    side data (PRIME, VLM4Rec, ...: :func:`~recbole_mm.data.dataset.needs_multimodal_data`), else
    RecBole's choice. The multimodal dataset is always built, never read from RecBole's pickled
    ``save_dataset`` file: its item store and vectors keep caches of their own, keyed by what made
    them, which a pickle of the dataset would bypass."""
    from recbole_mm.data import dataset as datasets

    check_dataset_files(config)
    cls = getattr(datasets, config["model"] + "Dataset", None)
    if cls is None and datasets.needs_multimodal_data(config):
        cls = datasets.MultimodalSequentialDataset
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
    if sequential:
        scores = int(config["eval_batch_size"]) * dataset.item_num
        if scores * 4 > 2 ** 30:  # full ranking: eval_batch_size USERS per batch, each scored against every item
            logger.warning(f"eval_batch_size={config['eval_batch_size']} users x {dataset.item_num} items: each "
                           f"full-ranking batch holds {scores * 4 / 2 ** 30:.1f} GiB of float32 scores (several copies "
                           f"at a time); set eval_batch_size to about {max(16, 2 ** 26 // dataset.item_num)} to bound it")
    logger.info(f"[Training]: train_batch_size = [{config['train_batch_size']}], train rows = {len(train_dataset)}; "
                f"[Evaluation]: eval_batch_size = [{config['eval_batch_size']}], mask_history = {config['mask_history']}")
    return train_data, loaders[0], loaders[1]
