"""One standalone RecBole run: data, model, trainer, fit, test (no manifest, no logging setup)."""

from __future__ import annotations

import os
import time
from logging import getLogger

from recbole.utils import init_seed

from recbole_mm.data.preparation import create_dataset, data_preparation
from recbole_mm.errors import CheckpointError, ConfigError
from recbole_mm.model.registry import get_model
from recbole_mm.trainer.registry import get_trainer
from recbole_mm.trainer.tracking import peak_memory_mb

logger = getLogger(__name__)


def check_against_data(config, dataset) -> None:
    """Settings that only the data can refute, checked before anything trains: every cutoff in
    ``topk`` and PRIME's ``n_candidates`` must fit in the number of items."""
    items = dataset.item_num - 1  # without RecBole's [PAD]
    if max(config["topk"]) > items:
        raise ConfigError(f"topk={config['topk']}: dataset {config['dataset']!r} has only {items} items; "
                          f"use cutoffs of at most {items}")
    if "n_candidates" in config and config["model"] == "PRIME" and config["n_candidates"] > items:
        raise ConfigError(f"n_candidates={config['n_candidates']}: dataset {config['dataset']!r} has only "
                          f"{items} items to choose candidates from; use at most {items}")
    if "retriever_checkpoint" in config and config["retriever_checkpoint"] and \
            not os.path.isfile(config["retriever_checkpoint"]):
        raise CheckpointError(f"retriever_checkpoint={config['retriever_checkpoint']} does not exist; check the path")


def train_and_test(config, saved: bool, resume: str | None = None, verbose: bool = True) -> dict:
    """Build the data, model and trainer of ``config``, train (or resume from ``resume``), test.

    Returns the valid/test results, the best checkpoint's path (``saved``), timings (median time per
    epoch, best epoch, time to best), peak memory and the per-user test metrics. A whole standalone
    run, used by :func:`recbole_mm.quick_start.run_recbole_mm` and by stages that train a RecBole
    model of their own (PRIME's retriever).
    """
    started = time.perf_counter()
    if resume and not os.path.isfile(resume):
        raise CheckpointError(f"--resume={resume}: no such checkpoint file; check the path")
    dataset = create_dataset(config)
    logger.info(dataset)
    check_against_data(config, dataset)
    train_data, valid_data, test_data = data_preparation(config, dataset)
    init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
    model = get_model(config["model"])(config, train_data._dataset).to(config["device"])
    logger.info(model)
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    if resume:
        trainer.resume_checkpoint(resume)
    best_valid_score, best_valid_result = trainer.fit(
        train_data, valid_data, verbose=verbose, saved=saved, show_progress=config["show_progress"])
    test_result = trainer.evaluate(test_data, load_best_model=saved, show_progress=config["show_progress"])
    result = {
        "model": config["model"],
        "dataset": config["dataset"],
        "seed": config["seed"],
        "best_valid_score": best_valid_score,
        "valid_score_bigger": config["valid_metric_bigger"],
        "best_valid_result": dict(best_valid_result or {}),
        "test_result": dict(test_result),
        "saved_model_file": trainer.saved_model_file if saved else None,
        "total_time_s": time.perf_counter() - started,
        **trainer.timing_summary(),
        **(trainer.extra_results() if hasattr(trainer, "extra_results") else {}),
        **peak_memory_mb(),
        "test_per_user": getattr(trainer, "last_per_user", {}),
    }
    logger.info(f"best valid : {result['best_valid_result']}")
    logger.info(f"test result: {result['test_result']}")
    return result, trainer, model


def sub_model_stage(sub_config, sub_model, checkpoint: str | None, filename: str, tag: str):
    """``compute(folder)`` for :meth:`~recbole_mm.trainer.stage_store.StageStore.run` of a stage that
    provides a RecBole model of its own (PRIME's retriever, ALMOSTREC's embedding model): load
    ``checkpoint`` into ``sub_model`` when given, else train ``sub_config`` as a standalone run
    (:func:`train_and_test`); the weights go to ``folder/filename`` (weights only, atomic)."""
    from recbole_mm.trainer.checkpoint import atomic_save, checkpoint_entries, load_model_state, safe_load

    def compute(folder) -> dict:
        path = str(folder / filename)
        if checkpoint:
            state = checkpoint_entries(safe_load(checkpoint, map_location="cpu"), checkpoint)["state_dict"]
            load_model_state(sub_model, state, checkpoint)  # a checkpoint of another model/dataset: one line
            atomic_save(state, path)
            return {"loaded_from": checkpoint}
        logger.info(f"{tag} training {sub_config['model']}")
        result, _, _ = train_and_test(sub_config, saved=True)
        atomic_save(safe_load(result["saved_model_file"], map_location="cpu")["state_dict"], path)
        info = {k: result.get(k) for k in ("best_valid_result", "test_result", "epochs_run", "best_epoch",
                                           "time_per_epoch_s", "total_time_s", "epoch_log")}
        return {**info, "valid_metric": sub_config["valid_metric"]}

    return compute
