"""MLLM4Rec: a retriever proposes candidates, an LLM ranks them from a role-play prompt of
``title : caption`` items in one forward pass (MLLM4Rec, Sec. 3.5 / Fig. 2)."""

from __future__ import annotations

from logging import getLogger

from recbole_mm.lmm.defaults import LMM_BASE
from recbole_mm.model.prime import PRIME

logger = getLogger(__name__)


class MLLM4Rec(PRIME):
    """MLLM4Rec as a RecBole model: PRIME's two-stage composition (retriever top ``n_candidates``,
    ranked by an :class:`~recbole_mm.lmm.candidate_ranker.LMMRanker`, the rest in retriever order),
    with MLLM4Rec's text-only role-play template
    (:class:`~recbole_mm.lmm.prompts.RolePlayTemplate`); captions come from the dataset's item
    store (``caption_source``). :class:`recbole_mm.trainer.mllm4rec.MLLM4RecTrainer` trains it."""

    properties_base = LMM_BASE  # Config layers properties/model/_lmm.yaml under MLLM4Rec.yaml

    def calculate_loss(self, interaction):
        raise NotImplementedError("MLLM4Rec trains in stages: use MLLM4RecTrainer (run_recbole_mm does)")
