"""PRIME stage 3: online preference optimization of the retriever from the frozen ranker's feedback."""

from __future__ import annotations

from logging import getLogger
from typing import Callable

import math

import torch
from torch import nn

from recbole_mm.errors import ConfigError
from recbole_mm.model.loss import SET_LIKELIHOODS, preference_loss
from recbole_mm.sampler.candidate_sets import CandidateSetSampler, label_pairs
from recbole_mm.trainer.ranker_training import ranker_autocast

logger = getLogger(__name__)

def set_dropout(module: nn.Module, p: float) -> None:
    """Every ``nn.Dropout`` of ``module`` drops with probability ``p`` from now on."""
    for m in module.modules():
        if isinstance(m, nn.Dropout):
            m.p = float(p)


def step_units(dataset, unit: str) -> list[torch.Tensor] | None:
    """What ``pref_batch_size`` counts: ``prefixes`` (None: rows of ``dataset``) or ``users`` (the
    reference code, ``trainer/dpo.py:491-503``: a step is that many users with all their positions),
    then one tensor of row indices per user, users in id order."""
    if unit == "prefixes":
        return None
    if unit != "users":
        raise ConfigError(f"pref_step_unit={unit!r}: choose prefixes or users")
    users = torch.as_tensor(dataset.inter_feat[dataset.uid_field]).long()
    order = torch.argsort(users, stable=True)
    _, sizes = torch.unique_consecutive(users[order], return_counts=True)
    return list(order.split(sizes.tolist()))


