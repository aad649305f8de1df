"""VLM4Rec: VLM-written item descriptions, sentence embeddings, profile matching (Valencia et al., 2026)."""

from __future__ import annotations

import time
from logging import getLogger

import torch
import torch.nn.functional as F
from recbole.model.abstract_recommender import SequentialRecommender
from recbole.utils import InputType

from recbole_mm.errors import ConfigError, UserError
from recbole_mm.lmm.item_vectors import build_item_vectors
from recbole_mm.model.fusion import FIXED, LEARNED, make_fusion

logger = getLogger(__name__)

FUSIONS = ("text", "image") + FIXED + LEARNED


def check_fusion(config) -> str:
    """``config["fusion"]``, refused unless it is one of :data:`FUSIONS`."""
    fusion = config["fusion"]
    if fusion not in FUSIONS:
        raise ConfigError(f"fusion must be one of {FUSIONS}, got {fusion!r}")
    return fusion


def modalities(fusion: str) -> tuple[str, ...]:
    """The item vectors a fusion reads: ``text`` for every fusion but ``image``, ``image`` for every one but ``text``."""
    return tuple(kind for kind, without in (("text", "image"), ("image", "text")) if fusion != without)


class VLM4Rec(SequentialRecommender):
    """VLM4Rec as a RecBole sequential model: profile = mean of the unit item vectors of the last
    ``history_length`` items, renormalised; score = cosine with every item (paper Eqs. 14-20).

    Item vectors are built by the dataset, not by the model:
    :func:`~recbole_mm.data.preparation.create_dataset` makes a
    :class:`~recbole_mm.data.dataset.MultimodalSequentialDataset`, which calls
    :meth:`build_item_vectors` once (from caches, see :mod:`recbole_mm.lmm.item_vectors`): the text
    of ``text_source`` (by default descriptions written by a vision-language model) encoded by a
    sentence encoder, and for the comparison variants an image encoder's vectors. The model reads
    ``dataset.item_vectors`` and uses them alone (``fusion: text`` / ``image``), concatenated,
    averaged, or combined by a learned attention or gating module. Only the learned variants train (in-batch
    InfoNCE between the profile and the next item, :meth:`calculate_loss`); the others have no
    parameters and :class:`~recbole_mm.trainer.vlm4rec.VLM4RecTrainer` only evaluates them. History
    items are excluded from the ranking by the data loader (``mask_history``), not here.
    """

    input_type = InputType.POINTWISE

    @staticmethod
    def build_item_vectors(config, item_store):
        """The dataset's hook (``dataset.item_vectors``): the text and / or image vectors that
        ``fusion`` reads, built once when the dataset is created."""
        fusion = check_fusion(config)
        kinds = modalities(fusion)
        return build_item_vectors(config, item_store, text="text" in kinds, image="image" in kinds,
                                  why=f"fusion {fusion!r}")

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.fusion_kind = check_fusion(config)
        self.history_length = int(config["history_length"])
        if self.history_length < 1:
            raise ConfigError(f"history_length must be >= 1, got {self.history_length}")
        if self.history_length > self.max_seq_length:
            logger.warning(f"[VLM4Rec] history_length {self.history_length} > MAX_ITEM_LIST_LENGTH "
                           f"{self.max_seq_length}: the profile uses the last {self.max_seq_length} items")
        if not config["mask_history"]:
            logger.info("[VLM4Rec] mask_history is off: the user's own history items are ranked too (the "
                        "profile is their mean, so they score high); the paper excludes them: mask_history: True")
        self.temperature = float(config["fusion_temperature"])
        vectors = getattr(dataset, "item_vectors", None)
        wanted = modalities(self.fusion_kind)
        if vectors is None or any(k not in vectors for k in wanted):
            raise UserError(f"VLM4Rec reads its {' and '.join(wanted)} item vectors from the dataset, but "
                            f"{type(dataset).__name__} has {sorted(vectors or {}) or 'none'}: build the dataset "
                            f"with recbole_mm.utils.create_dataset (a MultimodalSequentialDataset) from the "
                            f"same config")
        self.build_info = dict(dataset.item_vector_info)
        zeros = torch.zeros(self.n_items, 0)
        text = torch.as_tensor(vectors["text"]) if "text" in wanted else zeros
        image = torch.as_tensor(vectors["image"]) if "image" in wanted else zeros
        self.register_buffer("text_emb", text, persistent=False)
        self.register_buffer("image_emb", image, persistent=False)
        has = (text.abs().sum(1) > 0) | (image.abs().sum(1) > 0)
        self.register_buffer("has_vector", has, persistent=False)
        self.fusion = None
        if self.fusion_kind in FIXED + LEARNED:
            self.fusion = make_fusion(self.fusion_kind, text.shape[1], image.shape[1], config["fusion_dim"],
                                      config["seed"])
        self.trainable = self.fusion_kind in LEARNED
        self._table = None
        self.scoring = {"seconds": 0.0, "users": 0, "table_s": 0.0}

    # ---------------------------------------------------------------------------- item vectors
    def item_vectors(self, ids: torch.Tensor) -> torch.Tensor:
        """Unit vectors (zero where the item has none) of the items ``ids`` (1-D)."""
        if self.fusion_kind == "text":
            x = self.text_emb[ids]
        elif self.fusion_kind == "image":
            x = self.image_emb[ids]
        else:
            x = self.fusion(self.text_emb[ids], self.image_emb[ids])
        return F.normalize(x, dim=-1) * self.has_vector[ids].unsqueeze(-1)

    def item_table(self) -> torch.Tensor:
        """Vectors of all items, computed once per evaluation (recomputed after training steps)."""
        if self._table is None or self.training:
            started = time.perf_counter()
            with torch.no_grad():
                table = self.item_vectors(torch.arange(self.n_items, device=self.text_emb.device))
            if self.training:
                return table
            self._table = table
            self.scoring["table_s"] += time.perf_counter() - started
        return self._table

    def train(self, mode: bool = True):
        self._table = None
        return super().train(mode)

    def load_state_dict(self, *args, **kwargs):
        self._table = None
        return super().load_state_dict(*args, **kwargs)

    def fusion_summary(self) -> dict | None:
        """How much a learned fusion relies on the text: the mean attention weight (attention) or
        gate value (gating) of the text vector over the items that have a vector."""
        if self.fusion_kind not in LEARNED:
            return None
        with torch.no_grad():
            ids = torch.nonzero(self.has_vector).squeeze(1)
            t, v = self.text_emb[ids], self.image_emb[ids]
            if self.fusion_kind == "attention":
                weight = self.fusion.weights(t, v)[1][:, 0]
            else:
                weight = torch.sigmoid(self.fusion.gate(torch.cat([t, v], dim=-1)))
        return {"mean_text_weight": float(weight.mean()), "std_text_weight": float(weight.std())}

    # ------------------------------------------------------------------------------- profile
    def last_items(self, item_seq: torch.Tensor, seq_len: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The last ``history_length`` items of each sequence ``[B, L]`` and which slots are real."""
        length = min(self.history_length, item_seq.size(1))
        pos = (seq_len - length).unsqueeze(1) + torch.arange(length, device=item_seq.device)
        valid = pos >= 0
        items = item_seq.gather(1, pos.clamp(min=0)) * valid
        return items, valid & (items > 0)

    @staticmethod
    def profile(vectors: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """``normalize(mean of the valid vectors)``: vectors ``[B, L, d]``, valid ``[B, L]`` (Eqs. 15-16)."""
        mask = valid.unsqueeze(-1).to(vectors.dtype)
        mean = (vectors * mask).sum(1) / mask.sum(1).clamp(min=1)
        return F.normalize(mean, dim=-1)

    def user_profiles(self, interaction, table: torch.Tensor | None = None) -> torch.Tensor:
        items, valid = self.last_items(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])
        vectors = table[items] if table is not None else self.item_vectors(items.reshape(-1)).view(*items.shape, -1)
        return self.profile(vectors, valid)

    # ------------------------------------------------------------------------------ RecBole API
    def calculate_loss(self, interaction):
        """In-batch InfoNCE: each profile against its next item, the other rows' next items as negatives."""
        if not self.trainable:
            raise RuntimeError(f"VLM4Rec with fusion {self.fusion_kind!r} has nothing to train")
        items, valid = self.last_items(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])
        target = interaction[self.POS_ITEM_ID]
        unique, inverse = torch.unique(torch.cat([items.reshape(-1), target]), return_inverse=True)
        vectors = self.item_vectors(unique)
        history = vectors[inverse[:items.numel()]].view(*items.shape, -1)
        positives = vectors[inverse[items.numel():]]
        logits = self.profile(history, valid) @ positives.T / self.temperature
        same = target.unsqueeze(0) == target.unsqueeze(1)
        same.fill_diagonal_(False)  # another row with the same next item is not a negative
        logits = logits.masked_fill(same, float("-inf"))
        return F.cross_entropy(logits, torch.arange(len(target), device=logits.device))

    def predict(self, interaction):
        table = self.item_table()
        return (self.user_profiles(interaction, table) * table[interaction[self.ITEM_ID]]).sum(-1)

    def full_sort_predict(self, interaction):
        table = self.item_table()
        started = time.perf_counter()
        scores = self.user_profiles(interaction, table) @ table.T
        if scores.is_cuda:
            torch.cuda.synchronize()
        self.scoring["seconds"] += time.perf_counter() - started
        self.scoring["users"] += len(scores)
        return scores
