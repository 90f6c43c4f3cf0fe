"""Training throughput: our train step vs Hugging Face TRL's SFTTrainer, same everything.

Both sides fine-tune the same base model (saved once with save_pretrained, LoRA only) on the
same conversations (the prepare step's train split of a synthetic chat set), with the same
maxSeqLength, micro-batch × gradient accumulation, LoRA rank/alpha/dropout/targets,
optimizer (AdamW), schedule, precision and loss (assistant tokens only), for the same number
of optimizer steps. Each run is a fresh process; sides alternate; medians are reported.

- ours: ``chatbot_trainer.train.recipe.train`` in a workspace made by the real prepare and
  configure steps (packing with per-example attention, loss on assistant positions only).
- TRL padded: ``SFTTrainer`` with ``packing=False`` (its default: right-padded batches).
- TRL packed: ``SFTTrainer`` with ``packing=True`` (best-fit decreasing, padding-free).

Gradient checkpointing is off on both sides (TRL turns it on by default; ours does not use it);
``--trl-gradient-checkpointing`` measures TRL with it.

tokens/s counts real (non-padding) tokens over fixed windows of optimizer steps after a
warm-up window: ours from its own ``train/metrics.jsonl`` (one record per window), TRL from
its own token counter (``_total_train_tokens``) read at the end of each step. Memory: peak
RSS of the process (CPU), ``torch.cuda.max_memory_allocated`` (GPU).

Matmul floor: after the sides, the decoder's linear layers are timed alone at their real shapes
(forward and input gradient, one micro-batch of full rows): the tokens/s no LoRA trainer of
this model can beat on the machine. Each side's tokens/s is reported as a share of it, which
tells how much of a step is left to win besides the matrix products.

CPU (default): the ``scratch-llama`` shape (~1M parameters), fp32.
Real model, CPU: ``--model-shape smollm2-135m-real``: SmolLM2-135M-Instruct with its real
weights and tokenizer (the offline GGUF copy the ``smollm`` preset uses, dequantized once).
There ours runs with the product's defaults (micro-batch from the CPU token budget, eager;
``--ours-compiled`` adds the same run with ``compile: on``, ``--ours-peft-layers`` the same run
with peft's own LoRA layers instead of the fused CPU ones, ``--ours-torch-blas`` the same run with
every product in PyTorch's own BLAS instead of the one the trainer times as faster,
``--ours-in-turn`` the same run with a step's micro-batches one after another on all threads
instead of side by side on one core each), TRL with
``--micro-batch-size`` and gradient checkpointing off and, with ``--trl-gradient-checkpointing both``, also on (TRL's
default). ``--dtype bf16`` trains ours in bf16 autocast on a CPU too (what ``precision: auto``
picks on CPUs with avx512_bf16 or AMX); ``--trl-dtypes fp32,bf16`` measures TRL in both
precisions (bf16: the model loaded in bf16 and ``bf16=True``), each as its own side, so the
baseline is TRL's fastest configuration on the machine.
GPU: ``--model-shape qwen2-0.5b --device cuda --dtype bf16`` (or ``llama-1b``): the real
architecture built from its config with random weights; MFU = 6·N·tokens/s / peak FLOP/s with
N the parameters that do matrix multiplies (all but the input embedding) and the GPU's peak
dense bf16 FLOP/s (``--peak-tflops``, default from the GPU's name).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

# Architectures the benchmark can build from a config (random weights).
SHAPES: dict[str, dict[str, Any]] = {
    # chatbot_trainer.model.base_models.SCRATCH_LLAMA
    "scratch-llama": dict(arch="llama", hidden_size=128, intermediate_size=344, num_hidden_layers=4,
                          num_attention_heads=4, num_key_value_heads=2, vocab_size=2048,
                          tie_word_embeddings=False),
    "smollm-135m": dict(arch="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                        num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                        tie_word_embeddings=True, rope_theta=100000.0),
    "qwen2-0.5b": dict(arch="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                       num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                       tie_word_embeddings=True, rope_theta=1000000.0),
    "llama-1b": dict(arch="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                     tie_word_embeddings=True, rope_theta=500000.0),
}

# Shapes whose real weights and tokenizer come from an offline file instead of a config.
REAL_MODELS = {"smollm2-135m-real": "smollm"}

# TRL's assistant_only_loss needs {% generation %} markers around assistant text; SmolLM2's own
# template has none. The same ChatML rendering (same tokens), with the markers:
GENERATION_TEMPLATES = {
    "smollm": (
        "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
        "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
        "<|im_end|>\n' }}{% endif %}{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}"
        "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
        "{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
        "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
}

# Peak dense bf16 tensor FLOP/s (TFLOP/s), by a substring of torch.cuda.get_device_name().
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0,
               "A10": 125.0, "4090": 165.0, "3090": 71.0, "V100": 125.0, "T4": 65.0}


# ------------------------------------------------------------------------------ setup


def build_base_model(out_dir: Path, shape: str, texts_file: Path, max_positions: int, num_layers: int | None,
                     dtype: str) -> dict[str, Any]:
    """Tokenizer trained on the data (ChatML template) + a model of `shape` with random weights."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    from chatbot_trainer.model.base_models import (
        build_scratch_tokenizer,
        conversation_texts,
    )

    conversations = [json.loads(line) for line in texts_file.read_text().splitlines()]
    tokenizer = build_scratch_tokenizer(conversation_texts(conversations), 2048)
    spec = dict(SHAPES[shape])
    arch = spec.pop("arch")
    spec["vocab_size"] = max(spec["vocab_size"], len(tokenizer))  # rows past the tokenizer stay unused
    if num_layers:
        spec["num_hidden_layers"] = num_layers
    special = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id)
    config_cls = Qwen2Config if arch == "qwen2" else LlamaConfig
    config = config_cls(max_position_embeddings=max(max_positions, 64), rms_norm_eps=1e-6, **spec, **special)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    if dtype == "bf16":
        model = model.to(torch.bfloat16)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    embedding = model.get_input_embeddings().weight.numel()
    total = sum(p.numel() for p in model.parameters())
    return {"shape": shape, "architecture": arch, "params": total, "matmul_params": total - embedding
            + (embedding if config.tie_word_embeddings else 0), "layers": config.num_hidden_layers,
            "vocab_size": config.vocab_size, "tokenizer_size": len(tokenizer)}


