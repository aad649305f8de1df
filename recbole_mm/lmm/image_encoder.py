"""Image embeddings of items with a transformers vision encoder (CLIP, SigLIP, ...).

The checkpoint (hub id or local folder) is loaded with the transformers class named in its
``config.json`` (``architectures``; only classes that transformers itself defines, no remote code
unless ``trust_remote_code``), or ``AutoModel``. A model with ``get_image_features`` (``CLIPModel``,
``SiglipModel``) gives its projected image embedding; a vision tower gives ``image_embeds``
(``CLIPVisionModelWithProjection``) or its pooled output. Vectors are L2-normalised.
``small`` names a tiny random CLIP vision model built locally (:func:`build_tiny_clip`).
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np

from recbole_mm.errors import ConfigError
from recbole_mm.lmm.sentence_encoder import load_error, pretrained_location, weights_identity

logger = logging.getLogger(__name__)


class ImageEncoder:
    """A vision encoder turning PIL images into unit-length vectors (``[n, dim]`` float32)."""

    def __init__(self, name_or_path: str, *, device="cpu", batch_size: int = 32, trust_remote_code: bool = False):
        import torch
        import transformers
        from transformers import AutoConfig, AutoImageProcessor, AutoModel

        if not name_or_path:
            raise ConfigError("image_encoder is not set: image features need a vision checkpoint (hub id, local "
                             "folder such as a saved CLIPModel, or 'small' for a random one built locally)")
        self.name = str(name_or_path)
        path, kwargs, local = pretrained_location(self.name, "image_encoder", trust_remote_code)
        try:
            config = AutoConfig.from_pretrained(path, **kwargs)
            cls = None
            for arch in getattr(config, "architectures", None) or []:
                cls = getattr(transformers, arch, None)
                if cls is not None:
                    break
            self.model = (cls or AutoModel).from_pretrained(path, config=config, **kwargs)
            self.processor = AutoImageProcessor.from_pretrained(path, **kwargs)
        except OSError as e:
            raise load_error(self.name, "image_encoder", e, local) from e
        self.model.eval().to(device)
        self.device, self.batch_size = device, int(batch_size)
        self._identity = weights_identity(path, local, config)
        self._torch = torch
        self.dim = None

    @property
    def key(self) -> str:
        from recbole_mm.files import fingerprint

        return fingerprint("image", self._identity)

    def _features(self, pixel_values):
        model = self.model
        if hasattr(model, "get_image_features"):
            out = model.get_image_features(pixel_values=pixel_values)
            return out if isinstance(out, self._torch.Tensor) else out.pooler_output
        out = model(pixel_values=pixel_values)
        for name in ("image_embeds", "pooler_output"):
            value = getattr(out, name, None)
            if value is not None:
                return value
        return out.last_hidden_state.mean(1)

    def encode(self, images: Sequence) -> np.ndarray:
        """Unit-length vectors of RGB PIL images."""
        torch = self._torch
        chunks = []
        with torch.no_grad():
            for start in range(0, len(images), self.batch_size):
                batch = self.processor(images=list(images[start:start + self.batch_size]), return_tensors="pt")
                pixels = batch["pixel_values"].to(self.device, dtype=next(self.model.parameters()).dtype)
                feats = self._features(pixels).float()
                chunks.append(torch.nn.functional.normalize(feats, dim=-1).cpu().numpy())
        out = np.concatenate(chunks) if chunks else np.zeros((0, self.dim or 0), dtype=np.float32)
        self.dim = int(out.shape[1]) if len(out) else self.dim
        return out.astype(np.float32)

    def output_dim(self) -> int:
        """Size of the vectors (computed once from a blank image)."""
        if self.dim is None:
            from PIL import Image

            self.encode([Image.new("RGB", (32, 32), (128, 128, 128))])
        return self.dim
