"""What recbole-mm adds to any RecBole trainer class."""

from __future__ import annotations

import os
import secrets
import time

from recbole.utils import get_local_time

from recbole_mm.errors import CheckpointError
from recbole_mm.trainer.checkpoint import atomic_save, checkpoint_entries, load_model_state, plain_config, safe_load
from recbole_mm.trainer.distributed import barrier, from_rank0, gather_rows, shard_rows


class RecBoleMMTrainerMixin:
    """Weights-only, atomically written checkpoints; resume; per-epoch wall times.

    RecBole pickles its ``Config`` into every checkpoint, which ``torch.load`` refuses under
    torch>=2.6 (``weights_only``). Here the config is stored as plain data, so RecBole's own
    loading code (``evaluate(load_best_model=True)``) and :meth:`resume_checkpoint` work with
    safe loading left on. Checkpoint names are unique per run (:func:`checkpoint_name`), so two
    runs started in the same folder in the same second never share (and overwrite) a file.
    """

    def __init__(self, config, model):
        cpu_ddp = not config["single_spec"] and config["device"].type == "cpu"
        if cpu_ddp:
            # RecBole wraps the model as DDP(model, device_ids=[local_rank]), which DDP refuses for a
            # CPU module (gloo, see recbole_mm.config.Config._init_device): wrap it here without
            # device ids instead (SyncBatchNorm, RecBole's other step, is CUDA-only)
            config["single_spec"] = True
        try:
            super().__init__(config, model)
        finally:
            if cpu_ddp:
                config["single_spec"] = False
        if cpu_ddp:
            from torch.nn.parallel import DistributedDataParallel

            self.distributed_model = DistributedDataParallel(self.model)
        if getattr(self, "saved_model_file", None) and getattr(self, "checkpoint_dir", None):
            # one name for all processes: rank 0 writes it, every rank loads the best weights from it
            self.saved_model_file = os.path.join(self.checkpoint_dir, checkpoint_name(config["model"]))
            if not config["single_spec"]:  # (a one-process sub-run inside a distributed run, e.g. PRIME's
                self.saved_model_file = from_rank0(self.saved_model_file)  # retriever on rank 0, shares nothing)
        self._eval_rows = None  # this process's share of a sharded full-ranking evaluation
        self.epoch_log: list[dict] = []
        self._fit_started = None
        #: per-user NDCG@K / Recall@K of the latest evaluation (K = 10 if reported, else the largest
        #: cutoff), in evaluation order: what paired significance tests between models need
        self.last_per_user: dict[str, list[float]] = {}
        evaluate = self.evaluator.evaluate

        def evaluate_and_keep_per_user(struct):
            if self._eval_rows is not None:  # every process's rows, in one process's order
                struct = gather_rows(struct, self._eval_rows)
            self.last_per_user = per_user_metrics(struct, config["topk"])
            return evaluate(struct)

        self.evaluator.evaluate = evaluate_and_keep_per_user

    def evaluate(self, eval_data, load_best_model=True, model_file=None, show_progress=False):
        """RecBole's evaluation; in a process group, a full-ranking evaluation is sharded by users
        (RecBole's ``DistributedSampler``) and its rows gathered before the metrics are computed, so
        the metrics equal one process's exactly."""
        if load_best_model and not self.config["single_spec"]:
            barrier()  # rank 0 has written the best checkpoint that every process loads
        self._eval_rows = None if self.config["single_spec"] else shard_rows(eval_data)
        try:
            return super().evaluate(eval_data, load_best_model=load_best_model, model_file=model_file,
                                    show_progress=show_progress)
        finally:
            self._eval_rows = None

    def _map_reduce(self, result, num_sample):
        if self._eval_rows is not None:
            return result  # computed from the gathered rows: already every process's result
        return super()._map_reduce(result, num_sample)

    def _build_optimizer(self, **kwargs):
        if "params" not in kwargs and hasattr(self.model, "optimizer_param_groups"):
            kwargs["params"] = self.model.optimizer_param_groups(kwargs.get("weight_decay", self.weight_decay))
        return super()._build_optimizer(**kwargs)

    def _save_checkpoint(self, epoch, verbose=True, **kwargs):
        if not self.config["single_spec"] and self.config["local_rank"] != 0:
            return
        path = kwargs.pop("saved_model_file", self.saved_model_file)
        state = {
            "config": plain_config(self.config),
            "external_config": plain_config(self.config, external_only=True),
            "epoch": int(epoch),
            "cur_step": int(self.cur_step),
            "best_valid_score": float(self.best_valid_score),
            "state_dict": self.model.state_dict(),
            "other_parameter": self.model.other_parameter(),
            "optimizer": self.optimizer.state_dict(),
        }
        atomic_save(state, path)
        if verbose:
            self.logger.info(f"Saving current: {path}")

    def resume_checkpoint(self, resume_file):
        checkpoint = checkpoint_entries(safe_load(str(resume_file), map_location=self.device), resume_file,
                                        keys=("config", "epoch", "cur_step", "best_valid_score", "state_dict",
                                              "optimizer"))
        stored = checkpoint["config"]
        if str(stored.get("model", "")).lower() != self.config["model"].lower():
            raise CheckpointError(f"checkpoint {resume_file} is for model {stored.get('model')}, "
                                  f"not {self.config['model']}; resume with --model={stored.get('model')}")
        load_model_state(self.model, checkpoint["state_dict"], resume_file, stored.get("dataset"),
                         self.config["dataset"])
        self.saved_model_file = str(resume_file)
        self.start_epoch = checkpoint["epoch"] + 1
        self.cur_step = checkpoint["cur_step"]
        self.best_valid_score = checkpoint["best_valid_score"]
        self.model.load_other_parameter(checkpoint.get("other_parameter"))
        try:
            self.optimizer.load_state_dict(checkpoint["optimizer"])
        except (ValueError, KeyError) as err:
            raise CheckpointError(f"checkpoint {resume_file}: its optimizer state does not fit this run "
                                  f"({err}); resume with the learner settings it was trained with") from None
        self.logger.info(f"Checkpoint loaded. Resume training from epoch {self.start_epoch}")

    def _train_epoch(self, train_data, epoch_idx, *args, **kwargs):
        if self._fit_started is None:
            self._fit_started = time.perf_counter()
        start = time.perf_counter()
        loss = super()._train_epoch(train_data, epoch_idx, *args, **kwargs)
        self.epoch_log.append({"epoch": int(epoch_idx), "train_s": time.perf_counter() - start})
        return loss

    def _valid_epoch(self, valid_data, show_progress=False):
        start = time.perf_counter()
        score, result = super()._valid_epoch(valid_data, show_progress=show_progress)
        if self.epoch_log:
            self.epoch_log[-1].update(valid_s=time.perf_counter() - start, valid_score=float(score),
                                      elapsed_s=time.perf_counter() - self._fit_started)
        return score, result

    def timing_summary(self) -> dict:
        """Median train time per epoch, epochs run, best epoch (1-based) and wall time until it."""
        import statistics

        if not self.epoch_log:
            return {}
        train = [e["train_s"] for e in self.epoch_log]
        scored = [e for e in self.epoch_log if "valid_score" in e]
        bigger = self.config["valid_metric_bigger"]
        best = (max if bigger else min)(scored, key=lambda e: e["valid_score"]) if scored else None
        return {
            "epochs_run": len(train),
            "time_per_epoch_s": statistics.median(train),
            "train_time_s": sum(train),
            "best_epoch": best["epoch"] + 1 if best else None,  # 1-based, as "epochs_run"
            "epoch_base": 1,
            "time_to_best_s": best["elapsed_s"] if best else None,
            "epoch_log": [{**e, "epoch": e["epoch"] + 1} for e in self.epoch_log],  # 1-based
        }


