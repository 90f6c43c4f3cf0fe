"""The train step on several processes, with PyTorch's own engine (torchrun, torch.distributed).

torchrun starts one process per GPU (on a CPU, per `--nproc-per-node`) and tells each its
place (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT). The ranks
train data-parallel:

- each optimizer step's global batch (`batchSize`, as the user set it: micro-batch ×
  accumulation × world size) is cut into equal contiguous shards, one per rank;
- a rank's loss is its sum of token losses over the global number of assistant tokens of the
  step (an all-reduce of the counts), times the world size, so the averaged gradient equals
  the single-process gradient over the same global batch;
- gradients are synchronised once per optimizer step (`no_sync` while accumulating);
- DDP wraps the model (only the trainable, LoRA, parameters take part); with
  `distributed.strategy: fsdp`, FSDP2's `fully_shard` shards each transformer block and the
  frozen base across the ranks;
- logged losses and token counts are summed over the ranks: they equal a single process's;
- checkpoints hold full tensors, written once by rank 0: any world size resumes them;
- only rank 0 writes results.

NCCL carries the tensors on GPUs, gloo on CPUs (and the host-side token counts beside NCCL).
Without torchrun (no WORLD_SIZE, or 1) every function here leaves the single process as it is.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from chatbot_trainer.errors import InvalidConfig

log = logging.getLogger("chatbot_trainer.train")

# How long a rank waits for the others in a collective before the run fails (a rank that
# died is noticed by torchrun first, which stops the others).
COLLECTIVE_TIMEOUT = timedelta(minutes=30)


@dataclass(frozen=True)
class Ranks:
    """This process's place among the training processes."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    strategy: str = "ddp"

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def nodes(self) -> int:
        return max(1, self.world_size // max(self.local_world_size, 1))

    def describe(self) -> dict[str, Any]:
        return {"world_size": self.world_size, "nodes": self.nodes,
                "processes_per_node": self.local_world_size, "strategy": self.strategy}


# ---------------------------------------------------------------------------- set-up


def ranks_from_env(environ: Mapping[str, str] | None = None, strategy: str = "ddp") -> Ranks:
    """The place torchrun gave this process (a single process without torchrun)."""
    env = os.environ if environ is None else environ
    world = int(env.get("WORLD_SIZE") or 1)
    return Ranks(
        rank=int(env.get("RANK") or 0),
        world_size=world,
        local_rank=int(env.get("LOCAL_RANK") or 0),
        local_world_size=int(env.get("LOCAL_WORLD_SIZE") or (1 if world == 1 else world)),
        strategy=strategy,
    )


def is_main_process() -> bool:
    """Whether this process writes results (rank 0, or no torchrun at all)."""
    return int(os.environ.get("RANK") or 0) == 0


def start(ranks: Ranks, device: str) -> None:
    """Join the other ranks (NCCL on CUDA, gloo on CPU) and pick this rank's GPU."""
    if not ranks.enabled:
        return
    import torch
    import torch.distributed as dist

    if device == "cuda":
        torch.cuda.set_device(ranks.local_rank)  # "cuda" means this rank's GPU from here on
        backend = "cpu:gloo,cuda:nccl"  # gloo for the host-side token counts
    elif device == "cpu":
        backend = "gloo"
    else:
        raise InvalidConfig(f"distributed training runs on CUDA GPUs or CPUs, not on {device}")
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=COLLECTIVE_TIMEOUT)
    log.info("rank %d of %d (%s, %s, %d node(s))", ranks.rank, ranks.world_size, backend,
             ranks.strategy, ranks.nodes)
    if not ranks.is_main:  # one copy of the progress lines: rank 0's
        logging.getLogger("chatbot_trainer").setLevel(logging.WARNING)


def finish(ranks: Ranks) -> None:
    """Wait for every rank, then leave the process group."""
    if not ranks.enabled:
        return
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier(ranks: Ranks) -> None:
    if ranks.enabled:
        import torch.distributed as dist

        dist.barrier()


# ---------------------------------------------------------------------------- data


def per_rank_batch(batch_size: int, ranks: Ranks) -> int:
    """Sequences each rank takes from a global batch of `batch_size`."""
    if batch_size % ranks.world_size:
        raise InvalidConfig(
            f"batchSize {batch_size} cannot be split evenly over {ranks.world_size} training "
            f"processes: use a multiple of {ranks.world_size}")
    return batch_size // ranks.world_size


def shard(indices: list[int], ranks: Ranks) -> list[int]:
    """This rank's contiguous share of one global batch."""
    per_rank = per_rank_batch(len(indices), ranks)
    return indices[ranks.rank * per_rank:(ranks.rank + 1) * per_rank]


def micro_batches_to_run(batches: list, ranks: Ranks) -> list:
    """Micro-batches worth a forward pass. A single process skips those without assistant
    tokens; ranks run all of theirs, so that each one synchronises gradients equally often."""
    return batches if ranks.enabled else [b for b in batches if b.num_label_tokens > 0]


def global_counts(ranks: Ranks, *counts: int) -> tuple[int, ...]:
    """Host-side counts (tokens of a step) summed over the ranks."""
    if not ranks.enabled:
        return counts
    import torch
    import torch.distributed as dist

    total = torch.tensor(counts, dtype=torch.int64)  # on the CPU: gloo, no device sync
    dist.all_reduce(total)
    return tuple(int(v) for v in total.tolist())


