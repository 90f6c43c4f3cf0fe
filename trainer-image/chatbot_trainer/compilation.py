"""torch.compile of the decoder layers, where it pays back its compile time.

Regional compilation: every decoder layer (the block a model repeats) is compiled on its own
with dynamic shapes, so one compiled graph serves all layers and every batch shape; the
embedding, the chunked output layer and the loss stay eager. Inductor fuses what eager
LoRA training spends much of its time on besides matrix multiplies: the LoRA dropout masks,
the elementwise products of the MLP and norms, the casts. Measured on SmolLM2-135M on a CPU
(benchmarks/RESULTS.md): about 2x the eager tokens/s after a compile of about a minute.

``compile``:
- ``auto``: compile on a CPU when the run is long enough for the saving to repay the compile
  several times over (estimated from the model's matrix-multiply work, the tokens the run will
  train and this CPU's measured matmul speed); eager otherwise (short runs, the demo) and on
  GPUs, where compiled LoRA training is not measured yet.
- ``on`` / ``off``: as asked.

A layer that cannot be compiled falls back to eager (``suppress_errors``), so compiling never
fails a training; the decision and its reason are in the train result.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from chatbot_trainer.errors import InvalidConfig

log = logging.getLogger(__name__)

# Compile time of one decoder layer's forward and backward graphs on a CPU (seconds, 1-2 threads;
# measured 60-100 s for SmolLM2-135M, whose layers all share one graph).
CPU_COMPILE_SECONDS = 90.0
# Expected tokens/s gain of compiled over eager LoRA training on a CPU (measured ~2x).
CPU_COMPILE_SPEEDUP = 2.0
# Compile only when the time saved is at least this many times the compile time.
PAYBACK = 3.0
# Fraction of a CPU's matmul FLOP/s that eager LoRA training reaches (attention, elementwise
# work and the optimizer take the rest; SmolLM2-135M: ~40 of ~100 GFLOP/s on one AVX2 core).
CPU_TRAIN_EFFICIENCY = 0.4


def decoder_layers(model) -> list[Any]:
    """The repeated decoder blocks of a (peft-wrapped) causal LM, or [] when not found."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner = getattr(base, "model", None) or getattr(base, "transformer", None)
    for name in ("layers", "h"):
        layers = getattr(inner, name, None)
        if layers is not None and len(layers) > 0:
            return list(layers)
    return []


def cpu_matmul_flops(threads: int | None = None, size: int = 512) -> float:
    """Measured fp32 matmul FLOP/s of this CPU with the current thread setting."""
    import torch

    local = torch.Generator().manual_seed(0)  # never the global RNG: a resumed run must replay it
    a, b = torch.randn(size, size, generator=local), torch.randn(size, size, generator=local)
    torch.mm(a, b)  # warm-up
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / max(best, 1e-9)


def eager_seconds_estimate(matmul_params: int, tokens: int, flops: float) -> float:
    """Estimated eager time of LoRA training over `tokens` tokens on a CPU.

    Per token: 2N FLOPs forward and 2N backward to the activations (frozen base weights have no
    weight gradients; the LoRA matrices are small), N = parameters in matrix multiplies.
    """
    return 4 * matmul_params * tokens / max(flops * CPU_TRAIN_EFFICIENCY, 1.0)


def cxx_compiler() -> str | None:
    """The C++ compiler Inductor builds CPU kernels with (CXX, else c++/g++/clang++ on PATH)."""
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def decide(requested: str, device: str, *, matmul_params: int, tokens: int,
           flops: float | None = None, compiler: str | None = "detect") -> tuple[bool, str]:
    """(compile?, why) for a run that will train `tokens` tokens on `device`."""
    if requested == "off":
        return False, "compile off requested"
    compiler = cxx_compiler() if compiler == "detect" else compiler
    if requested == "on":
        if device == "cpu" and compiler is None:
            raise InvalidConfig("compile: on needs a C++ compiler on a CPU (g++ or clang++ on PATH, "
                                "or CXX): install one or use compile: auto")
        return True, "compile on requested"
    if device != "cpu":
        return False, f"eager on {device}: compiled LoRA training is measured on CPUs only"
    if compiler is None:
        return False, "eager: no C++ compiler (g++/clang++) for compiled CPU kernels"
    flops = flops if flops is not None else cpu_matmul_flops()
    eager = eager_seconds_estimate(matmul_params, tokens, flops)
    saved = eager * (1 - 1 / CPU_COMPILE_SPEEDUP)
    if saved >= PAYBACK * CPU_COMPILE_SECONDS:
        return True, (f"~{eager / 60:.0f} min of eager training: compiling (~{CPU_COMPILE_SECONDS:.0f} s) "
                      f"saves ~{saved / 60:.0f} min")
    return False, (f"~{eager / 60:.1f} min of eager training: too short to repay a "
                   f"~{CPU_COMPILE_SECONDS:.0f} s compile")


def matmul_params(model) -> int:
    """Parameters that take part in matrix multiplies (all but the input embedding, unless tied)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    embedding = base.get_input_embeddings().weight
    output = base.get_output_embeddings()
    tied = output is not None and output.weight is embedding
    total = sum(p.numel() for p in base.parameters())
    return total if tied else total - embedding.numel()


def compile_layers(model, cache_dir: Path | None = None) -> int:
    """Compile every decoder layer in place (dynamic shapes); returns how many were compiled."""
    import torch
    import torch._dynamo

    layers = decoder_layers(model)
    if not layers:
        return 0
    if cache_dir is not None:
        cache_dir.mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir))
    torch._dynamo.config.suppress_errors = True  # a graph that fails to compile runs eagerly
    # one graph per layer class; every layer instance and batch shape reuses it
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)


def apply(model, requested: str, device: str, *, tokens: int, cache_dir: Path | None = None) -> dict[str, Any]:
    """Decide, compile if so, and return the record for the train result."""
    layers = decoder_layers(model)
    if not layers:
        return {"compiled": False, "reason": "no decoder layers found: eager"}
    compiled, reason = decide(requested, device, matmul_params=matmul_params(model), tokens=tokens)
    if compiled:
        compile_layers(model, cache_dir)
    log.info("torch.compile: %s (%s)", "on" if compiled else "off", reason)
    return {"compiled": compiled, "reason": reason, "layers": len(layers) if compiled else 0}
