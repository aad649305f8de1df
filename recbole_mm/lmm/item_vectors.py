"""Item vectors from an item store: the text of every item (an item field, or descriptions written by a
vision-language model) encoded by a sentence encoder, and image vectors from an image encoder.

What VLM4Rec represents its items with. :class:`~recbole_mm.data.dataset.MultimodalSequentialDataset`
calls :func:`build_item_vectors` once, when the dataset is created (through the model class's
``build_item_vectors`` hook); models read the result from ``dataset.item_vectors``. Every step is cached
as before: descriptions in the describer's resumable JSONL (:class:`~recbole_mm.lmm.describer.DescriptionCache`),
vectors in ``.npz`` files under ``embedding_cache_dir`` keyed by encoder and source text / image file
(:class:`~recbole_mm.lmm.sentence_encoder.EmbeddingCache`), so that a second dataset on the same data
only reads them.
"""

from __future__ import annotations

import os
import re
import time
from logging import getLogger

import numpy as np

from recbole_mm.errors import DataFormatError

logger = getLogger(__name__)


def item_texts(config, store) -> tuple[list[str | None], dict]:
    """The text of every internal item id for ``text_source`` (``None``: no text), and what was done.

    ``generated``: the describer's cache (generated first when ``generate_descriptions``);
    ``title``; ``title_attributes`` (:func:`~recbole_mm.lmm.describer.attributes_text` over
    ``title_attribute_fields``, by default every field but the free-text ones); any other name is
    an item field, e.g. ``description``.
    """
    from recbole_mm.lmm.describer import attributes_text

    source = config["text_source"]
    real = store.item_ids()
    info: dict = {"text_source": source}
    if source == "generated":
        by_token, info["describer"] = generated_texts(config, store)
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


def generated_texts(config, store) -> tuple[dict[str, str], dict | None]:
    """Descriptions by item token from the describer's cache (``description_dir`` /
    ``description_tag``), writing what it lacks first when ``generate_descriptions`` is on;
    returns them and the describer's statistics (``None`` when it was not asked to run)."""
    from recbole_mm.lmm.describer import DescriberSettings, DescriptionCache, attributes_text, generate_descriptions
    from recbole_mm.lmm.describer import load_describer
    from recbole_mm.paths import description_dir

    folder = description_dir(config, config["description_tag"])
    cache = DescriptionCache(folder, config["dataset"], config["description_tag"])
    stats = None
    if config["generate_descriptions"]:
        settings = DescriberSettings.from_config(config)
        texts = lambda: [attributes_text(store.attributes(i)) for i in range(len(store))]  # noqa: E731
        stats = generate_descriptions(store, cache, settings, lambda: load_describer(
            settings, config["device"], texts, small_dir=config["artifacts_dir"], small_args=config["describer_small"]),
            show_progress=config["show_progress"])
        logger.info(f"[VLM4Rec] descriptions: {stats}")
    by_token = cache.texts()
    if not by_token:
        raise DataFormatError(
            "no generated descriptions found", file=cache.path, field=cache.field,
            hint="set generate_descriptions: True (with describer_model), or write them first with "
                 f"`python -m recbole_mm.lmm.describer --dataset={config['dataset']} --data_path=...`, or "
                 "choose another text_source (title, title_attributes or an item field)")
    meta = cache.meta() or {}
    if not meta.get("complete", False):
        logger.warning(f"[VLM4Rec] {cache.path} is incomplete ({len(by_token)} items described): items "
                       f"without a description have no text vector")
    return {t: (s.strip() or None) for t, s in by_token.items() if s and s.strip()}, stats


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]+", "_", str(text))[:40]


