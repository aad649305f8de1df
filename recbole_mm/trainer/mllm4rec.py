"""MLLM4Rec's stages: PRIME's retriever and ranker stages with the role-play template; no stage 3."""

from __future__ import annotations

from logging import getLogger

from recbole_mm.errors import ConfigError, UserError
from recbole_mm.lmm.defaults import LMM_BASE, model_yaml, shipped_defaults
from recbole_mm.trainer.prime import PRIMETrainer
from recbole_mm.trainer.stage_store import StageKeys, StageRule

logger = getLogger(__name__)


def mllm4rec_stage_keys() -> StageKeys:
    """MLLM4Rec's two stages and the settings that key each (as :func:`prime_stage_keys`, plus the
    prompt's ``caption_source`` and ``role_play`` for the ranker)."""
    return StageKeys(
        stages=("retriever", "ranker"),
        rules=[StageRule("retriever", prefixes=("retriever",)),
               StageRule("ranker", prefixes=("ranker_", "lora_", "prompt_", "image_", "caption_"),
                         keys=(*model_yaml(LMM_BASE), "role_play"))],
        keys=shipped_defaults("MLLM4Rec"),
        every_stage=("n_candidates", "train_neg_sample_args", "preference_optimization"),
        inputs=("seed", "mask_history"))


class MLLM4RecTrainer(PRIMETrainer):
    """Trains :class:`~recbole_mm.model.mllm4rec.MLLM4Rec`: PRIME's stage 1 (retriever, or
    ``retriever_checkpoint``) and stage 2 (the same training examples, loss on the answer's letter,
    engine and early stopping) with :class:`~recbole_mm.lmm.prompts.RolePlayTemplate`; evaluation
    as PRIME (retriever alone, then two-stage through RecBole's full-ranking evaluator)."""

    def __init__(self, config, model):
        if config["preference_optimization"]:
            raise ConfigError("preference_optimization=True: MLLM4Rec has no preference stage (that is PRIME's); "
                              "remove the setting")
        super().__init__(config, model)
        self.stage_keys = mllm4rec_stage_keys()

    def build_ranker(self, dataset):
        """The backbone (LoRA on ``lora_targets``) with the role-play template over the item store."""
        from recbole_mm.lmm.backbone import build_backbone
        from recbole_mm.lmm.candidate_ranker import LMMRanker
        from recbole_mm.lmm.prompts import RolePlayTemplate

        cfg = self.config
        store = getattr(dataset, "item_store", None)
        if store is None:
            raise UserError(f"MLLM4Rec needs the item side data of dataset {cfg['dataset']!r}: build the dataset with "
                            "recbole_mm.utils.create_dataset (MultimodalSequentialDataset), not RecBole's own")
        template = RolePlayTemplate.from_config(cfg)
        self.check_captions(store, template.caption_field)
        backbone = build_backbone(cfg, store, self.device, lora_targets=cfg["lora_targets"] or "all-linear")
        return LMMRanker(backbone, store, template, device=self.device)

    def check_captions(self, store, field_name: str | None) -> None:
        """Log how many items have a caption; a field no item has is a configuration error."""
        if field_name is None:
            return
        ids = list(store.item_ids())
        have = sum(1 for i in ids if store.get(i, field_name) not in (None, ""))
        if have == 0:
            hint = ("generate them: python -m recbole_mm.lmm.describer --dataset=<name> --data_path=<folder> "
                    "--tag=captions" if field_name == "caption"
                    else "choose caption_source: generated, none or an existing item field")
            raise ConfigError(f"caption_source={self.config['caption_source']!r}: no item of dataset "
                              f"{self.config['dataset']!r} has a {field_name!r} field; {hint}")
        logger.info(f"[MLLM4Rec] {have}/{len(ids)} items have a {field_name!r} caption; the others show their title")
