"""A step's micro-batches side by side on a CPU, one core each.

With gradient accumulation a step runs several micro-batches. On a CPU the usual way splits
every operation of one micro-batch across the cores (PyTorch's intra-op threads), one
micro-batch after another; the cores then meet at a barrier after every elementwise op and
every product, and a LoRA step is thousands of small ops. Here each core takes whole
micro-batches instead: one worker thread per core, each with one intra-op thread, runs the
forward and backward passes of every k-th micro-batch of the step (PyTorch and NumPy's BLAS
release the GIL while they compute). On SmolLM2-135M (LoRA r=16 on all linear layers, two AMD
Zen 2 cores) that was 1.09-1.17x the tokens/s of the same micro-batches run one after another on
two threads at about the same memory (the node's micro-batch split between the cores), and
1.35x with a whole micro-batch per core, at 1.25x the memory (see benchmarks/RESULTS.md).

A run stays reproducible: each micro-batch draws its LoRA dropout masks from a seed the main
thread draws, in order, from torch's generator (`lora_dropout.thread_seed`), and its gradients
come from `torch.autograd.grad` (nothing accumulates into `.grad` from two threads) and are
summed in a fixed order. Any number of workers then gives the same masks and, up to the order
of the fp32 sums, the same gradients; the micro-batches run in turn draw their masks from
torch's generator directly, so that is another (equally valid) run.

Taken only where it is safe and measured to pay: a CPU, one training process, eager layers,
and no dropout layer in the model other than LoRA's (those draw from torch's shared generator
in whatever order the threads reach it). The micro-batch the node chose is split among the
workers (as many tokens in flight as before, so about the same memory); a `microBatchSize`
set in the resource is kept, and then each worker holds one micro-batch, where memory allows.
`CHATBOT_CPU_WORKERS=1` (or another count) in the trainer's environment sets the number.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

from chatbot_trainer.model import lora_dropout
from chatbot_trainer.train.hardware import CPU_MEMORY_SHARE


@dataclass(frozen=True)
class WorkerPlan:
    workers: int
    reason: str
    micro_batch_size: int  # sequences per micro-batch, as the workers run them

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _other_dropout(model) -> bool:
    """Whether the model has dropout layers besides LoRA's that are active in training."""
    from torch import nn

    lora = {id(d) for m in model.modules() for d in getattr(m, "lora_dropout", {}).values()
            if isinstance(getattr(m, "lora_dropout", None), nn.ModuleDict)}
    return any(isinstance(m, nn.Dropout) and m.p > 0 and id(m) not in lora for m in model.modules())


def plan(*, device: str, threads: int, batch_size: int, micro_batch_size: int, micro_batch_requested: bool,
         world_size: int, compiled: bool, model=None, sequence_bytes: int | None = None,
         memory: int | None = None, model_bytes: int = 0) -> WorkerPlan:
    """How many micro-batches of a step run side by side, of how many sequences, and why.

    A micro-batch size the node chose (not `microBatchSize`) is split among the workers, so
    that as many tokens are in flight as when its micro-batches run in turn (same memory):
    two 256-token micro-batches side by side instead of one of 512. Otherwise each worker runs
    whole micro-batches: one more micro-batch in flight per worker, if memory allows.
    `sequence_bytes`: the activations one sequence keeps for backward; `memory`: what this
    process may still allocate (None: unknown); `model_bytes`: the model's.
    """
    requested = os.environ.get("CHATBOT_CPU_WORKERS", "auto").strip().lower() or "auto"
    if requested != "auto" and not requested.isdigit():
        raise ValueError(f"CHATBOT_CPU_WORKERS={requested!r}: use auto or a number of workers")
    micro_batches = max(1, batch_size // world_size // micro_batch_size)
    in_turn = lambda why: WorkerPlan(1, why, micro_batch_size)  # noqa: E731
    if device != "cpu":
        return in_turn(f"on {device}")
    if world_size > 1:
        return in_turn("several training processes: each runs its micro-batches in turn")
    if compiled:
        return in_turn("compiled layers run their micro-batches in turn")
    if model is not None and _other_dropout(model):
        return in_turn("the model has dropout layers besides LoRA's (one shared generator)")
    if requested != "auto":
        return WorkerPlan(max(1, min(int(requested), micro_batches)), f"CHATBOT_CPU_WORKERS={requested}",
                          micro_batch_size)
    if threads < 2:
        return in_turn("one thread")
    if not micro_batch_requested and micro_batch_size % threads == 0:
        split = micro_batch_size // threads
        return WorkerPlan(threads, f"micro-batches of {micro_batch_size} sequences run as {threads} of {split} "
                                   f"side by side, one core each (as many tokens in flight)", split)
    if micro_batches < threads:
        return in_turn(f"{micro_batches} micro-batch(es) of {micro_batch_size} per step for {threads} threads: "
                       "each micro-batch's ops split across the threads")
    workers = threads
    if memory and sequence_bytes:
        room = int((CPU_MEMORY_SHARE * memory - 1.5 * model_bytes) // (sequence_bytes * micro_batch_size))
        if room < 2:
            return in_turn(f"memory for one micro-batch in flight "
                           f"({sequence_bytes * micro_batch_size / 2**30:.1f} GiB each)")
        workers = min(workers, room)
    return WorkerPlan(workers, f"{workers} micro-batches of {micro_batch_size} at a time, one core each "
                               f"({threads} threads)", micro_batch_size)


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
            total = _add(total, part)
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
