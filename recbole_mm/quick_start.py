"""Entry points in RecBole's conventions: ``run_recbole_mm``, ``objective_function``, ``load_data_and_model``."""

from __future__ import annotations

import logging
import sys
from logging import getLogger

from recbole.utils import init_logger, init_seed

from recbole_mm.config import Config
from recbole_mm.errors import CheckpointError
from recbole_mm.preflight import preflight
from recbole_mm.trainer.standalone import train_and_test
from recbole_mm.utils import rebuild_data_and_model


def train_and_evaluate(config, saved: bool, resume: str | None, verbose: bool = True) -> dict:
    """:func:`~recbole_mm.trainer.standalone.train_and_test`, then (``saved``) the run's manifest:
    one weights-only file from which the trained model reloads (:func:`load_data_and_model`)."""
    result, trainer, model = train_and_test(config, saved=saved, resume=resume, verbose=verbose)
    if saved:
        from recbole_mm.manifest import write_manifest

        result["manifest_file"] = write_manifest(config, result, trainer, model)
        result["saved_model_file"] = result["saved_model_file"] or result["manifest_file"]
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
    return train_and_evaluate(config, saved=saved, resume=resume)


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
    return train_and_evaluate(config, saved=saved, resume=None, verbose=False)


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
