"""Checkpoints that resume a preempted training where it stopped.

``checkpoint-<step>/`` holds the trainable weights, the optimizer, scheduler and scaler states,
the random number generators and ``state.json`` (written last: it marks the checkpoint
complete). The two newest are kept. A checkpoint only resumes the run that wrote it: its
fingerprint covers the settings and the data that decide the run's mathematics.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from chatbot_trainer.train import distributed
from chatbot_trainer.workspace import write_json_atomic

log = logging.getLogger("chatbot_trainer.train")

KEEP_CHECKPOINTS = 2


def _checkpoint_step(path: Path) -> int | None:
    name = path.name
    if not name.startswith("checkpoint-") or not (path / "state.json").is_file():
        return None
    try:
        return int(name.split("-", 1)[1])
    except ValueError:
        return None


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``root`` (those with state.json), oldest first."""
    if not root.is_dir():
        return []
    found = [(_checkpoint_step(p), p) for p in root.iterdir() if p.is_dir()]
    return sorted((step, path) for step, path in found if step is not None)


def _rng_state() -> tuple[dict[str, Any], dict[str, Any]]:
    import torch

    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{i}"] = state
    np_state = np.random.get_state()
    plain = {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    return tensors, plain


def _set_rng_state(tensors: dict[str, Any], plain: dict[str, Any]) -> None:
    import torch

    torch.set_rng_state(tensors["torch"])
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted(tensors) if k.startswith("cuda")]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)
    version, internal, gauss = plain["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def save_checkpoint(root: Path, step: int, model, optimizer, scheduler, scaler, state: dict[str, Any],
                    ranks: distributed.Ranks = distributed.Ranks()) -> Path:
    """Write checkpoint-<step> atomically (temporary directory, then rename); keep the last 2.
    Full tensors, written by rank 0 alone (every rank takes part in gathering them)."""
    import torch
    from safetensors.torch import save_file

    trainable = distributed.full_trainable_state(model)
    optimizer_state = distributed.full_optimizer_state(optimizer)
    final = root / f"checkpoint-{step}"
    if not ranks.is_main:
        distributed.barrier(ranks)
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-checkpoint-{step}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(trainable, str(tmp / "trainable.safetensors"))
    torch.save(optimizer_state, tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    if scaler is not None:
        torch.save(scaler.state_dict(), tmp / "scaler.pt")
    rng_tensors, rng_plain = _rng_state()
    torch.save(rng_tensors, tmp / "rng.pt")
    write_json_atomic(tmp / "state.json", {**state, "step": step, "rng": rng_plain})  # last: marks it complete
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    for _, old in complete_checkpoints(root)[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(old, ignore_errors=True)
    distributed.barrier(ranks)
    return final


def load_checkpoint(path: Path, model, optimizer, scheduler, scaler) -> dict[str, Any]:
    import torch
    from safetensors.torch import load_file

    distributed.load_trainable(model, load_file(str(path / "trainable.safetensors")))
    distributed.load_optimizer_state(
        optimizer, torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", map_location="cpu", weights_only=True))
    if scaler is not None and (path / "scaler.pt").is_file():
        scaler.load_state_dict(torch.load(path / "scaler.pt", weights_only=True))
    state = json.loads((path / "state.json").read_text())
    _set_rng_state(torch.load(path / "rng.pt", weights_only=True), state["rng"])
    return state


def fingerprint(plan, params, data_file: Path) -> str:
    """Identifies a training run: a checkpoint only resumes the run that wrote it."""
    api = params.to_api()
    for key in ("evaluation", "export", "logEvery", "checkpointEvery", "trainingData",
                "microBatchSize", "precision"):
        api.pop(key, None)
    # Node-dependent choices stay out: a preempted pod may resume on another GPU type, with
    # another micro-batch size for the same effective batch.
    node_dependent = {"device", "precision", "precision_reason", "micro_batch_size", "gradient_accumulation_steps"}
    math_of_the_run = {k: v for k, v in plan.__dict__.items() if k not in node_dependent}
    digest = hashlib.sha256(json.dumps([api, math_of_the_run], sort_keys=True, default=str).encode())
    with open(data_file, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def resume_latest(root: Path, run_fingerprint: str, model, optimizer, scheduler, scaler
                  ) -> tuple[dict[str, Any] | None, Path | None]:
    """Load the newest complete checkpoint of this run (removing those of other runs);
    returns its state and path, or (None, None) when there is none."""
    for _, path in reversed(complete_checkpoints(root)):
        saved = json.loads((path / "state.json").read_text())
        if saved.get("fingerprint") != run_fingerprint:
            log.warning("removing %s: it belongs to a run with other settings or data", path)
            shutil.rmtree(path, ignore_errors=True)
            continue
        return load_checkpoint(path, model, optimizer, scheduler, scaler), path
    return None, None
