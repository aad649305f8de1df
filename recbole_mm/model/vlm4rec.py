"""VLM4Rec: VLM-written item descriptions, sentence embeddings, profile matching (Valencia et al., 2026)."""

from __future__ import annotations

import os
import re
import time
from logging import getLogger

import numpy as np
import torch
import torch.nn.functional as F
from recbole.model.abstract_recommender import SequentialRecommender
from recbole.utils import InputType

from recbole_mm.errors import ConfigError
from recbole_mm.model.fusion import FIXED, LEARNED, make_fusion

FUSIONS = ("text", "image") + FIXED + LEARNED
NAMED_SOURCES = ("generated", "title", "title_attributes")


def item_texts(config, store) -> tuple[list[str | None], dict]:
    """The text of every internal item id for ``text_source`` (``None``: no text), and what was done.

    ``generated``: the describer's cache (generated first when ``generate_descriptions``);
    ``title``; ``title_attributes`` (:func:`~recbole_mm.lmm.describer.attributes_text` over
    ``title_attribute_fields``, by default every field but the free-text ones); any other name is
    an item field, e.g. ``description``.
    """
    from recbole_mm.errors import DataFormatError
    from recbole_mm.lmm.describer import attributes_text

    source = config["text_source"]
    real = store.item_ids()
    info: dict = {"text_source": source}
    if source == "generated":
        by_token, info["describer"] = _generated(config, store)
        texts = [None] * len(store)
        for i in real:
            texts[i] = by_token.get(store.token(i))
    else:
        fields = config["title_attribute_fields"]
        texts = [None] * len(store)
        for i in real:
            attrs = store.attributes(i)
            if source == "title_attributes":
                texts[i] = attributes_text(attrs, fields=fields)
            else:
                value = attrs.get(source)
                texts[i] = ", ".join(map(str, value)) if isinstance(value, (list, tuple)) else value
        texts = [str(t).strip() if t is not None and str(t).strip() else None for t in texts]
        if not any(texts):
            known = sorted({k for i in real for k in store.attributes(i)})
            raise DataFormatError(
                "no item has text for this text_source", file=store.source, field=source,
                hint=f"set text_source to generated, title, title_attributes or one of the item fields {known}")
    info["items_with_text"] = sum(t is not None for t in texts)
    info["items"] = len(real)
    return texts, info


def _generated(config, store) -> tuple[dict[str, str], dict | None]:
    from recbole_mm.errors import DataFormatError
    from recbole_mm.lmm.describer import (DescriberSettings, DescriptionCache, attributes_text, generate_descriptions,
                                          load_describer)

    from recbole_mm.paths import description_dir

    folder = description_dir(config, config["description_tag"])
    cache = DescriptionCache(folder, config["dataset"], config["description_tag"])
    stats = None
    if config["generate_descriptions"]:
        settings = DescriberSettings(
            model=config["describer_model"], prompt=config["describer_prompt"],
            text_prompt=config["describer_text_prompt"], missing_image=config["describer_missing_image"],
            max_new_tokens=config["describer_max_new_tokens"], min_new_tokens=config["describer_min_new_tokens"],
            quantization=config["describer_quantization"], dtype=config["describer_dtype"],
            trust_remote_code=config["trust_remote_code"], min_pixels=config["image_min_pixels"],
            max_pixels=config["image_max_pixels"], batch_size=config["describer_batch_size"])
        texts = lambda: [attributes_text(store.attributes(i)) for i in range(len(store))]  # noqa: E731
        stats = generate_descriptions(store, cache, settings, lambda: load_describer(
            settings, config["device"], texts, small_dir=config["artifacts_dir"], small_args=config["describer_small"]),
            show_progress=config["show_progress"])
        getLogger().info(f"[VLM4Rec] descriptions: {stats}")
    by_token = cache.texts()
    if not by_token:
        raise DataFormatError(
            "no generated descriptions found", file=cache.path, field=cache.field,
            hint="set generate_descriptions: True (with describer_model), or write them first with "
                 f"`python -m recbole_mm.lmm.describer --dataset={config['dataset']} --data_path=...`, or "
                 "choose another text_source (title, title_attributes or an item field)")
    meta = cache.meta() or {}
    if not meta.get("complete", False):
        getLogger().warning(f"[VLM4Rec] {cache.path} is incomplete ({len(by_token)} items described): items "
                            f"without a description have no text vector")
    return {t: (s.strip() or None) for t, s in by_token.items() if s and s.strip()}, stats


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]+", "_", str(text))[:40]