class PreferenceTrainer:
    """Fine-tunes PRIME's retriever with ``CE + beta * L_or`` (PRIME Eq. 8) on sampled set pairs.

    For each batch of training prefixes: the retriever (in eval mode) gives the softmax from which
    :class:`~recbole_mm.sampler.candidate_sets.CandidateSetSampler` draws two sets per prefix; the
    frozen ranker is called, in batches, only for the prefixes where both sets hold the answer;
    then one optimizer step on the retriever (in train mode, dropout ``pref_dropout``), warmup then
    linear decay, on the training engine (:class:`~recbole_mm.trainer.engine.Engine`).
    ``validate()`` (two-stage NDCG@10 on validation users, supplied by the caller) runs before the
    first step and every ``pref_valid_every`` steps; the best retriever is kept, training stops after
    ``pref_patience`` validations without improvement. After each validation a checkpoint is written
    to ``out_dir/checkpoints/`` (weights only, at most two kept), from which an interrupted run resumes.
    """

    def __init__(self, model, config, out_dir: str, validate: Callable[[], dict], tracker=None):
        self.model, self.config, self.out_dir, self.validate = model, config, out_dir, validate
        self.tracker = tracker  # a recbole_mm.trainer.tracking.StageTracker (tensorboard / wandb), or None
        self.retriever = model.retriever
        if config["pref_set_likelihood"] not in SET_LIKELIHOODS:
            raise ConfigError(f"pref_set_likelihood must be one of {SET_LIKELIHOODS}, "
                             f"not {config['pref_set_likelihood']!r}")
        if config["pref_batch_size"] < 1 or config["pref_epochs"] < 0 or config["pref_valid_every"] < 1:
            raise ConfigError("pref_batch_size and pref_valid_every must be >= 1 and pref_epochs >= 0, got "
                             f"{config['pref_batch_size']}, {config['pref_valid_every']}, {config['pref_epochs']}")
        self.sampler = CandidateSetSampler(config["n_candidates"], config["pref_max_tries"], config["pref_answer_rule"])
        wd = config["pref_weight_decay"]
        groups = (self.retriever.optimizer_param_groups(wd) if hasattr(self.retriever, "optimizer_param_groups")
                  else [{"params": list(self.retriever.parameters()), "weight_decay": wd}])
        self.optimizer = torch.optim.AdamW(groups, lr=config["pref_learning_rate"], eps=1e-9)
        self.history: list[dict] = []
        self.counts = {"both": 0, "first_only": 0, "second_only": 0, "forced": 0}
        self.ranker_prompts = 0
        self.ranker_batches = 0
        self._fit: dict | None = None  # what loss() needs during fit()

    # ------------------------------------------------------------------------------ pieces
    @torch.no_grad()
    def judge(self, feat, rows: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """The frozen ranker's scores of ``candidates`` for the prefixes ``rows`` of ``feat``."""
        ranker = self.model.ranker
        ranker.model.eval()
        histories = self.model.histories(feat, rows.to(feat[self.model.ITEM_SEQ].device))
        bs = self.config["ranker_eval_batch_size"]
        with ranker_autocast(ranker):
            scores = ranker.score_in_batches(histories, candidates.cpu(), bs)
        self.ranker_batches += math.ceil(len(histories) / bs)
        self.ranker_prompts += len(histories)
        return scores

    def _logits(self, feat) -> torch.Tensor:
        logits = self.retriever.full_sort_predict(feat).view(len(feat), -1).float()
        return logits.masked_fill(torch.arange(logits.size(1), device=logits.device) == 0, float("-inf"))

    def step_loss(self, feat, generator: torch.Generator, masked=None) -> tuple[torch.Tensor, dict]:
        """Sample and label the pairs of one batch of prefixes; the loss to minimise and its parts.

        ``masked``: (row, item) pairs never put in a candidate set (``mask_history``: each prefix's
        earlier items, except its answer)."""
        answers = feat[self.model.POS_ITEM_ID]
        self.retriever.eval()
        with torch.no_grad():
            logits = self._logits(feat)
            if masked is not None:
                logits[masked[0].to(logits.device), masked[1].to(logits.device)] = float("-inf")
            log_probs = logits.log_softmax(1)
        pairs = self.sampler.sample(log_probs, answers, generator)
        for name, n in pairs.counts().items():
            self.counts[name] += n
        chosen, rejected, _ = label_pairs(pairs, answers, lambda rows, cands: self.judge(feat, rows, cands))
        self.retriever.train()
        loss, parts = preference_loss(self._logits(feat), answers, chosen, rejected, self.config["pref_beta"],
                                      self.config["pref_set_likelihood"])
        return loss, {**parts, **pairs.counts()}

    # ------------------------------------------------------------- the engine's Stage
    def loss(self, index: torch.Tensor, step: int) -> tuple[torch.Tensor, dict]:
        """The loss of one step's units ``index`` (prefixes, or users with all their prefixes)."""
        units, dataset, device = self._fit["units"], self._fit["dataset"], self._fit["device"]
        if units is not None:  # a step is bs users with all their prefixes
            index = torch.cat([units[i] for i in index.tolist()])
        feat = dataset.inter_feat[index].to(device)
        masked = None
        if self._fit["history"] is not None:
            masked = self._fit["history"].earlier_items(feat, self.model.ITEM_SEQ, self.model.USER_ID,
                                                        feat[self.model.POS_ITEM_ID], self._fit["positions"][index])
        generator = torch.Generator().manual_seed(self.config["seed"] * 1_000_003 + step)
        loss, parts = self.step_loss(feat, generator, masked)
        return loss, {"ranker_prompts": self.ranker_prompts, **parts}

    def weights(self) -> dict:
        return {k: v.detach().cpu().clone() for k, v in self.retriever.state_dict().items()}

    def load_weights(self, weights: dict) -> None:
        self.retriever.load_state_dict(weights)

    def state_dict(self) -> dict:
        """What a checkpoint keeps besides the weights and the validation history: the counters."""
        return {"counts": dict(self.counts), "ranker_prompts": self.ranker_prompts, "ranker_batches": self.ranker_batches}

    def load_state_dict(self, state: dict) -> None:
        self.counts, self.ranker_prompts, self.ranker_batches = (dict(state["counts"]), state["ranker_prompts"],
                                                                 state["ranker_batches"])

    # ------------------------------------------------------------------------------- fit
    def fit(self, dataset, device, history=None, positions=None) -> dict:
        """Run stage 3 on the training prefixes of ``dataset``; returns what happened. An interrupted
        run resumes from its newest checkpoint (``out_dir/checkpoints``, written after every validation).

        With ``history`` (a :class:`~recbole_mm.data.dataloader.PrefixHistory`, given under
        ``mask_history``) and ``positions`` (the number of earlier items of each row of ``dataset``),
        a prefix's earlier items, except its answer, are kept out of its candidate sets."""
        from recbole_mm.trainer.engine import Engine, EngineSettings

        cfg = self.config
        units = step_units(dataset, cfg["pref_step_unit"])
        n = len(units) if units is not None else len(dataset)
        per_epoch = min(n, cfg["pref_train_examples"] or n)
        set_dropout(self.retriever, cfg["pref_dropout"])
        self._fit = {"units": units, "dataset": dataset, "device": device, "history": history, "positions": positions}
        settings = EngineSettings(
            name="preference", batch_size=cfg["pref_batch_size"], epochs=cfg["pref_epochs"],
            max_grad_norm=cfg["pref_max_grad_norm"] or 0.0, schedule="linear", warmup_steps=cfg["pref_warmup_steps"],
            valid_every=cfg["pref_valid_every"], patience=cfg["pref_patience"], log_every=cfg["ranker_log_every"],
            seed=cfg["seed"], score_key="score", valid_prefix="valid_", tag="[PRIME] stage preference:",
            checkpoints=True, show_progress=bool(cfg["show_progress"]) if "show_progress" in cfg else True)
        engine = Engine(self, self.retriever, settings, self.optimizer, self.out_dir, tracker=self.tracker)
        seed = cfg["seed"]
        result = engine.fit(per_epoch, lambda epoch: torch.randperm(
            n, generator=torch.Generator().manual_seed(seed + epoch))[:per_epoch], resume=True)
        self.history = result.history
        self._fit = None
        self.retriever.eval()
        return {"best_valid_score": result.best, "steps": result.steps, "total_steps": result.total_steps,
                "prefixes_per_epoch": per_epoch, "pairs": dict(self.counts), "ranker_prompts": self.ranker_prompts,
                "ranker_batches": self.ranker_batches, "history": self.history}
