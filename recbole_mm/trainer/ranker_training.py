"""PRIME stage 2: LoRA fine-tuning of an LMM ranker on the training engine, and its examples,
validation metric, optimizer choice and adapter files (peft's format)."""

from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import dataclass
from logging import getLogger

import torch

from recbole_mm.lmm.candidate_ranker import ndcg_at

logger = getLogger(__name__)


@dataclass
class RankerExamples:
    """Prompts to train or validate on: histories (item ids, oldest first), candidates (n, k),
    and the answer's position in each candidate row (-1 when the answer is not a candidate)."""

    histories: list[list[int]]
    candidates: torch.Tensor
    answer_pos: torch.Tensor

    def __len__(self):
        return len(self.histories)

    def subset(self, index) -> "RankerExamples":
        index = torch.as_tensor(index, dtype=torch.long)
        return RankerExamples([self.histories[i] for i in index.tolist()], self.candidates[index], self.answer_pos[index])


def ranker_autocast(ranker):
    """bfloat16 autocast on CUDA, nothing on the CPU."""
    if str(ranker.device).startswith("cuda"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


@torch.no_grad()
def ranked_ndcg(ranker, examples: RankerExamples, batch_size: int) -> float:
    """Mean NDCG@10 of ``examples`` reranked by ``ranker`` in eval mode; rows whose answer is not a
    candidate count as 0, so with a retriever's top-k (k >= 10) as candidates this is the
    two-stage NDCG@10 of full ranking. Only rows with the answer among the candidates are scored."""
    ranker.model.eval()
    hits = torch.nonzero(examples.answer_pos >= 0).squeeze(1)
    part = examples.subset(hits)
    with ranker_autocast(ranker):
        scores = ranker.score_in_batches(part.histories, part.candidates, batch_size)
    total = float(ndcg_at(scores, part.answer_pos).sum())
    return total / max(1, len(examples))


def gathered(params: list):
    """A context in which ``params`` are whole tensors: under DeepSpeed ZeRO-3 (``ranker_engine_args:
    zero3``) each process holds a partition of every parameter (marked by DeepSpeed's ``ds_id``), which
    ``deepspeed.zero.GatheredParameters`` gathers (rank 0's writes are kept); otherwise nothing to do."""
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=0)
    return contextlib.nullcontext()


def lora_state(model) -> dict:
    """The trainable (adapter) weights only."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    with gathered([p for _, p in params]):
        return {n: p.detach().cpu().clone() for n, p in params}


def make_optimizer(params, name: str, lr: float, weight_decay: float):
    """``adamw`` (torch) or ``adamw_8bit`` (bitsandbytes' AdamW8bit, as the reference code; needs CUDA)."""
    from recbole_mm.errors import ConfigError

    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw_8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ConfigError("ranker_optimizer='adamw_8bit' needs bitsandbytes (pip install bitsandbytes, "
                              "CUDA only); use ranker_optimizer: adamw") from None
        return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay)
    raise ConfigError(f"ranker_optimizer={name!r}: choose adamw or adamw_8bit")


def save_adapter(model, folder: str) -> str:
    """The adapter of peft ``model`` in peft's own format (``adapter_config.json`` +
    ``adapter_model.safetensors``) at ``folder``, written beside it and renamed into place;
    ``PeftModel.from_pretrained(base, folder)`` loads it anywhere."""
    tmp = folder + ".part"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return folder


def load_adapter(model, folder: str) -> None:
    """Load the adapter saved at ``folder`` (:func:`save_adapter`) into peft ``model``, with peft's
    own loading (safetensors); a missing folder or an adapter of another shape is one line."""
    from peft.utils import load_peft_weights, set_peft_model_state_dict

    from recbole_mm.errors import CheckpointError

    if not os.path.isfile(os.path.join(folder, "adapter_config.json")):
        raise CheckpointError(f"adapter folder {folder} has no adapter_config.json (not a peft adapter, or a stage "
                              "written before issue 13 with only adapter.pth); delete its stage folder to retrain it")
    try:
        result = set_peft_model_state_dict(model, load_peft_weights(folder, device="cpu"))
    except RuntimeError as err:  # a tensor of another shape: another backbone or LoRA rank
        detail = next((line.strip() for line in str(err).splitlines() if "size mismatch" in line), str(err)[:200])
        raise CheckpointError(f"adapter {folder} does not fit this ranker ({detail}); use the adapter of the "
                              "same backbone and lora_r, or retrain") from None
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing or result.unexpected_keys:
        raise CheckpointError(f"adapter {folder} does not fit this ranker: {len(missing)} LoRA tensors missing, "
                              f"{len(result.unexpected_keys)} unexpected (e.g. {(missing or result.unexpected_keys)[:2]}); "
                              "use the adapter of the same backbone and LoRA settings, or retrain")


