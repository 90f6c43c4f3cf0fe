"""Device, precision and micro-batch size for the node a step runs on.

In the cluster, configure runs in a pod without a GPU while train and evaluate run on GPU
nodes (and a preempted train pod may come back on another GPU type), so these are decided by
each step on its own node: `resolve(params)`. configure records what it saw for the record
(and a local run, where all steps share the machine, shows the same decision).

Precision `auto`: bf16 autocast (fp32 master weights and optimizer state) on GPUs with bf16
and on CPUs with native bf16 arithmetic (avx512_bf16 or AMX: a bf16 matmul is several times an
fp32 one there); fp16 with loss scaling on older GPUs; fp32 on other CPUs, where bf16 is
emulated and slower. The decision and its reason are in every train result.

Micro-batch: a token budget per micro-batch, larger batches run as gradient accumulation. On a
GPU, a budget that fits one data-centre GPU; on a CPU, a small one (a CPU is as fast per token
on 512-token micro-batches as on larger ones, and peak memory falls with the micro-batch), further
bounded by what fits in the memory this process may use (the cgroup limit or MemAvailable,
shared by the training processes of the node), estimated from the model's shape, so a local run
fits the machine it runs on.

CPU threads: a step sizes its thread pools by its container's CPU quota (a pod's CPU limit),
not by the node's cores (`apply_cpu_threads`, at process start, before torch is imported).
"""

from __future__ import annotations

import os
import sys
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

from chatbot_trainer.errors import InvalidConfig

# Tokens per micro-batch that fit comfortably with LoRA on one data-centre GPU; larger batches
# are split into micro-batches with gradient accumulation (microBatchSize overrides).
GPU_TOKENS_PER_MICRO_BATCH = 16384
CPU_TOKENS_PER_MICRO_BATCH = 512


# Bytes of activations kept for backward per token and layer, in units of hidden and
# intermediate size (fp32 LoRA training, sdpa attention); fitted to measured peaks
# (SmolLM2-135M: ~3.0 GB at 4 x 128 tokens, ~5.2 GB at 4 x 256).
ACTIVATION_BYTES_PER_HIDDEN = 32 * 4
ACTIVATION_BYTES_PER_INTERMEDIATE = 12 * 4
CPU_MEMORY_SHARE = 0.7  # of the memory available when the step starts


def cpu_bf16() -> tuple[bool, str]:
    """Whether this CPU computes bf16 natively, and the flag that says so (Linux /proc/cpuinfo)."""
    try:
        flags = next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("flags")), [])
    except OSError:
        flags = []
    for flag in ("amx_bf16", "avx512_bf16"):
        if flag in flags:
            return True, flag
    return False, "no avx512_bf16 or amx_bf16 in /proc/cpuinfo"


def available_memory() -> int | None:
    """Bytes this process may still allocate: the smaller of the cgroup limit and MemAvailable."""
    found: list[int] = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except OSError:
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
            found.append(int(limit) - used)
    except (OSError, ValueError):
        pass
    return min(found) if found else None


# ---------------------------------------------------------------------------- CPU threads

CGROUP_ROOT = Path("/sys/fs/cgroup")
# Thread pools sized at start-up from these: OpenMP (torch's intra-op threads), OpenBLAS and
# MKL, the tokenizers' Rayon pool (both names: older Rayon reads RAYON_RS_NUM_CPUS).
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                    "RAYON_NUM_THREADS", "RAYON_RS_NUM_CPUS")


