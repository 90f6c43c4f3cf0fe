"""Device, precision and micro-batch size for the node a step runs on.

In the cluster, configure runs in a pod without a GPU while train and evaluate run on GPU
nodes (and a preempted train pod may come back on another GPU type), so these are decided by
each step on its own node: `resolve(params)`. configure records what it saw for the record
(and a local run, where all steps share the machine, shows the same decision).
"""

from __future__ import annotations

from typing import Any

from chatbot_trainer.errors import InvalidConfig

# Tokens per micro-batch that fit comfortably with LoRA on one data-centre GPU; larger batches
# are split into micro-batches with gradient accumulation (microBatchSize overrides).
GPU_TOKENS_PER_MICRO_BATCH = 16384


def detect() -> dict[str, Any]:
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return {
            "device": "cuda",
            "name": props.name,
            "count": torch.cuda.device_count(),
            "memory_gb": round(props.total_memory / 2**30, 1),
            "bf16": bool(torch.cuda.is_bf16_supported()),
        }
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return {"device": "mps", "name": "Apple MPS", "count": 1, "memory_gb": None, "bf16": False}
    return {"device": "cpu", "name": "cpu", "count": 0, "memory_gb": None, "bf16": False,
            "threads": torch.get_num_threads()}


def choose_precision(requested: str, hardware: dict[str, Any]) -> str:
    device = hardware["device"]
    if requested == "auto":
        if device == "cuda":
            return "bf16" if hardware["bf16"] else "fp16"
        return "fp32"
    if requested == "fp16" and device != "cuda":
        raise InvalidConfig(f"precision fp16 needs a CUDA GPU, found {device}: use auto, bf16 or fp32")
    if requested == "bf16" and device == "cuda" and not hardware["bf16"]:
        raise InvalidConfig(f"{hardware['name']} has no bf16 support: use precision auto or fp16")
    return requested


def choose_micro_batch(batch_size: int, requested: int | None, max_seq_length: int, device: str) -> int:
    if requested is not None:
        return requested
    if device == "cpu":
        return batch_size
    fitting = max(1, GPU_TOKENS_PER_MICRO_BATCH // max_seq_length)
    return max(d for d in range(1, batch_size + 1) if batch_size % d == 0 and d <= fitting)


def resolve(params, hardware: dict[str, Any] | None = None) -> dict[str, Any]:
    """The hardware-dependent settings for this node."""
    hardware = hardware or detect()
    micro = choose_micro_batch(params.batch_size, params.micro_batch_size, params.max_seq_length,
                               hardware["device"])
    return {
        "hardware": hardware,
        "device": hardware["device"],
        "precision": choose_precision(params.precision, hardware),
        "micro_batch_size": micro,
        "gradient_accumulation_steps": params.batch_size // micro,
    }
