"""The frozen base layers' fp32 products on a CPU, through the faster of two BLAS libraries.

PyTorch's CPU wheels run fp32 matrix products through Intel's MKL. On AMD CPUs MKL does not
use its best kernels: on an AMD EPYC (Zen 2, AVX2) it reached 64-72 GFLOP/s on one thread at
SmolLM2's layer shapes (1024 tokens × 576 → 1536 and back), where OpenBLAS (bundled with
NumPy's wheels; it picks its kernels per CPU at run time) reached 87-92. A LoRA step spends
~80% of its time in the frozen layers' products (forward, and the input's gradient), so the
choice decides most of a CPU step's time.

`choose()` times both libraries once per process, at the model's shapes and with the thread
count training uses, each product followed by elementwise work as in a step, and keeps
OpenBLAS only where it is clearly faster. On one thread of that EPYC it is (1.2-1.4x); on
several threads OpenBLAS's spinning workers and PyTorch's OpenMP threads fight over the cores
(0.5x on 2 threads) and PyTorch keeps the products, as it does where MKL is the faster
library. `linear` and `mm` then run the fp32 products of the fused LoRA layers and of the
output layer through the chosen library: NumPy views of the tensors' memory (no copy) and a
tensor view of the result. Anything else (autocast, half precision,
GPUs, layouts a BLAS cannot take without a copy) stays with PyTorch. `CHATBOT_CPU_BLAS=torch`
(or `openblas`) in the trainer's environment skips the timing and fixes the choice.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

# OpenBLAS is kept only when this much faster than PyTorch's own products (timing noise on a
# shared machine is a few percent).
MIN_SPEEDUP = 1.1
PROBE_ROWS = 512  # tokens per timed product: a micro-batch's order of magnitude
# Layers with fewer weights than this keep PyTorch's products: there the call's overhead, not
# the library's kernels, decides, and the step's time is not in the products anyway.
MIN_LAYER_WEIGHTS = 256 * 256


@dataclass(frozen=True)
class BlasChoice:
    backend: str  # "openblas" or "torch"
    reason: str
    speedup: float | None = None  # OpenBLAS's products vs PyTorch's, as timed by the probe
    threads: int | None = None

    def as_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


_active = False  # whether `linear` and `mm` route fp32 CPU products to OpenBLAS


def active() -> bool:
    return _active


def activate(choice: BlasChoice) -> None:
    """Route the products as `choice` says (process-wide; `choose` calls it)."""
    global _active
    _active = choice.backend == "openblas"


def _blas_layout(t: torch.Tensor) -> bool:
    """A 2-D fp32 CPU tensor a BLAS takes as it is (rows or columns contiguous)."""
    return (
        t.dim() == 2
        and t.dtype == torch.float32
        and t.device.type == "cpu"
        and (t.stride(1) == 1 or t.stride(0) == 1)
        and not t.is_neg()
        and not t.is_conj()
    )


def _routed(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether a product of a and b goes to OpenBLAS: routing on, fp32 BLAS layouts, no autocast,
    and nothing to record for autograd (inside an autograd Function's forward or backward)."""
    return (
        _active
        and _blas_layout(a)
        and _blas_layout(b)
        and not torch.is_autocast_enabled("cpu")
        and not (torch.is_grad_enabled() and (a.requires_grad or b.requires_grad))
        and not torch.compiler.is_compiling()  # a compiled graph keeps its own products
    )


def openblas_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b in NumPy's OpenBLAS: NumPy views of the operands, a tensor view of the result."""
    import numpy as np

    return torch.from_numpy(np.matmul(a.detach().numpy(), b.detach().numpy()))


def mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b (2-D)."""
    return openblas_mm(a, b) if _routed(a, b) else a.mm(b)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T + bias, x 2-D (what F.linear computes)."""
    if not _routed(x, weight) or (bias is not None and bias.dtype != torch.float32):
        return F.linear(x, weight, bias)
    out = openblas_mm(x, weight.t())
    if bias is not None:
        out.add_(bias)
    return out


# ------------------------------------------------------------------------------ the choice


def set_openblas_threads(threads: int) -> bool:
    """Give NumPy's OpenBLAS the thread count PyTorch trains with; False if there is none."""
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return False
    import numpy  # noqa: F401 - loads its BLAS so that threadpoolctl finds it

    openblas = ThreadpoolController().select(internal_api="openblas")
    if not openblas.lib_controllers:
        return False
    openblas.limit(limits=threads)  # kept for the process (no restore)
    return True


