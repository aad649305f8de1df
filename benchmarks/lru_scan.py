"""LRU layer cost: packed scan (recbole-mm) vs the reference's padded power-of-two scan.

    python benchmarks/lru_scan.py [--inter ../shared/data/amazon_beauty_2014/derived/interactions.tsv]

Sequence lengths come from the real Beauty data when available (each user's training prefix,
capped at 50), else from a geometric distribution with the same mean. Both variants use the same
LRULayer weights; the script first checks that they give the same outputs, then times a training
step (forward + backward, batch 128) and an evaluation pass (forward, batch 4096) and writes
benchmarks/results/lru_scan.md.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from recbole_mm.model.layers import LRULayer, pack  # noqa: E402


def padded_blocked_scan(b, lamb):
    """The reference LRURec scan: pad to a power of two, double block sizes (left to right)."""
    batch, length, n = b.shape
    padded = 1 << max(0, math.ceil(math.log2(length)))
    h = torch.nn.functional.pad(b, (0, 0, 0, padded - length))
    powers, block = lamb.unsqueeze(0), 2
    while block <= padded:
        h = h.reshape(batch, padded // block, block, n)
        first, second = h[:, :, : block // 2], h[:, :, block // 2:]
        h = torch.cat([first, second + powers * first[:, :, -1:]], dim=2).reshape(batch, padded, n)
        powers = torch.cat([powers, powers * powers[-1]], dim=0)
        block *= 2
    return h[:, :length]


def padded_forward(layer: LRULayer, x, mask):
    lamb, gamma = layer.recurrence()
    bx = layer.in_proj(x).reshape(*x.shape[:-1], layer.state_size, 2)
    b = torch.view_as_complex(bx.contiguous()) * gamma * mask.unsqueeze(-1)
    h = padded_blocked_scan(b, lamb)
    return layer.layer_norm(x + layer.dropout(layer.out_proj(torch.view_as_real(h).flatten(-2))))


def lengths_from(path: str | None, rng) -> tuple[np.ndarray, str]:
    if path and os.path.exists(path):
        import pandas as pd

        users = pd.read_csv(path, sep="\t", usecols=[0]).iloc[:, 0]
        counts = users.value_counts().to_numpy()
        return np.minimum(counts - 2, 50).clip(min=1), f"Beauty training sequences ({path})"
    return np.minimum(rng.geometric(1 / 8.9, 22363), 50), "geometric lengths, mean 8.9 (no ../shared)"


def timed(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--inter", default="../shared/data/amazon_beauty_2014/derived/interactions.tsv")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default="benchmarks/results/lru_scan.md")
    args = parser.parse_args()
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    all_lengths, source = lengths_from(args.inter, rng)
    layer = LRULayer(64, dropout=0.0).eval()
    rows = []
    for phase, batch in (("train step (fwd+bwd)", 128), ("evaluation (fwd)", 4096)):
        lengths = torch.as_tensor(rng.choice(all_lengths, batch))
        width = int(lengths.max())
        mask = torch.arange(width)[None] < lengths[:, None]
        x = torch.randn(batch, width, 64)
        index, position = pack(mask)
        packed_x = x.reshape(-1, 64)[index]
        with torch.no_grad():
            same = torch.allclose(padded_forward(layer, x, mask).reshape(-1, 64)[index],
                                  layer(packed_x, position), atol=1e-4)
        assert same, "packed and padded scans disagree"
        if phase.startswith("train"):
            def run_packed():
                layer(packed_x.requires_grad_(), position).sum().backward()

            def run_padded():
                (padded_forward(layer, x.requires_grad_(), mask) * mask.unsqueeze(-1)).sum().backward()
        else:
            def run_packed():
                with torch.no_grad():
                    layer(packed_x, position)

            def run_padded():
                with torch.no_grad():
                    padded_forward(layer, x, mask)
        t_pad, t_pack = timed(run_padded, args.repeats), timed(run_packed, args.repeats)
        rows.append((phase, batch, width, int(lengths.sum()), t_pad, t_pack))
        print(rows[-1], flush=True)
    lines = ["# LRU layer: packed scan vs the reference's padded scan", "",
             f"Command: `python benchmarks/lru_scan.py` ({torch.get_num_threads()} threads, CPU). "
             f"Lengths: {source}. One LRU layer, H=64, state 128 complex; median of {args.repeats} runs; "
             "outputs checked equal before timing.", "",
             "| phase | batch | padded width | real positions | padded scan (ms) | packed scan (ms) | speed-up |",
             "|---|---|---|---|---|---|---|"]
    for phase, batch, width, real, t_pad, t_pack in rows:
        lines.append(f"| {phase} | {batch} | {width} (scan pads to {1 << math.ceil(math.log2(width))}) | {real} "
                     f"| {t_pad * 1e3:.1f} | {t_pack * 1e3:.1f} | {t_pad / t_pack:.1f}x |")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
