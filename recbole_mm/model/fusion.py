"""Fusion of an item's text and image vectors: VLM4Rec's comparison variants (paper Sec. 4.1.2).

Inputs are unit-length text vectors ``t`` ``[n, d_t]`` and image vectors ``v`` ``[n, d_v]`` (zero rows
where a modality is missing); the caller L2-normalises every output. ``concat`` and ``average``
have no parameters; ``attention`` and ``gating`` are learned (VLM4Rec trains them with InfoNCE).
"""

from __future__ import annotations

import torch
from torch import nn

from recbole_mm.errors import ConfigError

LEARNED = ("attention", "gating")
FIXED = ("concat", "average")


def _projection(in_dim: int, out_dim: int) -> nn.Linear:
    """Linear map initialised to the identity when the sizes match, else to a random orthogonal one."""
    layer = nn.Linear(in_dim, out_dim)
    with torch.no_grad():
        if in_dim == out_dim:
            layer.weight.copy_(torch.eye(out_dim))
        else:
            nn.init.orthogonal_(layer.weight)
        layer.bias.zero_()
    return layer


class ConcatFusion(nn.Module):
    """``[t ; v]``: both modalities with equal weight in the cosine."""

    def __init__(self, text_dim: int, image_dim: int):
        super().__init__()
        self.out_dim = text_dim + image_dim

    def forward(self, t, v):
        return torch.cat([t, v], dim=-1)


class AverageFusion(nn.Module):
    """``(t + P v) / 2``; when the sizes differ ``P`` is a fixed random orthogonal map of the image
    vectors into the text space (seeded; it keeps their lengths and angles up to a projection)."""

    def __init__(self, text_dim: int, image_dim: int, seed: int = 0):
        super().__init__()
        self.out_dim = text_dim
        if image_dim == text_dim:
            proj = torch.eye(text_dim)
        else:
            g = torch.Generator().manual_seed(seed)
            q, _ = torch.linalg.qr(torch.randn(max(text_dim, image_dim), min(text_dim, image_dim), generator=g))
            proj = q if image_dim > text_dim else q.T  # [image_dim, text_dim], orthonormal rows or columns
        self.register_buffer("projection", proj.float())

    def forward(self, t, v):
        return (t + v @ self.projection) / 2


class AttentionFusion(nn.Module):
    """Item-wise attention over the two modality vectors after a learned projection to ``dim``:
    ``a = softmax_m(w^T tanh(W h_m))``, output ``sum_m a_m h_m``."""

    def __init__(self, text_dim: int, image_dim: int, dim: int, hidden: int = 64):
        super().__init__()
        self.out_dim = dim
        self.text_proj, self.image_proj = _projection(text_dim, dim), _projection(image_dim, dim)
        self.score = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, 1, bias=False))

    def weights(self, t, v):
        h = torch.stack([self.text_proj(t), self.image_proj(v)], dim=1)  # [n, 2, dim]
        return h, torch.softmax(self.score(h).squeeze(-1), dim=1)

    def forward(self, t, v):
        h, a = self.weights(t, v)
        return (a.unsqueeze(-1) * h).sum(1)


class GatingFusion(nn.Module):
    """Per-dimension gate from both modalities: ``g = sigmoid(W [t ; v])``, output
    ``g * W_t t + (1 - g) * W_v v``."""

    def __init__(self, text_dim: int, image_dim: int, dim: int):
        super().__init__()
        self.out_dim = dim
        self.text_proj, self.image_proj = _projection(text_dim, dim), _projection(image_dim, dim)
        self.gate = nn.Linear(text_dim + image_dim, dim)
        with torch.no_grad():
            self.gate.weight.mul_(0.1)
            self.gate.bias.zero_()

    def forward(self, t, v):
        g = torch.sigmoid(self.gate(torch.cat([t, v], dim=-1)))
        return g * self.text_proj(t) + (1 - g) * self.image_proj(v)


def make_fusion(kind: str, text_dim: int, image_dim: int, dim: int | None = None, seed: int = 0) -> nn.Module:
    """The fusion module called ``kind`` (``concat``, ``average``, ``attention`` or ``gating``)."""
    dim = dim or text_dim
    if kind == "concat":
        return ConcatFusion(text_dim, image_dim)
    if kind == "average":
        return AverageFusion(text_dim, image_dim, seed)
    if kind == "attention":
        return AttentionFusion(text_dim, image_dim, dim)
    if kind == "gating":
        return GatingFusion(text_dim, image_dim, dim)
    raise ConfigError(f"unknown fusion {kind!r}; use one of {FIXED + LEARNED}")
