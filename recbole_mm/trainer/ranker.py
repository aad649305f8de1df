"""Training loop of an LMM ranker: LoRA, gradient accumulation, warmup + cosine, early stopping."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from logging import getLogger

import torch

from recbole_mm.trainer.checkpoint import atomic_save
from recbole_mm.trainer.tracking import progress


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


def ndcg_at(scores: torch.Tensor, answer_pos: torch.Tensor, k: int = 10) -> torch.Tensor:
    """NDCG@k per row of the answer among the scored candidates (0 where it is not a candidate)."""
    hit = answer_pos >= 0
    rank = torch.zeros_like(answer_pos)
    if hit.any():
        answer_score = scores[hit].gather(1, answer_pos[hit].unsqueeze(1))
        rank[hit] = (scores[hit] > answer_score).sum(1)  # 0-based rank, ties in the answer's favour
    return torch.where(hit & (rank < k), 1.0 / torch.log2(rank.float() + 2), torch.zeros_like(rank, dtype=torch.float))


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
    total = 0.0
    for start in range(0, len(hits), batch_size):
        part = examples.subset(hits[start:start + batch_size])
        with ranker_autocast(ranker):
            scores = ranker.score(part.histories, part.candidates)
        total += float(ndcg_at(scores.cpu(), part.answer_pos).sum())
    return total / max(1, len(examples))


def lora_state(model) -> dict:
    """The trainable (adapter) weights only."""
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


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


class RankerTrainer:
    """Fits an :class:`~recbole_mm.lmm.candidate_ranker.LMMRanker` on :class:`RankerExamples`.

    Config keys: ``ranker_learning_rate``, ``ranker_epochs``, ``ranker_batch_size``,
    ``ranker_grad_accum``, ``ranker_warmup_steps``, ``ranker_valid_every`` (optimizer steps),
    ``ranker_patience`` (validations without improvement of NDCG@10), ``ranker_log_every``.
    The best adapter weights are kept and written to ``out_dir/adapter.pth`` (weights only) and, in
    peft's format, to ``out_dir/adapter/`` (:meth:`save_pretrained`).
    """

    def __init__(self, ranker, config, out_dir: str, tracker=None):
        self.ranker, self.config, self.out_dir = ranker, config, out_dir
        self.tracker = tracker  # a recbole_mm.trainer.tracking.StageTracker (tensorboard / wandb), or None
        self.logger = getLogger()
        self.params = [p for p in ranker.model.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(self.params, config["ranker_optimizer"], config["ranker_learning_rate"],
                                        config["ranker_weight_decay"])
        self.history: list[dict] = []

    def _schedule(self, total_steps: int):
        warmup = min(self.config["ranker_warmup_steps"], max(1, total_steps // 10))

        def factor(step):
            if step < warmup:
                return (step + 1) / warmup
            progress = (step - warmup) / max(1, total_steps - warmup)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

        return torch.optim.lr_scheduler.LambdaLR(self.optimizer, factor)

    def validate(self, examples: RankerExamples) -> float:
        """Mean NDCG@10 of the reranked candidates (rows without the answer count as 0)."""
        score = ranked_ndcg(self.ranker, examples, self.config["ranker_eval_batch_size"])
        self.ranker.model.train()
        return score

    def _autocast(self):
        return ranker_autocast(self.ranker)

    def fit(self, train: RankerExamples, valid: RankerExamples, seed: int = 0) -> float:
        cfg = self.config
        bs, accum = cfg["ranker_batch_size"], cfg["ranker_grad_accum"]
        steps_per_epoch = math.ceil(len(train) / (bs * accum))
        total = steps_per_epoch * cfg["ranker_epochs"]
        scheduler = self._schedule(total)
        generator = torch.Generator().manual_seed(seed)
        best, best_state, bad, step = self.validate(valid), lora_state(self.ranker.model), 0, 0
        self.logger.info(f"[ranker] {len(train)} training prompts, {total} optimizer steps, "
                         f"{len(valid)} validation users; NDCG@10 before training {best:.4f}")
        self.history.append({"step": 0, "valid_ndcg@10": best})
        if self.tracker:
            self.tracker.log(0, **{"valid_ndcg@10": best})
        stop = False
        bar = progress(total, "ranker", cfg, unit="step")
        self.ranker.model.train()
        for epoch in range(cfg["ranker_epochs"]):
            order = torch.randperm(len(train), generator=generator)
            for start in range(0, len(order), bs * accum):
                chunk = order[start:start + bs * accum]
                for micro in chunk.split(bs):
                    part = train.subset(micro)
                    with self._autocast():
                        loss = self.ranker.loss(part.histories, part.candidates, part.answer_pos)
                    (loss * len(micro) / len(chunk)).backward()
                torch.nn.utils.clip_grad_norm_(self.params, cfg["ranker_max_grad_norm"])
                self.optimizer.step()
                scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.4f}", best=f"{best:.4f}")
                if self.tracker:
                    self.tracker.log(step, loss=loss.item(), lr=scheduler.get_last_lr()[0])
                if step % cfg["ranker_log_every"] == 0 or step == total:
                    self.logger.info(f"[ranker] step {step}/{total} loss {loss.item():.4f}")
                if step % cfg["ranker_valid_every"] == 0 or step == total:
                    score = self.validate(valid)
                    self.history.append({"step": step, "valid_ndcg@10": score, "loss": loss.item()})
                    if self.tracker:
                        self.tracker.log(step, **{"valid_ndcg@10": score})
                    self.logger.info(f"[ranker] step {step}: valid NDCG@10 {score:.4f} (best {best:.4f})")
                    if score > best:
                        best, best_state, bad = score, lora_state(self.ranker.model), 0
                    else:
                        bad += 1
                        if bad >= cfg["ranker_patience"]:
                            self.logger.info(f"[ranker] early stop after {bad} validations without improvement")
                            stop = True
                            break
            if stop:
                break
        bar.close()
        self.load_adapter(best_state)
        atomic_save(best_state, os.path.join(self.out_dir, "adapter.pth"))
        self.save_pretrained()
        return best

    def save_pretrained(self) -> str:
        """The loaded adapter in peft's own format, ``out_dir/adapter/`` (``adapter_config.json`` +
        ``adapter_model.safetensors``): ``PeftModel.from_pretrained(base, folder)`` loads it anywhere."""
        folder = os.path.join(self.out_dir, "adapter")
        tmp = folder + ".part"
        if os.path.isdir(tmp):
            import shutil

            shutil.rmtree(tmp)
        self.ranker.model.save_pretrained(tmp)
        if os.path.isdir(folder):
            import shutil

            shutil.rmtree(folder)
        os.replace(tmp, folder)
        return folder

    def load_adapter(self, state: dict) -> None:
        params = dict(self.ranker.model.named_parameters())
        missing = set(params[n].requires_grad and n for n in params) - set(state) - {False}
        if missing:
            raise ValueError(f"adapter checkpoint lacks {len(missing)} trainable tensors, e.g. {sorted(missing)[:3]}")
        with torch.no_grad():
            for name, value in state.items():
                params[name].copy_(value.to(params[name].device, params[name].dtype))
