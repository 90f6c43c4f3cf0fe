"""How one optimizer step's micro-batches run on this node: the execution modes behind one interface.

- in turn (``InTurn``): one process, or one rank of several with DDP or FSDP (see
  distributed): each micro-batch's forward and backward pass in order, the ranks' gradients
  synchronised on the last one;
- side by side (``SideBySide``): on a CPU with several cores, each core takes whole
  micro-batches, one thread each (see cpu_workers).

``run(batches, label_tokens, loss_total)`` does the forward and backward passes of a step's
micro-batches, the loss of each scaled by the step's assistant tokens, and adds their summed
token losses to ``loss_total``. The train loop calls nothing else that differs between modes.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Callable

from chatbot_trainer.train import cpu_workers, distributed, hardware


def autocast(device: str, precision: str):
    import torch

    if device == "cuda" and precision in ("bf16", "fp16"):
        return torch.autocast("cuda", dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
    if device == "cpu" and precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return nullcontext()


class InTurn:
    """Micro-batches one after another (one process, or this rank's share under DDP/FSDP)."""

    def __init__(self, forward_loss: Callable, ranks: distributed.Ranks, device: str, precision: str, scaler):
        self.forward_loss, self.ranks, self.device, self.precision = forward_loss, ranks, device, precision
        self.scaler = scaler
        self.pin = device == "cuda"

    def run(self, batches: list, label_tokens: int, loss_total) -> None:
        for number, batch in enumerate(batches, 1):
            if self.pin:
                batch = batch.pin_memory()
            batch = batch.to(self.device, non_blocking=True)
            with distributed.gradient_sync(self.forward_loss, self.ranks, last=number == len(batches)):
                with autocast(self.device, self.precision):
                    loss_sum = self.forward_loss(batch)
                # × world size: the ranks' gradients are averaged, the tokens counted globally
                loss = loss_sum * self.ranks.world_size / max(label_tokens, 1)
                (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            loss_total += loss_sum.detach().double()


class SideBySide:
    """Whole micro-batches on the CPU's cores at once (one process: nothing to synchronise)."""

    def __init__(self, forward_loss: Callable, trainable: list, workers: int, device: str, precision: str):
        self.forward_loss, self.trainable, self.workers = forward_loss, trainable, workers
        self.device, self.precision = device, precision

    def run(self, batches: list, label_tokens: int, loss_total) -> None:
        for loss_sum in cpu_workers.run_step(
            self.forward_loss, batches, 1.0 / max(label_tokens, 1), self.trainable, self.workers,
            lambda: autocast(self.device, self.precision),
        ):
            loss_total += loss_sum.double()


def plan_workers(plan, params, model, ranks: distributed.Ranks, compiled: bool) -> Any:
    """How many of a step's micro-batches run side by side (cpu_workers), for this node."""
    import torch

    config = model.config.to_dict() if hasattr(model.config, "to_dict") else {}
    model_bytes, per_token = hardware.training_bytes(config)
    return cpu_workers.plan(
        device=plan.device, threads=torch.get_num_threads(), batch_size=params.batch_size,
        micro_batch_size=plan.micro_batch_size, micro_batch_requested=params.micro_batch_size is not None,
        world_size=ranks.world_size, compiled=compiled, model=model,
        sequence_bytes=per_token * params.max_seq_length,
        memory=hardware.available_memory() if plan.device == "cpu" else None, model_bytes=model_bytes,
    )


def for_workers(workers, forward_loss: Callable, trainable: list, ranks: distributed.Ranks, plan, scaler):
    """The execution mode the worker plan chose."""
    if workers.workers > 1:
        return SideBySide(forward_loss, trainable, workers.workers, plan.device, plan.precision)
    return InTurn(forward_loss, ranks, plan.device, plan.precision, scaler)
