"""ALMOSTREC's stages: the embedding model (trained once through the stage store, or loaded from a
checkpoint), then LoRA + W_B + W_T on the training engine; evaluation is RecBole's full ranking."""

from __future__ import annotations

import json
import time
from logging import getLogger

import torch
from recbole.trainer import Trainer

from recbole_mm.files import dataset_fingerprint, fingerprint
from recbole_mm.lmm.candidate_ranker import ndcg_at
from recbole_mm.lmm.defaults import LMM_BASE, model_yaml, shipped_defaults
from recbole_mm.trainer.checkpoint import plain_config, safe_load
from recbole_mm.trainer.ranker_training import lora_state
from recbole_mm.trainer.stage_store import EVALUATION_ONLY_KEYS, StageKeys, StageRule, StageStore
from recbole_mm.trainer.tracking import peak_memory_mb

logger = getLogger(__name__)


def almostrec_stage_keys() -> StageKeys:
    """ALMOSTREC's stages and which of its settings (``_lmm.yaml`` + ``ALMOSTREC.yaml``) key each.

    ``almost_base*`` key stage ``base`` (the embedding model; its own config, with the run's shared
    data settings, is in the key as well); the LMM base yaml's keys, ``ranker_*``, ``lora_*``,
    ``prompt_*``, ``image_*`` and the other ``almost_*`` key stage ``head`` (which is retrained on
    every run; its key is logged). Every key no rule matches keys both (a new setting retrains the
    base rather than reusing it); ``almost_eval_batch_size``, ``almost_log_every`` and
    ``almost_image_cache`` (speed and logging only) key neither.
    """
    return StageKeys(
        stages=("base", "head"),
        rules=[StageRule("base", prefixes=("almost_base",)),
               StageRule("head", prefixes=("almost_", "ranker_", "lora_", "prompt_", "image_"),
                         keys=(*model_yaml(LMM_BASE), "train_neg_sample_args"))],
        keys=shipped_defaults("ALMOSTREC"),
        evaluation_only=("almost_eval_batch_size", "almost_log_every", "almost_image_cache"),
        inputs=("seed",))


