"""NoDO (HaNoRec Eq. 10): Gaussian noise on every LoRA A and B factor for one forward pass.

``A' = A + sigma * eps_A``, ``B' = B + sigma * eps_B``, fresh noise per pass. Implemented with
forward hooks on peft's ``lora_A[adapter]`` / ``lora_B[adapter]`` linear modules that add
``x @ eps^T`` to their output, which equals a pass with the perturbed factors (B' receives A''s
output, so the product is ``B' A' x``), without ever writing to a weight: the parameters are the
same tensors, unchanged, after the pass, the gradient flows to A and B as with the perturbed
weights, and an exception cannot leave noise behind (the hooks are removed in ``finally``).
Written here rather than taken from a library: peft has no perturbation hook.
"""

from __future__ import annotations

from contextlib import contextmanager
from logging import getLogger

import torch
import torch.nn.functional as F

logger = getLogger(__name__)


def lora_pairs(model) -> list[tuple[str, torch.nn.Module, torch.nn.Module]]:
    """``(module name, lora_A, lora_B)`` of every active LoRA adapter of a peft ``model``."""
    pairs = []
    for name, module in model.named_modules():
        a, b = getattr(module, "lora_A", None), getattr(module, "lora_B", None)
        if a is None or b is None or getattr(module, "disable_adapters", False) or getattr(module, "merged", False):
            continue
        active = getattr(module, "active_adapters", None) or []
        for adapter in ([active] if isinstance(active, str) else active):
            if adapter in a and adapter in b:
                pairs.append((f"{name}.{adapter}", a[adapter], b[adapter]))
    return pairs


def _adds(noise: torch.Tensor):
    def hook(module, inputs, output):
        return output + F.linear(inputs[0].to(noise.dtype), noise).to(output.dtype)

    return hook


@contextmanager
def lora_noise(model, sigma: float, generator: torch.Generator | None = None):
    """Within the block, every forward pass of ``model`` runs with noisy LoRA factors (one draw per
    block). ``sigma`` <= 0 is a no-op. A model without LoRA is an error (NoDO perturbs LoRA only)."""
    if sigma is None or sigma <= 0:
        yield []
        return
    pairs = lora_pairs(model)
    if not pairs:
        from recbole_mm.errors import ConfigError

        raise ConfigError("nodo=True needs LoRA on the ranker (lora_r > 0): NoDO perturbs the LoRA factors")
    handles = []
    try:
        for _, a, b in pairs:
            for module in (a, b):
                w = module.weight
                noise = torch.randn(w.shape, generator=generator, dtype=torch.float32,
                                    device="cpu" if generator is not None else w.device).to(w.device, w.dtype) * sigma
                handles.append(module.register_forward_hook(_adds(noise)))
        yield pairs
    finally:
        for handle in handles:
            handle.remove()