def checkpoint_name(model: str) -> str:
    """``<Model>-<local time>-<pid>-<8 random hex digits>.pth``: RecBole's name made unique per run."""
    return f"{model}-{get_local_time()}-{os.getpid()}-{secrets.token_hex(4)}.pth"


def per_user_metrics(struct, topk) -> dict[str, list[float]]:
    """Per-user ``ndcg@K`` and ``recall@K`` from RecBole's collected ``rec.topk`` (K = 10 when in
    ``topk``, else its largest cutoff), computed by RecBole's own metric classes before they average;
    empty when the run collected no top-k data."""
    import numpy as np
    from recbole.evaluator.metrics import NDCG, Recall

    if "rec.topk" not in struct:
        return {}
    topk = [topk] if isinstance(topk, int) else list(topk)
    k = 10 if 10 in topk else max(topk)
    per_user = {}
    for name, metric_class in (("ndcg", NDCG), ("recall", Recall)):
        metric = metric_class({"topk": topk, "metric_decimal_place": 6})
        values = metric.metric_info(*metric.used_info(struct))[:, k - 1]
        per_user[f"{name}@{k}"] = np.round(values, 6).tolist()
    return per_user


_CACHE: dict[type, type] = {}


def with_recbole_mm_features(trainer_cls: type) -> type:
    """``trainer_cls`` with :class:`RecBoleMMTrainerMixin` in front (one class per base, cached)."""
    if issubclass(trainer_cls, RecBoleMMTrainerMixin):
        return trainer_cls
    if trainer_cls not in _CACHE:
        _CACHE[trainer_cls] = type(trainer_cls.__name__, (RecBoleMMTrainerMixin, trainer_cls),
                                   {"__doc__": trainer_cls.__doc__, "__module__": __name__})
    return _CACHE[trainer_cls]
