"""PRIME's stages: retriever, LMM ranker, two-stage full-ranking evaluation; resumable."""

from __future__ import annotations

import json
import os
import time

import torch
from recbole.trainer import Trainer
from recbole.utils import init_seed

from recbole_mm.trainer.stage_store import StageStore
from recbole_mm.files import dataset_fingerprint, fingerprint
from recbole_mm.trainer.checkpoint import atomic_save, checkpoint_entries, load_model_state, plain_config, safe_load
from recbole_mm.trainer.preference import PREFERENCE_KEYS, PreferenceTrainer
from recbole_mm.trainer.ranker_training import RankerExamples, RankerTrainer, ranked_ndcg
from recbole_mm.trainer.tracking import StageTracker, peak_memory_mb

RANKER_KEYS = ("ranker_model", "ranker_small", "ranker_quantization", "ranker_dtype", "lora_r", "lora_alpha",
               "lora_dropout", "prompt_variant", "prompt_domain", "max_history_items", "attr_max_tokens",
               "image_min_pixels", "image_max_pixels", "ranker_negatives", "ranker_train_examples",
               "ranker_valid_users", "ranker_learning_rate", "ranker_epochs", "ranker_batch_size",
               "ranker_grad_accum", "ranker_warmup_steps", "ranker_valid_every", "ranker_patience",
               "n_candidates", "seed", "mask_history", "ranker_min_history", "ranker_negative_counts",
               "ranker_optimizer", "ranker_weight_decay", "ranker_max_grad_norm", "prompt_text", "ranker_loss_tokens")
# settings that change what is reported, never the trained weights: not part of a stage's key
EVALUATION_ONLY_KEYS = ("metrics", "topk", "eval_batch_size", "show_progress", "state", "checkpoint_dir")


def prefix_filter(users: torch.Tensor, lengths: torch.Tensor, min_history: int) -> torch.Tensor:
    """Which training prefixes become ranker prompts: those with at least ``min_history`` history
    items, plus, for a user who has none, that user's longest prefix (one prompt per such user).
    ``min_history`` 4 is the reference code's rule (``dataloader/lmm.py:49-56``); 1 keeps every prefix."""
    users, lengths = torch.as_tensor(users).long(), torch.as_tensor(lengths).long()
    if min_history <= 1 or len(users) == 0:
        return torch.ones(len(users), dtype=torch.bool)
    longest = torch.zeros(int(users.max()) + 1, dtype=torch.long).scatter_reduce(0, users, lengths, "amax")
    return (lengths >= min_history) | ((lengths == longest[users]) & (longest[users] < min_history))


def loss_newline(name: str) -> bool:
    """``ranker_loss_tokens``: ``letter_end`` (ours) or ``letter_end_newline`` (the reference code's
    loss also covers the newline after the end-of-turn token, ``trainer/lmm.py:69-70``)."""
    from recbole_mm.errors import ConfigError

    if name not in ("letter_end", "letter_end_newline"):
        raise ConfigError(f"ranker_loss_tokens={name!r}: choose letter_end or letter_end_newline")
    return name == "letter_end_newline"


def popularity_counts(train, valid, seq_field: str, len_field: str, target_field: str) -> torch.Tensor:
    """The reference code's negative-sampling counts (``dataloader/lmm.py:59-71``): 1 for every item,
    plus its occurrences in every user's training sequence and validation item; 0 for padding.
    From RecBole's splits: training targets, each user's first item (the input of the 1-item
    prefix) and the validation targets."""
    n = int(train.item_num)
    feat = train.inter_feat
    first = feat[seq_field][feat[len_field] == 1][:, 0]
    items = torch.cat([feat[target_field], first, valid.inter_feat[target_field]]).long()
    counts = torch.bincount(items, minlength=n)[:n] + 1
    counts[0] = 0
    return counts