def text_vectors(config, store) -> tuple[np.ndarray, dict]:
    """``[len(store), dim]`` unit text vectors (zero rows: no text) and the build statistics."""
    from recbole_mm.files import fingerprint
    from recbole_mm.lmm.sentence_encoder import EmbeddingCache, SentenceEncoder, cached_encode, content_hash
    from recbole_mm.lmm.tiny_models import build_tiny_text_encoder
    from recbole_mm.paths import embedding_cache_dir

    texts, info = item_texts(config, store)
    rows = [i for i, t in enumerate(texts) if t is not None]
    encoder_name = config["text_encoder"]
    if encoder_name == "small":
        args = dict(config["text_encoder_small"] or {})
        plain = [texts[i] for i in rows]
        encoder_name = build_tiny_text_encoder(
            os.path.join(config["artifacts_dir"], f"small-text-{fingerprint(args, plain)}"), plain, **args)
    encoder = SentenceEncoder(encoder_name, device=config["device"], max_length=config["text_encoder_max_length"],
                              batch_size=config["encode_batch_size"], pooling=config["text_encoder_pooling"],
                              trust_remote_code=config["trust_remote_code"])
    cache = EmbeddingCache(os.path.join(str(embedding_cache_dir(config)),
                                        f"{config['dataset']}.text-{_slug(config['text_source'])}.{encoder.key}.npz"))
    matrix, stats = cached_encode(cache, [store.token(i) for i in rows], [content_hash(texts[i]) for i in rows],
                                  lambda pos: encoder.encode([texts[rows[p]] for p in pos]), encoder.dim,
                                  label="[VLM4Rec] text embeddings", show_progress=config["show_progress"])
    text = np.zeros((len(store), encoder.dim), dtype=np.float32)
    text[rows] = matrix
    info = {**info, "encoder": encoder.name, "dim": encoder.dim, "pooling": encoder.pooling,
            "cache": str(cache.path), **stats}
    logger.info(f"[VLM4Rec] text embeddings: {info}")
    return text, info


def image_vectors(config, store, why: str = "image vectors") -> tuple[np.ndarray, dict]:
    """``[len(store), dim]`` unit image vectors (zero rows: no usable image) and the build statistics;
    a dataset without any image file is an error that names ``why`` needed them."""
    from recbole_mm.files import fingerprint
    from recbole_mm.lmm.image_encoder import ImageEncoder
    from recbole_mm.lmm.sentence_encoder import EmbeddingCache, cached_encode, content_hash
    from recbole_mm.lmm.tiny_models import build_tiny_clip
    from recbole_mm.paths import embedding_cache_dir

    rows = [i for i in store.item_ids() if store.has_image(i)]
    if not rows:
        raise DataFormatError(f"{why} needs item images, but no item has an image file",
                              file=store.source, field="image", hint="use fusion: text for a dataset without images")
    encoder_name = config["image_encoder"]
    if encoder_name == "small":
        args = dict(config["image_encoder_small"] or {})
        encoder_name = build_tiny_clip(os.path.join(config["artifacts_dir"], f"small-clip-{fingerprint(args)}"), **args)
    encoder = ImageEncoder(encoder_name, device=config["device"], batch_size=config["encode_batch_size"],
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
    cache = EmbeddingCache(os.path.join(str(embedding_cache_dir(config)), f"{config['dataset']}.image.{key}.npz"))
    matrix, stats = cached_encode(cache, [store.token(i) for i in rows], hashes, compute, dim, chunk=256,
                                  label="[VLM4Rec] image embeddings", show_progress=config["show_progress"])
    image = np.zeros((len(store), dim), dtype=np.float32)
    image[rows] = matrix
    info = {"encoder": encoder.name, "dim": dim, "items_with_image": len(rows), "cache": str(cache.path), **stats}
    logger.info(f"[VLM4Rec] image embeddings: {info}")
    return image, info


def build_item_vectors(config, store, *, text: bool = True, image: bool = False,
                       why: str = "image vectors") -> tuple[dict[str, np.ndarray], dict]:
    """The item vectors of ``store`` (row = internal item id): ``{"text": [n, d_t], "image": [n, d_v]}``
    with the kinds asked for, read from their caches (computing only what they lack), and the build
    statistics by kind plus ``build_s`` (seconds for the whole build)."""
    started = time.perf_counter()
    vectors: dict[str, np.ndarray] = {}
    info: dict = {}
    if text:
        vectors["text"], info["text"] = text_vectors(config, store)
    if image:
        vectors["image"], info["image"] = image_vectors(config, store, why)
    info["build_s"] = time.perf_counter() - started
    return vectors, info
