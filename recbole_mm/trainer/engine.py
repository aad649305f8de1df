"""One training engine for every LMM stage, on transformers' :class:`~transformers.Trainer`.

A stage (PRIME's ranker fine-tuning, its preference optimization of the retriever, and the coming
DPO stage and all-item head) supplies only what is its own: a loss over a batch of example
indices, a validation callable, its weights to keep, its optimizer. The Trainer supplies the rest:
the loop, gradient accumulation, clipping, the schedule step, device placement, checkpoints and
``resume_from_checkpoint``; through ``accelerate`` it also runs a stage on several processes
(``torchrun`` / ``accelerate launch``, issue 18: the index dataset sharded by accelerate, the
:class:`StageModule` wrapped in DDP, DeepSpeed / FSDP through ``EngineSettings.extra``). What the Trainer has no hook for lives here,
in callbacks:

* :class:`ValidationCallback`: validation before the first step, every ``valid_every`` optimizer
  steps and after the last one; early stopping after ``patience`` validations without improvement;
  the best weights kept in memory (and in every checkpoint) and loaded back at the end.
* :class:`ReportCallback`: per-step loss / learning rate / the stage's extras to a
  :class:`~recbole_mm.trainer.tracking.StageTracker` (RecBole's tensorboard / wandb run), the log
  and the tqdm bar (:func:`~recbole_mm.trainer.tracking.progress`), in place of the Trainer's own
  printer and bar.

Checkpoints (``<out_dir>/checkpoints/checkpoint-<step>``, at most ``save_total_limit``) hold the
Trainer's files (weights as safetensors, ``optimizer.pt``, ``scheduler.pt``, ``rng_state.pth``,
``trainer_state.json``) plus ``stage_state.pth`` (the validation history, the best weights, the
stage's own counters): every one of them loads with ``torch.load(weights_only=True)`` (transformers
5 loads the optimizer, scheduler and RNG files that way itself, the RNG file under its
numpy allowlist). The pickled ``training_args.bin`` the Trainer writes for humans is removed: nothing
reads it, and the project keeps pickles out of its folders.
"""

from __future__ import annotations

import functools
import os
import shutil
from dataclasses import dataclass, field
from logging import getLogger
from typing import Callable, Protocol

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from recbole_mm.trainer.checkpoint import atomic_save, safe_load
from recbole_mm.trainer.tracking import progress

logger = getLogger(__name__)

STAGE_STATE = "stage_state.pth"


class Stage(Protocol):
    """What a stage gives the engine (PRIME's ranker and preference trainers implement it)."""

    def loss(self, index: torch.Tensor, step: int) -> tuple[torch.Tensor, dict]:
        """Loss (mean over the examples ``index``) at optimizer step ``step`` (0-based), and scalars to report."""

    def validate(self) -> dict:
        """Validation scores; the engine compares ``settings.score_key`` (higher is better)."""

    def weights(self) -> dict:
        """A detached CPU copy of the weights to keep when validation improves."""

    def load_weights(self, weights: dict) -> None:
        """Load weights from :meth:`weights`."""


@dataclass
class EngineSettings:
    """How the engine runs one stage (filled from the stage's ``ranker_*`` / ``pref_*`` keys)."""

    name: str                       # the tracker's / progress bar's stage name
    batch_size: int                 # examples per forward pass
    epochs: int
    grad_accum: int = 1
    max_grad_norm: float = 0.0      # 0 / None: no clipping
    schedule: str = "cosine"        # cosine | linear (transformers' schedules with linear warmup)
    warmup_steps: int = 0           # capped at a tenth of the optimizer steps (at least 1)
    valid_every: int = 1            # optimizer steps between validations
    patience: int = 1               # validations without improvement before stopping
    log_every: int = 10             # optimizer steps between log lines
    seed: int = 0                   # transformers' set_seed at the start (as init_seed before a stage)
    score_key: str = "score"        # the validation entry that decides early stopping
    keep_best: bool = True          # False: no early stopping, the last step's weights are kept (validation
                                    # still runs every valid_every steps, for the curve)
    valid_prefix: str = ""          # prefix of the validation scalars sent to the tracker
    tag: str = ""                   # log line prefix, e.g. "[ranker]"
    checkpoints: bool = False       # write resumable checkpoints (at every validation)
    save_total_limit: int = 2       # checkpoints kept (the newest with a complete stage state is resumed)
    show_progress: bool = True
    extra: dict = field(default_factory=dict)  # further TrainingArguments (e.g. ddp options, issue 18)