class RankerTrainer:
    """Fits an :class:`~recbole_mm.lmm.ranker.LMMRanker` on :class:`RankerExamples` with the training
    engine (:class:`~recbole_mm.trainer.engine.Engine`, transformers' Trainer).

    Config keys: ``ranker_learning_rate``, ``ranker_optimizer``, ``ranker_weight_decay``,
    ``ranker_epochs``, ``ranker_batch_size``, ``ranker_grad_accum``, ``ranker_max_grad_norm``,
    ``ranker_warmup_steps`` (warmup, then cosine decay), ``ranker_valid_every`` (optimizer steps),
    ``ranker_patience`` (validations without improvement of NDCG@10), ``ranker_log_every``.
    The best adapter weights are kept and written in peft's format to ``out_dir/adapter/``
    (:meth:`save_pretrained`).
    """

    def __init__(self, ranker, config, out_dir: str, tracker=None):
        self.ranker, self.config, self.out_dir = ranker, config, out_dir
        self.tracker = tracker  # a recbole_mm.trainer.tracking.StageTracker (tensorboard / wandb), or None
        self.params = [p for p in ranker.model.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(self.params, config["ranker_optimizer"], config["ranker_learning_rate"],
                                        config["ranker_weight_decay"])
        self.history: list[dict] = []
        self._train: RankerExamples | None = None
        self._valid: RankerExamples | None = None

    def validate(self, examples: RankerExamples) -> float:
        """Mean NDCG@10 of the reranked candidates (rows without the answer count as 0)."""
        score = ranked_ndcg(self.ranker, examples, self.config["ranker_eval_batch_size"])
        self.ranker.model.train()
        return score

    # the engine's Stage: loss over a batch of training prompts, validation, weights to keep
    def loss(self, index: torch.Tensor, step: int) -> tuple[torch.Tensor, dict]:
        part = self._train.subset(index)
        with ranker_autocast(self.ranker):
            return self.ranker.loss(part.histories, part.candidates, part.answer_pos), {}

    def weights(self) -> dict:
        return lora_state(self.ranker.model)

    def load_weights(self, weights: dict) -> None:
        self._load_state(weights)

    def _validation(self) -> dict:
        return {"valid_ndcg@10": self.validate(self._valid)}

    def fit(self, train: RankerExamples, valid: RankerExamples, seed: int = 0) -> float:
        """Train on ``train``, validate on ``valid``; the best adapter is loaded and saved. Returns its NDCG@10."""
        from recbole_mm.trainer.engine import Engine, EngineSettings, engine_arguments

        cfg = self.config
        self._train, self._valid = train, valid
        settings = EngineSettings(
            name="ranker", batch_size=cfg["ranker_batch_size"], grad_accum=cfg["ranker_grad_accum"],
            epochs=cfg["ranker_epochs"], max_grad_norm=cfg["ranker_max_grad_norm"], schedule="cosine",
            warmup_steps=cfg["ranker_warmup_steps"], valid_every=cfg["ranker_valid_every"],
            patience=cfg["ranker_patience"], log_every=cfg["ranker_log_every"], seed=seed,
            score_key="valid_ndcg@10", tag="[ranker]",
            show_progress=bool(cfg["show_progress"]) if "show_progress" in cfg else True,
            extra=engine_arguments(cfg["ranker_engine_args"], "ranker_engine_args"))
        stage = _RankerStage(self)
        engine = Engine(stage, self.ranker.model, settings, self.optimizer, self.out_dir, tracker=self.tracker)
        generator_seed, orders = seed, {}

        def order(epoch: int) -> torch.Tensor:  # one generator over the epochs, as the loop before the engine
            if epoch not in orders:
                generator = torch.Generator().manual_seed(generator_seed)
                for e in range(epoch + 1):
                    orders[e] = torch.randperm(len(train), generator=generator)
            return orders[epoch]

        result = engine.fit(len(train), order)
        self.history = result.history
        self.ranker.model.train()
        from recbole_mm.trainer.distributed import rank

        if rank() == 0:  # several processes (DDP) end with the same adapter: one writer
            self.save_pretrained()
        self._train = self._valid = None
        return result.best

    def save_pretrained(self) -> str:
        """The loaded adapter in peft's own format, ``out_dir/adapter/``."""
        return save_adapter(self.ranker.model, os.path.join(self.out_dir, "adapter"))

    def load_adapter(self, folder: str | None = None) -> None:
        """Load a saved adapter (``out_dir/adapter/`` unless ``folder``) with peft's own loading."""
        load_adapter(self.ranker.model, folder or os.path.join(self.out_dir, "adapter"))

    def _load_state(self, state: dict) -> None:
        params = dict(self.ranker.model.named_parameters())
        missing = {n for n, p in params.items() if p.requires_grad} - set(state)
        if missing:
            raise ValueError(f"adapter state lacks {len(missing)} trainable tensors, e.g. {sorted(missing)[:3]}")
        with torch.no_grad(), gathered([params[name] for name in state]):
            for name, value in state.items():
                params[name].copy_(value.to(params[name].device, params[name].dtype))


class _RankerStage:
    """The engine's view of a :class:`RankerTrainer` (its ``validate`` takes examples; the Stage's none)."""

    def __init__(self, trainer: RankerTrainer):
        self.trainer = trainer
        self.loss, self.weights, self.load_weights = trainer.loss, trainer.weights, trainer.load_weights

    def validate(self) -> dict:
        return self.trainer._validation()
