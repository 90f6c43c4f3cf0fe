"""Step 5, export: merge the LoRA adapter into its base model and write GGUF files + a Modelfile.

Reads `train/result.json` (`base_model_path_for_adapter`, `adapter_path`) and
`configure/result.json` (the base model's label). Writes
  <workspace>/export/merged/            merged safetensors + tokenizer (with the chat template)
  <out>/<name>.<quant>.gguf             one per spec.export.quantizations, the first is "the model"
  <out>/Modelfile                       `ollama create <name> -f Modelfile` imports it
  <out>/loss.png                        the training loss curve, base vs fine-tuned eval loss
where <out> is `--output` (ctx.output_dir) or <workspace>/export. Every file is written under a
temporary name and renamed, so a killed export never leaves a half file under a final name.
Each GGUF is read back with gguf's reader before the step reports success.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from chatbot_trainer.errors import ModelNotFound, StepError
from chatbot_trainer.train import curves
from chatbot_trainer.workspace import StepContext, replace_dir_atomically

MiB = 1024 * 1024


def run(ctx: StepContext) -> dict[str, Any]:
    trained = ctx.read_result("train")
    configured = ctx.read_result("configure")
    base_label = (configured.get("base_model") or {}).get("label") or trained.get("base_model_path_for_adapter")
    base_identity = _base_identity(configured.get("base_model") or {}, base_label)
    name = ctx.params.export.name or ctx.name
    quantizations = list(dict.fromkeys(ctx.params.export.quantizations))
    export_dir = ctx.step_dir("export")
    out_dir = Path(ctx.output_dir) if ctx.output_dir else export_dir
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StepError(f"cannot create the output directory {out_dir}: {exc}", exit_code=2) from exc
    _remove_stale_temporaries(out_dir, name)

    merged_dir = export_dir / "merged"
    _remove_stale_merges(export_dir)
    merge_note = merge_adapter(trained, merged_dir)

    files, written, warnings = _write_files(merged_dir, out_dir, name, base_identity, quantizations)

    modelfile_path = out_dir / "Modelfile"
    modelfile_info = _write_modelfile(
        modelfile_path, merged_dir, Path(files[0]["path"]).name, ctx.params.data.system_prompt
    )

    loss_curve = curves.write_loss_curve(ctx.workspace, out_dir, title=f"{name}: training loss")
    first = files[0]
    served = answer_with_gguf(ctx, first["path"])
    return {
        "name": name,
        "merged_path": str(merged_dir),
        "merge": merge_note,
        "base_model": base_label,
        "arch": written[0].arch,
        "files": files,
        "modelfile": str(modelfile_path),
        "modelfile_system": modelfile_info,
        "loss_curve": loss_curve,
        "gguf_samples": served,
        "warnings": warnings,
        "summary": {
            **({"warnings": warnings} if warnings else {}),
            "model": {
                "path": first["path"],
                "format": "gguf",
                "size_mb": first["size_mb"],
                "base_model": base_label,
                "files": [{k: f[k] for k in ("path", "quantization", "size_mb")} for f in files],
                "modelfile": str(modelfile_path),
            }
        },
    }


# ---------------------------------------------------------------------------- GGUF files


def _base_identity(choice: dict[str, Any], label: str | None) -> dict[str, str] | None:
    """The base model's name and repo id for the GGUF metadata, without local paths (the
    label, for results, says where it came from and why)."""
    from chatbot_trainer.model.base_models import BaseModelChoice

    try:
        return BaseModelChoice.from_dict(choice).identity()
    except (TypeError, ValueError, AttributeError):  # a configure result without the choice
        return {"name": Path(label).name} if label else None


def _write_files(merged_dir: Path, out_dir: Path, name: str, base_model: dict[str, str] | None,
                 quantizations: list[str]):
    """Every requested file, in the requested order; K-quants are made from an F16 file (the
    requested one, or a temporary one removed afterwards). Returns the files' entries, what
    gguf_writer wrote, and warnings (K-quants a model's row sizes defeat)."""
    from chatbot_trainer.export import gguf_writer, llama_quantize

    k_quants = [q for q in quantizations if q in llama_quantize.K_QUANTS]
    if k_quants and (problem := llama_quantize.available()):
        raise StepError(problem, reason="InvalidConfig", exit_code=2)
    direct = [q for q in quantizations if q not in llama_quantize.K_QUANTS]
    if k_quants and "f16" not in direct:
        direct.append("f16")  # the K-quants' source, not kept
    vocab_size = int(gguf_writer.load_config(merged_dir).get("vocab_size") or 0) or None
    by_quant: dict[str, dict[str, Any]] = {}
    infos: dict[str, Any] = {}
    warnings: list[str] = []
    for quant in direct:
        keep = quant in quantizations
        target = out_dir / (f"{name}.{quant}.gguf" if keep else f".{name}.f16-source.gguf")
        started = time.perf_counter()
        info = _write_direct(merged_dir, target, quant, name, base_model)
        seconds = round(time.perf_counter() - started, 2)
        checked = gguf_writer.verify_gguf(info.path, arch=info.arch, tensor_count=info.tensor_count,
                                          vocab_size=vocab_size)
        infos[quant] = info
        by_quant[quant] = _file_entry(info.path, quant, checked["tensor_types"], info.fallbacks,
                                      info.tokenizer_pre, info.notes, seconds)
    source = infos.get("f16")
    for quant in k_quants:
        target = out_dir / f"{name}.{quant}.gguf"
        started = time.perf_counter()
        try:
            llama_quantize.quantize(source.path, target, quant)
        except OSError as exc:
            raise StepError(f"writing {target} failed: {exc} (is the volume full or read-only?)") from exc
        checked = gguf_writer.verify_gguf(target, arch=source.arch, tensor_count=source.tensor_count,
                                          vocab_size=vocab_size)
        note = llama_quantize.fallback_note(quant, checked["tensor_types"])
        small = llama_quantize.small_model_warning(target, quant)
        if small:
            warnings.append(small)
        by_quant[quant] = _file_entry(target, quant, checked["tensor_types"], [], source.tokenizer_pre,
                                      [note] if note else [], round(time.perf_counter() - started, 2))
    if source is not None and "f16" not in quantizations:
        Path(source.path).unlink(missing_ok=True)
    files = [by_quant[q] for q in quantizations]
    return files, [infos[q] for q in direct if q in infos], warnings


def _write_direct(merged_dir: Path, target: Path, quant: str, name: str, base_model: dict[str, str] | None):
    from chatbot_trainer.export import gguf_writer

    try:
        return gguf_writer.write_gguf(merged_dir, target, quant, name=name, base_model=base_model, finetune="lora-chat")
    except StepError:
        raise
    except OSError as exc:
        raise StepError(f"writing {target} failed: {exc} (is the volume full or read-only?)") from exc
    except (ValueError, NotImplementedError) as exc:
        raise StepError(f"writing {target.name} failed: {exc}") from exc


def _file_entry(path, quant, tensor_types, fallbacks, tokenizer_pre, notes, seconds) -> dict[str, Any]:
    return {
        "path": str(path),
        "quantization": quant,
        "size_mb": round(Path(path).stat().st_size / MiB, 3),
        "tensor_types": tensor_types,
        "f16_fallbacks": fallbacks,
        "tokenizer_pre": tokenizer_pre,
        "notes": notes,
        "seconds": seconds,
    }


def answer_with_gguf(ctx: StepContext, path: str) -> dict[str, Any] | None:
    """The evaluate step's sample questions answered by llama.cpp from the exported file (as
    it will be served), beside the merged model's answers; None without llama-cpp-python."""
    from chatbot_trainer.evaluate.samples import gguf_answers

    evaluated = ctx.read_result("evaluate") if ctx.result_path("evaluate").is_file() else {}
    questions = evaluated.get("sample_questions") or []
    if not questions:
        return None
    answers = gguf_answers(path, questions)
    if answers is None:
        return None
    merged = [row.get("fine_tuned") for row in evaluated.get("samples") or []]
    return {
        "file": path,
        "generated_with": "llama.cpp (llama-cpp-python, embedded chat template, greedy)",
        "answers": answers,
        "same_as_merged_model": sum(a == b for a, b in zip(answers, merged)),
        "questions": len(answers),
    }


# ---------------------------------------------------------------------------- merge


def merge_adapter(trained: dict[str, Any], merged_dir: Path) -> str:
    """Load base + adapter (as the train step left them), merge, and save safetensors + tokenizer
    to `merged_dir`, replacing it whole."""
    from chatbot_trainer.model.loading import load_trained_model

    base_path, adapter_path = trained.get("base_model_path_for_adapter"), trained.get("adapter_path")
    if not base_path or not (Path(base_path) / "config.json").is_file():
        raise ModelNotFound(
            f"the base model {base_path!r} named in train/result.json is missing: run the train step again"
        )
    if not adapter_path or not (Path(adapter_path) / "adapter_config.json").is_file():
        raise ModelNotFound(
            f"the LoRA adapter {adapter_path!r} named in train/result.json is missing: run the train step again"
        )
    from chatbot_trainer.export import gguf_writer

    has_tokenizer = (Path(adapter_path) / "tokenizer.json").is_file() or (Path(adapter_path) / "tokenizer.model").is_file()
    gguf_writer.preflight(base_path, adapter_path if has_tokenizer else base_path)
    try:
        model, tokenizer = load_trained_model(trained, merge=True)
    except (ValueError, RuntimeError, KeyError) as exc:
        raise StepError(
            f"cannot merge the adapter {adapter_path} into {base_path}: {exc}; the adapter and base model do not match"
        ) from exc
    with replace_dir_atomically(merged_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        gguf_writer.apply_default_mode(tmp)
    return f"adapter {adapter_path} merged into {base_path}"


# ---------------------------------------------------------------------------- Modelfile


def _write_modelfile(path: Path, merged_dir: Path, gguf_name: str, system_prompt: str | None) -> dict[str, Any]:
    """Write the Modelfile; returns which system prompt it carries and why."""
    from chatbot_trainer.data.chat_templates import default_system_prompt
    from chatbot_trainer.export import gguf_writer, modelfile

    config = gguf_writer.load_config(merged_dir)
    vocab = gguf_writer.read_vocab(merged_dir, config)
    eos = vocab.tokens[vocab.eos_id] if vocab.eos_id is not None else None
    bos = vocab.tokens[vocab.bos_id] if vocab.bos_id is not None else None
    end_of_turn = [t for t in gguf_writer.END_OF_TURN_TOKENS if t in set(vocab.tokens) and t != "<|endoftext|>"]
    context = config.get("max_position_embeddings") or config.get("n_positions")
    default_system = default_system_prompt(
        vocab.chat_template, {k: v for k, v in (("bos_token", bos), ("eos_token", eos)) if v}
    )
    system = system_prompt or default_system
    try:
        text = modelfile.render_modelfile(
            gguf_name,
            chat_template=vocab.chat_template,
            stops=modelfile.stop_tokens(vocab.chat_template, eos, end_of_turn),
            system_prompt=system,
            num_ctx=context,
        )
    except ValueError as exc:
        raise StepError(str(exc), reason="InvalidConfig", exit_code=2) from exc
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        gguf_writer.apply_default_mode(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return {
        "path": str(path),
        "system": system,
        "system_source": "data.systemPrompt" if system_prompt else ("chat template default" if system else None),
        "template": "ollama" if modelfile.ollama_template(vocab.chat_template) else "embedded in the GGUF",
    }


def _remove_stale_temporaries(out_dir: Path, name: str) -> None:
    """Temporaries of an export that was killed mid-write (never a finished file)."""
    stale_files = [*out_dir.glob(f".{name}.*.gguf.*.tmp"), *out_dir.glob(".Modelfile.*.tmp"),
                   out_dir / f".{name}.f16-source.gguf"]
    for stale in stale_files:
        stale.unlink(missing_ok=True)


def _remove_stale_merges(export_dir: Path) -> None:
    for stale in export_dir.glob(".merged.*"):
        shutil.rmtree(stale, ignore_errors=True)

