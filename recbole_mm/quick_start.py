"""Entry points in RecBole's conventions: ``run_recbole_mm``, ``objective_function``, ``load_data_and_model``."""

from __future__ import annotations

import logging
import os
import resource
import sys
import time
from logging import getLogger

import torch
from recbole.utils import init_logger, init_seed

from recbole_mm.config import Config
from recbole_mm.errors import CheckpointError, ConfigError
from recbole_mm.preflight import preflight
from recbole_mm.utils import create_dataset, data_preparation, get_model, get_trainer, rebuild_data_and_model


def peak_memory_mb() -> dict:
    """Peak resident memory of this process (and peak CUDA memory when a GPU is used), in MiB."""
    peak = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.cuda.is_available():
        peak["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
    return peak


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


def _train_and_evaluate(config, saved: bool, resume: str | None, verbose: bool = True) -> dict:
    logger = getLogger()
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
    if saved:  # one weights-only file from which the trained model reloads (load_data_and_model)
        from recbole_mm.manifest import write_manifest

        result["manifest_file"] = write_manifest(config, result, trainer, model)
        result["saved_model_file"] = result["saved_model_file"] or result["manifest_file"]
    logger.info(f"best valid : {result['best_valid_result']}")
    logger.info(f"test result: {result['test_result']}")
    return result


def run_recbole_mm(model=None, dataset=None, config_file_list=None, config_dict=None, saved=True,
                   argv=None, resume=None) -> dict:
    """Train and evaluate one model (ours or RecBole's) on one dataset, as RecBole's ``run_recbole``.

    ``argv`` holds ``--key=value`` overrides (highest priority); ``resume`` is a checkpoint written
    by a previous run, from which training continues. Returns the valid/test results, the path of
    the best checkpoint, timings (median time per epoch, best epoch, time to best) and peak memory.
    """
    config = Config(model=model, dataset=dataset, config_file_list=config_file_list,
                    config_dict=config_dict, argv=argv)
    init_seed(config["seed"], config["reproducibility"])
    init_logger(config)
    logger = getLogger()
    logger.info(sys.argv)
    # every stage's inputs are resolved before anything trains (and before the long config listing)
    logger.info(f"[preflight] checked: {', '.join(preflight(config))}")
    logger.info(config)
    return _train_and_evaluate(config, saved=saved, resume=resume)


def objective_function(config_dict=None, config_file_list=None, saved=True, argv=None) -> dict:
    """Objective for RecBole's ``HyperTuning``: one run, quiet on the console, with its own log file
    (``log/<model>/<model>-<dataset>-<time>-<hash>.log``, as RecBole's ``objective_function``) and
    tensorboard run of the same name; returns RecBole's result dict."""
    config = Config(config_dict=config_dict, config_file_list=config_file_list, argv=argv)
    preflight(config)
    init_seed(config["seed"], config["reproducibility"])
    logger = getLogger()
    for handler in logger.handlers[:]:
        logger.removeHandler(handler)
        handler.close()
    init_logger(config)
    for handler in logger.handlers:
        if not hasattr(handler, "baseFilename"):  # the console: errors only; the file keeps everything
            handler.setLevel(logging.ERROR)
    logger.info(config)
    return _train_and_evaluate(config, saved=saved, resume=None, verbose=False)


def load_data_and_model(model_file: str):
    """Rebuild config, data, model (with its trained weights) from a recbole-mm checkpoint or a run's
    manifest (``result["saved_model_file"]``, any model, PRIME and VLM4Rec included)."""
    from recbole_mm.trainer.checkpoint import checkpoint_entries, load_model_state, safe_load

    from recbole_mm.manifest import is_manifest, load_manifest

    if not model_file:
        raise CheckpointError("no model file given (None): pass the saved_model_file (or manifest_file) of a "
                              "run_recbole_mm result")
    loaded = safe_load(model_file)
    if is_manifest(loaded):
        return load_manifest(model_file, loaded)
    checkpoint = checkpoint_entries(loaded, model_file, keys=("config", "external_config", "state_dict"))
    stored = checkpoint["config"]
    config = Config(model=stored["model"], dataset=stored["dataset"], config_dict=checkpoint["external_config"])
    model, dataset, train_data, valid_data, test_data = rebuild_data_and_model(config)
    load_model_state(model, checkpoint["state_dict"], model_file, stored["dataset"], config["dataset"])
    model.load_other_parameter(checkpoint.get("other_parameter"))
    return config, model, dataset, train_data, valid_data, test_data
