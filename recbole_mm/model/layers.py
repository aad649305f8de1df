"""Building blocks shared by recbole-mm models."""

from __future__ import annotations

import math

import torch
from torch import nn


def linear_scan(b: torch.Tensor, lamb: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """All states of ``h_t = lamb * h_{t-1} + b_t`` for packed sequences, by a log-depth parallel scan.

    ``b``: (tokens, n) complex, the real positions of several sequences laid end to end;
    ``position``: (tokens,) index of each token inside its own sequence (0 at a sequence start,
    where the state starts from zero); ``lamb``: (n,) complex. Padding is never materialised, so
    it can neither carry state nor cost work. Hillis-Steele doubling: after the level with offset
    ``d``, ``h_t`` holds the recurrence over the last ``2d`` inputs of its own sequence, so
    ``ceil(log2(longest sequence))`` levels give the exact result.
    """
    h = b
    power = lamb  # lamb ** d
    d = 1
    longest = int(position.max()) + 1 if len(position) else 0
    while d < longest:
        carry = torch.nn.functional.pad(h[:-d], (0, 0, d, 0)) * power
        h = h + carry * (position >= d).unsqueeze(-1)
        power = power * power
        d *= 2
    return h


def pack(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For a (batch, length) mask of right-padded sequences: flat indices of the real positions
    (row-major) and each one's position inside its sequence."""
    index = torch.nonzero(mask.reshape(-1), as_tuple=True)[0]
    return index, index % mask.size(1)


class LRULayer(nn.Module):
    """Linear recurrent unit: complex diagonal recurrence, ring-initialised, with a residual.

    ``h_t = lambda * h_{t-1} + gamma * (B x_t)``, ``o_t = Re(C h_t)``, output
    ``LayerNorm(x + dropout(o))``. ``lambda = exp(-exp(nu_log) + i exp(theta_log))`` with
    ``|lambda|`` uniform on the ring ``[r_min, r_max]`` and phase uniform on ``[0, 2 pi]`` at
    init; ``gamma = sqrt(1 - |lambda|^2)`` at init, learned afterwards. The complex state has
    ``2 * d_model`` dimensions. Inputs are packed: (tokens, d_model) with ``position`` giving each
    token's index inside its sequence (see :func:`linear_scan`).
    """

    def __init__(self, d_model: int, dropout: float, r_min: float = 0.8, r_max: float = 0.99):
        super().__init__()
        self.state_size = 2 * d_model
        u1, u2 = torch.rand(self.state_size), torch.rand(self.state_size)
        nu_log = torch.log(-0.5 * torch.log(u1 * (r_max ** 2 - r_min ** 2) + r_min ** 2))
        theta_log = torch.log(u2 * 2 * math.pi)
        modulus = torch.exp(-torch.exp(nu_log))
        self.nu_log = nn.Parameter(nu_log)
        self.theta_log = nn.Parameter(theta_log)
        self.gamma_log = nn.Parameter(torch.log(torch.sqrt(1 - modulus ** 2)))
        self.in_proj = nn.Linear(d_model, 2 * self.state_size)  # real and imaginary parts of B x + b
        self.out_proj = nn.Linear(2 * self.state_size, d_model)  # Re(C h) + c from (Re h, Im h)
        self.dropout = nn.Dropout(dropout)
        self.layer_norm = nn.LayerNorm(d_model)

    def recurrence(self):
        """(lambda, gamma) as tensors: complex (state,), real (state,)."""
        lamb = torch.exp(torch.complex(-torch.exp(self.nu_log), torch.exp(self.theta_log)))
        return lamb, torch.exp(self.gamma_log)

    def forward(self, x: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        lamb, gamma = self.recurrence()
        bx = self.in_proj(x).reshape(*x.shape[:-1], self.state_size, 2)
        h = linear_scan(torch.view_as_complex(bx.float().contiguous()) * gamma, lamb, position)
        out = self.out_proj(torch.view_as_real(h).flatten(-2).to(x.dtype))
        return self.layer_norm(x + self.dropout(out))


class PositionwiseFeedForward(nn.Module):
    """``LayerNorm(x + dropout(W2 dropout(GELU(W1 x))))`` with ``d_ff = 4 * d_model`` by default."""

    def __init__(self, d_model: int, d_ff: int, dropout: float):
        super().__init__()
        self.w_1, self.w_2 = nn.Linear(d_model, d_ff), nn.Linear(d_ff, d_model)
        self.activation, self.dropout = nn.GELU(), nn.Dropout(dropout)
        self.layer_norm = nn.LayerNorm(d_model)

    def forward(self, x):
        return self.layer_norm(x + self.dropout(self.w_2(self.dropout(self.activation(self.w_1(x))))))


class LRUBlock(nn.Module):
    """One LRURec block: LRU layer then position-wise feed-forward, each residual + LayerNorm."""

    def __init__(self, d_model: int, dropout: float, attn_dropout: float, r_min: float, r_max: float):
        super().__init__()
        self.lru = LRULayer(d_model, attn_dropout, r_min, r_max)
        self.ffn = PositionwiseFeedForward(d_model, 4 * d_model, dropout)

    def forward(self, x, position):
        return self.ffn(self.lru(x, position))
