"""The train step: LoRA fine-tuning on the assistant tokens, resumable after preemption.

Reads top to bottom like the loop it runs:

1. resolve the plan from ``configure/result.json`` (device, precision, micro-batches, …);
2. seed; load the tokenizer and the base model (sdpa attention);
3. tokenize ``prepare/train.jsonl`` and build packed (or padded) sequences;
4. wrap the model with a LoRA adapter (new special tokens trained too; every base weight
   trained as well when the base was built from a config, because its weights are random);
5. AdamW + warmup/decay schedule; resume from the latest complete checkpoint;
6. for exactly ``training_steps`` optimizer steps: micro-batches × gradient accumulation,
   loss = sum of token losses / assistant tokens in the whole step, clip, step; log every
   ``log_every`` steps to ``train/metrics.jsonl``, the live progress board and TensorBoard
   (``train/tensorboard/``, see train/monitor.py); checkpoint every ``checkpoint_every``;
7. save ``train/adapter/`` (and ``train/base/`` when base weights changed or tokens were added).

Started by torchrun, the same loop runs on every rank; what differs (the rank's shard of each
batch, DDP/FSDP, sums over ranks, rank 0 writing) is in ``chatbot_trainer.train.distributed``.

The host only waits for the device at log and checkpoint steps (``.item()`` nowhere else).
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import math
import os
import random
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from chatbot_trainer.data.packing import (
    build_sequences,
    choose_attention_mode,
    collate,
    packing_stats,
    restore_attention,
)
from chatbot_trainer.data.tokenization import tokenize_dataset
from chatbot_trainer.errors import InvalidConfig, InvalidData, TrainingDiverged
from chatbot_trainer.model import compilation
from chatbot_trainer.model.loading import (
    ALL_LINEAR,
    default_target_modules,
    load_causal_lm,
    load_tokenizer_with_template,
    peft_quietly,
)
from chatbot_trainer.model.loss import token_loss_sums
from chatbot_trainer.train import distributed, hardware
from chatbot_trainer.train.monitor import NoMonitor, TrainMonitor
from chatbot_trainer.workspace import StepContext, write_json_atomic

log = logging.getLogger("chatbot_trainer.train")

KEEP_CHECKPOINTS = 2


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


# ---------------------------------------------------------------------------- data order


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


# ---------------------------------------------------------------------------- checkpoints


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


def _fingerprint(plan: TrainPlan, params, data_file: Path) -> str:
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


# ---------------------------------------------------------------------------- helpers


def _load_conversations(path: Path) -> list[dict[str, Any]]:
    try:
        from chatbot_trainer.data.dataset import load_jsonl
    except ImportError:  # pragma: no cover - dataset module ships with the trainer
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return load_jsonl(path)


def _autocast(device: str, precision: str):
    import torch

    if device == "cuda" and precision in ("bf16", "fp16"):
        return torch.autocast("cuda", dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
    if device == "cpu" and precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return nullcontext()


def _plan_workers(plan: TrainPlan, params, model, device: str, ranks, compiled: bool):
    """How many of a step's micro-batches run side by side (cpu_workers), for this node."""
    import torch

    from chatbot_trainer.train import cpu_workers

    config = model.config.to_dict() if hasattr(model.config, "to_dict") else {}
    model_bytes, per_token = hardware.training_bytes(config)
    return cpu_workers.plan(
        device=device, threads=torch.get_num_threads(), batch_size=params.batch_size,
        micro_batch_size=plan.micro_batch_size, micro_batch_requested=params.micro_batch_size is not None,
        world_size=ranks.world_size, compiled=compiled, model=model,
        sequence_bytes=per_token * params.max_seq_length,
        memory=hardware.available_memory() if device == "cpu" else None, model_bytes=model_bytes,
    )


