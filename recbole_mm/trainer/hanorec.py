"""HaNoRec's stages: (full ranking only) the retriever; SFT of the title-likelihood ranker; DPO with
HaRS's per-pair beta and NoDO's LoRA noise on the policy; evaluation under either protocol.

Why DPO runs as a stage on our engine and not through TRL's ``DPOTrainer`` (which the authors
subclass): HaNoRec's beta is per pair and changes with every batch (eta from the batch's reward
gaps), NoDO perturbs only the policy's pass, and both need the policy and reference
log-likelihoods of the SAME prompt-shared title pass that scores candidates at test time
(:class:`~recbole_mm.lmm.title_scorer.TitleScorer`); ``DPOTrainer`` tokenizes its own
prompt/chosen/rejected columns and computes those log-probabilities itself, so all three would be
overrides of its internals, besides a second Trainer outside our Stage protocol and StageStore
caching. Our engine is transformers' Trainer too, so the loop, accumulation, schedule, clipping
and early stopping are the same library code; only the loss (:mod:`~recbole_mm.model.hanorec_losses`,
tested against hand computations) is ours.

The reference model is the SFT model, frozen: the SFT adapter is MERGED into the base weights
(peft's ``merge_and_unload``) and a fresh LoRA adapter (B = 0, so the policy starts equal to the
reference) is trained by DPO; the reference pass is the same model with that adapter disabled
(``disable_adapter``), so no second copy of the LM is held in memory.
"""

from __future__ import annotations

import json
import os
import time
from logging import getLogger

import torch
from recbole.trainer import Trainer
from recbole.utils import init_seed

from recbole_mm.errors import ConfigError, UserError
from recbole_mm.lmm.defaults import LMM_BASE, model_yaml, shipped_defaults
from recbole_mm.trainer.prime import PRIMETrainer
from recbole_mm.trainer.ranker_training import (RankerExamples, lora_state, load_adapter, make_optimizer, ranked_ndcg,
                                                save_adapter)
from recbole_mm.trainer.stage_store import StageKeys, StageRule
from recbole_mm.trainer.tracking import StageTracker

logger = getLogger(__name__)

STAGES = ("sft", "sft+dpo")


def hanorec_stage_keys() -> StageKeys:
    """HaNoRec's stages and the settings that key each: ``retriever*`` the retriever; the LMM base
    yaml, ``ranker_*``, ``lora_*``, ``prompt_*``, ``image_*`` and ``hanorec_length_normalise`` the
    SFT stage (``ranker``); ``dpo_*``, ``hars*``, ``nodo*``, HaRS's embedding settings and
    ``hanorec_stages`` the DPO stage. ``hanorec_history_cap`` is a check only."""
    return StageKeys(
        stages=("retriever", "ranker", "dpo"),
        rules=[StageRule("retriever", prefixes=("retriever",)),
               StageRule("dpo", prefixes=("dpo_", "hars", "nodo", "text_", "image_encoder"),
                         keys=("hanorec_stages", "title_attribute_fields", "encode_batch_size")),
               StageRule("ranker", prefixes=("ranker_", "lora_", "prompt_", "image_", "hanorec_length"),
                         keys=tuple(model_yaml(LMM_BASE)))],
        keys=shipped_defaults("HaNoRec"),
        every_stage=("n_candidates", "train_neg_sample_args", "preference_optimization"),
        evaluation_only=("hanorec_history_cap", "embedding_cache_dir"),
        inputs=("seed", "mask_history"))


def eval_mode(config) -> str:
    """RecBole's ``eval_args.mode`` of the test phase (``full``, ``uni9``, ...)."""
    mode = config["eval_args"]["mode"]
    return str(mode.get("test", mode.get("valid")) if isinstance(mode, dict) else mode)


def pair_auc(scores: torch.Tensor, positive_u: torch.Tensor, positive_i: torch.Tensor) -> tuple[float, int]:
    """``(correctly ordered, total)`` (target, negative) pairs of a sampled-evaluation batch: ``scores``
    (users, items) with -inf where an item was not a candidate; a tie counts one half."""
    rows = scores[positive_u]
    pos = scores[positive_u, positive_i].unsqueeze(1)
    negative = torch.isfinite(rows)
    negative[torch.arange(len(positive_u)), positive_i] = False
    correct = ((rows < pos) & negative).sum() + 0.5 * ((rows == pos) & negative).sum()
    return float(correct), int(negative.sum())


