"""The local runner: the five steps in one process, through the same `run_step` the Jobs use."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

from chatbot_api.spec import STEPS, TrainingParams

from chatbot_trainer.errors import InvalidConfig
from chatbot_trainer.steps import run_step
from chatbot_trainer.workspace import StepContext, write_json_atomic

MARKER = ".chatbot-workspace.json"


def params_fingerprint(params: TrainingParams) -> str:
    return hashlib.sha256(json.dumps(params.to_api(), sort_keys=True).encode()).hexdigest()[:16]


def check_writable(directory: Path, what: str) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise InvalidConfig(f"cannot write to {what} {directory}: {exc.strerror}; choose another directory") from exc


def prepare_workspace(workspace: Path, params: TrainingParams, resume: bool) -> None:
    """Start clean (or resume a run with the same settings); never wipe a folder we did not make."""
    marker = workspace / MARKER
    fingerprint = params_fingerprint(params)
    if workspace.exists() and any(workspace.iterdir()):
        if not marker.is_file():
            raise InvalidConfig(
                f"workspace {workspace} is not empty and was not created by chatbot-training: "
                "choose an empty or new directory"
            )
        recorded = json.loads(marker.read_text()).get("fingerprint")
        if resume and recorded != fingerprint:
            raise InvalidConfig(
                f"workspace {workspace} holds a run with other settings; drop --resume to start over"
            )
        if not resume:
            shutil.rmtree(workspace)
    check_writable(workspace, "workspace")
    write_json_atomic(marker, {"fingerprint": fingerprint, "params": params.to_api()})


def seed_output(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The seed workflow's output JSON."""
    model = results["export"]["summary"]["model"]
    metrics = results["evaluate"]["summary"]["metrics"]
    return {
        "model": {"path": model["path"], "format": model["format"], "size_mb": model["size_mb"]},
        "metrics": {k: metrics[k] for k in ("loss", "accuracy", "perplexity")},
    }


def run_pipeline(
    params: TrainingParams,
    *,
    name: str,
    output_dir: Path,
    workspace: Path | None = None,
    resume: bool = False,
    show_progress: bool = False,
    log: Callable[[str], None] = lambda line: print(line, file=sys.stderr),
) -> tuple[dict[str, Any], dict[str, Any]]:
    output_dir = output_dir.resolve()
    workspace = (workspace or output_dir / "workspace").resolve()
    check_writable(output_dir, "output directory")
    prepare_workspace(workspace, params, resume)
    ctx = StepContext(workspace=workspace, params=params, name=name, output_dir=output_dir,
                      show_progress=show_progress)
    results: dict[str, dict[str, Any]] = {}
    started = time.time()
    for step in STEPS:
        if resume and ctx.result_path(step).is_file():
            results[step] = ctx.read_result(step)
            log(f"[{step}] already done, skipped (--resume)")
            continue
        log(f"[{step}] running")
        results[step] = run_step(step, ctx, termination_log=str(ctx.step_dir(step) / "termination-message.json"))
        log(f"[{step}] done in {results[step]['seconds']:.1f}s: {_one_line(results[step].get('summary', {}))}")
    output = seed_output(results)
    details = {
        **output,
        "base_model": results["configure"]["base_model"]["label"],
        "base_metrics": results["evaluate"]["summary"].get("base_metrics"),
        "train": results["train"].get("summary"),
        "data": results["prepare"]["report"],
        "files": results["export"]["summary"]["model"].get("files"),
        "modelfile": results["export"]["summary"]["model"].get("modelfile"),
        "config": {k: results["configure"][k] for k in (
            "params", "device", "precision", "micro_batch_size", "gradient_accumulation_steps",
            "warmup_steps", "target_modules", "train_base_weights", "architecture")},
        "timings_seconds": {step: results[step]["seconds"] for step in STEPS},
        "total_seconds": round(time.time() - started, 3),
        "workspace": str(workspace),
    }
    write_json_atomic(output_dir / "result.json", output)
    write_json_atomic(output_dir / "details.json", details)
    return output, details


def _one_line(summary: dict[str, Any]) -> str:
    text = json.dumps(summary, default=str)
    return text if len(text) < 300 else text[:297] + "..."
