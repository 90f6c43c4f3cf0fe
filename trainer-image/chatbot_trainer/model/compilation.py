"""torch.compile of the decoder layers (``compile: on``), eager by default.

Regional compilation: every decoder layer (the block a model repeats) is compiled on its own
with dynamic shapes, so one compiled graph serves all layers and every batch shape; the
embedding, the chunked output layer and the loss stay eager.

``compile``:
- ``auto`` (default): eager. Measured on SmolLM2-135M, LoRA on all linear layers, one AVX2 core
  (benchmarks/RESULTS.md): compiled layers trained at 0.8x the eager tokens/s after a compile
  of about a minute, so compiling does not pay back there; GPUs are not measured yet.
- ``on``: compile (a CPU needs a C++ compiler for Inductor's kernels); ``off``: eager.

A layer that cannot be compiled falls back to eager (``suppress_errors``), so compiling never
fails a training; the decision and its reason are in the train result.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

from chatbot_trainer.errors import InvalidConfig

log = logging.getLogger(__name__)


def decoder_layers(model) -> list[Any]:
    """The repeated decoder blocks of a (peft-wrapped) causal LM, or [] when not found."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner = getattr(base, "model", None) or getattr(base, "transformer", None)
    for name in ("layers", "h"):
        layers = getattr(inner, name, None)
        if layers is not None and len(layers) > 0:
            return list(layers)
    return []


def cxx_compiler() -> str | None:
    """The C++ compiler Inductor builds CPU kernels with (CXX, else c++/g++/clang++ on PATH)."""
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def decide(requested: str, device: str, *, compiler: str | None = "detect") -> tuple[bool, str]:
    """(compile?, why) for a train step on `device`."""
    if requested == "off":
        return False, "compile off requested"
    if requested == "auto":
        return False, ("eager: compiled LoRA layers measured at 0.8x eager tokens/s on CPU"
                       if device == "cpu" else f"eager: compiled LoRA training not measured on {device}")
    compiler = cxx_compiler() if compiler == "detect" else compiler
    if device == "cpu" and compiler is None:
        raise InvalidConfig("compile: on needs a C++ compiler on a CPU (g++ or clang++ on PATH, "
                            "or CXX): install one or use compile: auto")
    return True, "compile on requested"


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


def apply(model, requested: str, device: str, *, cache_dir: Path | None = None) -> dict[str, Any]:
    """Decide, compile if so, and return the record for the train result."""
    layers = decoder_layers(model)
    if not layers:
        return {"compiled": False, "reason": "no decoder layers found: eager"}
    compiled, reason = decide(requested, device)
    if compiled:
        compile_layers(model, cache_dir)
    log.info("torch.compile: %s (%s)", "on" if compiled else "off", reason)
    return {"compiled": compiled, "reason": reason, "layers": len(layers) if compiled else 0}
