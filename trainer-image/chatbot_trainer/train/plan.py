"""The train step's plan for this node: what configure decided, with this node's device,
precision and micro-batches, and the order the training sequences are drawn in."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

import numpy as np

from chatbot_trainer.errors import InvalidConfig
from chatbot_trainer.train import distributed, hardware


@dataclass
class TrainPlan:
    """What configure decided, with defaults for anything it left out."""

    base_model_path: str
    architecture: str
    device: str
    precision: str  # fp32 | bf16 | fp16
    precision_reason: str
    micro_batch_size: int
    gradient_accumulation_steps: int
    warmup_steps: int
    target_modules: list[str] | None
    train_base_weights: bool

    @classmethod
    def from_configure(cls, configure: dict[str, Any], params,
                       ranks: distributed.Ranks = distributed.Ranks()) -> "TrainPlan":
        base = configure.get("base_model") or {}
        path = configure.get("base_model_path") or base.get("name_or_path")
        if not path:
            raise InvalidConfig("configure/result.json has no base_model_path: run the configure step again")
        # this node's GPU (or CPU and memory), not the one configure ran on
        distributed.per_rank_batch(params.batch_size, ranks)
        node = hardware.resolve(params, model_config=hardware.model_config_of(str(path)),
                                world_size=ranks.world_size, processes_per_node=ranks.local_world_size)
        warmup = configure.get("warmup_steps")
        if warmup is None:
            warmup = params.warmup_steps if params.warmup_steps is not None else math.ceil(0.03 * params.training_steps)
        return cls(
            base_model_path=str(path),
            architecture=str(base.get("architecture") or "unknown"),
            device=node["device"],
            precision=node["precision"],
            precision_reason=node["precision_reason"],
            micro_batch_size=node["micro_batch_size"],
            gradient_accumulation_steps=node["gradient_accumulation_steps"],
            warmup_steps=int(warmup),
            target_modules=_as_list(configure.get("target_modules") or params.lora.target_modules),
            train_base_weights=bool(configure.get("train_base_weights", base.get("source") == "scratch")),
        )


def _as_list(value: Any) -> list[str] | None:
    if not value:
        return None
    return [value] if isinstance(value, str) else list(value)


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def epoch_order(num_sequences: int, seed: int, epoch: int) -> np.ndarray:
    """The shuffled order of the sequences in one epoch (a pure function of seed and epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(num_sequences)


def sequence_indices(start: int, count: int, num_sequences: int, seed: int) -> list[int]:
    """Sequences number start … start+count-1 of the endless stream of shuffled epochs."""
    out: list[int] = []
    position = start
    order = None
    order_epoch = -1
    while len(out) < count:
        epoch, offset = divmod(position, num_sequences)
        if epoch != order_epoch:
            order, order_epoch = epoch_order(num_sequences, seed, epoch), epoch
        take = min(count - len(out), num_sequences - offset)
        out.extend(int(i) for i in order[offset : offset + take])
        position += take
    return out