def import_real_model(out_dir: Path, preset: str, dtype: str) -> dict[str, Any]:
    """The preset's offline GGUF dequantized into a model directory (real weights and tokenizer)."""
    import torch
    from transformers import AutoConfig

    from chatbot_trainer.model import gguf_import, packaged_models

    source = packaged_models.find(preset)
    if source is None:
        raise SystemExit(packaged_models.fetch_hint(preset))
    if not (out_dir / "config.json").is_file():
        gguf_import.import_gguf(source, out_dir)
    config = AutoConfig.from_pretrained(out_dir)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.bfloat16 if dtype == "bf16" else torch.float32)
    embedding = model.get_input_embeddings().weight.numel()
    total = sum(p.numel() for p in model.parameters())
    return {"shape": f"{source.name} (real weights)", "architecture": config.model_type, "params": total,
            "matmul_params": total - embedding + (embedding if config.tie_word_embeddings else 0),
            "layers": config.num_hidden_layers, "vocab_size": config.vocab_size,
            "tokenizer_size": len(AutoTokenizer.from_pretrained(out_dir))}


def make_workspace(workspace: Path, config: dict[str, Any]) -> dict[str, Any]:
    """The real prepare and configure steps (ours and TRL then read the same train split)."""
    from chatbot_trainer.params import trainer_params
    from chatbot_trainer.steps import run_step
    from chatbot_trainer.workspace import StepContext

    ctx = StepContext(workspace=workspace, params=trainer_params(config), name="bench")
    prepared = run_step("prepare", ctx, termination_log=os.devnull)
    configured = run_step("configure", ctx, termination_log=os.devnull)
    return {"train": prepared["report"]["train"], "device": configured["device"],
            "precision": configured["precision"], "micro_batch_size": configured["micro_batch_size"],
            "gradient_accumulation_steps": configured["gradient_accumulation_steps"],
            "target_modules": configured["target_modules"]}


