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

from chatbot_trainer.errors import InvalidConfig, StepError
from chatbot_trainer.previous_results import set_aside_previous_results
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


OUTPUT_METRICS = ("loss", "accuracy", "perplexity", "fact_recall", "rouge_l")


def seed_output(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The seed workflow's output JSON, with the answer metrics (fact recall, ROUGE-L) beside the
    loss, the base model's metrics, the training length and learning rate that were used, and
    every warning of the run."""
    model = results["export"]["summary"]["model"]
    summary = results["evaluate"]["summary"]
    configure = results["configure"]
    output = {
        "model": {"path": model["path"], "format": model["format"], "size_mb": model["size_mb"]},
        "metrics": {k: summary["metrics"][k] for k in OUTPUT_METRICS if k in summary["metrics"]},
    }
    base = summary.get("base_metrics") or {}
    if base:
        output["base_metrics"] = {k: base[k] for k in OUTPUT_METRICS if k in base}
    if configure.get("training_steps") is not None:
        output["training"] = {
            "steps": configure["training_steps"],
            "steps_from": configure.get("training_steps_reason"),
            "learning_rate": configure.get("learning_rate"),
            "learning_rate_from": configure.get("learning_rate_reason"),
        }
    output["warnings"] = run_warnings(results)
    return output


def run_warnings(results: dict[str, dict[str, Any]]) -> list[str]:
    """Every step's warnings, in step order, each once."""
    warnings: list[str] = []
    for step in STEPS:
        result = results.get(step) or {}
        found = [*(result.get("warnings") or []), *((result.get("summary") or {}).get("warnings") or []),
                 *((result.get("chat_template") or {}).get("warnings") or [])]
        for warning in found:
            if warning not in warnings:
                warnings.append(warning)
    return warnings


def run_pipeline(
    params: TrainingParams,
    *,
    name: str,
    output_dir: Path,
    workspace: Path | None = None,
    resume: bool = False,
    show_progress: bool = False,
    nproc_per_node: int = 1,
    log: Callable[[str], None] = lambda line: print(line, file=sys.stderr),
) -> tuple[dict[str, Any], dict[str, Any]]:
    output_dir = output_dir.resolve()
    workspace = (workspace or output_dir / "workspace").resolve()
    check_writable(output_dir, "output directory")
    aside = set_aside_previous_results(output_dir, keep_model_files=resume)
    if aside:
        log(f"[output] the previous run's results were moved to {aside}")
    prepare_workspace(workspace, params, resume)
    ctx = StepContext(workspace=workspace, params=params, name=name, output_dir=output_dir,
                      show_progress=show_progress)
    results: dict[str, dict[str, Any]] = {}
    started = time.time()
    try:
        for step in STEPS:
            if resume and ctx.result_path(step).is_file():
                results[step] = ctx.read_result(step)
                log(f"[{step}] already done, skipped (--resume)")
                continue
            log(f"[{step}] running")
            termination_log = str(ctx.step_dir(step) / "termination-message.json")
            if step == "train" and nproc_per_node > 1:  # torchrun: one process per rank
                from chatbot_trainer.launch import run_train_step

                results[step] = run_train_step(ctx, nproc_per_node, termination_log)
            else:
                results[step] = run_step(step, ctx, termination_log=termination_log)
            log(f"[{step}] done in {results[step]['seconds']:.1f}s: {_one_line(results[step].get('summary', {}))}")
    except StepError as exc:
        exc.message += f" ({output_dir} holds no result.json from this run" + (
            f"; the previous run's results are in {aside})" if aside else ")")
        raise
    output = seed_output(results)
    evaluated, exported = results["evaluate"], results["export"]
    details = {
        **output,
        "base_model": results["configure"]["base_model"]["label"],
        "base_model_import": results["configure"].get("base_model_import"),
        "base_metrics": evaluated["summary"].get("base_metrics"),
        "warnings": output["warnings"],
        "answers": evaluated.get("answers"),
        "chat_template": results["configure"].get("chat_template"),
        "eval_examples": evaluated.get("eval_examples"),
        "samples": sample_rows(evaluated, exported),
        "samples_generated_with": samples_generated_with(evaluated, exported),
        "train": results["train"].get("summary"),
        "data": results["prepare"]["report"],
        "files": results["export"]["summary"]["model"].get("files"),
        "modelfile": results["export"]["summary"]["model"].get("modelfile"),
        "loss_curve": exported.get("loss_curve"),
        "config": {k: results["configure"].get(k) for k in (
            "params", "training_steps", "training_steps_reason", "learning_rate", "learning_rate_reason",
            "device", "precision", "micro_batch_size", "gradient_accumulation_steps",
            "warmup_steps", "target_modules", "train_base_weights", "architecture")},
        "precision_reason": results["train"].get("precision_reason"),
        "modelfile_system": exported.get("modelfile_system"),
        "timings_seconds": {step: results[step]["seconds"] for step in STEPS},
        "total_seconds": round(time.time() - started, 3),
        "workspace": str(workspace),
    }
    write_json_atomic(output_dir / "result.json", output)
    write_json_atomic(output_dir / "details.json", details)
    return output, details


def sample_rows(evaluated: dict[str, Any], exported: dict[str, Any]) -> list[dict[str, Any]]:
    """The evaluate step's answers, with the exported file's (llama.cpp) where there are any."""
    rows = [dict(row) for row in evaluated.get("samples") or []]
    served = exported.get("gguf_samples") or {}
    for row, answer in zip(rows, served.get("answers") or []):
        row["fine_tuned_gguf"] = answer
    return rows


def samples_generated_with(evaluated: dict[str, Any], exported: dict[str, Any]) -> str:
    text = evaluated.get("samples_generated_with") or "transformers"
    served = exported.get("gguf_samples")
    if served:
        text += f"; fine_tuned_gguf: {served['generated_with']} from {Path(served['file']).name}"
    return text


def summary_text(details: dict[str, Any], width: int = 100) -> str:
    """What a person reads after a local run: which base, before → after, a few answers."""
    import textwrap

    lines = [f"base model: {details['base_model']}"]
    config = details.get("config") or {}
    if config.get("training_steps") is not None:
        lines.append(f"trained {config['training_steps']} steps ({config.get('training_steps_reason')}) at "
                     f"learning rate {config.get('learning_rate'):g} ({config.get('learning_rate_reason')})")
    base, after = details.get("base_metrics") or {}, details["metrics"]
    if base:
        lines.append(
            f"eval on {details.get('eval_examples')} held-out conversations, base → fine-tuned: "
            f"loss {base['loss']:.3f} → {after['loss']:.3f}, accuracy {base['accuracy']:.3f} → "
            f"{after['accuracy']:.3f}, perplexity {base['perplexity']:.2f} → {after['perplexity']:.2f}"
        )
    answers = details.get("answers")
    if answers:
        tuned, before = answers["fine_tuned"], answers["base"]
        recall = (f"fact recall {_share(before['fact_recall'])} → {_share(tuned['fact_recall'])} "
                  f"({before['facts_stated']} → {tuned['facts_stated']} of {tuned['facts']} facts)")
        lines.append(f"answers to {tuned['questions']} held-out questions, base → fine-tuned: {recall}, "
                     f"ROUGE-L {_number(before['rouge_l'])} → {_number(tuned['rouge_l'])}")
    for warning in details.get("warnings") or []:
        lines.append(f"WARNING: {warning}")
    if details.get("samples"):
        lines.append(f"sample answers ({details.get('samples_generated_with')}):")
    labels = (("question", "Q"), ("reference", "data"), ("base", "base"), ("fine_tuned", "fine-tuned"),
              ("fine_tuned_gguf", "GGUF"))
    for row in details.get("samples") or []:
        for key, label in labels:
            if key in row:
                text = " ".join(str(row[key]).split()) or "(empty)"
                missed = row.get(f"{key}_missed")
                if missed:
                    text += f" [missed: {', '.join(missed)}]"
                lines.append(textwrap.shorten(f"  {label:>10}: {text}", width=width, placeholder=" …"))
        lines.append("")
    if details.get("loss_curve"):
        lines.append(f"loss curve: {details['loss_curve']}")
    lines.append(f"model: {details['model']['path']} ({details['model']['size_mb']} MiB)")
    return "\n".join(lines)


def _share(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.0f}%"


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _one_line(summary: dict[str, Any]) -> str:
    text = json.dumps(summary, default=str)
    return text if len(text) < 300 else text[:297] + "..."
