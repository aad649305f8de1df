"""PRIME's stages: retriever, LMM ranker, two-stage full-ranking evaluation; resumable."""

from __future__ import annotations

import json
import time
from logging import getLogger

import torch
from recbole.trainer import Trainer
from recbole.utils import init_seed

from recbole_mm.files import dataset_fingerprint, fingerprint
from recbole_mm.lmm.defaults import LMM_BASE, model_yaml, shipped_defaults
from recbole_mm.trainer.checkpoint import atomic_save, plain_config, safe_load
from recbole_mm.trainer.distributed import barrier, from_rank0, rank, rank0_first, sum_over_processes
from recbole_mm.trainer.preference import PreferenceTrainer
from recbole_mm.trainer.ranker_training import RankerExamples, RankerTrainer, ranked_ndcg
from recbole_mm.trainer.stage_store import EVALUATION_ONLY_KEYS, StageKeys, StageRule, StageStore
from recbole_mm.trainer.tracking import StageTracker, peak_memory_mb

logger = getLogger(__name__)


def prime_stage_keys() -> StageKeys:
    """PRIME's stages and which of its settings (``_lmm.yaml`` + ``PRIME.yaml``) key each one.

    ``retriever*`` settings key stage 1 (with the retriever's own config); the LMM base yaml's keys
    and ``ranker_*``, ``lora_*``, ``prompt_*``, ``image_*`` key stage 2; ``pref_*`` and
    ``preference_optimization`` key stage 3. ``n_candidates`` (the retriever's Recall@k, the
    ranker's letters, stage 3's sets) and every key no rule matches key all three; ``seed`` and
    ``mask_history`` come from outside PRIME's yaml and key all three too.
    """
    return StageKeys(
        stages=("retriever", "ranker", "preference"),
        rules=[StageRule("retriever", prefixes=("retriever",)),
               StageRule("ranker", prefixes=("ranker_", "lora_", "prompt_", "image_"), keys=tuple(model_yaml(LMM_BASE))),
               StageRule("preference", prefixes=("pref_",), keys=("preference_optimization",))],
        keys=shipped_defaults("PRIME"),
        every_stage=("n_candidates", "train_neg_sample_args"),
        evaluation_only=("ranker_engine_args",),  # the layout over devices (DeepSpeed), like the device itself
        inputs=("seed", "mask_history"))


