"""Experiment tracking and progress for the stages RecBole's training loop does not run.

RecBole's trainers write scalars to tensorboard (``log_tensorboard/<log file name>``, i.e.
``<model>-<dataset>-<time>-<hash>``) and, with ``log_wandb: True``, to Weights & Biases
(``wandb_project``). :class:`StageTracker` reports the LMM stages (PRIME's ranker and preference
optimization) into that same tensorboard run and that same wandb run, under ``<stage>/<name>``
with a ``<stage>_step`` axis, as RecBole's ``train/*`` and ``valid/*``. :func:`progress` is the
tqdm bar every long loop uses, shown only when ``show_progress`` is on.
"""

from __future__ import annotations

from typing import Any

from tqdm import tqdm


def progress(total: int | None, desc: str, config=None, *, show: bool | None = None, initial: int = 0, unit="it"):
    """A tqdm bar (``show`` defaults to the config's ``show_progress``; off: a silent no-op bar)."""
    if show is None:
        show = bool(config["show_progress"]) if config is not None and "show_progress" in config else True
    return tqdm(total=total, initial=initial, desc=desc, ncols=100, unit=unit, disable=not show, leave=False)


class StageTracker:
    """Scalars of one stage to RecBole's tensorboard writer and wandb logger (either may be absent)."""

    def __init__(self, stage: str, tensorboard: Any = None, wandblogger: Any = None):
        self.stage, self.tensorboard, self.wandblogger = stage, tensorboard, wandblogger
        if self._wandb_on():
            self.wandblogger._wandb.define_metric(f"{stage}/*", step_metric=f"{stage}_step")

    @classmethod
    def for_trainer(cls, trainer, stage: str) -> "StageTracker":
        """The tracker of ``stage`` writing where RecBole ``trainer`` writes."""
        return cls(stage, getattr(trainer, "tensorboard", None), getattr(trainer, "wandblogger", None))

    def _wandb_on(self) -> bool:
        return bool(self.wandblogger is not None and getattr(self.wandblogger, "log_wandb", False))

    def log(self, step: int, **scalars: Any) -> None:
        """Report numeric ``scalars`` at ``step`` (non-numbers are skipped)."""
        values = {k: float(v) for k, v in scalars.items()
                  if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.tensorboard is not None:
            for key, value in values.items():
                self.tensorboard.add_scalar(f"{self.stage}/{key}", value, step)
        if self._wandb_on():
            self.wandblogger.log_metrics({**values, f"{self.stage}_step": step}, head=self.stage)


def peak_memory_mb() -> dict:
    """Peak resident memory of this process (and peak CUDA memory when a GPU is used), in MiB."""
    import resource

    import torch

    peak = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.cuda.is_available():
        peak["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
    return peak
