"""LoRA dropout that draws its masks cheaply on a CPU.

peft applies `lora.dropout` to the input of every adapted layer with `nn.Dropout`, whose CPU
kernel draws one random number per element (`bernoulli_`): on SmolLM2-135M in bf16 that was
~13% of a training step, more than the attention. `CheapMaskDropout` draws four 16-bit lanes
from each 64-bit random number instead and keeps an element when its lane clears a threshold,
so the drop probability is `p` rounded to a multiple of 1/65536 (0.05 → 0.0500031) and the
kept elements are scaled by 1/(1 - that probability), as `nn.Dropout` scales them. Same
generator (`torch.manual_seed` reproduces a run), same memory kept for backward (a bool mask).
On GPUs the fused `nn.Dropout` kernel is already cheap and stays.
"""

from __future__ import annotations

import torch
from torch import nn

LANES = 65536  # values of one 16-bit lane


def drop_threshold(p: float) -> int:
    """How many of the 65,536 lane values drop an element (p rounded to a multiple of 1/65536)."""
    return round(p * LANES)


def keep_mask(shape: torch.Size, p: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """A bool tensor of `shape`, True with probability 1 - drop_threshold(p)/65536 per element."""
    count = shape.numel()
    words = torch.empty((count + 3) // 4, dtype=torch.int64, device=device).random_(-(2**63), None)
    lanes = words.view(torch.int16)[:count].view(shape)
    return lanes >= drop_threshold(p) - LANES // 2


class CheapMaskDropout(nn.Dropout):
    """`nn.Dropout` with masks drawn four per 64-bit random number on a CPU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dropped = drop_threshold(self.p)
        if not self.training or x.device.type != "cpu" or dropped in (0, LANES) or self.inplace:
            return super().forward(x)
        keep = keep_mask(x.shape, self.p, x.device)
        return torch.where(keep, x * (LANES / (LANES - dropped)), 0)


def use_cheap_masks(model: nn.Module) -> int:
    """Swap every LoRA `nn.Dropout` of a peft model for `CheapMaskDropout`; how many were swapped."""
    swapped = 0
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if not isinstance(dropouts, nn.ModuleDict):
            continue
        for adapter, dropout in dropouts.items():
            if type(dropout) is nn.Dropout:
                dropouts[adapter] = CheapMaskDropout(dropout.p)
                swapped += 1
    return swapped