class PRIMETrainer(Trainer):
    """Trains :class:`~recbole_mm.model.prime.PRIME` stage by stage and evaluates it two ways.

    Stage 1 trains the retriever exactly as a standalone run would (or loads
    ``retriever_checkpoint``); stage 2 trains the LMM ranker on prompts built from every training
    prefix (capped by ``ranker_train_examples``) with the answer among sampled negatives; stage 3
    (``preference_optimization``) refines the retriever from the frozen ranker's judgements of
    candidate sets sampled from it (:class:`~recbole_mm.trainer.preference.PreferenceTrainer`). Each
    stage's result is stored under ``artifacts_dir`` keyed by its settings and the data, and a
    re-run with the same settings loads it instead of recomputing. ``evaluate`` reports the
    retriever alone (``retriever_results``) and the two-stage ranking (its return value).
    """

    def __init__(self, config, model):
        super().__init__(config, model)
        self.stages = StageStore(config["artifacts_dir"])
        self.stage_log: dict[str, dict] = {}
        self.retriever_results: dict[str, dict] = {}
        self._mode, self._phase = "composed", "test"
        self.retriever_key = None
        self.ranker_key = None
        self.artifacts: dict[str, str] = {}
        #: validation curves per stage (retriever epochs, ranker and preference steps), for reports
        self.curves: dict[str, list] = {}

    # ----------------------------------------------------------------------------- stages
    def _stage(self, name: str, started: float, **info):
        entry = {"wall_s": time.perf_counter() - started, **peak_memory_mb(), **info}
        self.stage_log[name] = entry
        self.logger.info(f"[PRIME] stage {name}: {json.dumps(entry, default=str)}")

    def train_retriever(self):
        """Stage 1: train (or load) the retriever; returns the stage key."""
        from recbole_mm.trainer.standalone import train_and_test

        started = time.perf_counter()
        rconf = self.model.retriever_config
        settings = {k: v for k, v in plain_config(rconf, external_only=True).items() if k not in EVALUATION_ONLY_KEYS}
        key = fingerprint("retriever", rconf["model"], settings, dataset_fingerprint(rconf),
                          self.config["retriever_checkpoint"])
        path = self.stages.folder("retriever", key) / "retriever.pth"
        done = self.stages.done("retriever", key)
        if done:
            self.logger.info(f"[PRIME] stage retriever: reusing {path}")
            info = {"reused": True}
        elif self.config["retriever_checkpoint"]:
            ckpt = self.config["retriever_checkpoint"]
            state = checkpoint_entries(safe_load(ckpt, map_location="cpu"), ckpt)["state_dict"]
            load_model_state(self.model.retriever, state, ckpt)  # a checkpoint of another model/dataset: one line
            atomic_save(state, str(path))
            info = {"loaded_from": self.config["retriever_checkpoint"]}
            self.stages.finish("retriever", key, info)
        else:
            self.logger.info(f"[PRIME] stage retriever: training {rconf['model']}")
            result, _, _ = train_and_test(rconf, saved=True)
            atomic_save(safe_load(result["saved_model_file"], map_location="cpu")["state_dict"], str(path))
            info = {k: result.get(k) for k in ("best_valid_result", "test_result", "epochs_run", "best_epoch",
                                               "time_per_epoch_s", "total_time_s", "epoch_log")}
            info["valid_metric"] = rconf["valid_metric"]
            self.stages.finish("retriever", key, info)
        self.model.retriever.load_state_dict(safe_load(str(path), map_location=self.device))
        self.artifacts["retriever"] = str(path)
        self.curves["retriever"] = (done or info).get("epoch_log") or []
        self._stage("retriever", started, key=key, **{k: v for k, v in info.items() if k != "epoch_log"})
        self.retriever_key = key
        return key

    def build_ranker(self, dataset):
        """Load the LMM backbone (building the small local model if asked) with LoRA."""
        from recbole_mm.data.item_store import ItemStore
        from recbole_mm.lmm.backbone import BackboneSettings, load_backbone
        from recbole_mm.lmm.prompts import PromptSettings, prompt_text_settings
        from recbole_mm.lmm.candidate_ranker import LMMRanker

        cfg = self.config
        store = ItemStore.from_recbole(cfg, dataset, min_pixels=cfg["image_min_pixels"],
                                       max_pixels=cfg["image_max_pixels"])
        name = cfg["ranker_model"]
        if name == "small":
            from recbole_mm.lmm.tiny_models import build_tiny_vlm

            texts = [json.dumps(store.attributes(i), ensure_ascii=False) for i in range(1, len(store))]
            folder = os.path.join(cfg["artifacts_dir"], f"small-vlm-{fingerprint(cfg['ranker_small'], texts)}")
            name = build_tiny_vlm(folder, texts, seed=cfg["seed"], min_pixels=cfg["image_min_pixels"],
                                   max_pixels=cfg["image_max_pixels"], **cfg["ranker_small"])
        # reseed: LoRA's initial weights (and, in train_ranker, training) must depend on the stage key
        # only, not on whether stage 1 trained or the small model was built in this process
        init_seed(cfg["seed"], cfg["reproducibility"])
        backbone = load_backbone(BackboneSettings(
            name_or_path=name, quantization=cfg["ranker_quantization"], dtype=cfg["ranker_dtype"],
            lora_r=cfg["lora_r"], lora_alpha=cfg["lora_alpha"], lora_dropout=cfg["lora_dropout"],
            trust_remote_code=cfg["trust_remote_code"], gradient_checkpointing=cfg["gradient_checkpointing"],
            min_pixels=cfg["image_min_pixels"], max_pixels=cfg["image_max_pixels"],
            cache_dir=cfg["artifacts_dir"]))
        if cfg["ranker_quantization"] != "4bit" and not getattr(backbone.model, "is_loaded_in_4bit", False):
            backbone.model.to(self.device)
        settings = PromptSettings(max_history=cfg["max_history_items"], attr_max_tokens=cfg["attr_max_tokens"],
                                  variant=cfg["prompt_variant"], domain=cfg["prompt_domain"],
                                  **prompt_text_settings(cfg["prompt_text"]))
        return LMMRanker(backbone, store, settings, device=self.device,
                         loss_newline=loss_newline(cfg["ranker_loss_tokens"]))

    def training_examples(self, train_data, valid_data=None) -> RankerExamples:
        """One prompt per training prefix with at least ``ranker_min_history`` history items (capped):
        the answer among k-1 sampled negatives (popularity from ``ranker_negative_counts``; its
        ``train_valid_plus_one`` needs ``valid_data``)."""
        from recbole_mm.errors import ConfigError
        from recbole_mm.sampler.ranker_negatives import RankerNegativeSampler, training_candidates

        dataset = train_data._dataset
        generator = torch.Generator().manual_seed(self.config["seed"])
        rows = torch.nonzero(prefix_filter(dataset.inter_feat[dataset.uid_field],
                                           dataset.inter_feat[self.model.ITEM_SEQ_LEN],
                                           self.config["ranker_min_history"])).squeeze(1)
        cap = self.config["ranker_train_examples"]
        if cap and cap < len(rows):
            rows = rows[torch.randperm(len(rows), generator=generator)[:cap]]
        feat = dataset.inter_feat[rows]
        answers = feat[self.model.POS_ITEM_ID]
        source = self.config["ranker_negative_counts"]
        if source not in ("train", "train_valid_plus_one"):
            raise ConfigError(f"ranker_negative_counts={source!r}: choose train or train_valid_plus_one")
        counts = None
        if source == "train_valid_plus_one":
            if valid_data is None:
                raise ConfigError("ranker_negative_counts='train_valid_plus_one' needs the validation split")
            counts = popularity_counts(dataset, valid_data._dataset, self.model.ITEM_SEQ, self.model.ITEM_SEQ_LEN,
                                       self.model.POS_ITEM_ID)
        sampler = RankerNegativeSampler(dataset, distribution=self.config["ranker_negatives"], counts=counts)
        negatives = sampler.sample(answers, self.config["n_candidates"] - 1)
        candidates, answer_pos = training_candidates(answers, negatives, generator)
        return RankerExamples(self.model.histories(feat), candidates, answer_pos)

    @torch.no_grad()
    def validation_examples(self, valid_data, users: int | None = -1) -> RankerExamples:
        """A sample of validation users (``ranker_valid_users`` unless given; ``None``: all) with the
        retriever's top-k as candidates."""
        from recbole_mm.sampler.ranker_negatives import retriever_candidates

        dataset = valid_data._dataset
        generator = torch.Generator().manual_seed(self.config["seed"] + 1)
        users = self.config["ranker_valid_users"] if users == -1 else users
        rows = torch.randperm(len(dataset), generator=generator)[:users]
        feat = dataset.inter_feat[rows]
        answers = feat[self.model.POS_ITEM_ID]
        # the run's mask_history: the user's earlier items (never the answer) are not candidates
        history = getattr(valid_data, "history", None) if self.config["mask_history"] else None
        self.model.eval()
        scores = []
        for i in range(0, len(feat), 512):
            part = feat[i:i + 512]
            masked = None
            if history is not None:
                masked = history.earlier_items(part, self.model.ITEM_SEQ, self.model.USER_ID, answers[i:i + 512])
            scores.append(self.model.retriever_scores(part.to(self.device), masked).cpu())
        scores = torch.cat(scores)
        candidates = retriever_candidates(scores, self.config["n_candidates"])
        match = candidates == answers.unsqueeze(1)
        answer_pos = torch.where(match.any(1), match.float().argmax(1), torch.full_like(answers, -1))
        return RankerExamples(self.model.histories(feat), candidates, answer_pos)

    def train_ranker(self, train_data, valid_data):
        """Stage 2: train (or load) the LMM ranker and attach it to the model."""
        started = time.perf_counter()
        key = fingerprint("ranker", self.retriever_key, {k: self.config[k] for k in RANKER_KEYS},
                          dataset_fingerprint(self.config))
        folder = self.stages.folder("ranker", key)
        ranker = self.build_ranker(train_data._dataset)
        done = self.stages.done("ranker", key)
        trainer = RankerTrainer(ranker, self.config, str(folder), tracker=StageTracker.for_trainer(self, "ranker"))
        if done:
            self.logger.info(f"[PRIME] stage ranker: reusing {folder / 'adapter'}")
            trainer.load_adapter()  # peft's folder, out_dir/adapter
            info = {"reused": True}
        else:
            train, valid = self.training_examples(train_data, valid_data), self.validation_examples(valid_data)
            init_seed(self.config["seed"], self.config["reproducibility"])
            best = trainer.fit(train, valid, seed=self.config["seed"])
            info = {"best_valid_ndcg@10_sample": best, "train_prompts": len(train), "valid_users": len(valid),
                    "trainable_share": ranker.backbone.trainable_share, "history": trainer.history}
            self.stages.finish("ranker", key, info)
        self.curves["ranker"] = (done or info).get("history") or []
        ranker.model.eval()
        self.model.ranker = ranker
        self.ranker_key = key
        self.artifacts["ranker_adapter"] = str(folder / "adapter")
        self._stage("ranker", started, key=key, **{k: v for k, v in info.items() if k != "history"})

    def preference_validation(self, valid_data) -> dict:
        """Two-stage NDCG@10 (full ranking) and the retriever's Recall@k on ``pref_valid_users``."""
        examples = self.validation_examples(valid_data, users=self.config["pref_valid_users"])
        score = ranked_ndcg(self.model.ranker, examples, self.config["ranker_eval_batch_size"])
        recall = float((examples.answer_pos >= 0).float().mean())
        return {"score": score, "ndcg@10": score, f"retriever_recall@{self.config['n_candidates']}": recall}

    def optimize_retriever(self, train_data, valid_data):
        """Stage 3: online preference optimization of the retriever (or load its result)."""
        started = time.perf_counter()
        key = fingerprint("preference", self.ranker_key, {k: self.config[k] for k in PREFERENCE_KEYS},
                          dataset_fingerprint(self.config))
        folder = self.stages.folder("preference", key)
        path = folder / "retriever.pth"
        done = self.stages.done("preference", key)
        if done:
            self.logger.info(f"[PRIME] stage preference: reusing {path}")
            info = {"reused": True, **done}
        else:
            init_seed(self.config["seed"], self.config["reproducibility"])  # as for stage 2
            trainer = PreferenceTrainer(self.model, self.config, str(folder),
                                        validate=lambda: self.preference_validation(valid_data),
                                        tracker=StageTracker.for_trainer(self, "preference"))
            history = getattr(train_data, "prefix_history", None) if self.config["mask_history"] else None
            info = trainer.fit(train_data._dataset, self.device, history=history,
                               positions=getattr(train_data, "prefix_positions", None))
            atomic_save(self.model.retriever.state_dict(), str(path))
            self.stages.finish("preference", key, info)
        self.model.retriever.load_state_dict(safe_load(str(path), map_location=self.device))
        self.artifacts["retriever_refined"] = str(path)
        self.curves["preference"] = info.get("history") or []
        self._stage("preference", started, key=key, **info)

    def fit(self, train_data, valid_data=None, verbose=True, saved=True, show_progress=False, callback_fn=None):
        self.saved_model_file = None  # PRIME's weights are its stage artefacts (see extra_results)
        try:
            self.train_retriever()
            self.train_ranker(train_data, valid_data)
            if self.config["preference_optimization"]:
                self.optimize_retriever(train_data, valid_data)
        except BaseException:
            self.stages.remove_unfinished_empty()  # a stage that failed early leaves no empty folder
            raise
        self._phase = "valid"
        result = self.evaluate(valid_data, load_best_model=False, show_progress=show_progress)
        self._phase = "test"
        self.best_valid_result = result
        self.best_valid_score = result[self.valid_metric]
        return self.best_valid_score, result

    # ------------------------------------------------------------------------ evaluation
    def evaluate(self, eval_data, load_best_model=True, model_file=None, show_progress=False):
        """Retriever alone, then retriever + ranker; returns the two-stage result."""
        started = time.perf_counter()
        if self.model.ranker is not None:
            self.model.ranker.model.eval()
        self._mode = "retriever"
        self.retriever_results[self._phase] = super().evaluate(eval_data, load_best_model=False,
                                                              show_progress=show_progress)
        self._mode, self._ranked_rows = "composed", 0  # RecBole's evaluate shows the tqdm bar (show_progress)
        result = super().evaluate(eval_data, load_best_model=False, show_progress=show_progress)
        self.logger.info(f"[PRIME] {self._phase}: retriever alone {dict(self.retriever_results[self._phase])}")
        self.logger.info(f"[PRIME] {self._phase}: retriever + ranker {dict(result)}")
        self._stage(f"evaluate_{self._phase}", started, ranked_users=self._ranked_rows)
        return result

    def _full_sort_batch_eval(self, batched_data):
        interaction, history_index, positive_u, positive_i = batched_data
        interaction = interaction.to(self.device)
        scores = self.model.retriever_scores(interaction, history_index)
        if self._mode == "composed" and self.model.ranker is not None:
            k = self.model.n_candidates
            candidates = torch.topk(scores, k, dim=1).indices
            rows = torch.arange(len(scores), device=scores.device)
            if self.config["rank_only_hits"] and max(self.config["topk"]) <= k:
                # users whose answer is not a candidate score 0 at every cutoff <= k whatever the
                # ranker does, so ranking them cannot change any reported metric
                rows = torch.nonzero((candidates.cpu() == positive_i.unsqueeze(1)).any(1)).squeeze(1).to(scores.device)
            ranked = []
            bs = self.config["ranker_eval_batch_size"]
            for start in range(0, len(rows), bs):
                part = rows[start:start + bs]
                ranked.append(self.model.ranker.score(self.model.histories(interaction, part), candidates[part].cpu()))
            ranker_scores = torch.cat(ranked).to(scores.device) if ranked else scores.new_zeros(0, k)
            scores = self.model.compose(scores, candidates, rows, ranker_scores)
            self._ranked_rows += len(rows)
        return interaction, scores, positive_u, positive_i

    def extra_results(self) -> dict:
        return {"retriever_valid_result": dict(self.retriever_results.get("valid", {})),
                "retriever_test_result": dict(self.retriever_results.get("test", {})),
                "stages": self.stage_log, "artifacts": self.artifacts, "curves": self.curves}
