"""One autograd node per LoRA linear layer on a CPU: base product, dropout and adapter fused.

peft's `lora.Linear` computes `base(x) + lora_B(lora_A(dropout(x))) * scaling` as separate
operations: the adapter's (tokens × out_features) output is written, scaled into a second
tensor and added into a third, and the backward pass walks the same chain, about ten autograd
nodes per layer (SmolLM2-135M has 210 such layers). The fused layer does the same arithmetic as one
node:

- forward: `y = x Wᵀ + b`, then `y += scaling · (dropout(x) Aᵀ) Bᵀ` in place (one `addmm_`,
  which accumulates in the product itself rather than in a separate pass);
- the LoRA scaling and the dropout's 1/(1 - p) multiply the (tokens × rank) products only;
- the dropout mask is kept as 0/1 bytes and applied by multiplication (`torch.where` on a bool
  mask is ~6× slower on a CPU); backward re-applies it to the saved input rather than keeping
  a dropped copy of the input per layer (q, k and v share one input, so one copy serves all
  three), and adds the dropout's gradient into the input's with one `addcmul_`.

Under CPU autocast the products run in the autocast dtype as peft's do (`F.linear` autocasts),
and the gradients of the fp32 adapter weights are returned in fp32. The fused path is taken
only where it computes exactly what peft would: one active plain-LoRA adapter on an
`nn.Linear`, not merged, gradients on, CPU tensors, no per-call adapter names; anything else
(GPUs, DoRA, evaluation under `no_grad`) goes through peft's own forward.
The fp32 products go through `cpu_blas`, which runs them in OpenBLAS where that was timed
faster than PyTorch's own BLAS on the CPU (AMD CPUs) and leaves them to PyTorch elsewhere.
`CHATBOT_FUSED_LORA=off` in the trainer's environment keeps peft's layers as they are.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from chatbot_trainer.model import cpu_blas
from chatbot_trainer.model.lora_dropout import (
    LANES,
    drop_threshold,
    keep_lanes,
    keep_scale,
)


class _LoraLinearFunction(torch.autograd.Function):
    """y = x Wᵀ + b + scaling · ((x ⊙ keep) · keep_scale) Aᵀ Bᵀ, with keep a 0/1 uint8 mask (or None).

    The dropout's 1/(1 - p) (`keep_scale`) and LoRA's `scaling` are applied to the
    (tokens × rank) products, never to a (tokens × features) tensor.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling: float, keep, keep_scale: float):
        flat = x.reshape(-1, x.shape[-1])
        y = cpu_blas.linear(flat, weight, bias)  # autocasts like peft's base layer
        dropped = flat if keep is None else flat * keep.to(flat.dtype)
        hidden = cpu_blas.linear(dropped, lora_a)  # (tokens, rank)
        if keep_scale != 1.0:
            hidden.mul_(keep_scale)
        y.addmm_(hidden.to(y.dtype), lora_b.t().to(y.dtype), alpha=scaling)
        ctx.save_for_backward(flat, weight, lora_a, lora_b, hidden, keep)
        ctx.scaling, ctx.keep_scale = scaling, keep_scale
        ctx.has_bias = bias is not None
        ctx.in_shape = x.shape
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        flat, weight, lora_a, lora_b, hidden, keep = ctx.saved_tensors
        dtype = hidden.dtype  # the dtype the products ran in (bf16 under autocast)
        grad = grad_out.reshape(-1, grad_out.shape[-1]).to(dtype)
        grad_b = cpu_blas.mm(grad.t(), hidden).mul_(ctx.scaling)
        # d loss / d (dropped x), up to the 0/1 mask: scaled on the (tokens, rank) side
        grad_hidden = cpu_blas.mm(grad, lora_b.to(dtype)).mul_(ctx.scaling * ctx.keep_scale)
        mask = None if keep is None else keep.to(dtype)
        dropped = flat.to(dtype) if mask is None else flat.to(dtype) * mask
        grad_a = cpu_blas.mm(grad_hidden.t(), dropped)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = cpu_blas.mm(grad, weight.to(dtype))
            grad_dropped = cpu_blas.mm(grad_hidden, lora_a.to(dtype))
            if mask is None:
                grad_x.add_(grad_dropped)
            else:
                grad_x.addcmul_(grad_dropped, mask)
            grad_x = grad_x.view(ctx.in_shape)
        grad_bias = grad.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, None, grad_bias, grad_a, grad_b, None, None, None


def _fused_forward(layer, x: torch.Tensor, *args, **kwargs):
    """peft's forward where the fused path does not apply, the fused node where it does."""
    adapter = _plain_adapter(layer)
    if adapter is None or args or kwargs or x.device.type != "cpu" or not torch.is_grad_enabled():
        return type(layer).peft_forward(layer, x, *args, **kwargs)
    dropout = layer.lora_dropout[adapter]
    p = float(getattr(dropout, "p", 0.0)) if dropout.training else 0.0
    dropped = drop_threshold(p)
    if dropped >= LANES:
        return type(layer).peft_forward(layer, x, *args, **kwargs)
    keep, scale = None, 1.0
    if dropped > 0:
        keep = keep_lanes(torch.Size((x.numel() // x.shape[-1], x.shape[-1])), p, x.device)
        scale = keep_scale(p)
    base = layer.base_layer
    return _LoraLinearFunction.apply(
        x, base.weight, base.bias, layer.lora_A[adapter].weight, layer.lora_B[adapter].weight,
        float(layer.scaling[adapter]), keep, scale,
    )


def _plain_adapter(layer) -> str | None:
    """The one active plain-LoRA adapter of an unmerged layer, or None."""
    if layer.disable_adapters or layer.merged or layer.fan_in_fan_out:
        return None
    active = [name for name in layer.active_adapters if name in layer.lora_A]
    if len(active) != 1 or active[0] in layer.lora_variant:
        return None
    if type(layer.base_layer) is not nn.Linear:
        return None
    if layer.lora_A[active[0]].bias is not None or layer.lora_B[active[0]].bias is not None:
        return None
    return active[0]


def enabled() -> bool:
    """Whether training uses the fused layers (`CHATBOT_FUSED_LORA=off` keeps peft's)."""
    return os.environ.get("CHATBOT_FUSED_LORA", "on").strip().lower() not in ("off", "0", "false", "no")


_FUSED_CLASSES: dict[type, type] = {}


def _fused_class(cls: type) -> type:
    if cls not in _FUSED_CLASSES:
        _FUSED_CLASSES[cls] = type(cls.__name__, (cls,), {
            "forward": _fused_forward,
            "peft_forward": cls.forward,
            "__module__": cls.__module__,
            "__doc__": cls.__doc__,
        })
    return _FUSED_CLASSES[cls]


def base_shapes(model: nn.Module) -> list[tuple[int, int]]:
    """The (out, in) shapes of the fused layers' base weights, each once."""
    return sorted({tuple(m.base_layer.weight.shape) for m in model.modules()
                   if type(m).forward is _fused_forward})


def use_fused_lora(model: nn.Module) -> int:
    """Give every peft `lora.Linear` of the model the fused CPU path; how many were changed.

    The layers keep their class for peft (a subclass, same parameters and state dict), so
    saving, merging and GPU training are unchanged.
    """
    from peft.tuners.lora.layer import Linear

    changed = 0
    for module in model.modules():
        if type(module) is Linear:
            module.__class__ = _fused_class(Linear)
            changed += 1
    return changed