def sum_over_ranks(ranks: Ranks, value) -> float:
    """A device scalar summed over the ranks, as a float (waits for the device)."""
    if not ranks.enabled:
        return float(value.item())
    import torch.distributed as dist

    total = value.detach().clone()
    dist.all_reduce(total)
    return float(total.item())


def main_share(ranks: Ranks, value: float) -> float:
    """A global quantity restored from a checkpoint, counted once: on rank 0 only."""
    return value if ranks.is_main else 0.0


def as_float(value) -> float:
    """A scalar tensor (a DTensor under FSDP) as a float."""
    full = getattr(value, "full_tensor", None)
    return float(full() if full is not None else value)


# ---------------------------------------------------------------------------- model


def check_supported(ranks: Ranks, only_lora: bool) -> None:
    if ranks.enabled and ranks.strategy == "fsdp" and not only_lora:
        raise InvalidConfig(
            "distributed.strategy fsdp trains a LoRA adapter on a frozen base; this base is "
            "trained too (built from a config) or gets new chat tokens: use distributed.strategy ddp")


def wrap(model, ranks: Ranks, device: str, loss: Callable[[Any, Any], Any]) -> Callable[[Any], Any]:
    """What the loop calls for a micro-batch's loss sum: `loss(model, batch)`, run inside DDP
    (replicated model) or FSDP2 (sharded model) when there are several ranks, so that every
    use of a weight, the output layer's too, happens within the wrapper's forward."""
    if not ranks.enabled:
        return lambda batch: loss(model, batch)
    module = _model_loss(model, loss)
    if ranks.strategy == "fsdp":
        return _fully_shard(module, device, ranks.world_size)
    from torch.nn.parallel import DistributedDataParallel

    # device_ids=None: the batch is already on this rank's device, and stays as it is
    return DistributedDataParallel(module, device_ids=None)


def _model_loss(model, loss):
    import torch

    class ModelLoss(torch.nn.Module):
        """The model and its training loss as one module, for DDP or FSDP to wrap."""

        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, batch):
            return loss(self.model, batch)

    return ModelLoss()


def _fully_shard(module, device: str, world_size: int):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device, (world_size,))
    for block in _transformer_blocks(module):
        fully_shard(block, mesh=mesh)
    fully_shard(module, mesh=mesh)  # the rest: embeddings, final norm, output layer
    return module


def _transformer_blocks(model) -> list:
    """The repeated layers of a causal LM (model.layers, transformer.h, …)."""
    import torch

    for module in model.modules():
        if (isinstance(module, torch.nn.ModuleList) and len(module) > 0
                and all(type(m) is type(module[0]) for m in module)
                and type(module[0]).__name__.endswith(("Block", "Layer"))):
            return list(module)
    return []


def gradient_sync(wrapped, ranks: Ranks, last: bool):
    """Synchronise gradients only on a step's last micro-batch (`wrapped`: from wrap())."""
    if not ranks.enabled:
        return nullcontext()
    if ranks.strategy == "fsdp":
        wrapped.set_requires_gradient_sync(last)
        return nullcontext()
    return nullcontext() if last else wrapped.no_sync()


def fused_optimizer_allowed(ranks: Ranks) -> bool:
    """Fused AdamW works on plain tensors, not on FSDP's sharded DTensors."""
    return not (ranks.enabled and ranks.strategy == "fsdp")


# ---------------------------------------------------------------------------- checkpoints


def _full(tensor):
    full = getattr(tensor, "full_tensor", None)
    return full() if full is not None else tensor


def _like(full, reference):
    """`full` laid out as `reference` is: this rank's shard when that is a DTensor."""
    mesh = getattr(reference, "device_mesh", None)
    if mesh is None:
        return full.to(reference.device)
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(reference.device), mesh, reference.placements, src_data_rank=None)


def full_trainable_state(model) -> dict[str, Any]:
    """The trainable weights as full CPU tensors, by their names in the unwrapped model.
    Every rank must call it (FSDP gathers the shards)."""
    return {name: _full(p.detach()).to("cpu").contiguous()
            for name, p in model.named_parameters() if p.requires_grad}


def full_optimizer_state(optimizer) -> dict[str, Any]:
    """The optimizer's state_dict with full tensors. Every rank must call it."""
    state = optimizer.state_dict()
    state["state"] = {index: {key: _full(value).to("cpu") if hasattr(value, "to") else value
                              for key, value in entries.items()}
                      for index, entries in state["state"].items()}
    return state


def load_trainable(model, saved: Mapping[str, Any]) -> None:
    """Copy full saved weights into the model (into this rank's shard under FSDP)."""
    import torch

    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in saved]
    if missing:
        raise ValueError(f"the checkpoint lacks trainable weights such as {missing[0]}")
    with torch.no_grad():
        for name, tensor in saved.items():
            params[name].copy_(_like(tensor.to(params[name].dtype), params[name]))


def load_optimizer_state(optimizer, state: Mapping[str, Any]) -> None:
    """Load a full optimizer state; under FSDP each rank keeps the shards of its parameters."""
    optimizer.load_state_dict(state)
    for group in optimizer.param_groups:
        for param in group["params"]:
            if getattr(param, "device_mesh", None) is None:
                continue
            entries = optimizer.state.get(param, {})
            for key, value in list(entries.items()):
                if key != "step" and hasattr(value, "shape") and tuple(value.shape) == tuple(param.shape):
                    entries[key] = _like(value, param)
