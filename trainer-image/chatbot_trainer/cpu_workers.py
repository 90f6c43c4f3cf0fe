"""A step's micro-batches side by side on a CPU, one core each.

With gradient accumulation a step runs several micro-batches. On a CPU the usual way splits
every operation of one micro-batch across the cores (PyTorch's intra-op threads), one
micro-batch after another; the cores then meet at a barrier after every elementwise op and
every product, and a LoRA step is thousands of small ops. Here each core takes whole
micro-batches instead: one worker thread per core, each with one intra-op thread, runs the
forward and backward passes of every k-th micro-batch of the step (PyTorch and NumPy's BLAS
release the GIL while they compute). On SmolLM2-135M (LoRA r=16 on all linear layers, two AMD
Zen 2 cores) that was 1.2x the tokens/s of the same micro-batches run one after another on two
threads, at the memory of one more micro-batch in flight (see benchmarks/RESULTS.md).

A run stays reproducible: each micro-batch draws its LoRA dropout masks from a seed the main
thread draws, in order, from torch's generator (`lora_dropout.thread_seed`), and its gradients
come from `torch.autograd.grad` (nothing accumulates into `.grad` from two threads) and are
summed in a fixed order. Any number of workers then gives the same masks and, up to the order
of the fp32 sums, the same gradients; the micro-batches run in turn draw their masks from
torch's generator directly, so that is another (equally valid) run.

Taken only where it is safe and measured to pay: a CPU, one training process, eager layers,
at least as many micro-batches per step as threads (each worker then has one core), memory for
one micro-batch in flight per worker, and no dropout layer in the model other than LoRA's
(those draw from torch's shared generator in whatever order the threads reach it).
`CHATBOT_CPU_WORKERS=1` (or another count) in the trainer's environment sets the number.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

from chatbot_trainer import lora_dropout
from chatbot_trainer.hardware import CPU_MEMORY_SHARE


@dataclass(frozen=True)
class WorkerPlan:
    workers: int
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _other_dropout(model) -> bool:
    """Whether the model has dropout layers besides LoRA's that are active in training."""
    from torch import nn

    lora = {id(d) for m in model.modules() for d in getattr(m, "lora_dropout", {}).values()
            if isinstance(getattr(m, "lora_dropout", None), nn.ModuleDict)}
    return any(isinstance(m, nn.Dropout) and m.p > 0 and id(m) not in lora for m in model.modules())


def plan(*, device: str, threads: int, micro_batches: int, world_size: int, compiled: bool,
         model=None, micro_batch_bytes: int | None = None, memory: int | None = None,
         model_bytes: int = 0) -> WorkerPlan:
    """How many micro-batches of a step run side by side, and why.

    `micro_batch_bytes`: the activations one micro-batch keeps for backward; `memory`: what
    this process may still allocate (None: unknown, not limiting); `model_bytes`: the model's.
    """
    requested = os.environ.get("CHATBOT_CPU_WORKERS", "auto").strip().lower() or "auto"
    if requested != "auto" and not requested.isdigit():
        raise ValueError(f"CHATBOT_CPU_WORKERS={requested!r}: use auto or a number of workers")
    if device != "cpu":
        return WorkerPlan(1, f"on {device}")
    if world_size > 1:
        return WorkerPlan(1, "several training processes: each runs its micro-batches in turn")
    if compiled:
        return WorkerPlan(1, "compiled layers run their micro-batches in turn")
    if model is not None and _other_dropout(model):
        return WorkerPlan(1, "the model has dropout layers besides LoRA's (one shared generator)")
    if requested != "auto":
        count = max(1, min(int(requested), micro_batches))
        return WorkerPlan(count, f"CHATBOT_CPU_WORKERS={requested}")
    if threads < 2:
        return WorkerPlan(1, "one thread")
    if micro_batches < threads:
        return WorkerPlan(1, f"{micro_batches} micro-batch(es) per step for {threads} threads: "
                             "each micro-batch's ops split across the threads")
    workers = threads
    if memory and micro_batch_bytes:
        room = int((CPU_MEMORY_SHARE * memory - 1.5 * model_bytes) // micro_batch_bytes)
        if room < 2:
            return WorkerPlan(1, f"memory for one micro-batch in flight ({micro_batch_bytes / 2**30:.1f} GiB each)")
        workers = min(workers, room)
    return WorkerPlan(workers, f"{workers} micro-batches at a time, one core each ({threads} threads)")


def run_step(loss_of: Callable[[Any], Any], batches: Sequence[Any], scale: float, params: Sequence[Any],
             workers: int, context: Callable[[], AbstractContextManager]) -> list[Any]:
    """Forward and backward of a step's micro-batches on `workers` threads of one core each.

    `loss_of(batch)` is a micro-batch's loss sum (run inside `context()`, e.g. autocast, which is
    per thread); the gradient of `scale` × each loss sum is summed into `params`' `.grad`.
    Returns the loss sums (detached) in the batches' order.
    """
    import torch

    threads = torch.get_num_threads()
    # one seed per micro-batch, drawn in order by this thread: the masks do not depend on
    # which worker gets there first
    seeds = [int(torch.randint(0, 2**62, (1,))) for _ in batches]

    def work(first: int):
        torch.set_num_threads(1)
        grads, sums = None, []
        for index in range(first, len(batches), workers):
            with lora_dropout.thread_seed(seeds[index]), context():
                loss_sum = loss_of(batches[index])
            new = torch.autograd.grad(loss_sum * scale, params, allow_unused=True)
            grads = new if grads is None else [_add(a, b) for a, b in zip(grads, new)]
            sums.append((index, loss_sum.detach()))
        return grads, sums

    pool = _pool(workers)
    results = [f.result() for f in [pool.submit(work, w) for w in range(min(workers, len(batches)))]]
    torch.set_num_threads(threads)  # the workers set one thread; the optimizer step gets them all back
    for param, *parts in zip(params, *(grads for grads, _ in results if grads is not None)):
        total = None
        for part in parts:
            total = part if total is None else _add(total, part)
        if total is not None:
            param.grad = total if param.grad is None else param.grad.add_(total)
    return [loss for _, loss in sorted((pair for _, sums in results for pair in sums), key=lambda p: p[0])]


_pools: dict[int, ThreadPoolExecutor] = {}


def _pool(workers: int) -> ThreadPoolExecutor:
    """The same threads for every step: a new thread starts with empty allocator caches (and
    its own malloc arena), which showed as a larger peak memory."""
    if workers not in _pools:
        _pools[workers] = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="micro-batch")
    return _pools[workers]


def _add(a, b):
    if a is None:
        return b
    if b is None:
        return a
    return a.add_(b)
