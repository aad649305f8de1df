"""HaNoRec: an LMM ranker that scores candidates by the likelihood of their titles, trained by SFT
then DPO with a hardness-aware beta (HaRS) and LoRA noise on the policy (NoDO) (Wang et al., 2025)."""

from __future__ import annotations

from logging import getLogger

import torch

from recbole_mm.lmm.defaults import LMM_BASE
from recbole_mm.model.prime import PRIME

logger = getLogger(__name__)


class HaNoRec(PRIME):
    """HaNoRec as a RecBole model; :class:`recbole_mm.trainer.hanorec.HaNoRecTrainer` trains it.

    The ranker (attached by the trainer) is a :class:`~recbole_mm.lmm.title_scorer.TitleScorer`:
    a candidate's score is ``log p(title | prompt)`` (sum, or the per-token mean with
    ``hanorec_length_normalise``). Two protocols:

    * sampled (the paper's, e.g. ``eval_args.mode: uni9``): :meth:`predict` groups the rows of a
      batch by user and scores each user's candidates (target + sampled negatives) in ONE prompt,
      listed in an order drawn from ``seed`` and the user (never the rows' order, which puts the
      target first);
    * full ranking (the project's): PRIME's :meth:`full_sort_predict` -- the retriever's top
      ``n_candidates`` reranked by the title scores, every other item below in retriever order.
    """

    properties_base = LMM_BASE  # Config layers properties/model/_lmm.yaml under HaNoRec.yaml

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.seed = int(config["seed"])
        vectors = getattr(dataset, "item_vectors", None) or {}
        #: the fused HaRS item embeddings (n_items, d), or None when HaRS is off
        self.hars_embeddings = None
        if config["hars"]:
            from recbole_mm.model.hanorec_losses import fuse_embeddings

            if "text" not in vectors:
                from recbole_mm.errors import UserError

                raise UserError("hars=True needs the items' text vectors: build the dataset with "
                                "recbole_mm.utils.create_dataset (it calls HaNoRec.build_item_vectors)")
            image = torch.as_tensor(vectors["image"]) if "image" in vectors else None
            self.hars_embeddings = fuse_embeddings(torch.as_tensor(vectors["text"]), image)

    @staticmethod
    def build_item_vectors(config, item_store):
        """The dataset's hook: HaRS's text vectors (``text_source`` through ``text_encoder``) and, when
        ``image_encoder`` is set, image vectors; nothing when ``hars`` is off."""
        if not config["hars"]:
            return {}, {}
        from recbole_mm.lmm.item_vectors import build_item_vectors

        return build_item_vectors(config, item_store, text=True, image=bool(config["image_encoder"]),
                                  why="HaRS's image embeddings (image_encoder)")

    def calculate_loss(self, interaction):
        raise NotImplementedError("HaNoRec trains in stages: use HaNoRecTrainer (run_recbole_mm does)")

    def candidate_order(self, user: int, k: int) -> torch.Tensor:
        """The order in which a user's k sampled candidates are listed in the prompt (fixed by seed and user)."""
        return torch.randperm(k, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + int(user)))

    def predict(self, interaction) -> torch.Tensor:
        """Scores of the (user, item) rows; the rows of one user (same user id and history) are one
        prompt listing all of that user's items of the batch as candidates."""
        if self.ranker is None:
            return self.retriever.predict(interaction)
        users = interaction[self.USER_ID].cpu()
        lengths = interaction[self.ITEM_SEQ_LEN].cpu()
        items = interaction[self.ITEM_ID].cpu()
        groups: dict[tuple[int, int], list[int]] = {}
        for row, key in enumerate(zip(users.tolist(), lengths.tolist())):
            groups.setdefault(key, []).append(row)
        scores = torch.zeros(len(items))
        histories = self.histories(interaction)
        for (user, _), rows in groups.items():
            order = self.candidate_order(user, len(rows))
            rows_t = torch.tensor(rows)[order]
            ranked = self.ranker.score_in_batches([histories[rows[0]]], items[rows_t].unsqueeze(0))
            scores[rows_t] = ranked[0]
        return scores.to(interaction[self.ITEM_ID].device)
