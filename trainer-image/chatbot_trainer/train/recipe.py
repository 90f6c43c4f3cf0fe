"""The train step: LoRA fine-tuning on the assistant tokens, resumable after preemption.

``LoRAFinetuneRecipe`` has these features:

- the plan configure made (``train.plan``), re-resolved for this node's device, precision and
  micro-batches; seeded, so a rerun gives the same losses;
- data: ``prepare/train.jsonl`` tokenized with the loss on the assistant's tokens only, packed
  into sequences whose examples never attend to each other (or padded);
- model: the base in half precision where only LoRA weights train; a LoRA adapter (new
  special tokens trained too; every base weight trained as well when the base was built from
  a config, its weights being random); on a CPU, fused LoRA layers with cheap dropout masks
  and the faster BLAS library for their products;
- execution modes behind one interface (``train.execution``): micro-batches in turn (one
  process, or one rank of DDP/FSDP under torchrun: ``train.distributed``) or side by side on
  a CPU's cores (``train.cpu_workers``);
- AdamW (fused where the device has it) and a warmup/decay schedule; gradient accumulation
  with the loss of a step = sum of its token losses / its assistant tokens; clipping;
- checkpoints every ``checkpointEvery`` steps that resume the same run (``train.checkpoints``);
- per logged window: ``train/metrics.jsonl``, the live progress board, TensorBoard
  (``train.monitor``); a loss that stops being finite ends the run as diverged;
- output: ``train/adapter/`` (and ``train/base/`` when base weights changed or tokens were
  added), and the result the step writes.

``setup()`` composes the ``_setup_*`` phases; ``train()`` runs the loop; ``save_checkpoint()``
and ``save()`` write what it made. The host waits for the device only at log and checkpoint
steps (``.item()`` nowhere else).
"""

from __future__ import annotations

import gc
import logging
import math
import time
from pathlib import Path
from typing import Any

from chatbot_trainer.data.packing import (
    build_sequences,
    choose_attention_mode,
    collate,
    packing_stats,
    restore_attention,
)
from chatbot_trainer.data.tokenization import tokenize_dataset
from chatbot_trainer.errors import InvalidConfig, InvalidData
from chatbot_trainer.model import compilation
from chatbot_trainer.model.loading import (
    ALL_LINEAR,
    default_target_modules,
    load_causal_lm,
    load_tokenizer_with_template,
    peft_quietly,
)
from chatbot_trainer.model.loss import token_loss_sums
from chatbot_trainer.train import checkpoints, distributed, execution
from chatbot_trainer.train.monitor import MetricsLog, NoMonitor, TrainMonitor, check_finite
from chatbot_trainer.train.plan import TrainPlan, seed_everything, sequence_indices
from chatbot_trainer.workspace import StepContext

log = logging.getLogger("chatbot_trainer.train")


def train(ctx: StepContext, *, stop_at_step: int | None = None) -> dict[str, Any]:
    """Run (or resume) the training; returns the train step's result.

    ``stop_at_step`` ends the process's work after that step as a preemption would (the
    result then has ``"completed": False``); the next call resumes from the checkpoint.
    """
    recipe = LoRAFinetuneRecipe(ctx)
    recipe.setup()
    if not recipe.train(stop_at_step=stop_at_step):
        return {"completed": False, "step": recipe.step, "resumed_from": recipe.resumed_from}
    recipe.save()
    return recipe.result()