def _window_rates(points: list[tuple[float, int]], window: int) -> list[float]:
    """tokens/s of consecutive windows of `window` steps from (time, cumulative tokens) per step."""
    rates = []
    for end in range(2 * window, len(points) + 1, window):
        (t0, n0), (t1, n1) = points[end - window - 1], points[end - 1]
        rates.append((n1 - n0) / (t1 - t0))
    return rates


def _cuda_peak(device: str) -> int | None:
    if device != "cuda":
        return None
    import torch

    torch.cuda.synchronize()
    return int(torch.cuda.max_memory_allocated())


def matmul_floor(base_dir: str, tokens: int, dtype: str, threads: int, device: str = "cpu",
                 repeats: int = 7) -> dict[str, Any]:
    """The products no LoRA trainer of this model can skip, timed alone on this machine.

    Per micro-batch of ``tokens`` tokens: every linear layer of the decoder forward (x Wᵀ) and
    its input gradient (g W), each timed as one product at its real shape (median of
    ``repeats``). LoRA's own rank-r products, attention, elementwise work and the output layer
    are left out, so ``decoder_tokens_per_s`` is an upper bound on any trainer's tokens/s here,
    and a side's tokens/s over it is the share of its step spent in these products at this
    machine's speed. The output layer is reported apart (``output_layer_ms_per_row``: forward
    and input gradient of one row), since trainers differ in which rows they run through it.
    On a CPU in fp32 the products are timed with PyTorch's BLAS and with NumPy's OpenBLAS (the
    two libraries the trainer chooses between); the bound is the faster one's
    (``by_library`` has both).
    """
    common.set_quiet_env(threads)
    import statistics
    from collections import Counter

    import torch
    from torch import nn
    from transformers import AutoConfig, AutoModelForCausalLM

    from chatbot_trainer.model import cpu_blas

    torch.set_num_threads(threads)
    config = AutoConfig.from_pretrained(base_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    head = model.get_output_embeddings()
    shapes = Counter((m.out_features, m.in_features) for m in model.modules()
                     if isinstance(m, nn.Linear) and m is not head)
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    libraries = {"torch": lambda a, b: torch.mm(a, b)}
    if device == "cpu" and torch_dtype == torch.float32 and cpu_blas.set_openblas_threads(threads):
        libraries["openblas"] = cpu_blas.openblas_mm

    def product_seconds(product, rows: int, out_features: int, in_features: int) -> float:
        x = torch.randn(rows, in_features, dtype=torch_dtype, device=device)
        w = torch.randn(out_features, in_features, dtype=torch_dtype, device=device)
        g = torch.randn(rows, out_features, dtype=torch_dtype, device=device)
        times = []
        for _ in range(repeats + 1):
            if device == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            product(x, w.t())
            product(g, w)
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - started)
        return statistics.median(times[1:])

    by_library = {}
    for library, product in libraries.items():
        seconds = flops = 0.0
        for (out_features, in_features), count in shapes.items():
            seconds += count * product_seconds(product, tokens, out_features, in_features)
            flops += count * 4 * tokens * out_features * in_features
        head_rows = min(tokens, 512)
        head_seconds = product_seconds(product, head_rows, head.out_features, head.in_features)
        by_library[library] = {"decoder_tokens_per_s": tokens / seconds, "gflop_per_s": flops / seconds / 1e9,
                               "output_layer_ms_per_row": head_seconds / head_rows * 1e3}
    fastest = max(by_library, key=lambda library: by_library[library]["decoder_tokens_per_s"])
    return {"tokens": tokens, "library": fastest, **by_library[fastest], "by_library": by_library}


# ------------------------------------------------------------------------------ the two sides