class HaNoRecTrainer(PRIMETrainer):
    """Trains :class:`~recbole_mm.model.hanorec.HaNoRec` stage by stage.

    * ``retriever`` (``eval_args.mode: full`` only): PRIME's stage 1.
    * ``ranker`` (SFT): PRIME's ranker stage (:class:`~recbole_mm.trainer.ranker_training.RankerTrainer`
      on the engine) with the title scorer: one prompt per training prefix (``ranker_train_examples``),
      the target among ``n_candidates - 1`` unobserved items, loss = NLL of the target's title.
    * ``dpo`` (``hanorec_stages: sft+dpo``): pairs from the same prompts, chosen = the target,
      rejected = another (unobserved) candidate of the prompt; ``hars`` / ``nodo`` as configured.

    Evaluation: ``full`` = PRIME's (retriever alone, then reranked); sampled (``uni9``) = RecBole's
    sampled evaluation through :meth:`HaNoRec.predict` plus ``auc`` (share of (target, negative)
    pairs ordered correctly) in the result.
    """

    def __init__(self, config, model):
        if config["preference_optimization"]:
            raise ConfigError("preference_optimization=True: that is PRIME's stage 3; HaNoRec's preference stage is "
                              "hanorec_stages: sft+dpo")
        if config["hanorec_stages"] not in STAGES:
            raise ConfigError(f"hanorec_stages={config['hanorec_stages']!r}: choose one of {', '.join(STAGES)}")
        if config["dpo_keep"] not in ("best", "last"):
            raise ConfigError(f"dpo_keep={config['dpo_keep']!r}: choose best (early stopping, the best validated "
                              "weights) or last (every step, the last weights)")
        if config["nodo"] and not (config["nodo_sigma"] and config["nodo_sigma"] > 0):
            raise ConfigError(f"nodo_sigma={config['nodo_sigma']!r}: NoDO needs a positive sigma (the paper: 0.05..0.1)")
        super().__init__(config, model)
        self.stage_keys = hanorec_stage_keys()
        self.full_ranking = eval_mode(config) == "full"
        self.dpo_key = None
        self._sampler = None
        self._auc = [0.0, 0]
        self._dpo_history: list[dict] = []

    def _stage(self, name: str, started: float, **info):
        from recbole_mm.trainer.tracking import peak_memory_mb

        entry = {"wall_s": time.perf_counter() - started, **peak_memory_mb(), **info}
        self.stage_log[name] = entry
        self.logger.info(f"[HaNoRec] stage {name}: {json.dumps(entry, default=str)}")

    # ------------------------------------------------------------------------------ data
    def check_history_cap(self, valid_data) -> None:
        """``hanorec_history_cap``: every user must have at most that many interactions (the
        validation row's history + its target + the test target)."""
        cap = self.config["hanorec_history_cap"]
        if not cap:
            return
        lengths = valid_data._dataset.inter_feat[self.model.ITEM_SEQ_LEN]
        longest = int(lengths.max()) + 2 if len(lengths) else 0
        if longest > cap:
            raise UserError(f"hanorec_history_cap={cap}: dataset {self.config['dataset']!r} has a user with {longest} "
                            f"interactions; build the truncated copy first: python benchmarks/hanorec.py --truncate "
                            f"--dataset={self.config['dataset']} --cap={cap} (then use the dataset it names)")

    def sampler(self, train_data, valid_data):
        """The unobserved-item sampler over the training sequences, their targets and the validation targets."""
        from recbole_mm.sampler.preference_pairs import UnobservedSampler, observed_matrix

        if self._sampler is None:
            m, train = self.model, train_data._dataset
            feat = train.inter_feat
            users, items = [feat[m.USER_ID]], [[feat[m.ITEM_SEQ], feat[m.POS_ITEM_ID]]]
            if valid_data is not None:
                users.append(valid_data._dataset.inter_feat[m.USER_ID])
                items.append([valid_data._dataset.inter_feat[m.ITEM_SEQ], valid_data._dataset.inter_feat[m.POS_ITEM_ID]])
            seen = torch.zeros((train.user_num, train.item_num), dtype=torch.bool)
            for u, lists in zip(users, items):
                seen |= observed_matrix(train.user_num, train.item_num, u, lists)
            self._sampler = UnobservedSampler(seen)
        return self._sampler

    def _prompts(self, feat, generator) -> RankerExamples:
        from recbole_mm.sampler.ranker_negatives import training_candidates

        m = self.model
        answers = feat[m.POS_ITEM_ID]
        negatives = self._sampler.sample(feat[m.USER_ID], self.config["n_candidates"] - 1, generator)
        candidates, answer_pos = training_candidates(answers, negatives, generator)
        return RankerExamples(m.histories(feat), candidates, answer_pos)

    def training_examples(self, train_data, valid_data=None) -> RankerExamples:
        """One prompt per training prefix (capped by ``ranker_train_examples``): the target among
        ``n_candidates - 1`` unobserved items, in a random order."""
        self.sampler(train_data, valid_data)
        dataset = train_data._dataset
        generator = torch.Generator().manual_seed(self.config["seed"])
        rows = torch.arange(len(dataset.inter_feat))
        cap = self.config["ranker_train_examples"]
        if cap and cap < len(rows):
            rows = rows[torch.randperm(len(rows), generator=generator)[:cap]]
        return self._prompts(dataset.inter_feat[rows], generator)

    @torch.no_grad()
    def validation_examples(self, valid_data, users: int | None = -1) -> RankerExamples:
        """Full ranking: PRIME's (the retriever's top k). Sampled protocol: ``ranker_valid_users``
        validation rows with the target among ``n_candidates - 1`` unobserved items."""
        if self.full_ranking:
            return super().validation_examples(valid_data, users)
        dataset = valid_data._dataset
        generator = torch.Generator().manual_seed(self.config["seed"] + 1)
        users = self.config["ranker_valid_users"] if users == -1 else users
        rows = torch.randperm(len(dataset.inter_feat), generator=generator)[:users]
        return self._prompts(dataset.inter_feat[rows], generator)

    # ---------------------------------------------------------------------------- ranker
    def build_ranker(self, dataset):
        """The text causal LM (LoRA on ``lora_targets``) as a title-likelihood scorer over the item store."""
        from recbole_mm.lmm.backbone import build_backbone
        from recbole_mm.lmm.prompts import TitleListTemplate
        from recbole_mm.lmm.title_scorer import TitleScorer

        cfg = self.config
        store = getattr(dataset, "item_store", None)
        if store is None:
            raise UserError(f"HaNoRec needs the item side data of dataset {cfg['dataset']!r}: build the dataset with "
                            "recbole_mm.utils.create_dataset (MultimodalSequentialDataset), not RecBole's own")
        backbone = build_backbone(cfg, store, self.device, text_only=True, lora_targets=cfg["lora_targets"])
        return TitleScorer(backbone, store, TitleListTemplate.from_config(cfg), device=self.device,
                           normalise=bool(cfg["hanorec_length_normalise"]))

    # ------------------------------------------------------------------------------- DPO
    def start_policy(self) -> None:
        """Merge the SFT adapter into the base weights (the frozen reference) and add a fresh LoRA
        adapter of the same settings (the policy; B = 0: it starts equal to the reference)."""
        from peft import LoraConfig, get_peft_model

        scorer = self.model.ranker
        backbone = scorer.backbone
        if backbone.quantized:
            raise ConfigError("HaNoRec's DPO stage merges the SFT adapter into the base weights, which a 4-bit model "
                              "cannot take; use ranker_quantization: none")
        merged = backbone.model.merge_and_unload()
        s = backbone.settings
        init_seed(self.config["seed"], self.config["reproducibility"])
        lora = LoraConfig(r=s.lora_r, lora_alpha=s.lora_alpha, lora_dropout=s.lora_dropout,
                          target_modules=backbone.lora_targets, bias="none", task_type="CAUSAL_LM")
        backbone.model = get_peft_model(merged, lora).to(self.device)

    def dpo_pairs(self, examples: RankerExamples) -> dict:
        """DPO pairs from the SFT prompts (capped by ``dpo_train_examples``): chosen = the answer,
        rejected = a uniformly drawn other candidate of the same prompt (an unobserved item)."""
        generator = torch.Generator().manual_seed(self.config["seed"] + 2)
        n = len(examples)
        cap = self.config["dpo_train_examples"]
        rows = torch.randperm(n, generator=generator)[:cap] if cap and cap < n else torch.arange(n)
        part = examples.subset(rows)
        k = part.candidates.size(1)
        offset = torch.randint(1, k, (len(part),), generator=generator)
        rejected_pos = (part.answer_pos + offset) % k
        rows_i = torch.arange(len(part))
        return {"examples": part, "chosen": part.candidates[rows_i, part.answer_pos],
                "rejected": part.candidates[rows_i, rejected_pos]}

    def hars_lambdas(self, chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor | None:
        """HaRS's offline hardness lambda of every pair (None when ``hars`` is off)."""
        if not self.config["hars"]:
            return None
        from recbole_mm.model.hanorec_losses import hars_deltas, hars_lambda

        deltas = hars_deltas(self.model.hars_embeddings, chosen, rejected, self.config["hars_top_k"])
        lambdas = hars_lambda(deltas).float()
        logger.info(f"[HaNoRec] HaRS: {len(deltas)} pairs, Delta mean {float(deltas.mean()):.4f}, lambda "
                    f"{float(lambdas.min()):.3f}..{float(lambdas.max()):.3f}")
        return lambdas

    def train_dpo(self, train_data, valid_data) -> None:
        """Stage 3: DPO of a fresh adapter on the merged SFT model (or load its result)."""
        started = time.perf_counter()
        key = self.stage_key("dpo", self.ranker_key)
        self.start_policy()
        scorer = self.model.ranker

        def compute(folder):
            from recbole_mm.trainer.engine import Engine, EngineSettings

            cfg = self.config
            pairs = self.dpo_pairs(self.training_examples(train_data, valid_data))
            valid = self.validation_examples(valid_data)
            lambdas = self.hars_lambdas(pairs["chosen"], pairs["rejected"])
            init_seed(cfg["seed"], cfg["reproducibility"])
            stage = DPOStage(scorer, pairs, valid, cfg, lambdas)
            params = [p for p in scorer.model.parameters() if p.requires_grad]
            optimizer = make_optimizer(params, "adamw", cfg["dpo_learning_rate"], cfg["dpo_weight_decay"])
            settings = EngineSettings(
                name="dpo", batch_size=cfg["dpo_batch_size"], grad_accum=cfg["dpo_grad_accum"],
                epochs=cfg["dpo_epochs"], max_grad_norm=cfg["dpo_max_grad_norm"], schedule="cosine",
                warmup_steps=cfg["dpo_warmup_steps"], valid_every=cfg["dpo_valid_every"],
                patience=cfg["dpo_patience"], log_every=cfg["dpo_log_every"], seed=cfg["seed"],
                score_key="valid_ndcg@10", tag="[HaNoRec dpo]", show_progress=bool(cfg["show_progress"]),
                keep_best=cfg["dpo_keep"] == "best")
            engine = Engine(stage, scorer.model, settings, optimizer, str(folder),
                            tracker=StageTracker.for_trainer(self, "dpo"))
            n, generator, orders = len(pairs["chosen"]), torch.Generator().manual_seed(cfg["seed"]), {}

            def order(epoch: int) -> torch.Tensor:
                while len(orders) <= epoch:
                    orders[len(orders)] = torch.randperm(n, generator=generator)
                return orders[epoch]

            scorer.model.train()
            result = engine.fit(n, order)
            save_adapter(scorer.model, os.path.join(str(folder), "adapter"))
            return {"best_valid_ndcg@10_sample": result.best, "pairs": n, "steps": result.steps,
                    "hars": bool(cfg["hars"]), "nodo": bool(cfg["nodo"]), "history": result.history}

        def load(folder, info):
            load_adapter(scorer.model, os.path.join(str(folder), "adapter"))

        info, reused = self.stages.run("dpo", key, compute, load)
        scorer.model.eval()
        self.dpo_key = key
        self.curves["dpo"] = info.get("history") or []
        self.artifacts["dpo_adapter"] = str(self.stages.folder("dpo", key) / "adapter")
        shown = {"reused": True} if reused else {k: v for k, v in info.items() if k != "history"}
        self._stage("dpo", started, key=key, **shown)

    # ------------------------------------------------------------------------------- fit
    def run_stages(self, train_data, valid_data) -> None:
        """The retriever (full ranking only), SFT, then DPO for ``hanorec_stages: sft+dpo``."""
        if self.full_ranking:
            self.train_retriever()
        self.train_ranker(train_data, valid_data)
        if self.config["hanorec_stages"] == "sft+dpo":
            self.train_dpo(train_data, valid_data)

    def fit(self, train_data, valid_data=None, verbose=True, saved=True, show_progress=False, callback_fn=None):
        self.check_history_cap(valid_data)
        return super().fit(train_data, valid_data, verbose, saved, show_progress, callback_fn)

    # ------------------------------------------------------------------------ evaluation
    def evaluate(self, eval_data, load_best_model=True, model_file=None, show_progress=False):
        """Full ranking: PRIME's two evaluations. Sampled: RecBole's sampled evaluation of the ranker,
        with ``auc`` added."""
        if self.full_ranking:
            return super().evaluate(eval_data, load_best_model=False, show_progress=show_progress)
        started = time.perf_counter()
        if self.model.ranker is not None:
            self.model.ranker.model.eval()
        self._auc = [0.0, 0]
        result = Trainer.evaluate(self, eval_data, load_best_model=False, show_progress=show_progress)
        result["auc"] = round(self._auc[0] / self._auc[1], 4) if self._auc[1] else float("nan")
        self.logger.info(f"[HaNoRec] {self._phase}: {dict(result)}")
        self._stage(f"evaluate_{self._phase}", started, pairs=self._auc[1])
        return result

    def _neg_sample_batch_eval(self, batched_data):
        interaction, scores, positive_u, positive_i = super()._neg_sample_batch_eval(batched_data)
        correct, total = pair_auc(scores.detach().cpu(), positive_u.cpu(), positive_i.cpu())
        self._auc[0] += correct
        self._auc[1] += total
        return interaction, scores, positive_u, positive_i


class DPOStage:
    """The engine's stage for DPO: per batch of pairs, the reference's (adapter disabled, no grad)
    and the policy's (NoDO noise when ``nodo``) title log-likelihoods of chosen and rejected in one
    prompt-shared pass each, eta from the batch's reward gaps, beta_i = beta0 * eta * lambda_i
    (``hars``), and the mean DPO loss."""

    def __init__(self, scorer, pairs: dict, valid: RankerExamples, config, lambdas: torch.Tensor | None):
        from recbole_mm.model.hanorec_losses import Responsiveness

        self.scorer, self.pairs, self.valid, self.config, self.lambdas = scorer, pairs, valid, config, lambdas
        self.beta0 = float(config["dpo_beta"])
        self.sigma = float(config["nodo_sigma"]) if config["nodo"] else 0.0
        self.eta = Responsiveness()
        self.noise = torch.Generator().manual_seed(int(config["seed"]) + 3)

    def log_likelihoods(self, examples: RankerExamples, chosen, rejected) -> torch.Tensor:
        scored = torch.stack([chosen, rejected], dim=1)
        return self.scorer.candidate_log_likelihoods(examples.histories, examples.candidates, scored)[0]

    def loss(self, index: torch.Tensor, step: int) -> tuple[torch.Tensor, dict]:
        from recbole_mm.lmm.nodo import lora_noise
        from recbole_mm.model.hanorec_losses import dpo_loss, hanorec_betas, reward_gaps

        model = self.scorer.model
        part = self.pairs["examples"].subset(index)
        chosen, rejected = self.pairs["chosen"][index], self.pairs["rejected"][index]
        with torch.no_grad(), model.disable_adapter():
            ref = self.log_likelihoods(part, chosen, rejected)
        with lora_noise(model, self.sigma, self.noise):
            policy = self.log_likelihoods(part, chosen, rejected)
        gaps = reward_gaps(policy[:, 0], policy[:, 1], ref[:, 0], ref[:, 1], self.beta0)
        lambdas = None if self.lambdas is None else self.lambdas[index].to(policy.device)
        eta = self.eta(gaps) if lambdas is not None else 1.0
        beta = hanorec_betas(self.beta0, eta, lambdas)
        loss = dpo_loss(policy[:, 0], policy[:, 1], ref[:, 0], ref[:, 1], beta).mean()
        return loss, {"eta": eta, "beta": float(torch.as_tensor(beta).mean()),
                      "reward_acc": float((gaps > 0).float().mean())}

    def validate(self) -> dict:
        score = ranked_ndcg(self.scorer, self.valid, self.config["ranker_eval_batch_size"])
        self.scorer.model.train()
        return {"valid_ndcg@10": score}

    def weights(self) -> dict:
        return lora_state(self.scorer.model)

    def load_weights(self, weights: dict) -> None:
        params = dict(self.scorer.model.named_parameters())
        with torch.no_grad():
            for k, v in weights.items():
                params[k].copy_(v.to(params[k].device, params[k].dtype))