def prefix_filter(users: torch.Tensor, lengths: torch.Tensor, min_history: int) -> torch.Tensor:
    """Which training prefixes become ranker prompts: those with at least ``min_history`` history
    items, plus, for a user who has none, that user's longest prefix (one prompt per such user).
    ``min_history`` 4 is the reference code's rule (``dataloader/lmm.py:49-56``); 1 keeps every prefix."""
    users, lengths = torch.as_tensor(users).long(), torch.as_tensor(lengths).long()
    if min_history <= 1 or len(users) == 0:
        return torch.ones(len(users), dtype=torch.bool)
    longest = torch.zeros(int(users.max()) + 1, dtype=torch.long).scatter_reduce(0, users, lengths, "amax")
    return (lengths >= min_history) | ((lengths == longest[users]) & (longest[users] < min_history))


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
        #: which settings key each stage (by rule, see :func:`prime_stage_keys`)
        self.stage_keys = prime_stage_keys()
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
        self.logger.info(f"[{self.config['model']}] stage {name}: {json.dumps(entry, default=str)}")

    def stage_key(self, stage: str, *parts) -> str:
        """Fingerprint of ``stage``: its settings by rule (:attr:`stage_keys`), the data, ``parts``
        (the previous stage's key, the retriever's own config)."""
        return fingerprint(stage, *parts, self.stage_keys.settings(self.config, stage), dataset_fingerprint(self.config))

    def train_retriever(self):
        """Stage 1: train (or load) the retriever; returns the stage key."""
        from recbole_mm.trainer.standalone import sub_model_stage

        started = time.perf_counter()
        rconf = self.model.retriever_config
        settings = {k: v for k, v in plain_config(rconf, external_only=True).items() if k not in EVALUATION_ONLY_KEYS}
        key = self.stage_key("retriever", rconf["model"], settings, dataset_fingerprint(rconf))

        compute = sub_model_stage(rconf, self.model.retriever, self.config["retriever_checkpoint"], "retriever.pth",
                                  f"[{self.config['model']}] stage retriever:")
        info, reused = self.stages.run("retriever", key, compute)
        path = self.stages.folder("retriever", key) / "retriever.pth"
        self.model.retriever.load_state_dict(safe_load(str(path), map_location=self.device))
        self.artifacts["retriever"] = str(path)
        self.curves["retriever"] = info.get("epoch_log") or []
        shown = {"reused": True} if reused else {k: v for k, v in info.items() if k != "epoch_log"}
        self._stage("retriever", started, key=key, **shown)
        self.retriever_key = key
        return key

    def build_ranker(self, dataset):
        """The LMM ranker of a run: the backbone (:func:`~recbole_mm.lmm.backbone.build_backbone`:
        hub id, local folder, ``small``, GGUF; LoRA; reseeded; on this trainer's device) with PRIME's
        prompt template over the dataset's item store."""
        from recbole_mm.errors import UserError
        from recbole_mm.lmm.backbone import build_backbone
        from recbole_mm.lmm.candidate_ranker import LMMRanker
        from recbole_mm.lmm.prompts import LetteredJSONTemplate

        cfg = self.config
        store = getattr(dataset, "item_store", None)  # built by MultimodalSequentialDataset
        if store is None:
            raise UserError(f"PRIME needs the item side data of dataset {cfg['dataset']!r}: build the dataset with "
                            "recbole_mm.utils.create_dataset (MultimodalSequentialDataset), not RecBole's own")
        backbone = build_backbone(cfg, store, self.device)
        return LMMRanker(backbone, store, LetteredJSONTemplate.from_config(cfg), device=self.device)

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
        key = self.stage_key("ranker", self.retriever_key)
        with rank0_first(not self.config["single_spec"]):  # a built `small` model is written once
            ranker = self.build_ranker(train_data._dataset)
        folder = self.stages.folder("ranker", key)
        trainer = RankerTrainer(ranker, self.config, str(folder), tracker=StageTracker.for_trainer(self, "ranker"))

        def compute(folder):
            train, valid = self.training_examples(train_data, valid_data), self.validation_examples(valid_data)
            init_seed(self.config["seed"], self.config["reproducibility"])
            best = trainer.fit(train, valid, seed=self.config["seed"])
            return {"best_valid_ndcg@10_sample": best, "train_prompts": len(train), "valid_users": len(valid),
                    "trainable_share": ranker.backbone.trainable_share, "history": trainer.history}

        def load(folder, info):
            trainer.load_adapter()  # peft's folder, out_dir/adapter

        info, reused = self.run_stage("ranker", key, compute, load)
        self.curves["ranker"] = info.get("history") or []
        ranker.model.eval()
        self.model.ranker = ranker
        self.ranker_key = key
        self.artifacts["ranker_adapter"] = str(folder / "adapter")
        shown = {"reused": True} if reused else {k: v for k, v in info.items() if k != "history"}
        self._stage("ranker", started, key=key, **shown)

    def preference_validation(self, valid_data) -> dict:
        """Two-stage NDCG@10 (full ranking) and the retriever's Recall@k on ``pref_valid_users``."""
        examples = self.validation_examples(valid_data, users=self.config["pref_valid_users"])
        score = ranked_ndcg(self.model.ranker, examples, self.config["ranker_eval_batch_size"])
        recall = float((examples.answer_pos >= 0).float().mean())
        return {"score": score, "ndcg@10": score, f"retriever_recall@{self.config['n_candidates']}": recall}

    def optimize_retriever(self, train_data, valid_data):
        """Stage 3: online preference optimization of the retriever (or load its result)."""
        started = time.perf_counter()
        key = self.stage_key("preference", self.ranker_key)

        def compute(folder):
            init_seed(self.config["seed"], self.config["reproducibility"])  # as for stage 2
            trainer = PreferenceTrainer(self.model, self.config, str(folder),
                                        validate=lambda: self.preference_validation(valid_data),
                                        tracker=StageTracker.for_trainer(self, "preference"))
            history = getattr(train_data, "prefix_history", None) if self.config["mask_history"] else None
            info = trainer.fit(train_data._dataset, self.device, history=history,
                               positions=getattr(train_data, "prefix_positions", None))
            if rank() == 0:
                atomic_save(self.model.retriever.state_dict(), str(folder / "retriever.pth"))
            return info

        info, reused = self.run_stage("preference", key, compute)
        path = self.stages.folder("preference", key) / "retriever.pth"
        self.model.retriever.load_state_dict(safe_load(str(path), map_location=self.device))
        self.artifacts["retriever_refined"] = str(path)
        self.curves["preference"] = info.get("history") or []
        self._stage("preference", started, key=key, **({"reused": True, **info} if reused else info))

    def run_stage(self, stage: str, key: str, compute, load=None) -> tuple[dict, bool]:
        """:meth:`StageStore.run`; in a process group every process computes an unfinished stage (the
        engine's DDP needs all of them) and rank 0 alone stores it (``done.json``; the stage's own
        writes are rank 0's too), or every process reuses a finished one."""
        if self.config["single_spec"]:
            return self.stages.run(stage, key, compute, load)
        barrier()  # nobody is writing this stage: every process takes rank 0's answer to "finished?"
        finished = from_rank0(self.stages.done(stage, key) is not None)
        if rank() == 0 or finished:
            result = self.stages.run(stage, key, compute, load)
        else:
            result = compute(self.stages.folder(stage, key)), False
        barrier()
        return result

    def run_stages(self, train_data, valid_data) -> None:
        """Train (or reuse) every stage: the retriever (rank 0 first), the ranker, and stage 3 if asked."""
        with rank0_first(not self.config["single_spec"]):
            self.train_retriever()
        self.train_ranker(train_data, valid_data)
        if self.config["preference_optimization"]:
            self.optimize_retriever(train_data, valid_data)

    def fit(self, train_data, valid_data=None, verbose=True, saved=True, show_progress=False, callback_fn=None):
        """Stages 1-3, then the two-stage validation. In a process group (``run_recbole_mm.py --nproc``,
        ``torchrun``): rank 0 trains (or reuses) the retriever alone while the others wait, then they
        reuse it; stages 2 and 3 run on every process through the engine (DDP), rank 0 alone storing
        their artefacts (:meth:`run_stage`); the evaluations are sharded by users and gathered."""
        self.saved_model_file = None  # PRIME's weights are its stage artefacts (see extra_results)
        try:
            self.run_stages(train_data, valid_data)
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
        if not self.config["single_spec"]:  # every process ranked its own users
            self._ranked_rows = int(sum_over_processes(self._ranked_rows))
        self.logger.info(f"[{self.config['model']}] {self._phase}: retriever alone {dict(self.retriever_results[self._phase])}")
        self.logger.info(f"[{self.config['model']}] {self._phase}: retriever + ranker {dict(result)}")
        self._stage(f"evaluate_{self._phase}", started, ranked_users=self._ranked_rows,
                    **({} if self.config["single_spec"] else {"processes": self.config["world_size"]}))
        return result

    def _full_sort_batch_eval(self, batched_data):
        interaction, history_index, positive_u, positive_i = batched_data
        interaction = interaction.to(self.device)
        if self._mode != "composed":
            return interaction, self.model.retriever_scores(interaction, history_index), positive_u, positive_i
        only_hits = self.config["rank_only_hits"] and max(self.config["topk"]) <= self.model.n_candidates
        scores, ranked = self.model.two_stage_scores(interaction, history_index, positive_i if only_hits else None,
                                                     self.config["ranker_eval_batch_size"])
        self._ranked_rows += ranked
        return interaction, scores, positive_u, positive_i

    def extra_results(self) -> dict:
        return {"retriever_valid_result": dict(self.retriever_results.get("valid", {})),
                "retriever_test_result": dict(self.retriever_results.get("test", {})),
                "stages": self.stage_log, "artifacts": self.artifacts, "curves": self.curves}