class ALMOSTRECTrainer(Trainer):
    """Stage 1 (``base``): the embedding model, trained as a standalone run or loaded from
    ``almost_base_checkpoint``, reused while its settings and the data are unchanged. Stage 2: the
    engine trains LoRA, W_B and W_T on the training prefixes (``almost_train_positions``, capped by
    ``almost_train_examples``), keeping the best NDCG@10 on ``almost_valid_users`` validation rows."""

    def __init__(self, config, model):
        super().__init__(config, model)
        self.stages = StageStore(config["artifacts_dir"])
        #: which settings key each stage (by rule, see :func:`almostrec_stage_keys`)
        self.stage_keys = almostrec_stage_keys()
        self.stage_log: dict[str, dict] = {}
        self.history: list[dict] = []
        self._train = self._valid = None

    def _stage(self, name: str, started: float, **info):
        entry = {"wall_s": time.perf_counter() - started, **peak_memory_mb(), **info}
        self.stage_log[name] = entry
        self.logger.info(f"[ALMOSTREC] stage {name}: {json.dumps(entry, default=str)}")

    def train_base(self) -> str:
        """Stage 1: train (or load) the embedding model; its weights go into ``model.base``."""
        from recbole_mm.trainer.standalone import sub_model_stage

        started = time.perf_counter()
        bconf = self.model.base_config
        settings = {k: v for k, v in plain_config(bconf, external_only=True).items() if k not in EVALUATION_ONLY_KEYS}
        key = fingerprint("base", bconf["model"], settings, self.stage_keys.settings(self.config, "base"),
                          dataset_fingerprint(bconf))

        compute = sub_model_stage(bconf, self.model.base, self.config["almost_base_checkpoint"], "base.pth",
                                  "[ALMOSTREC] stage base:")
        info, reused = self.stages.run("base", key, compute)
        path = self.stages.folder("base", key) / "base.pth"
        self.model.base.load_state_dict(safe_load(str(path), map_location=self.device))
        self.model.base.requires_grad_(False)
        shown = {"reused": True} if reused else {k: v for k, v in info.items() if k != "epoch_log"}
        self._stage("base", started, key=key, **shown)
        return key

    @staticmethod
    def _rows(data, fields) -> dict:
        """Every row of a RecBole data loader's dataset, as tensors of ``fields``."""
        inter = data.dataset.inter_feat if hasattr(data, "dataset") else data._dataset.inter_feat
        return {f: inter[f] for f in fields}

    def training_rows(self, train_data) -> dict:
        m = self.model
        rows = self._rows(train_data, (m.USER_ID, m.ITEM_SEQ, m.ITEM_SEQ_LEN, m.POS_ITEM_ID))
        keep = torch.arange(len(rows[m.USER_ID]))
        if self.config["almost_train_positions"] == "last":
            users, lengths = rows[m.USER_ID], rows[m.ITEM_SEQ_LEN]
            best = {}
            for i, (u, n) in enumerate(zip(users.tolist(), lengths.tolist())):
                if u not in best or n >= lengths[best[u]]:
                    best[u] = i
            keep = torch.tensor(sorted(best.values()))
        elif self.config["almost_train_positions"] != "all":
            from recbole_mm.errors import ConfigError

            raise ConfigError(f"almost_train_positions={self.config['almost_train_positions']!r}: use all or last")
        cap = self.config["almost_train_examples"]
        if cap and cap < len(keep):
            generator = torch.Generator().manual_seed(self.config["seed"])
            keep = keep[torch.randperm(len(keep), generator=generator)[:cap]].sort().values
        return {k: v[keep] for k, v in rows.items()}

    def validation_rows(self, valid_data) -> dict:
        m = self.model
        rows = self._rows(valid_data, (m.ITEM_SEQ, m.ITEM_SEQ_LEN, m.POS_ITEM_ID))
        cap = self.config["almost_valid_users"]
        n = len(rows[m.ITEM_SEQ])
        if cap and cap < n:
            keep = torch.randperm(n, generator=torch.Generator().manual_seed(self.config["seed"]))[:cap]
            rows = {k: v[keep] for k, v in rows.items()}
        return rows

    # the engine's Stage
    def loss(self, index: torch.Tensor, step: int):
        from recbole.data.interaction import Interaction

        part = Interaction({k: v[index] for k, v in self._train.items()}).to(self.device)
        return self.model.calculate_loss(part), {}

    @torch.no_grad()
    def validate(self) -> dict:
        from recbole.data.interaction import Interaction

        m, rows = self.model, self._valid
        m.eval()
        bs, total, n = self.config["almost_eval_batch_size"], 0.0, len(rows[m.ITEM_SEQ])
        for s in range(0, n, bs):
            part = Interaction({k: v[s:s + bs] for k, v in rows.items()}).to(self.device)
            scores = m.full_sort_predict(part)
            scores[:, 0] = -torch.inf
            total += float(ndcg_at(scores, part[m.POS_ITEM_ID]).sum())
        m.train()
        return {"valid_ndcg@10": total / max(1, n)}

    def weights(self) -> dict:
        return lora_state(self.model)  # every trainable tensor: LoRA, W_B, W_T

    def load_weights(self, weights: dict) -> None:
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for k, v in weights.items():
                params[k].copy_(v.to(params[k].device, params[k].dtype))

    def train_head(self, train_data, valid_data) -> float:
        """Stage 2: LoRA, W_B and W_T on the engine; the best weights stay loaded."""
        from recbole_mm.trainer.engine import Engine, EngineSettings
        from recbole_mm.trainer.ranker_training import make_optimizer

        started, cfg = time.perf_counter(), self.config
        self._train, self._valid = self.training_rows(train_data), self.validation_rows(valid_data)
        n = len(self._train[self.model.ITEM_SEQ])
        optimizer = make_optimizer(self.model.trainable_parameters(), "adamw", cfg["almost_learning_rate"],
                                   cfg["almost_weight_decay"])
        settings = EngineSettings(
            name="almostrec", batch_size=cfg["almost_batch_size"], grad_accum=cfg["almost_grad_accum"],
            epochs=cfg["almost_epochs"], max_grad_norm=cfg["almost_max_grad_norm"], schedule="cosine",
            warmup_steps=cfg["almost_warmup_steps"], valid_every=cfg["almost_valid_every"],
            patience=cfg["almost_patience"], log_every=cfg["almost_log_every"], seed=cfg["seed"],
            score_key="valid_ndcg@10", tag="[ALMOSTREC]", show_progress=bool(cfg["show_progress"]))
        out_dir = str(self.stages.root / "engine")
        engine = Engine(self, self.model, settings, optimizer, out_dir)
        generator = torch.Generator().manual_seed(cfg["seed"])
        orders: dict[int, torch.Tensor] = {}

        def order(epoch: int) -> torch.Tensor:
            while len(orders) <= epoch:
                orders[len(orders)] = torch.randperm(n, generator=generator)
            return orders[epoch]

        self.model.train()
        result = engine.fit(n, order)
        self.history = result.history
        self._train = self._valid = None
        self._stage("head", started, examples=n, steps=result.steps, best_valid_ndcg10=result.best,
                    train_s_per_example=(time.perf_counter() - started) / max(1, n * cfg["almost_epochs"]))
        return result.best

    def fit(self, train_data, valid_data=None, verbose=True, saved=True, show_progress=False, callback_fn=None):
        self.saved_model_file = None  # ALMOSTREC's weights: the stage artefact (base) + this process's head
        try:
            base = self.train_base()
            self.train_head(train_data, valid_data)
            self.stage_log["head"]["key"] = fingerprint("head", base, self.stage_keys.settings(self.config, "head"))
        except BaseException:
            self.stages.remove_unfinished_empty()
            raise
        result = self.evaluate(valid_data, load_best_model=False, show_progress=show_progress)
        self.best_valid_result, self.best_valid_score = result, result[self.valid_metric]
        return self.best_valid_score, result

    def evaluate(self, eval_data, load_best_model=True, model_file=None, show_progress=False):
        started = time.perf_counter()
        result = super().evaluate(eval_data, load_best_model=False, show_progress=show_progress)
        users = len(eval_data.dataset.inter_feat) if hasattr(eval_data, "dataset") else None
        self._stage("evaluate", started, users=users,
                    eval_s_per_user=(time.perf_counter() - started) / users if users else None)
        return result

    def extra_results(self) -> dict:
        return {"stages": self.stage_log, "curves": {"head": self.history}}