def run_ours(workspace: str, config: dict[str, Any], window: int, threads: int,
             env: dict[str, str] | None = None) -> dict[str, Any]:
    common.set_quiet_env(threads)
    os.environ.update(env or {})
    import torch

    torch.set_num_threads(threads)
    import peft  # noqa: F401 - imported before the baseline RSS is read, as on the TRL side
    import transformers  # noqa: F401

    from chatbot_trainer.params import trainer_params
    from chatbot_trainer.train.recipe import train
    from chatbot_trainer.workspace import StepContext

    ws = Path(workspace)
    shutil.rmtree(ws / "train", ignore_errors=True)  # never resume an earlier repeat
    ctx = StepContext(workspace=ws, params=trainer_params(config), name="bench")
    rss_start = common.rss_now()
    started = time.perf_counter()
    with common.RssSampler() as sampler:
        result = train(ctx)
    seconds = time.perf_counter() - started
    device = result["device"]
    records = [json.loads(line) for line in (ws / "train" / "metrics.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_second"] for r in records if r["step"] >= 2 * window]
    shutil.rmtree(ws / "train", ignore_errors=True)
    return {
        "tokens_per_s": common.median(rates),
        "window_rates": rates,
        "peak_rss_phase": sampler.peak,
        "rss_start": rss_start,
        "cuda_peak": _cuda_peak(device),
        "seconds_total": seconds,
        "train_tokens": result["train_tokens"],
        "fill_ratio": result["data"]["fill_ratio"],
        "attention": result["attention"],
        "compile": result.get("compile"),
        "cpu_blas": result.get("cpu_blas"),
        "micro_batches_at_once": result.get("micro_batches_at_once"),
        "padding_free": result.get("padding_free"),
        "micro_batch_size": result["micro_batch_size"],
        "first_window_tokens_per_s": records[0]["tokens_per_second"] if records else None,
        "final_loss": result["final_loss"],
        "trainable_params": result["trainable_params"],
    }


def run_trl(base_dir: str, train_file: str, config: dict[str, Any], target_modules: list[str], packing: bool,
            window: int, threads: int, device: str, dtype: str, gradient_checkpointing: bool,
            generation_template: str | None = None) -> dict[str, Any]:
    common.set_quiet_env(threads)
    import torch

    torch.set_num_threads(threads)
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    rows = [json.loads(line) for line in Path(train_file).read_text().splitlines() if line.strip()]
    dataset = Dataset.from_list(rows)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    if "{% generation %}" not in (tokenizer.chat_template or ""):
        tokenizer.chat_template = GENERATION_TEMPLATES[generation_template]
    rss_start = common.rss_now()
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch_dtype, attn_implementation="sdpa")
    lora = config["lora"]
    micro = config["microBatchSize"]
    steps = config["trainingSteps"]
    out = tempfile.mkdtemp(prefix="trl-bench-")
    args = SFTConfig(
        output_dir=out,
        max_steps=steps,
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=config["batchSize"] // micro,
        learning_rate=config["learningRate"],
        lr_scheduler_type="cosine",
        warmup_steps=config["warmupSteps"],
        weight_decay=0.0,
        max_grad_norm=1.0,
        max_length=config["maxSeqLength"],
        packing=packing,
        assistant_only_loss=True,
        gradient_checkpointing=gradient_checkpointing,
        bf16=dtype == "bf16",
        fp16=False,
        use_cpu=device == "cpu",
        logging_steps=10**9,
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=config["seed"],
    )
    points: list[tuple[float, int]] = []

    class StepClock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):  # after optimizer.step()
            if device == "cuda":
                torch.cuda.synchronize()
            points.append((time.perf_counter(), int(trainer._total_train_tokens)))

    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=LoraConfig(r=lora["rank"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                               target_modules=target_modules, task_type="CAUSAL_LM"),
        callbacks=[StepClock()],
    )
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # no end-of-training log line
    started = time.perf_counter()
    with common.RssSampler() as sampler:
        output = trainer.train()
    seconds = time.perf_counter() - started
    rates = _window_rates(points, window)
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    shutil.rmtree(out, ignore_errors=True)
    return {
        "tokens_per_s": common.median(rates),
        "window_rates": rates,
        "peak_rss_phase": sampler.peak,
        "rss_start": rss_start,
        "cuda_peak": _cuda_peak(device),
        "seconds_total": seconds,
        "train_tokens": int(trainer._total_train_tokens),
        "final_loss": output.training_loss,
        "trainable_params": trainable,
    }


