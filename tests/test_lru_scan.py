"""The parallel scan and the LRU layer against plain step-by-step loops."""

import math

import pytest
import torch

from recbole_mm.model.layers import LRULayer, linear_scan, pack


def loop_recurrence(b, lamb):
    h = torch.zeros_like(b[0])
    out = []
    for t in range(len(b)):
        h = lamb * h + b[t]
        out.append(h)
    return torch.stack(out)


@pytest.mark.parametrize("lengths", [[1], [16], [5, 1, 50, 3, 17, 33], [100, 2], [7] * 9])
def test_scan_equals_loop_on_padded_batches(lengths):
    torch.manual_seed(len(lengths))
    n, width = 6, max(lengths) + 3  # extra right padding beyond the longest sequence
    mask = torch.arange(width)[None] < torch.tensor(lengths)[:, None]
    b = torch.randn(len(lengths), width, n, dtype=torch.cfloat)
    b[~mask] = 1e3  # padding holds garbage: it must not reach any real position
    lamb = torch.exp(torch.complex(-torch.rand(n) * 0.3, torch.rand(n) * 2 * math.pi))
    index, position = pack(mask)
    got = linear_scan(b.reshape(-1, n)[index], lamb, position)
    row = index // width
    for i, length in enumerate(lengths):
        expected = loop_recurrence(b[i, :length], lamb)
        torch.testing.assert_close(got[row == i], expected, rtol=1e-4, atol=1e-5)


def test_scan_gradients_match_loop():
    torch.manual_seed(0)
    n, length = 4, 11
    b1 = torch.randn(length, n, dtype=torch.cfloat, requires_grad=True)
    b2 = b1.detach().clone().requires_grad_()
    lamb = torch.exp(torch.complex(-torch.rand(n) * 0.3, torch.rand(n) * 6))
    weights = torch.randn(length, n)
    (linear_scan(b1, lamb, torch.arange(length)).real * weights).sum().backward()
    (loop_recurrence(b2, lamb).real * weights).sum().backward()
    torch.testing.assert_close(b1.grad, b2.grad, rtol=1e-4, atol=1e-5)


def test_lru_layer_matches_its_definition():
    """o_t = Re(C h_t) + c, h_t = lambda h_{t-1} + gamma (B x_t + b), out = LN(x + o)."""
    torch.manual_seed(0)
    d = 4
    layer = LRULayer(d, dropout=0.0).eval()
    x = torch.randn(9, d)
    got = layer(x, torch.arange(9))
    lamb, gamma = layer.recurrence()
    w, bias = layer.in_proj.weight, layer.in_proj.bias
    bx = (x @ w.T + bias).reshape(9, 2 * d, 2)
    b = torch.complex(bx[..., 0], bx[..., 1]) * gamma
    h = loop_recurrence(b, lamb)
    o = layer.out_proj(torch.stack([h.real, h.imag], -1).reshape(9, -1))
    torch.testing.assert_close(got, layer.layer_norm(x + o), rtol=1e-4, atol=1e-5)


def test_ring_initialisation():
    torch.manual_seed(0)
    layer = LRULayer(32, dropout=0.0, r_min=0.8, r_max=0.99)
    lamb, gamma = layer.recurrence()
    modulus = lamb.abs()
    assert layer.state_size == 64
    assert modulus.min() >= 0.8 - 1e-5 and modulus.max() <= 0.99 + 1e-5
    phase = torch.exp(layer.theta_log)
    assert phase.min() >= 0 and phase.max() <= 2 * math.pi
    torch.testing.assert_close(gamma, torch.sqrt(1 - modulus ** 2))