def _make_optimizer(params_with_names, lr: float, weight_decay: float, device: str, fused: bool = True):
    import torch

    decay = [p for n, p in params_with_names if p.ndim >= 2]
    no_decay = [p for n, p in params_with_names if p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    try:
        return torch.optim.AdamW(groups, lr=lr, fused=fused and device in ("cuda", "cpu"))
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(groups, lr=lr)


def _scheduler_name(name: str, warmup: int) -> str:
    if name == "constant":
        return "constant_with_warmup" if warmup else "constant"
    return name


class _MetricsLog:
    """train/metrics.jsonl: one JSON line per logged step (lines past a resumed step dropped)."""

    def __init__(self, path: Path, resume_step: int, write: bool = True):
        self.path = path
        self.writes = write
        kept: list[str] = []
        if resume_step and path.is_file():
            for line in path.read_text().splitlines():
                try:
                    if json.loads(line).get("step", 0) <= resume_step:
                        kept.append(line)
                except json.JSONDecodeError:
                    continue
        if write:
            path.write_text("".join(line + "\n" for line in kept))
        self.records = [json.loads(line) for line in kept]

    def write(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        if not self.writes:
            return
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")


def check_finite(step: int, loss: float, grad_norm: float, records: list[dict[str, Any]], params) -> None:
    """Stop with TrainingDiverged when the loss or the gradient norm is NaN or infinite."""
    if math.isfinite(loss) and math.isfinite(grad_norm):
        return
    what = "loss" if not math.isfinite(loss) else "gradient norm"
    last = next((r for r in reversed(records) if math.isfinite(r.get("loss", math.nan))), None)
    before = f" (last finite loss {last['loss']:.4g} at step {last['step']})" if last else ""
    raise TrainingDiverged(
        f"training diverged: the {what} is {loss if what == 'loss' else grad_norm} by step {step}{before}; "
        f"lower learningRate (now {params.learning_rate:g}), raise warmupSteps or lower maxGradNorm"
    )


# ---------------------------------------------------------------------------- training


def train(ctx: StepContext, *, stop_at_step: int | None = None) -> dict[str, Any]:
    """Run (or resume) the training; returns the train step's result.

    ``stop_at_step`` ends the process's work after that step as a preemption would (the
    result then has ``"completed": False``); the next call resumes from the checkpoint.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import get_scheduler

    from chatbot_trainer.model import cpu_blas, lora_dropout, lora_fused
    from chatbot_trainer.train import cpu_workers

    params = ctx.params
    train_dir = ctx.step_dir("train")
    if not ctx.show_progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # no weight-loading bars in Job logs
    checkpoint_root = train_dir / "checkpoints"

    # 1. The plan configure made, with device, precision and micro-batch for this node;
    #    this process's place among the training processes (torchrun), if there are several.
    configure = ctx.read_result("configure")
    ranks = distributed.ranks_from_env(strategy=params.distributed.strategy)
    plan = TrainPlan.from_configure(configure, params, ranks)
    device = plan.device
    distributed.start(ranks, device)
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    # 2. Seed, tokenizer, base model.
    seed_everything(params.seed)
    tokenizer, added_tokens = load_tokenizer_with_template(plan.base_model_path)
    data_file = ctx.workspace / "prepare" / "train.jsonl"
    if not data_file.is_file():
        raise InvalidData(f"{data_file} is missing: run the prepare step first")

    # 3. Data: tokenize, then pack (or pad) into training sequences.
    conversations = _load_conversations(data_file)
    examples, tokenization = tokenize_dataset(tokenizer, conversations, params.max_seq_length)
    if not examples:
        raise InvalidData(
            f"no training conversation fits maxSeqLength {params.max_seq_length} with assistant tokens "
            f"({tokenization}): raise maxSeqLength or check the data"
        )
    sequences = build_sequences(examples, params.max_seq_length, params.packing)
    del conversations, examples
    data_stats = packing_stats(sequences, params.max_seq_length)

    # 4. Model + LoRA. Frozen base weights may live in half precision; trained ones stay fp32.
    only_lora = not plan.train_base_weights and not added_tokens
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(plan.precision)
    # (On a CPU too, in bf16: half the frozen weights' memory, at the speed of an fp32 copy under autocast.)
    load_dtype = half if (half is not None and only_lora) else torch.float32
    log.info("base model %s on %s (%s), %d sequences of up to %d tokens", plan.base_model_path,
             device, plan.precision, len(sequences), params.max_seq_length)
    model = load_causal_lm(plan.base_model_path, dtype=load_dtype)
    if added_tokens:
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.use_cache = False
    model.to(device)
    try:
        attention_mode = choose_attention_mode(model) if params.packing else "position_ids"
    except ValueError as exc:
        raise InvalidConfig(str(exc)) from exc

    target_modules = plan.target_modules or default_target_modules(model)
    lora_config = LoraConfig(
        r=params.lora.rank,
        lora_alpha=params.lora.alpha,
        lora_dropout=params.lora.dropout,
        target_modules=ALL_LINEAR if target_modules == [ALL_LINEAR] else target_modules,
        task_type="CAUSAL_LM",
        fan_in_fan_out=model.config.model_type == "gpt2",  # GPT-2's Conv1D stores weights transposed
        trainable_token_indices=(
            tokenizer.convert_tokens_to_ids(added_tokens) if added_tokens and not plan.train_base_weights else None
        ),
    )
    try:
        with peft_quietly():
            model = get_peft_model(model, lora_config)
    except ValueError as exc:
        raise InvalidConfig(f"LoRA cannot adapt this model: {exc}: check lora.targetModules") from exc
    lora_dropout.use_cheap_masks(model)
    # A step's micro-batches side by side on a CPU's cores, or in turn (see cpu_workers).
    will_compile = compilation.decide(params.compile, device)[0] and bool(compilation.decoder_layers(model))
    workers = _plan_workers(plan, params, model, device, ranks, will_compile)
    log.info("micro-batches: %d at a time (%s)", workers.workers, workers.reason)
    if device == "cpu" and lora_fused.enabled():
        lora_fused.use_fused_lora(model)  # one autograd node per adapted layer (see lora_fused)
        # which library runs their fp32 products (and the output layer's): timed at their shapes,
        # with the threads each micro-batch gets
        products_dtype = torch.float32 if plan.precision == "fp32" else half
        blas = cpu_blas.choose(lora_fused.base_shapes(model), device, products_dtype,
                               threads=1 if workers.workers > 1 else None)
    else:  # PyTorch's products, whatever an earlier run in this process chose
        blas = cpu_blas.BlasChoice("torch", f"on {device}" if device != "cpu" else "CHATBOT_FUSED_LORA=off")
        cpu_blas.activate(blas)
    log.info("matrix products: %s (%s)", blas.backend, blas.reason)
    if plan.train_base_weights:
        for param in model.parameters():
            param.requires_grad_(True)
    distributed.check_supported(ranks, only_lora)
    # What the loop calls: the loss of a micro-batch, through DDP or FSDP with several ranks.
    forward_loss = distributed.wrap(
        model, ranks, device, lambda m, batch: token_loss_sums(m, batch, attention_mode=attention_mode))
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    trainable_params = sum(p.numel() for _, p in trainable)
    total_params = sum(p.numel() for p in model.parameters())
    model.train()

    # 5. Optimizer, schedule, resume.
    optimizer = _make_optimizer(trainable, params.learning_rate, params.weight_decay, device,
                                fused=distributed.fused_optimizer_allowed(ranks))
    scheduler = get_scheduler(
        _scheduler_name(params.lr_scheduler, plan.warmup_steps),
        optimizer,
        num_warmup_steps=plan.warmup_steps,
        num_training_steps=params.training_steps,
    )
    scaler = torch.amp.GradScaler("cuda") if (device == "cuda" and plan.precision == "fp16") else None
    fingerprint = _fingerprint(plan, params, data_file)

    step, consumed, train_tokens, initial_loss, resumed_from = 0, 0, 0, None, None
    window_state = None
    for _, path in reversed(complete_checkpoints(checkpoint_root)):
        saved = json.loads((path / "state.json").read_text())
        if saved.get("fingerprint") != fingerprint:
            log.warning("removing %s: it belongs to a run with other settings or data", path)
            shutil.rmtree(path, ignore_errors=True)
            continue
        state = load_checkpoint(path, model, optimizer, scheduler, scaler)
        step, consumed = state["step"], state["consumed_sequences"]
        train_tokens, initial_loss = state["train_tokens"], state["initial_loss"]
        resumed_from = str(path)
        window_state = state.get("window")
        log.info("resuming from %s (step %d of %d)", path, step, params.training_steps)
        break
    metrics_log = _MetricsLog(train_dir / "metrics.jsonl", step, write=ranks.is_main)
    compiled = compilation.apply(model, params.compile, device, cache_dir=train_dir / "compile-cache")
    monitor = TrainMonitor(ctx.workspace, params.training_steps, step) if ranks.is_main else NoMonitor()

    # 6. The loop.
    batch_size, micro = params.batch_size, workers.micro_batch_size
    pad_id = tokenizer.pad_token_id
    # The segments attention works per example: a micro-batch's packed rows then go in as one
    # row without the padding between them (see packing.collate).
    padding_free = params.packing and attention_mode == "segments"
    pin = device == "cuda"
    window_loss = torch.zeros((), dtype=torch.float64, device=device)
    window_label_tokens = window_tokens = 0
    if window_state:  # a log window that a checkpoint cut in two goes on (summed once)
        window_loss += distributed.main_share(ranks, window_state[0])
        window_label_tokens, window_tokens = int(window_state[1]), int(window_state[2])
    run_tokens = 0
    grad_norm = None
    from tqdm.auto import tqdm

    progress = tqdm(
        total=params.training_steps, initial=step, disable=not (ctx.show_progress and ranks.is_main),
        desc="train", unit="step"
    )
    # The model, data and tokenizer are millions of long-lived objects: keep the garbage
    # collector's full passes from walking them at every step.
    gc.collect()
    gc.freeze()
    started = window_started = time.perf_counter()
    start_step = step
    while step < params.training_steps:
        indices = sequence_indices(consumed, batch_size, len(sequences), params.seed)
        consumed += batch_size
        indices = distributed.shard(indices, ranks)  # this rank's share of the global batch
        batches = [
            collate([sequences[i] for i in indices[j : j + micro]], pad_token_id=pad_id, packed=params.packing,
                    flat=padding_free)
            for j in range(0, len(indices), micro)
        ]
        step_label_tokens, step_tokens = distributed.global_counts(
            ranks, sum(b.num_label_tokens for b in batches), sum(b.num_tokens for b in batches))
        to_run = distributed.micro_batches_to_run(batches, ranks)
        if workers.workers > 1:  # side by side on the CPU's cores (one process: nothing to sync)
            for loss_sum in cpu_workers.run_step(
                forward_loss, to_run, 1.0 / max(step_label_tokens, 1), [p for _, p in trainable],
                workers.workers, lambda: _autocast(device, plan.precision),
            ):
                window_loss += loss_sum.double()
        else:
            for number, batch in enumerate(to_run, 1):
                if pin:
                    batch = batch.pin_memory()
                batch = batch.to(device, non_blocking=True)
                with distributed.gradient_sync(forward_loss, ranks, last=number == len(to_run)):
                    with _autocast(device, plan.precision):
                        loss_sum = forward_loss(batch)
                    # × world size: the ranks' gradients are averaged, the tokens counted globally
                    loss = loss_sum * ranks.world_size / max(step_label_tokens, 1)
                    (scaler.scale(loss) if scaler is not None else loss).backward()
                window_loss += loss_sum.detach().double()
        window_label_tokens += step_label_tokens
        window_tokens += step_tokens
        run_tokens += step_tokens
        train_tokens += step_tokens

        if scaler is not None:
            scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_([p for _, p in trainable], params.max_grad_norm)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        progress.update(1)

        if step == 1 or step % params.log_every == 0 or step == params.training_steps:
            now = time.perf_counter()
            loss_value = distributed.sum_over_ranks(ranks, window_loss) / max(window_label_tokens, 1)
            check_finite(step, loss_value, distributed.as_float(grad_norm), metrics_log.records, params)
            if initial_loss is None:
                initial_loss = loss_value
            record = {
                "step": step,
                "loss": round(loss_value, 6),
                "lr": lr,
                "grad_norm": round(distributed.as_float(grad_norm), 6),
                "tokens_per_second": round(window_tokens / max(now - window_started, 1e-9), 1),
                "epoch": round(consumed / len(sequences), 3),
            }
            metrics_log.write(record)
            monitor.window(record)
            progress.set_postfix(loss=f"{loss_value:.4f}")
            log.info("step %d/%d loss %.4f lr %.3g %.0f tokens/s", step, params.training_steps,
                     loss_value, record["lr"], record["tokens_per_second"])
            window_loss.zero_()
            window_label_tokens = window_tokens = 0
            window_started = now

        if step % params.checkpoint_every == 0 or step == params.training_steps:
            # never checkpoint a diverged state: a resumed run would start from it
            window_total = distributed.sum_over_ranks(ranks, window_loss)
            check_finite(step, window_total, distributed.as_float(grad_norm), metrics_log.records, params)
            save_checkpoint(
                checkpoint_root,
                step,
                model,
                optimizer,
                scheduler,
                scaler,
                {
                    "fingerprint": fingerprint,
                    "consumed_sequences": consumed,
                    "train_tokens": train_tokens,
                    "initial_loss": initial_loss,
                    "training_steps": params.training_steps,
                    "window": [window_total, window_label_tokens, window_tokens],
                },
                ranks,
            )
        if stop_at_step is not None and step >= stop_at_step and step < params.training_steps:
            break
    gc.unfreeze()
    progress.close()
    seconds = time.perf_counter() - started
    monitor.close()
    if step < params.training_steps:  # stopped at stop_at_step
        return {"completed": False, "step": step, "resumed_from": resumed_from}
    restore_attention(model)
    final_loss = metrics_log.records[-1]["loss"] if metrics_log.records else None

    # 7. Save the adapter, and the base when it changed (trained weights, added tokens):
    #    rank 0 alone, with the full weights (FSDP gathers its shards from every rank).
    adapter_dir = train_dir / "adapter"
    base_dir = train_dir / "base" if plan.train_base_weights or added_tokens else None
    adapter_weights = distributed.full_trainable_state(model) if ranks.strategy == "fsdp" else None
    if ranks.is_main:
        _save_trained(model, tokenizer, adapter_dir, base_dir, added_tokens, adapter_weights)
    distributed.finish(ranks)
    base_for_adapter = str(base_dir) if base_dir else plan.base_model_path

    tokens_per_second = run_tokens / seconds if step > start_step and seconds > 0 else 0.0
    return {
        "completed": True,
        "base_model": configure.get("base_model"),
        "base_model_path": plan.base_model_path,
        "base_model_path_for_adapter": base_for_adapter,
        "adapter_path": str(adapter_dir),
        "base_weights_trained": plan.train_base_weights,
        "added_tokens": list(added_tokens),
        "steps": params.training_steps,
        "steps_this_run": step - start_step,
        "initial_loss": initial_loss,
        "final_loss": final_loss,
        "train_tokens": train_tokens,
        "tokens_per_second": round(tokens_per_second, 1),
        "trainable_params": trainable_params,
        "total_params": total_params,
        "resumed_from": resumed_from,
        "tokenization": tokenization,
        "data": data_stats,
        "device": device,
        "precision": plan.precision,
        "precision_reason": plan.precision_reason,
        "micro_batch_size": micro,
        "gradient_accumulation_steps": math.ceil(batch_size / ranks.world_size / micro),
        "distributed": ranks.describe(),
        "attention": attention_mode if params.packing else "causal (padded)",
        "padding_free": padding_free,
        "micro_batches_at_once": workers.as_dict(),
        "compile": compiled,
        "cpu_blas": blas.as_dict(),
        "lora": {"rank": params.lora.rank, "alpha": params.lora.alpha, "dropout": params.lora.dropout,
                 "target_modules": target_modules},
        "metrics_path": str(train_dir / "metrics.jsonl"),
        "summary": {
            "train_loss": final_loss,
            "initial_loss": initial_loss,
            "steps": params.training_steps,
            "tokens_per_second": round(tokens_per_second, 1),
        },
    }


def _save_trained(model, tokenizer, adapter_dir: Path, base_dir: Path | None, added_tokens,
                  adapter_weights: dict[str, Any] | None) -> None:
    shutil.rmtree(adapter_dir, ignore_errors=True)
    # The resized embedding matrix goes to train/base below, not into the adapter.
    model.save_pretrained(adapter_dir, save_embedding_layers=False if added_tokens else "auto",
                          state_dict=adapter_weights)
    tokenizer.save_pretrained(adapter_dir)
    if base_dir is not None:
        shutil.rmtree(base_dir, ignore_errors=True)
        base_model = model.unload()  # the base weights as trained, without the LoRA layers
        base_model.config.use_cache = True
        base_model.save_pretrained(base_dir)
        tokenizer.save_pretrained(base_dir)