def _seconds_per_product(product, repeats: int = 3) -> float:
    product()  # warm-up: first-touch pages, thread start
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        product()
        best = min(best, time.perf_counter() - started)
    return best


def _time_backends(shapes: list[tuple[int, int]], threads: int) -> tuple[float, float]:
    """Seconds for one forward and one input-gradient product per (out, in) shape, PyTorch then
    OpenBLAS, on random data; alternated so that a busy neighbour hurts both alike.

    Each product is followed by an elementwise PyTorch operation on its result, as in a training
    step: with several threads, OpenBLAS's workers keep spinning after a product and PyTorch's
    OpenMP threads then compete with them for the cores (measured on 2 threads: products alone
    1.2x faster through OpenBLAS, products and elementwise work together 1.4x slower); timing
    the pair catches that."""
    generator = torch.Generator().manual_seed(0)
    rows = min(PROBE_ROWS * max(1, threads), 4 * PROBE_ROWS)
    operands = []
    for out_features, in_features in shapes:
        x = torch.randn(rows, in_features, generator=generator)
        w = torch.randn(out_features, in_features, generator=generator)
        g = torch.randn(rows, out_features, generator=generator)
        operands.append((x, w, g))

    def with_torch():
        for x, w, g in operands:
            F.linear(x, w).mul_(0.5)
            g.mm(w).mul_(0.5)

    def with_openblas():
        for x, w, g in operands:
            openblas_mm(x, w.t()).mul_(0.5)
            openblas_mm(g, w).mul_(0.5)

    torch_s, openblas_s = [], []
    for _ in range(2):
        torch_s.append(_seconds_per_product(with_torch))
        openblas_s.append(_seconds_per_product(with_openblas))
    return min(torch_s), min(openblas_s)


def choose(shapes: list[tuple[int, int]], device_type: str, dtype: torch.dtype,
           threads: int | None = None) -> BlasChoice:
    """Pick the library for the fp32 CPU products of layers of these (out, in) shapes, and
    route `linear` and `mm` accordingly. `threads`: how many threads each product gets in
    training (default: PyTorch's current count)."""
    torch_threads = torch.get_num_threads()
    threads = threads or torch_threads
    if threads != torch_threads:
        torch.set_num_threads(threads)  # time PyTorch's products with the threads they will get
    try:
        return _choose(shapes, device_type, dtype, threads)
    finally:
        torch.set_num_threads(torch_threads)


def _choose(shapes: list[tuple[int, int]], device_type: str, dtype: torch.dtype, threads: int) -> BlasChoice:
    forced = os.environ.get("CHATBOT_CPU_BLAS", "auto").strip().lower() or "auto"
    if device_type != "cpu" or dtype != torch.float32:
        choice = BlasChoice("torch", f"products run on {device_type} in {str(dtype).removeprefix('torch.')}")
    elif forced not in ("auto", "openblas", "torch"):
        raise ValueError(f"CHATBOT_CPU_BLAS={forced!r}: use auto, openblas or torch")
    elif forced == "torch":
        choice = BlasChoice("torch", "CHATBOT_CPU_BLAS=torch")
    elif forced == "auto" and max((o * i for o, i in shapes), default=0) < MIN_LAYER_WEIGHTS:
        choice = BlasChoice("torch", f"layers under {MIN_LAYER_WEIGHTS} weights: not worth timing")
    elif not set_openblas_threads(threads):
        choice = BlasChoice("torch", "no OpenBLAS found (NumPy's wheels bundle it; threadpoolctl sets its threads)")
    elif forced == "openblas":
        choice = BlasChoice("openblas", "CHATBOT_CPU_BLAS=openblas", threads=threads)
    else:
        torch_s, openblas_s = _time_backends(sorted(set(shapes)), threads)
        speedup = round(torch_s / openblas_s, 2)
        timed = f"OpenBLAS timed {speedup}x PyTorch's products at the model's shapes on {threads} thread(s)"
        if speedup >= MIN_SPEEDUP:
            choice = BlasChoice("openblas", timed, speedup, threads)
        else:
            choice = BlasChoice("torch", f"{timed} (kept only from {MIN_SPEEDUP}x)", speedup, threads)
    activate(choice)
    return choice