@dataclass
class EngineResult:
    """What a finished (or early-stopped, or resumed) stage returns."""

    best: float
    steps: int
    total_steps: int
    history: list[dict]
    resumed_at: int | None = None


class IndexDataset(Dataset):
    """Example ``i`` is the integer ``i``: stages keep their own tensors, the collator only batches indices."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return i


def collate_indices(batch: list[int]) -> dict:
    return {"index": torch.as_tensor(batch, dtype=torch.long)}


class EpochOrderSampler(Sampler):
    """The stage's own example order per epoch (``order(epoch)``, a tensor of indices).

    The Trainer's RandomSampler draws from its own seed; a stage's order is part of its settings
    (and of the results it reproduces), and it must be the same for an epoch whether the run is
    fresh or resumed, which ``set_epoch`` (called by the Trainer through accelerate) gives.
    """

    def __init__(self, order: Callable[[int], torch.Tensor], length: int):
        self.order, self.length, self.epoch = order, length, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self):
        return self.length

    def __iter__(self):
        return iter(self.order(self.epoch).tolist())


class StageModule(torch.nn.Module):
    """What the Trainer trains: the stage's trainable module (``inner``), whose forward is the stage's loss.

    With several processes the Trainer (accelerate) wraps this module in DDP, so the stage's loss
    runs inside DDP's forward and its gradients are averaged over processes; calling the stage's
    modules directly, outside the wrapper, would leave every process training on its own shard.
    ``state_dict`` / ``load_state_dict`` are the inner module's, so checkpoints hold the same names as
    the module alone.
    """

    def __init__(self, stage: Stage, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner
        self.stage = stage  # not a module: its tensors and the other modules it calls stay its own
        # bitsandbytes-quantized backbones cannot be moved with .to(); the Trainer asks the model it is given
        self.quantization_method = getattr(inner, "quantization_method", None)

    def forward(self, index: torch.Tensor, step: int):
        return self.stage.loss(index, step)

    def state_dict(self, *args, **kwargs):
        return self.inner.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        return self.inner.load_state_dict(state_dict, strict=strict, assign=assign)


def engine_arguments(value, key: str = "engine_args") -> dict:
    """Further ``TrainingArguments`` of a stage (``EngineSettings.extra``) from the setting ``key``:
    ``None`` (none), a dict, the name of a shipped preset (``properties/engine/<name>.yaml``: ``zero3``,
    ``zero2``) or the path of a yaml/json file. DeepSpeed is only looked for when asked for (a
    ``deepspeed`` entry), and its absence is a one-line error; FSDP is refused (see README
    "Multi-GPU and multi-node": transformers does not take a stage's own optimizer under FSDP)."""
    import importlib.util
    import json
    from importlib import resources

    import yaml

    from recbole_mm.errors import ConfigError

    if value is None or value == {}:
        return {}
    if isinstance(value, str):
        shipped = resources.files("recbole_mm.properties") / "engine" / f"{value}.yaml"
        path = str(shipped) if shipped.is_file() else value
        if not os.path.isfile(path):
            names = sorted(f.name[:-5] for f in (resources.files("recbole_mm.properties") / "engine").iterdir()
                           if f.name.endswith(".yaml"))
            raise ConfigError(f"{key}={value!r}: neither a shipped engine preset ({', '.join(names)}) nor a "
                              "yaml/json file; name one, or give a dict of TrainingArguments")
        with open(path, encoding="utf-8") as f:
            value = json.load(f) if path.endswith(".json") else yaml.safe_load(f)
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: expected a dict of transformers TrainingArguments, got {type(value).__name__}")
    if "fsdp" in value or "fsdp_config" in value:
        raise ConfigError(f"{key}: FSDP is not supported by the training engine (transformers refuses a stage's "
                          "own optimizer under FSDP); use DeepSpeed (ranker_engine_args: zero3) or plain DDP")
    if "deepspeed" in value and importlib.util.find_spec("deepspeed") is None:
        raise ConfigError(f"{key} asks for DeepSpeed, which is not installed: pip install deepspeed "
                          "(on the GPU machines), or drop the deepspeed entry for plain DDP")
    reserved = {"output_dir", "per_device_train_batch_size", "gradient_accumulation_steps", "num_train_epochs",
                "max_grad_norm", "seed", "save_strategy", "save_steps", "save_total_limit"}
    if reserved & set(value):
        raise ConfigError(f"{key}: {sorted(reserved & set(value))} come from the stage's own keys "
                          "(e.g. ranker_batch_size, ranker_grad_accum); set them there")
    return dict(value)


def warmup_steps(requested: int, total: int) -> int:
    """Warmup length: ``requested``, at most a tenth of ``total`` (at least 1), as the reference code."""
    return min(requested, max(1, total // 10))


def make_schedule(optimizer, name: str, warmup: int, total: int):
    """transformers' cosine or linear schedule with linear warmup (the learning rate starts at 0)."""
    from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

    from recbole_mm.errors import ConfigError

    if name == "cosine":
        return get_cosine_schedule_with_warmup(optimizer, warmup, total)
    if name == "linear":
        return get_linear_schedule_with_warmup(optimizer, warmup, total)
    raise ConfigError(f"schedule={name!r}: choose cosine or linear")


@functools.cache
def _engine_classes():
    """The Trainer subclass and the callbacks, defined on first use: transformers loads only when a
    stage trains (``import recbole_mm`` stays light)."""
    from transformers import Trainer, TrainerCallback

    class StageTrainer(Trainer):
        """A Trainer whose loss comes from the stage, over batches of example indices.

        Gradient accumulation weighs each micro-batch by its share of the optimizer step's examples
        (``loss * len(micro) / examples in the step``), so a short last step is an exact mean too.
        """

        def __init__(self, *args, stage: Stage, order: Callable[[int], torch.Tensor], **kwargs):
            super().__init__(*args, **kwargs)
            self.stage, self.order = stage, order
            self.loss_is_scaled_for_ga = True  # compute_loss scales by the step's example count
            self.step_loss = 0.0
            self.step_extras: dict = {}

        def get_train_dataloader(self) -> DataLoader:
            # own sampler (the stage's order); a private generator so that the DataLoader's base
            # seed draw does not advance the global RNG (dropout draws stay those of a plain loop)
            loader = DataLoader(self.train_dataset, batch_size=self._train_batch_size, collate_fn=collate_indices,
                                sampler=EpochOrderSampler(self.order, len(self.train_dataset)),
                                generator=torch.Generator(), num_workers=0)
            return self.accelerator.prepare(loader)

        def get_batch_samples(self, epoch_iterator, num_batches, device):
            batches, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
            count = torch.tensor(sum(len(b["index"]) for b in batches), device=self.args.device)
            if self.args.world_size > 1:  # every process's examples of this optimizer step
                count = self.accelerator.gather(count).sum()
            return batches, count

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            index = inputs["index"].cpu()
            # through `model`: the StageModule, or the DDP wrapper around it with several processes
            loss, extras = model(index, self.state.global_step)
            total = float(num_items_in_batch) if num_items_in_batch is not None else float(len(index))
            # DDP averages gradients over processes; the step's mean needs their sum, hence * world size
            self.step_loss += float(loss.detach()) * len(index) / total
            self.step_extras = extras
            return loss * (len(index) * self.args.world_size / total)

        def pop_step_loss(self) -> float:
            """The finished optimizer step's mean loss over every process's examples."""
            loss, self.step_loss = self.step_loss, 0.0
            if self.args.world_size > 1:  # each process holds its examples' share of the mean
                loss = float(self.accelerator.reduce(torch.tensor(loss, device=self.args.device), "sum"))
            return loss

        def floating_point_ops(self, inputs):
            return 0  # the inputs are indices; the Trainer's token-count estimate does not apply

    class ValidationCallback(TrainerCallback):
        """Validation every ``valid_every`` steps and after the last, early stopping, best weights, and
        the stage state written into each checkpoint."""

        def __init__(self, engine: "Engine"):
            self.engine = engine

        def on_step_end(self, args, state, control, **kwargs):
            e, s = self.engine, self.engine.settings
            step = state.global_step
            if step % s.valid_every and step != state.max_steps:
                return control
            e.validate_now(step)
            if s.keep_best and e.bad >= s.patience:
                logger.info(f"{s.tag} early stop after {e.bad} validations without improvement")
                control.should_training_stop = True
            if s.checkpoints:
                control.should_save = True  # the resumable state after every validation
            return control

        def on_save(self, args, state, control, **kwargs):
            folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            if state.is_world_process_zero and os.path.isdir(folder):  # one writer (the Trainer's own rule)
                e = self.engine
                atomic_save({"best": e.best, "bad": e.bad, "history": e.history, "best_weights": e.best_weights,
                             "stage": e.stage.state_dict() if hasattr(e.stage, "state_dict") else {}},
                            os.path.join(folder, STAGE_STATE))
                args_file = os.path.join(folder, "training_args.bin")
                if os.path.isfile(args_file):
                    os.remove(args_file)  # a pickle nothing reads (see the module docstring)
            return control

    class ReportCallback(TrainerCallback):
        """Per-step scalars to the tracker, log lines and the progress bar."""

        def __init__(self, engine: "Engine"):
            self.engine, self.bar = engine, None

        def on_train_begin(self, args, state, control, **kwargs):
            s = self.engine.settings
            self.bar = progress(state.max_steps, s.name, show=s.show_progress, initial=state.global_step,
                                unit="step")
            return control

        def on_step_end(self, args, state, control, **kwargs):
            e, s, trainer = self.engine, self.engine.settings, self.engine.trainer
            step, loss = state.global_step, trainer.pop_step_loss()
            e.last_loss = loss
            lr = trainer.lr_scheduler.get_last_lr()[0]
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}", best=f"{e.best:.4f}")
            if e.tracker:
                e.tracker.log(step, loss=loss, lr=lr, **trainer.step_extras)
            if step % s.log_every == 0 or step == state.max_steps:
                extras = f" {trainer.step_extras}" if trainer.step_extras else ""
                logger.info(f"{s.tag} step {step}/{state.max_steps} loss {loss:.4f} lr {lr:.3g}{extras}")
            return control

        def on_train_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                self.bar.close()
            return control

    return StageTrainer, ValidationCallback, ReportCallback


def _last_complete_checkpoint(folder: str) -> str | None:
    """The newest ``checkpoint-<step>`` under ``folder`` that holds a stage state (written last)."""
    if not os.path.isdir(folder):
        return None
    found = []
    for name in os.listdir(folder):
        if name.startswith("checkpoint-") and name[len("checkpoint-"):].isdigit():
            if os.path.isfile(os.path.join(folder, name, STAGE_STATE)):
                found.append((int(name[len("checkpoint-"):]), os.path.join(folder, name)))
    return max(found)[1] if found else None


class Engine:
    """Runs one stage on transformers' Trainer: ``Engine(stage, model, settings, ...).fit(n, order)``.

    ``model`` is the module that holds the trainable weights (the Trainer saves and restores it,
    inside a :class:`StageModule`, which it wraps in DDP for data parallelism); ``optimizer`` is the stage's own (custom parameter
    groups, ``adamw_8bit``); the schedule is transformers' ``settings.schedule`` with warmup.
    ``order(epoch)`` gives the epoch's example indices (``n`` of them, or fewer: a capped epoch).
    """

    def __init__(self, stage: Stage, model: torch.nn.Module, settings: EngineSettings, optimizer, out_dir: str,
                 tracker=None):
        self.stage, self.model, self.settings, self.optimizer = stage, model, settings, optimizer
        self.out_dir, self.tracker = out_dir, tracker
        self.history: list[dict] = []
        self.best, self.bad, self.best_weights = float("-inf"), 0, None
        self.last_loss: float | None = None
        self.trainer = None

    @property
    def checkpoint_dir(self) -> str:
        return os.path.join(self.out_dir, "checkpoints")

    def steps_per_epoch(self, per_epoch: int, world_size: int = 1) -> int:
        """Optimizer steps per epoch: each process gets every ``world_size``-th batch (accelerate pads
        the last round), ``grad_accum`` of them per step."""
        s = self.settings
        batches = -(-per_epoch // s.batch_size)
        return -(-(-(-batches // world_size)) // s.grad_accum)

    def validate_now(self, step: int) -> dict:
        """Validate, record, report; keep the weights if the score improved."""
        s = self.settings
        result = self.stage.validate()
        entry = {"step": step, **({"loss": self.last_loss} if step and self.last_loss is not None else {}), **result}
        self.history.append(entry)
        if self.tracker:
            self.tracker.log(step, **{f"{s.valid_prefix}{k}": v for k, v in result.items()})
        score = float(result[s.score_key])
        if step == 0:
            self.best, self.bad, self.best_weights = score, 0, self.stage.weights()
            return result
        logger.info(f"{s.tag} step {step}: {result} (best {self.best:.4f})")
        if score > self.best:
            self.best, self.bad, self.best_weights = score, 0, self.stage.weights()
        else:
            self.bad += 1
        return result

    def fit(self, per_epoch: int, order: Callable[[int], torch.Tensor], resume: bool = False) -> EngineResult:
        """Train; ``resume``: continue from the newest complete checkpoint under ``out_dir/checkpoints``."""
        s = self.settings
        args = self._arguments()
        total = self.steps_per_epoch(per_epoch, args.world_size) * s.epochs
        trainer = self._build(args, per_epoch, order, total)
        checkpoint = _last_complete_checkpoint(self.checkpoint_dir) if resume and s.checkpoints else None
        resumed_at = None
        if checkpoint:
            state = safe_load(os.path.join(checkpoint, STAGE_STATE), map_location="cpu", what="stage checkpoint")
            self.best, self.bad, self.history = state["best"], state["bad"], state["history"]
            self.best_weights = state["best_weights"]
            if hasattr(self.stage, "load_state_dict"):
                self.stage.load_state_dict(state["stage"])
            resumed_at = int(os.path.basename(checkpoint).split("-")[1])
            logger.info(f"{s.tag} resuming at step {resumed_at}/{total} from {checkpoint}")
        else:
            first = self.validate_now(0)
            logger.info(f"{s.tag} {per_epoch} examples per epoch, {total} optimizer steps; before: {first}")
        steps = resumed_at or 0
        if total > 0 and (self.bad < s.patience or not s.keep_best) and steps < total:
            trainer.train(resume_from_checkpoint=checkpoint)
            steps = trainer.state.global_step
        if s.keep_best:
            self.stage.load_weights(self.best_weights)
        return EngineResult(self.best, steps, total, self.history, resumed_at)

    def _arguments(self):
        from transformers import TrainingArguments

        s = self.settings
        return TrainingArguments(
            output_dir=self.checkpoint_dir, per_device_train_batch_size=s.batch_size,
            gradient_accumulation_steps=s.grad_accum, num_train_epochs=s.epochs, max_grad_norm=s.max_grad_norm or 0.0,
            save_strategy="steps" if s.checkpoints else "no", save_steps=max(1, s.valid_every),
            save_total_limit=s.save_total_limit, logging_strategy="no", report_to="none", disable_tqdm=True,
            seed=s.seed, use_cpu=not torch.cuda.is_available(), remove_unused_columns=False,
            dataloader_pin_memory=False, eval_strategy="no", **s.extra)

    def _build(self, args, per_epoch: int, order, total: int):
        from transformers import PrinterCallback, ProgressCallback, set_seed

        s = self.settings
        scheduler = make_schedule(self.optimizer, s.schedule, warmup_steps(s.warmup_steps, total), max(1, total))
        stage_trainer, validation, report = _engine_classes()
        trainer = stage_trainer(
            model=StageModule(self.stage, self.model), args=args, train_dataset=IndexDataset(per_epoch),
            data_collator=collate_indices,
            optimizers=(self.optimizer, scheduler), stage=self.stage, order=order,
            callbacks=[report(self), validation(self)])  # report first: a validation records the step's loss
        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)
        # the Trainer seeded at construction; again after it, so that training starts from exactly the
        # state init_seed(seed) leaves (what the loops before the engine started from)
        set_seed(s.seed)
        self.trainer = trainer
        return trainer

    def remove_checkpoints(self) -> None:
        """Drop the checkpoints (a finished stage keeps only its result)."""
        shutil.rmtree(self.checkpoint_dir, ignore_errors=True)
