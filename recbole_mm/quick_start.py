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
    one weights-only file from which the trained model reloads (:func:`load_data_and_model`).
    In a distributed run only rank 0 writes it (every rank returns the same metrics)."""
    from recbole_mm.trainer.distributed import rank

    result, trainer, model = train_and_test(config, saved=saved, resume=resume, verbose=verbose)
    if saved and rank() == 0:
        from recbole_mm.manifest import write_manifest

        result["manifest_file"] = write_manifest(config, result, trainer, model)
        result["saved_model_file"] = result["saved_model_file"] or result["manifest_file"]
    return result


def run_recbole_mm(model=None, dataset=None, config_file_list=None, config_dict=None, saved=True,
                   argv=None, resume=None, distributed: dict | None = None) -> dict:
    """Train and evaluate one model (ours or RecBole's) on one dataset, as RecBole's ``run_recbole``.

    ``argv`` holds ``--key=value`` overrides (highest priority); ``resume`` is a checkpoint written
    by a previous run, from which training continues. Returns the valid/test results, the path of
    the best checkpoint, timings (median time per epoch, best epoch, time to best) and peak memory.
    ``distributed``: this process's place in a multi-process run (set by :func:`run`).
    """
    config = Config(model=model, dataset=dataset, config_file_list=config_file_list,
                    config_dict=config_dict, argv=argv, distributed=distributed)
    init_seed(config["seed"], config["reproducibility"])
    init_logger(config)
    logger = getLogger()
    logger.info(sys.argv)
    # every stage's inputs are resolved before anything trains (and before the long config listing)
    logger.info(f"[preflight] checked: {', '.join(preflight(config))}")
    logger.info(config)
    try:
        return train_and_evaluate(config, saved=saved, resume=resume)
    finally:
        if not config["single_spec"] and distributed is not None:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def run(model=None, dataset=None, config_file_list=None, config_dict=None, saved=True, argv=None, resume=None,
        nproc: int = 1, world_size: int = -1, ip: str = "localhost", port: str | int = "5678",
        group_offset: int = 0) -> dict | None:
    """:func:`run_recbole_mm` in ``nproc`` processes of one machine, as RecBole's ``run``:
    ``torch.multiprocessing.spawn`` of one worker per local rank, joined in a process group of
    ``world_size`` processes (default ``nproc``; several machines: the same command on each, with
    ``group_offset`` = the global rank of its first process, ``ip``/``port`` = rank 0's machine).

    RecBole's distributed path does the rest: its data loaders shard by ``DistributedSampler``
    (each process gets ``train_batch_size / world_size`` of every global batch), its trainer wraps
    the model in DDP; recbole-mm's ``Config`` picks ``gloo`` without CUDA, rank 0 alone writes
    checkpoints and the manifest, and full-ranking evaluation is gathered so that the metrics equal
    one process's. Returns the result of local rank 0 (``None`` if it returned none).
    """
    if nproc == 1 and world_size <= 0:
        return run_recbole_mm(model=model, dataset=dataset, config_file_list=config_file_list,
                              config_dict=config_dict, saved=saved, argv=argv, resume=resume)
    import os

    import torch.multiprocessing as mp

    from recbole_mm.errors import ConfigError

    world_size = nproc if world_size == -1 else world_size
    if nproc < 1 or world_size < nproc + group_offset:
        raise ConfigError(f"--nproc={nproc}, --world_size={world_size}, --offset={group_offset}: the processes of "
                          f"this machine (ranks {group_offset}..{group_offset + nproc - 1}) must fit in world_size")
    queue = mp.get_context("spawn").SimpleQueue()
    place = {"world_size": world_size, "ip": ip, "port": str(port), "nproc": nproc, "offset": group_offset}
    kwargs = dict(model=model, dataset=dataset, config_file_list=config_file_list, config_dict=config_dict,
                  saved=saved, argv=argv, resume=resume)
    # RecBole's init_logger checks, then creates ./log and ./log/<model> in every worker: two workers
    # can race between the check and the makedirs (FileExistsError); the launcher makes them first
    os.makedirs(os.path.join("log", model) if isinstance(model, str) else "log", exist_ok=True)
    mp.spawn(run_worker, args=(kwargs, place, queue), nprocs=nproc, join=True)
    return None if queue.empty() else queue.get()


def run_worker(local_rank: int, kwargs: dict, place: dict, queue=None) -> None:
    """One process of :func:`run` (RecBole's ``run_recboles``): :func:`run_recbole_mm` at ``local_rank``;
    local rank 0 puts its result on ``queue``."""
    import os

    # what torchrun would set: accelerate (the LMM stages' engine) then joins the process group that
    # recbole_mm's Config forms, instead of seeing one process
    os.environ.update(RANK=str(place["offset"] + local_rank), LOCAL_RANK=str(local_rank),
                      WORLD_SIZE=str(place["world_size"]), LOCAL_WORLD_SIZE=str(place["nproc"]),
                      MASTER_ADDR=str(place["ip"]), MASTER_PORT=str(place["port"]))
    result = run_recbole_mm(**kwargs, distributed={**place, "local_rank": local_rank})
    if local_rank == 0 and queue is not None:
        queue.put(result)


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