def _cgroup_quota(root: Path) -> tuple[float, str] | None:
    """CPUs of the container's CFS quota (cgroup v2 cpu.max, else v1), or None without one."""
    try:
        fields = (root / "cpu.max").read_text().split()
    except OSError:
        fields = []
    if fields:
        if fields[0] == "max":
            return None
        try:
            quota, period = int(fields[0]), int(fields[1]) if len(fields) > 1 else 100000
        except ValueError:
            return None
        if quota > 0 and period > 0:
            return quota / period, f"cgroup v2 cpu.max {quota} {period}"
        return None
    for folder in ("cpu", "cpu,cpuacct", "cpuacct,cpu", "."):
        try:
            quota = int((root / folder / "cpu.cfs_quota_us").read_text())
            period = int((root / folder / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            continue
        if quota > 0 and period > 0:
            return quota / period, f"cgroup v1 cpu.cfs_quota_us {quota} / cpu.cfs_period_us {period}"
        return None
    return None


def _affinity() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def cpu_quota_threads(cgroup_root: str | os.PathLike[str] = CGROUP_ROOT,
                      affinity: int | None = None) -> dict[str, Any]:
    """Threads this container's CPU share supports: its CFS quota (a pod's CPU limit) rounded
    down, at least 1, at most the CPUs it may run on (``os.sched_getaffinity``).

    ``{"threads", "cpus_allowed", "quota_cpus" (None without a quota), "source"}``. Without a
    quota the thread pools keep their own defaults (torch: the physical cores), so
    ``limited`` says whether the quota is what bounds the threads.
    """
    allowed = affinity if affinity is not None else _affinity()
    found = _cgroup_quota(Path(cgroup_root))
    if found is None:
        return {"threads": allowed, "cpus_allowed": allowed, "quota_cpus": None, "limited": False,
                "source": f"no CPU quota; {allowed} CPUs in the affinity mask"}
    cpus, source = found
    threads = max(1, min(allowed, int(cpus)))
    return {"threads": threads, "cpus_allowed": allowed, "quota_cpus": round(cpus, 3),
            "limited": threads < allowed, "source": source}


def apply_cpu_threads(environ: MutableMapping[str, str] | None = None,
                      cgroup_root: str | os.PathLike[str] = CGROUP_ROOT,
                      affinity: int | None = None) -> dict[str, Any]:
    """Size the CPU thread pools by the container's CPU quota, before torch starts them.

    An explicit ``OMP_NUM_THREADS`` wins and sizes the other pools too; otherwise, where a
    quota bounds the threads, every variable of :data:`THREAD_VARIABLES` that is not set gets
    the quota's figure (a pod asking for 4 CPUs on a 64-core node runs 4 threads, not 64
    contending for 4 CPUs' time). Where torch is already imported its intra-op pool is resized.
    Returns what it decided (the ``cpu_threads`` of every step result).
    """
    global _applied
    environ = os.environ if environ is None else environ
    info = cpu_quota_threads(cgroup_root, affinity)
    if environ is os.environ:
        _applied = info
    explicit = (environ.get("OMP_NUM_THREADS") or "").strip()
    if explicit.isdigit() and int(explicit) > 0:
        threads, info["decided_by"] = int(explicit), "OMP_NUM_THREADS"
    elif info["limited"]:
        threads, info["decided_by"] = info["threads"], "cpu quota"
    else:
        info["decided_by"] = "defaults"
        return info
    info["threads"] = threads
    info["set"] = {}
    for name in THREAD_VARIABLES:
        if not (environ.get(name) or "").strip():
            environ[name] = str(threads)
            info["set"][name] = str(threads)
    torch = sys.modules.get("torch")
    if torch is not None and environ is os.environ and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return info


_applied: dict[str, Any] | None = None  # what apply_cpu_threads decided in this process


def cpu_threads_in_effect() -> dict[str, Any]:
    """The CPU thread decision of this process (apply_cpu_threads', or the quota's figure when
    it was not applied) with torch's intra-op threads where torch is loaded."""
    info = dict(_applied) if _applied is not None else {**cpu_quota_threads(), "decided_by": "not applied"}
    torch = sys.modules.get("torch")
    if torch is not None:
        info["torch_threads"] = torch.get_num_threads()
    return info


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
    bf16, why = cpu_bf16()
    memory = available_memory()
    return {"device": "cpu", "name": "cpu", "count": 0,
            "memory_gb": round(memory / 2**30, 1) if memory else None, "bf16": bf16, "bf16_reason": why,
            "threads": torch.get_num_threads()}


def choose_precision(requested: str, hardware: dict[str, Any]) -> str:
    device = hardware["device"]
    if requested == "auto":
        if device == "cuda":
            return "bf16" if hardware["bf16"] else "fp16"
        return "bf16" if device == "cpu" and hardware.get("bf16") else "fp32"
    if requested == "fp16" and device != "cuda":
        raise InvalidConfig(f"precision fp16 needs a CUDA GPU, found {device}: use auto, bf16 or fp32")
    if requested == "bf16" and device == "cuda" and not hardware["bf16"]:
        raise InvalidConfig(f"{hardware['name']} has no bf16 support: use precision auto or fp16")
    return requested


def precision_reason(requested: str, chosen: str, hardware: dict[str, Any]) -> str:
    if requested != "auto":
        return f"precision {requested} requested"
    if hardware["device"] == "cuda":
        return f"{hardware['name']} {'supports bf16' if chosen == 'bf16' else 'has no bf16: fp16 with loss scaling'}"
    if hardware["device"] == "cpu":
        why = hardware.get("bf16_reason", "")
        return f"CPU has {why}: bf16 autocast" if chosen == "bf16" else f"fp32: {why or 'no native bf16'}"
    return f"fp32 on {hardware['device']}"


def training_bytes(model_config: dict[str, Any]) -> tuple[int, int]:
    """(bytes of the fp32 model, activation bytes per token) for LoRA training of this shape."""
    hidden = int(model_config.get("hidden_size") or model_config.get("n_embd") or 0)
    layers = int(model_config.get("num_hidden_layers") or model_config.get("n_layer") or 0)
    inter = int(model_config.get("intermediate_size") or model_config.get("n_inner") or 4 * hidden)
    vocab = int(model_config.get("vocab_size") or 0)
    embeddings = vocab * hidden * (1 if model_config.get("tie_word_embeddings", True) else 2)
    params = embeddings + layers * (4 * hidden * hidden + 3 * hidden * inter)
    per_token = layers * (ACTIVATION_BYTES_PER_HIDDEN * hidden + ACTIVATION_BYTES_PER_INTERMEDIATE * inter)
    return 4 * params, per_token


def cpu_micro_batch(batch_size: int, max_seq_length: int, model_config: dict[str, Any] | None,
                    memory: int | None) -> int:
    """The largest divisor of batch_size within the CPU token budget whose activations fit in `memory`."""
    fitting = max(1, CPU_TOKENS_PER_MICRO_BATCH // max_seq_length)
    if model_config and memory:
        model_bytes, per_token = training_bytes(model_config)
        budget = CPU_MEMORY_SHARE * memory - 1.5 * model_bytes
        fitting = min(fitting, int(budget // max(per_token * max_seq_length, 1)))
    return max([d for d in range(1, batch_size + 1) if batch_size % d == 0 and d <= fitting] or [1])


def choose_micro_batch(batch_size: int, requested: int | None, max_seq_length: int, device: str,
                       model_config: dict[str, Any] | None = None, memory: int | None = None) -> int:
    if requested is not None:
        return requested
    if device == "cpu":
        return cpu_micro_batch(batch_size, max_seq_length, model_config, memory)
    fitting = max(1, GPU_TOKENS_PER_MICRO_BATCH // max_seq_length)
    return max(d for d in range(1, batch_size + 1) if batch_size % d == 0 and d <= fitting)


def model_config_of(path: str | None) -> dict[str, Any] | None:
    """config.json of a local model directory (None for hub ids and missing files)."""
    import json

    if not path or not (Path(path) / "config.json").is_file():
        return None
    return json.loads((Path(path) / "config.json").read_text())


def resolve(params, hardware: dict[str, Any] | None = None, model_config: dict[str, Any] | None = None,
            *, world_size: int = 1, processes_per_node: int = 1) -> dict[str, Any]:
    """The hardware-dependent settings for this node (`model_config` sizes CPU micro-batches).

    With several training processes each takes batchSize / world_size sequences of every
    step, and on a CPU the processes of a node share its memory.
    """
    hardware = hardware or detect()
    memory_gb = hardware.get("memory_gb")
    batch = params.batch_size // world_size
    memory = int(memory_gb * 2**30 / processes_per_node) if memory_gb and hardware["device"] == "cpu" else None
    micro = choose_micro_batch(batch, params.micro_batch_size, params.max_seq_length,
                               hardware["device"], model_config, memory)
    if batch % micro:
        raise InvalidConfig(
            f"microBatchSize {micro} does not divide the {batch} sequences each of the "
            f"{world_size} training processes takes from batchSize {params.batch_size}: "
            f"choose a divisor of {batch}")
    precision = choose_precision(params.precision, hardware)
    return {
        "hardware": hardware,
        "device": hardware["device"],
        "precision": precision,
        "precision_reason": precision_reason(params.precision, precision, hardware),
        "micro_batch_size": micro,
        "gradient_accumulation_steps": batch // micro,
    }