class LoRAFinetuneRecipe:
    """LoRA fine-tuning of one ChatbotTraining on this process (see the module docstring)."""

    def __init__(self, ctx: StepContext):
        self.ctx, self.params = ctx, ctx.params
        self.train_dir = ctx.step_dir("train")
        self.checkpoint_root = self.train_dir / "checkpoints"
        self.data_file = ctx.workspace / "prepare" / "train.jsonl"

    # ------------------------------------------------------------------------ setup

    def setup(self) -> None:
        self._setup_plan()
        self._setup_data()
        self._setup_model()
        self._setup_execution()
        self._setup_optimizer()
        # the mode the worker plan chose, with the optimizer's gradient scaler (fp16 on a GPU)
        self.execution = execution.for_workers(self.workers, self.forward_loss, [p for _, p in self.trainable],
                                               self.ranks, self.plan, self.scaler)
        self._setup_lr_scheduler()
        self._resume()
        self._setup_reporting()

    def _setup_plan(self) -> None:
        """The plan configure made, with device, precision and micro-batch for this node; this
        process's place among the training processes (torchrun), if there are several."""
        import torch

        if not self.ctx.show_progress:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()  # no weight-loading bars in Job logs
        self.configure = self.ctx.read_result("configure")
        self.ranks = distributed.ranks_from_env(strategy=self.params.distributed.strategy)
        self.plan = TrainPlan.from_configure(self.configure, self.params, self.ranks)
        self.device = self.plan.device
        distributed.start(self.ranks, self.device)
        if self.device == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        seed_everything(self.params.seed)

    def _setup_data(self) -> None:
        """Tokenizer; the training conversations tokenized, then packed (or padded) into sequences."""
        params = self.params
        self.tokenizer, self.added_tokens = load_tokenizer_with_template(
            self.plan.base_model_path, self.params.chat_template)
        if not self.data_file.is_file():
            raise InvalidData(f"{self.data_file} is missing: run the prepare step first")
        from chatbot_trainer.data.dataset import load_jsonl

        examples, self.tokenization = tokenize_dataset(self.tokenizer, load_jsonl(self.data_file),
                                                       params.max_seq_length)
        if not examples:
            raise InvalidData(
                f"no training conversation fits maxSeqLength {params.max_seq_length} with assistant tokens "
                f"({self.tokenization}): raise maxSeqLength or check the data"
            )
        self.sequences = build_sequences(examples, params.max_seq_length, params.packing)
        self.data_stats = packing_stats(self.sequences, params.max_seq_length)

    def _setup_model(self) -> None:
        """The base model and its LoRA adapter. Frozen base weights may live in half precision
        (on a CPU too, in bf16: half their memory, at the speed of an fp32 copy under
        autocast); trained ones stay fp32."""
        import torch
        from peft import LoraConfig, get_peft_model

        plan, params, tokenizer = self.plan, self.params, self.tokenizer
        self.only_lora = not plan.train_base_weights and not self.added_tokens
        self.half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(plan.precision)
        load_dtype = self.half if (self.half is not None and self.only_lora) else torch.float32
        log.info("base model %s on %s (%s), %d sequences of up to %d tokens", plan.base_model_path,
                 self.device, plan.precision, len(self.sequences), params.max_seq_length)
        model = load_causal_lm(plan.base_model_path, dtype=load_dtype)
        if self.added_tokens:
            model.resize_token_embeddings(len(tokenizer))
        model.config.pad_token_id = tokenizer.pad_token_id
        model.config.use_cache = False
        model.to(self.device)
        try:
            self.attention_mode = choose_attention_mode(model) if params.packing else "position_ids"
        except ValueError as exc:
            raise InvalidConfig(str(exc)) from exc
        self.target_modules = plan.target_modules or default_target_modules(model)
        lora_config = LoraConfig(
            r=params.lora.rank,
            lora_alpha=params.lora.alpha,
            lora_dropout=params.lora.dropout,
            target_modules=ALL_LINEAR if self.target_modules == [ALL_LINEAR] else self.target_modules,
            task_type="CAUSAL_LM",
            fan_in_fan_out=model.config.model_type == "gpt2",  # GPT-2's Conv1D stores weights transposed
            trainable_token_indices=(
                tokenizer.convert_tokens_to_ids(self.added_tokens)
                if self.added_tokens and not plan.train_base_weights else None
            ),
        )
        try:
            with peft_quietly():
                self.model = get_peft_model(model, lora_config)
        except ValueError as exc:
            raise InvalidConfig(f"LoRA cannot adapt this model: {exc}: check lora.targetModules") from exc

    def _setup_execution(self) -> None:
        """How the micro-batches run (in turn or side by side), the CPU kernels they use, and
        the loss of a micro-batch (through DDP or FSDP with several ranks)."""
        from chatbot_trainer.model import lora_dropout

        model, plan = self.model, self.plan
        lora_dropout.use_cheap_masks(model)
        will_compile = (compilation.decide(self.params.compile, self.device)[0]
                        and bool(compilation.decoder_layers(model)))
        self.workers = execution.plan_workers(plan, self.params, model, self.ranks, will_compile)
        log.info("micro-batches: %d at a time (%s)", self.workers.workers, self.workers.reason)
        self.blas = self._setup_cpu_kernels()
        log.info("matrix products: %s (%s)", self.blas.backend, self.blas.reason)
        if plan.train_base_weights:
            for param in model.parameters():
                param.requires_grad_(True)
        distributed.check_supported(self.ranks, self.only_lora)
        attention_mode = self.attention_mode
        self.forward_loss = distributed.wrap(
            model, self.ranks, self.device,
            lambda m, batch: token_loss_sums(m, batch, attention_mode=attention_mode))
        self.trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.trainable_params = sum(p.numel() for _, p in self.trainable)
        self.total_params = sum(p.numel() for p in model.parameters())
        model.train()

    def _setup_cpu_kernels(self):
        """On a CPU: one fused autograd node per adapted layer (see lora_fused), with their fp32
        products in the library timed faster at their shapes, with the threads each
        micro-batch gets. Elsewhere PyTorch's products, whatever an earlier run chose."""
        import torch

        from chatbot_trainer.model import cpu_blas, lora_fused

        if self.device == "cpu" and lora_fused.enabled():
            lora_fused.use_fused_lora(self.model)
            products_dtype = torch.float32 if self.plan.precision == "fp32" else self.half
            return cpu_blas.choose(lora_fused.base_shapes(self.model), self.device, products_dtype,
                                   threads=1 if self.workers.workers > 1 else None)
        blas = cpu_blas.BlasChoice("torch", f"on {self.device}" if self.device != "cpu" else "CHATBOT_FUSED_LORA=off")
        cpu_blas.activate(blas)
        return blas

    def _setup_optimizer(self) -> None:
        """AdamW, weight decay on matrices only, fused where the device and the ranks allow; the
        gradient scaler of fp16 on a GPU."""
        import torch

        decay = [p for _, p in self.trainable if p.ndim >= 2]
        no_decay = [p for _, p in self.trainable if p.ndim < 2]
        groups = [g for g in ({"params": decay, "weight_decay": self.params.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
        fused = distributed.fused_optimizer_allowed(self.ranks) and self.device in ("cuda", "cpu")
        try:
            self.optimizer = torch.optim.AdamW(groups, lr=self.params.learning_rate, fused=fused)
        except (RuntimeError, ValueError):
            self.optimizer = torch.optim.AdamW(groups, lr=self.params.learning_rate)
        self.scaler = (torch.amp.GradScaler("cuda")
                       if (self.device == "cuda" and self.plan.precision == "fp16") else None)

    def _setup_lr_scheduler(self) -> None:
        from transformers import get_scheduler

        name, warmup = self.params.lr_scheduler, self.plan.warmup_steps
        if name == "constant":
            name = "constant_with_warmup" if warmup else "constant"
        self.scheduler = get_scheduler(name, self.optimizer, num_warmup_steps=warmup,
                                       num_training_steps=self.params.training_steps)

    def _resume(self) -> None:
        """From the latest complete checkpoint of this run, if there is one."""
        self.fingerprint = checkpoints.fingerprint(self.plan, self.params, self.data_file)
        self.step, self.consumed, self.train_tokens, self.initial_loss = 0, 0, 0, None
        self.window_state = None
        state, path = checkpoints.resume_latest(self.checkpoint_root, self.fingerprint, self.model,
                                                self.optimizer, self.scheduler, self.scaler)
        self.resumed_from = str(path) if path else None
        if state is not None:
            self.step, self.consumed = state["step"], state["consumed_sequences"]
            self.train_tokens, self.initial_loss = state["train_tokens"], state["initial_loss"]
            self.window_state = state.get("window")
            log.info("resuming from %s (step %d of %d)", path, self.step, self.params.training_steps)

    def _setup_reporting(self) -> None:
        """metrics.jsonl, compiled decoder layers (after the checkpoint load), the monitor."""
        main = self.ranks.is_main
        self.metrics_log = MetricsLog(self.train_dir / "metrics.jsonl", self.step, write=main)
        self.compiled = compilation.apply(self.model, self.params.compile, self.device,
                                          cache_dir=self.train_dir / "compile-cache")
        self.monitor = TrainMonitor(self.ctx.workspace, self.params.training_steps, self.step) if main else NoMonitor()

    # ------------------------------------------------------------------------ the loop

    def train(self, stop_at_step: int | None = None) -> bool:
        """Optimizer steps until ``trainingSteps`` (True), or until ``stop_at_step`` (False)."""
        import torch
        from tqdm.auto import tqdm

        params, ranks = self.params, self.ranks
        # The segments attention works per example: a micro-batch's packed rows then go in as
        # one row without the padding between them (see packing.collate).
        self.padding_free = params.packing and self.attention_mode == "segments"
        self.window_loss = torch.zeros((), dtype=torch.float64, device=self.device)
        self.window_label_tokens = self.window_tokens = 0
        if self.window_state:  # a log window that a checkpoint cut in two goes on (summed once)
            self.window_loss += distributed.main_share(ranks, self.window_state[0])
            self.window_label_tokens, self.window_tokens = int(self.window_state[1]), int(self.window_state[2])
        self.run_tokens, self.start_step = 0, self.step
        progress = tqdm(total=params.training_steps, initial=self.step, desc="train", unit="step",
                        disable=not (self.ctx.show_progress and ranks.is_main))
        # The model, data and tokenizer are millions of long-lived objects: keep the garbage
        # collector's full passes from walking them at every step.
        gc.collect()
        gc.freeze()
        self.started = self.window_started = time.perf_counter()
        while self.step < params.training_steps:
            label_tokens, tokens = self._forward_backward()
            grad_norm, lr = self._optimizer_step()
            self.step += 1
            progress.update(1)
            self.window_label_tokens += label_tokens
            self.window_tokens += tokens
            if self.step == 1 or self.step % params.log_every == 0 or self.step == params.training_steps:
                progress.set_postfix(loss=f"{self._log_window(grad_norm, lr):.4f}")
            if self.step % params.checkpoint_every == 0 or self.step == params.training_steps:
                self.save_checkpoint(grad_norm)
            if stop_at_step is not None and stop_at_step <= self.step < params.training_steps:
                break
        gc.unfreeze()
        progress.close()
        self.seconds = time.perf_counter() - self.started
        self.monitor.close()
        return self.step >= params.training_steps

    def _forward_backward(self) -> tuple[int, int]:
        """The next global batch: this rank's share, in micro-batches, through the execution
        mode; returns the step's assistant and all tokens over every rank."""
        params, ranks = self.params, self.ranks
        indices = sequence_indices(self.consumed, params.batch_size, len(self.sequences), params.seed)
        self.consumed += params.batch_size
        indices = distributed.shard(indices, ranks)  # this rank's share of the global batch
        micro = self.workers.micro_batch_size
        batches = [
            collate([self.sequences[i] for i in indices[j : j + micro]], pad_token_id=self.tokenizer.pad_token_id,
                    packed=params.packing, flat=self.padding_free)
            for j in range(0, len(indices), micro)
        ]
        label_tokens, tokens = distributed.global_counts(
            ranks, sum(b.num_label_tokens for b in batches), sum(b.num_tokens for b in batches))
        self.execution.run(distributed.micro_batches_to_run(batches, ranks), label_tokens, self.window_loss)
        self.run_tokens += tokens
        self.train_tokens += tokens
        return label_tokens, tokens

    def _optimizer_step(self):
        """Clip, step the optimizer and the schedule; returns the gradient norm and the lr used."""
        import torch

        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_([p for _, p in self.trainable], self.params.max_grad_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm, lr

    def _log_window(self, grad_norm, lr: float) -> float:
        """One line of metrics.jsonl, the progress board and TensorBoard; returns the loss."""
        ranks, params, step = self.ranks, self.params, self.step
        now = time.perf_counter()
        loss_value = distributed.sum_over_ranks(ranks, self.window_loss) / max(self.window_label_tokens, 1)
        check_finite(step, loss_value, distributed.as_float(grad_norm), self.metrics_log.records, params)
        if self.initial_loss is None:
            self.initial_loss = loss_value
        record = {
            "step": step,
            "loss": round(loss_value, 6),
            "lr": lr,
            "grad_norm": round(distributed.as_float(grad_norm), 6),
            "tokens_per_second": round(self.window_tokens / max(now - self.window_started, 1e-9), 1),
            "epoch": round(self.consumed / len(self.sequences), 3),
        }
        self.metrics_log.write(record)
        self.monitor.window(record)
        log.info("step %d/%d loss %.4f lr %.3g %.0f tokens/s", step, params.training_steps,
                 loss_value, record["lr"], record["tokens_per_second"])
        self.window_loss.zero_()
        self.window_label_tokens = self.window_tokens = 0
        self.window_started = now
        return loss_value

    # ------------------------------------------------------------------------ saving

    def save_checkpoint(self, grad_norm) -> Path:
        """Never of a diverged state: a resumed run would start from it."""
        window_total = distributed.sum_over_ranks(self.ranks, self.window_loss)
        check_finite(self.step, window_total, distributed.as_float(grad_norm), self.metrics_log.records, self.params)
        state = {
            "fingerprint": self.fingerprint,
            "consumed_sequences": self.consumed,
            "train_tokens": self.train_tokens,
            "initial_loss": self.initial_loss,
            "training_steps": self.params.training_steps,
            "window": [window_total, self.window_label_tokens, self.window_tokens],
        }
        return checkpoints.save_checkpoint(self.checkpoint_root, self.step, self.model, self.optimizer,
                                           self.scheduler, self.scaler, state, self.ranks)

    def save(self) -> None:
        """The adapter, and the base when it changed (trained weights, added tokens): rank 0
        alone, with the full weights (FSDP gathers its shards from every rank)."""
        import shutil

        restore_attention(self.model)
        self.adapter_dir = self.train_dir / "adapter"
        self.base_dir = self.train_dir / "base" if self.plan.train_base_weights or self.added_tokens else None
        adapter_weights = distributed.full_trainable_state(self.model) if self.ranks.strategy == "fsdp" else None
        if self.ranks.is_main:
            model, tokenizer = self.model, self.tokenizer
            shutil.rmtree(self.adapter_dir, ignore_errors=True)
            # The resized embedding matrix goes to train/base below, not into the adapter.
            model.save_pretrained(self.adapter_dir, save_embedding_layers=False if self.added_tokens else "auto",
                                  state_dict=adapter_weights)
            tokenizer.save_pretrained(self.adapter_dir)
            if self.base_dir is not None:
                shutil.rmtree(self.base_dir, ignore_errors=True)
                base_model = model.unload()  # the base weights as trained, without the LoRA layers
                base_model.config.use_cache = True
                base_model.save_pretrained(self.base_dir)
                tokenizer.save_pretrained(self.base_dir)
        distributed.finish(self.ranks)

    def result(self) -> dict[str, Any]:
        """The train step's result (train/result.json); ``summary`` goes into status."""
        params, plan, records = self.params, self.plan, self.metrics_log.records
        final_loss = records[-1]["loss"] if records else None
        ran = self.step > self.start_step and self.seconds > 0
        tokens_per_second = round(self.run_tokens / self.seconds if ran else 0.0, 1)
        micro = self.workers.micro_batch_size
        return {
            "completed": True,
            "base_model": self.configure.get("base_model"),
            "base_model_path": plan.base_model_path,
            "base_model_path_for_adapter": str(self.base_dir) if self.base_dir else plan.base_model_path,
            "adapter_path": str(self.adapter_dir),
            "base_weights_trained": plan.train_base_weights,
            "added_tokens": list(self.added_tokens),
            "steps": params.training_steps,
            "steps_this_run": self.step - self.start_step,
            "initial_loss": self.initial_loss,
            "final_loss": final_loss,
            "train_tokens": self.train_tokens,
            "tokens_per_second": tokens_per_second,
            "trainable_params": self.trainable_params,
            "total_params": self.total_params,
            "resumed_from": self.resumed_from,
            "tokenization": self.tokenization,
            "data": self.data_stats,
            "device": self.device,
            "precision": plan.precision,
            "precision_reason": plan.precision_reason,
            "micro_batch_size": micro,
            "gradient_accumulation_steps": math.ceil(params.batch_size / self.ranks.world_size / micro),
            "distributed": self.ranks.describe(),
            "attention": self.attention_mode if params.packing else "causal (padded)",
            "padding_free": self.padding_free,
            "micro_batches_at_once": self.workers.as_dict(),
            "compile": self.compiled,
            "cpu_blas": self.blas.as_dict(),
            "lora": {"rank": params.lora.rank, "alpha": params.lora.alpha, "dropout": params.lora.dropout,
                     "target_modules": self.target_modules},
            "metrics_path": str(self.train_dir / "metrics.jsonl"),
            "summary": {
                "train_loss": final_loss,
                "initial_loss": self.initial_loss,
                "steps": params.training_steps,
                "tokens_per_second": tokens_per_second,
            },
        }