# ------------------------------------------------------------------------------ main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-shape", choices=sorted([*SHAPES, *REAL_MODELS]), default="scratch-llama")
    parser.add_argument("--num-layers", type=int, help="override the shape's layer count (smoke tests)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default=None,
                        help="ours' precision and TRL's (default: fp32 on CPU, bf16 on GPU)")
    parser.add_argument("--trl-dtypes", default=None,
                        help="comma-separated TRL precisions to measure, each a side (e.g. fp32,bf16: "
                             "TRL's fastest is the baseline); default: --dtype")
    parser.add_argument("--conversations", type=int, default=4000, help="synthetic conversations")
    parser.add_argument("--max-seq-length", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per optimizer step")
    parser.add_argument("--micro-batch-size", type=int, default=4, help="sequences per forward pass")
    parser.add_argument("--window", type=int, default=4, help="optimizer steps per timed window")
    parser.add_argument("--windows", type=int, default=3, help="timed windows after one warm-up window")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each side (alternating)")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS") or 1))
    parser.add_argument("--peak-tflops", type=float, help="GPU peak dense bf16 TFLOP/s (for MFU)")
    parser.add_argument("--no-trl-packed", action="store_true", help="skip the TRL packing=True baseline")
    parser.add_argument("--trl-gradient-checkpointing", choices=["off", "on", "both"], default="off",
                        help="TRL without gradient checkpointing, with it (TRL's default), or both")
    parser.add_argument("--ours-compiled", action="store_true",
                        help="also run ours with compile: on (decoder layers through torch.compile)")
    parser.add_argument("--ours-peft-layers", action="store_true",
                        help="also run ours with peft's own LoRA layers (CHATBOT_FUSED_LORA=off)")
    parser.add_argument("--ours-torch-blas", action="store_true",
                        help="add ours with every CPU product in PyTorch's BLAS (CHATBOT_CPU_BLAS=torch)")
    parser.add_argument("--ours-in-turn", action="store_true",
                        help="add ours with the micro-batches run in turn on all threads (CHATBOT_CPU_WORKERS=1)")
    parser.add_argument("--sides", help="comma-separated side names to run (e.g. ours): a before/after of ours "
                                         "without the baselines")
    parser.add_argument("--workdir", help="where data, model and workspace go (default: a temporary directory)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks that everything runs")
    args = parser.parse_args()
    if args.quick:
        args.conversations, args.window, args.windows, args.repeats = 300, 2, 1, 1
        args.max_seq_length = min(args.max_seq_length, 256)
    dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    common.set_quiet_env(args.threads)

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-train-"))
    work.mkdir(parents=True, exist_ok=True)
    data_file = common.write_jsonl(work / "chats.jsonl", common.synthetic_conversations(
        args.conversations, seed=1, max_words=int(args.max_seq_length * 0.55)))
    base_dir = work / "base-model"
    real = args.model_shape in REAL_MODELS
    if real:
        model_info, _ = common.run_isolated(import_real_model, base_dir, REAL_MODELS[args.model_shape], dtype)
    else:
        model_info, _ = common.run_isolated(build_base_model, base_dir, args.model_shape, data_file,
                                            args.max_seq_length, args.num_layers, dtype)
    steps = args.window * (args.windows + 1)
    config: dict[str, Any] = {
        "trainingData": str(data_file),
        "modelType": str(base_dir),
        "trainingSteps": steps,
        "batchSize": args.batch_size,
        "microBatchSize": args.micro_batch_size,
        "learningRate": 2e-4,
        "maxSeqLength": args.max_seq_length,
        "packing": True,
        "precision": dtype,
        "warmupSteps": 1,
        "logEvery": args.window,
        "checkpointEvery": 10**6,
        "seed": 42,
        "lora": {"rank": 16, "alpha": 32, "dropout": 0.05},
        "data": {"evalFraction": 0.05},
        "evaluation": {},
    }
    # compiled repeats share one Inductor cache: the first one pays the cold compile
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(work / "inductor-cache"))
    workspace = work / "workspace"
    shutil.rmtree(workspace, ignore_errors=True)
    plan, _ = common.run_isolated(make_workspace, workspace, config)
    if plan["device"] != args.device:
        raise SystemExit(f"configure chose device {plan['device']}, not {args.device}")
    train_file = str(workspace / "prepare" / "train.jsonl")
    print(f"model {model_info}; {plan['train']} training conversations; plan {plan}", flush=True)

    def ours(compile_mode: str | None, env: dict[str, str] | None = None):
        ours_config = {**config, "compile": compile_mode} if compile_mode else config
        if real:  # ours sizes its own micro-batches; TRL keeps --micro-batch-size
            ours_config = {k: v for k, v in ours_config.items() if k != "microBatchSize"}

        def side(_: int) -> dict[str, Any]:
            result, peak = common.run_isolated(run_ours, str(workspace), ours_config, args.window, args.threads,
                                               env)
            return {**result, "peak_rss": peak}
        return side

    def trl(packing: bool, checkpointing: bool, trl_dtype: str):
        def side(_: int) -> dict[str, Any]:
            result, peak = common.run_isolated(run_trl, str(base_dir), train_file, config, plan["target_modules"],
                                               packing, args.window,
                                               args.threads, args.device, trl_dtype, checkpointing,
                                               REAL_MODELS.get(args.model_shape))
            return {**result, "peak_rss": peak}
        return side

    checkpointing = {"off": [False], "on": [True], "both": [False, True]}[args.trl_gradient_checkpointing]
    trl_dtypes = (args.trl_dtypes or dtype).split(",")
    sides = {}
    for trl_dtype in trl_dtypes:
        for gc in checkpointing:
            suffix = ("_gc" if gc and len(checkpointing) > 1 else "") + (f"_{trl_dtype}" if len(trl_dtypes) > 1 else "")
            sides[f"trl_padded{suffix}"] = trl(False, gc, trl_dtype)
            if not args.no_trl_packed:
                sides[f"trl_packed{suffix}"] = trl(True, gc, trl_dtype)
    sides["ours"] = ours(None)
    if args.ours_compiled:
        sides["ours_compiled"] = ours("on")
    if args.ours_peft_layers:
        sides["ours_peft_layers"] = ours(None, {"CHATBOT_FUSED_LORA": "off"})
    if args.ours_torch_blas:
        sides["ours_torch_blas"] = ours(None, {"CHATBOT_CPU_BLAS": "torch"})
    if args.ours_in_turn:
        sides["ours_in_turn"] = ours(None, {"CHATBOT_CPU_WORKERS": "1"})
    if args.sides:
        wanted = args.sides.split(",")
        unknown = set(wanted) - set(sides)
        if unknown:
            raise SystemExit(f"unknown sides {sorted(unknown)}; choose from {sorted(sides)}")
        sides = {name: side for name, side in sides.items() if name in wanted}
    runs = common.alternate(sides, args.repeats)
    # the unavoidable products of one micro-batch of full rows, timed after the sides (same machine state)
    floor, _ = common.run_isolated(matmul_floor, str(base_dir), args.micro_batch_size * args.max_seq_length,
                                   dtype, args.threads, args.device)

    summary: dict[str, dict[str, Any]] = {}
    for name, results in runs.items():
        summary[name] = {
            "tokens_per_s": common.median(r["tokens_per_s"] for r in results),
            "peak_rss_mib": common.mib(common.median(r["peak_rss"] for r in results)),
            "rss_growth_mib": common.mib(common.median(r["peak_rss_phase"] - r["rss_start"] for r in results)),
            "cuda_peak_mib": common.mib(common.median(r["cuda_peak"] for r in results))
            if args.device == "cuda" else None,
            "final_loss": common.median(r["final_loss"] for r in results),
            "trainable_params": results[0]["trainable_params"],
            "seconds_total": common.median(r["seconds_total"] for r in results),
        }
    peak_tflops = args.peak_tflops
    if args.device == "cuda" and peak_tflops is None:
        import torch

        name = torch.cuda.get_device_name(0)
        peak_tflops = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    for name, s in summary.items():
        s["mfu"] = (6 * model_info["matmul_params"] * s["tokens_per_s"] / (peak_tflops * 1e12)
                    if peak_tflops else None)
    memory_key = "cuda_peak_mib" if args.device == "cuda" else "peak_rss_mib"
    others = [name for name in summary if name != "ours"] if "ours" in summary else []
    ratios = {f"ours_vs_{name}": common.ratio(summary["ours"]["tokens_per_s"], summary[name]["tokens_per_s"])
              for name in others}
    memory_ratios = {f"ours_vs_{name}": common.ratio(summary["ours"][memory_key], summary[name][memory_key])
                     for name in others}
    trl_sides = [name for name in others if name.startswith("trl")]
    best_trl = max(trl_sides, key=lambda name: summary[name]["tokens_per_s"]) if trl_sides else None

    headers = ["side", "tokens/s", "peak RSS MiB", "RSS growth MiB", "GPU peak MiB", "MFU", "loss", "trainable"]
    rows = [[name, s["tokens_per_s"], s["peak_rss_mib"], s["rss_growth_mib"], s["cuda_peak_mib"],
             s["mfu"], s["final_loss"], s["trainable_params"]] for name, s in summary.items()]
    print()
    print(common.table(headers, rows))
    print()
    for key, value in ratios.items():
        print(f"tokens/s ratio {key}: {value:.2f}x   ({memory_key} ratio {memory_ratios[key]:.2f})")
    for name, s in summary.items():
        s["share_of_matmul_floor"] = s["tokens_per_s"] / floor["decoder_tokens_per_s"]
    libraries = ", ".join(f"{library} {v['gflop_per_s']:.1f}" for library, v in floor["by_library"].items())
    print(f"matmul floor: the decoder's linear layers (forward + input gradient) alone at "
          f"{floor['gflop_per_s']:.1f} GFLOP/s ({floor['library']}; GFLOP/s by library: {libraries}) allow "
          f"{floor['decoder_tokens_per_s']:.1f} tokens/s; the output layer adds {floor['output_layer_ms_per_row']:.2f} ms per row it runs on; each side's tokens/s as a share of "
          f"that bound: " + ", ".join(f"{name} {s['share_of_matmul_floor']:.0%}" for name, s in summary.items()))
    if best_trl:
        print(f"fastest TRL side: {best_trl}; ours vs it: {ratios[f'ours_vs_{best_trl}']:.2f}x tokens/s at "
              f"{memory_ratios[f'ours_vs_{best_trl}']:.2f}x {memory_key}")
    ours_runs = runs.get("ours") or runs.get("ours_compiled") or []
    for ours_run in ours_runs[:1]:
        print(f"ours: micro-batch {ours_run['micro_batch_size']}, compile {ours_run['compile']}, "
              f"products {ours_run.get('cpu_blas')}, micro-batches at once {ours_run.get('micro_batches_at_once')}, "
              f"first window {[r['first_window_tokens_per_s'] for r in ours_runs]} tokens/s, "
              f"whole run {[round(r['seconds_total'], 1) for r in ours_runs]} s")
    data = {
        "benchmark": "train_throughput",
        "machine": common.machine_info(),
        "versions": common.package_versions(["torch", "transformers", "peft", "trl", "datasets", "accelerate"]),
        "settings": {**vars(args), "dtype": dtype, "steps": steps, "config": config, "plan": plan,
                     "peak_tflops": peak_tflops},
        "model": model_info,
        "summary": summary,
        "ratios_tokens_per_s": ratios,
        "fastest_trl": best_trl,
        "matmul_floor": floor,
        f"ratios_{memory_key}": memory_ratios,
        "runs": runs,
    }
    default = args.model_shape == "scratch-llama" and args.device == "cpu" and not args.num_layers

    layers = f"-{args.num_layers}layer" if args.num_layers else ""
    cpu_bf16 = "_bf16" if args.device == "cpu" and dtype == "bf16" else ""
    only = f"_only-{args.sides.replace(',', '-')}" if args.sides else ""
    name = "train_throughput" + ("" if default and not only and not cpu_bf16 else
                                 f"_{args.model_shape}{layers}_{args.device}{cpu_bf16}{only}")
    return common.finish(name, data, quick=args.quick, work=work, keep=bool(args.workdir))


if __name__ == "__main__":
    raise SystemExit(main())
