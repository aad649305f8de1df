"""Trainer classes by model name: recbole-mm's own, else RecBole's, with recbole-mm's safe
checkpoints and timings in front."""

from __future__ import annotations

import importlib

# model name -> "module:Class" of a trainer that replaces RecBole's for that model.
TRAINERS: dict[str, str] = {
    "ALMOSTREC": "recbole_mm.trainer.almostrec:ALMOSTRECTrainer",
    "HaNoRec": "recbole_mm.trainer.hanorec:HaNoRecTrainer",
    "MLLM4Rec": "recbole_mm.trainer.mllm4rec:MLLM4RecTrainer",
    "PRIME": "recbole_mm.trainer.prime:PRIMETrainer",
    "VLM4Rec": "recbole_mm.trainer.vlm4rec:VLM4RecTrainer",
}


def get_trainer(model_type, model_name: str):
    """Return the trainer class for a model, with recbole-mm's safe checkpoints and timings."""
    from recbole_mm.trainer.mixin import with_recbole_mm_features

    if model_name in TRAINERS:
        module, cls = TRAINERS[model_name].split(":")
        base = getattr(importlib.import_module(module), cls)
    else:
        from recbole.utils import get_trainer as recbole_get_trainer

        base = recbole_get_trainer(model_type, model_name)
    return with_recbole_mm_features(base)