def build_item_representations(config, dataset) -> dict:
    """Text and/or image vectors of every internal item id (zero rows where missing), from the caches
    under ``embedding_cache_dir`` (computing what they lack), and the build statistics."""
    from recbole_mm.data.item_store import ItemStore
    from recbole_mm.lmm.sentence_encoder import EmbeddingCache, cached_encode, content_hash
    from recbole_mm.files import fingerprint

    logger = getLogger()
    fusion = config["fusion"]
    store = ItemStore.from_recbole(config, dataset)
    from recbole_mm.paths import embedding_cache_dir

    cache_dir = str(embedding_cache_dir(config))
    name, n, device = config["dataset"], len(store), config["device"]
    out: dict = {"text": None, "image": None, "info": {}}

    if fusion != "image":
        from recbole_mm.lmm.sentence_encoder import SentenceEncoder
        from recbole_mm.lmm.tiny_models import build_tiny_text_encoder

        texts, info = item_texts(config, store)
        rows = [i for i, t in enumerate(texts) if t is not None]
        encoder_name = config["text_encoder"]
        if encoder_name == "small":
            args = dict(config["text_encoder_small"] or {})
            plain = [texts[i] for i in rows]
            encoder_name = build_tiny_text_encoder(
                os.path.join(config["artifacts_dir"], f"small-text-{fingerprint(args, plain)}"), plain, **args)
        encoder = SentenceEncoder(encoder_name, device=device, max_length=config["text_encoder_max_length"],
                                  batch_size=config["encode_batch_size"], pooling=config["text_encoder_pooling"],
                                  trust_remote_code=config["trust_remote_code"])
        cache = EmbeddingCache(os.path.join(cache_dir, f"{name}.text-{_slug(config['text_source'])}.{encoder.key}.npz"))
        matrix, stats = cached_encode(cache, [store.token(i) for i in rows], [content_hash(texts[i]) for i in rows],
                                      lambda pos: encoder.encode([texts[rows[p]] for p in pos]), encoder.dim,
                                      label="[VLM4Rec] text embeddings", show_progress=config["show_progress"])
        text = np.zeros((n, encoder.dim), dtype=np.float32)
        text[rows] = matrix
        out["text"] = text
        out["info"]["text"] = {**info, "encoder": encoder.name, "dim": encoder.dim, "pooling": encoder.pooling,
                               "cache": str(cache.path), **stats}
        logger.info(f"[VLM4Rec] text embeddings: {out['info']['text']}")
        del encoder

    if fusion != "text":
        from recbole_mm.errors import DataFormatError
        from recbole_mm.lmm.image_encoder import ImageEncoder
        from recbole_mm.lmm.tiny_models import build_tiny_clip

        rows = [i for i in store.item_ids() if store.has_image(i)]
        if not rows:
            raise DataFormatError(f"fusion {fusion!r} needs item images, but no item has an image file",
                                  file=store.source, field="image",
                                  hint="use fusion: text for a dataset without images")
        encoder_name = config["image_encoder"]
        if encoder_name == "small":
            args = dict(config["image_encoder_small"] or {})
            folder = os.path.join(config["artifacts_dir"], f"small-clip-{fingerprint(args)}")
            encoder_name = build_tiny_clip(folder, **args)
        encoder = ImageEncoder(encoder_name, device=device, batch_size=config["encode_batch_size"],
                               trust_remote_code=config["trust_remote_code"])
        dim = encoder.output_dim()

        def compute(pos):
            images = store.images([rows[p] for p in pos])
            good = [k for k, img in enumerate(images) if img is not None]
            vectors = np.zeros((len(pos), dim), dtype=np.float32)
            if good:
                vectors[good] = encoder.encode([images[k] for k in good])
            return vectors

        hashes = []
        for i in rows:
            with open(store.image_path(i), "rb") as f:
                hashes.append(content_hash(f.read()))
        key = fingerprint(encoder.key, store.min_pixels, store.max_pixels)
        cache = EmbeddingCache(os.path.join(cache_dir, f"{name}.image.{key}.npz"))
        matrix, stats = cached_encode(cache, [store.token(i) for i in rows], hashes, compute, dim,
                                      chunk=256, label="[VLM4Rec] image embeddings",
                                      show_progress=config["show_progress"])
        image = np.zeros((n, dim), dtype=np.float32)
        image[rows] = matrix
        out["image"] = image
        out["info"]["image"] = {"encoder": encoder.name, "dim": dim, "items_with_image": len(rows),
                                "cache": str(cache.path), **stats}
        logger.info(f"[VLM4Rec] image embeddings: {out['info']['image']}")
    return out


class VLM4Rec(SequentialRecommender):
    """VLM4Rec as a RecBole sequential model: profile = mean of the unit item vectors of the last
    ``history_length`` items, renormalised; score = cosine with every item (paper Eqs. 14-20).

    Item vectors are built once, at construction, from caches (see
    :func:`build_item_representations`): the text of ``text_source`` (by default descriptions
    written by a vision-language model) encoded by a sentence encoder, and for the comparison
    variants an image encoder's vectors, used alone (``fusion: image``), concatenated, averaged, or
    combined by a learned attention or gating module. Only the learned variants train (in-batch
    InfoNCE between the profile and the next item, :meth:`calculate_loss`); the others have no
    parameters and :class:`~recbole_mm.trainer.vlm4rec.VLM4RecTrainer` only evaluates them. History
    items are excluded from the ranking by the data loader (``mask_history``), not here.
    """

    input_type = InputType.POINTWISE

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.fusion_kind = config["fusion"]
        if self.fusion_kind not in FUSIONS:
            raise ConfigError(f"fusion must be one of {FUSIONS}, got {self.fusion_kind!r}")
        self.history_length = int(config["history_length"])
        if self.history_length < 1:
            raise ConfigError(f"history_length must be >= 1, got {self.history_length}")
        if self.history_length > self.max_seq_length:
            getLogger().warning(f"[VLM4Rec] history_length {self.history_length} > MAX_ITEM_LIST_LENGTH "
                                f"{self.max_seq_length}: the profile uses the last {self.max_seq_length} items")
        if not config["mask_history"]:
            getLogger().info("[VLM4Rec] mask_history is off: the user's own history items are ranked too (the "
                             "profile is their mean, so they score high); the paper excludes them: mask_history: True")
        self.temperature = float(config["fusion_temperature"])
        started = time.perf_counter()
        reps = build_item_representations(config, dataset)
        self.build_info = {**reps["info"], "build_s": time.perf_counter() - started}
        zeros = torch.zeros(self.n_items, 0)
        text = torch.as_tensor(reps["text"]) if reps["text"] is not None else zeros
        image = torch.as_tensor(reps["image"]) if reps["image"] is not None else zeros
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
