"""Export speed: seconds per GB of weights for GGUF F16 and Q8_0, against a plain file copy.

A Llama-shaped model (~345M parameters by default, random weights, bf16 like hub
checkpoints) is saved once with ``save_pretrained`` together with a byte-level BPE tokenizer
and our ChatML template. Then, alternating, in fresh processes:

- ours: ``chatbot_trainer.export.gguf_writer.write_gguf(model_dir, out, "f16" | "q8_0")`` — reads
  the safetensors, applies the layout transforms, converts or quantizes, writes and fsyncs;
- floor: ``shutil.copyfile`` of the same safetensors file(s) followed by ``fsync``: what
  moving these bytes through the file system costs with no conversion at all;
- reference (``*_gguf_numpy``): the same ``write_gguf`` with each tensor converted the plain
  gguf-py way, i.e. read as float32 numpy and passed to ``gguf.quants.quantize`` (numpy
  float16 cast, numpy Q8_0), which is how the exporter converted before it used torch.

Figures are seconds per GB of source weights (the safetensors bytes) and the ratio of our
time to the copy's. The source files are in the page cache for every run (they were just
written or read), so both sides read from memory and write through to the disk.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

SHAPES = {
    # ~345M parameters: 24 layers of width 1024 (GQA 16/8 heads), 32k vocabulary, untied head.
    "llama-345m": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=24, num_attention_heads=16,
                       num_key_value_heads=8, vocab_size=32000, tie_word_embeddings=False),
    # Qwen2.5-0.5B's shape as a Llama (494M parameters, tied embeddings).
    "llama-494m": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                       num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "tiny": dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=4096, tie_word_embeddings=False),
}


def build_model(out_dir: str, shape: str, dtype: str) -> dict[str, Any]:
    common.set_quiet_env(1)
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from chatbot_trainer.model.base_models import (
        build_scratch_tokenizer,
        conversation_texts,
    )

    tokenizer = build_scratch_tokenizer(conversation_texts(common.synthetic_conversations(500, seed=3)), 2048)
    config = LlamaConfig(max_position_embeddings=2048, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **SHAPES[shape])
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16 if dtype == "bf16" else torch.float32)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    files = sorted(Path(out_dir).glob("*.safetensors"))
    return {"shape": shape, "dtype": dtype, "params": sum(p.numel() for p in model.parameters()),
            "files": len(files), "bytes": sum(f.stat().st_size for f in files)}


def _gguf_numpy_tensor_data(t):
    """Conversion the plain gguf-py way: float32 numpy array → gguf.quants.quantize."""
    import gguf
    import numpy as np
    import torch

    data = t.load()
    if isinstance(data, torch.Tensor):
        data = data.to(torch.float32).numpy()
    return gguf.quants.quantize(np.ascontiguousarray(data, dtype=np.float32), t.qtype)


def run_ours(model_dir: str, out_path: str, quantization: str, reference: bool = False) -> dict[str, Any]:
    common.set_quiet_env(1)
    # Imports are not what is measured: the export step has them loaded when it converts (it has
    # just merged the adapter into the model with transformers).
    import gguf  # noqa: F401
    import numpy  # noqa: F401
    import safetensors  # noqa: F401
    import tokenizers  # noqa: F401
    import torch  # noqa: F401
    from transformers import AutoConfig, LlamaConfig  # noqa: F401

    LlamaConfig()  # the config class's own lazy imports

    from chatbot_trainer.export import gguf_writer
    from chatbot_trainer.export.gguf_writer import write_gguf

    if reference:
        gguf_writer._tensor_data = _gguf_numpy_tensor_data
    started = time.perf_counter()
    info = write_gguf(model_dir, out_path, quantization, name="bench")
    seconds = time.perf_counter() - started
    size = info.size_bytes
    os.unlink(out_path)
    return {"seconds": seconds, "out_bytes": size, "tensor_types": info.tensor_types}


def run_copy(model_dir: str, out_dir: str) -> dict[str, Any]:
    started = time.perf_counter()
    written = 0
    for source in sorted(Path(model_dir).glob("*.safetensors")):
        target = Path(out_dir) / source.name
        shutil.copyfile(source, target)
        with open(target, "rb+") as handle:
            os.fsync(handle.fileno())
        written += target.stat().st_size
    seconds = time.perf_counter() - started
    for target in Path(out_dir).glob("*.safetensors"):
        target.unlink()
    return {"seconds": seconds, "out_bytes": written}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-shape", choices=sorted(SHAPES), default="llama-345m")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16", help="dtype of the saved weights")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-reference", action="store_true", help="skip the gguf-py numpy conversion runs")
    parser.add_argument("--workdir", help="where the model and outputs go (default: a temporary directory)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks that everything runs")
    args = parser.parse_args()
    if args.quick:
        args.model_shape, args.repeats = "tiny", 1
    common.set_quiet_env(1)

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-export-"))
    model_dir, out_dir = work / "model", work / "out"
    out_dir.mkdir(parents=True, exist_ok=True)
    model, _ = common.run_isolated(build_model, str(model_dir), args.model_shape, args.dtype)
    gb = model["bytes"] / 1e9
    print(f"model {model} ({gb:.2f} GB of weights)", flush=True)

    def side(kind: str):
        def run(_: int) -> dict[str, Any]:
            if kind == "copy":
                result, peak = common.run_isolated(run_copy, str(model_dir), str(out_dir))
            else:
                result, peak = common.run_isolated(run_ours, str(model_dir), str(out_dir / f"m.{kind}.gguf"),
                                                   kind.removesuffix("_gguf_numpy"), kind.endswith("_gguf_numpy"))
            return {**result, "s_per_gb": result["seconds"] / gb, "peak_rss": peak}
        return run

    kinds = ["copy", "f16", "q8_0"] + ([] if args.no_reference else ["f16_gguf_numpy", "q8_0_gguf_numpy"])
    runs = common.alternate({kind: side(kind) for kind in kinds}, args.repeats)
    summary = {
        name: {
            "s_per_gb": common.median(r["s_per_gb"] for r in results),
            "seconds": common.median(r["seconds"] for r in results),
            "out_gb": results[0]["out_bytes"] / 1e9,
            "peak_rss_mib": common.mib(common.median(r["peak_rss"] for r in results)),
        }
        for name, results in runs.items()
    }
    ratios = {f"{name}_vs_copy": common.ratio(summary[name]["s_per_gb"], summary["copy"]["s_per_gb"])
              for name in summary if name != "copy"}
    speedups = {f"{name}_speedup_vs_gguf_numpy": common.ratio(summary[f"{name}_gguf_numpy"]["s_per_gb"],
                                                             summary[name]["s_per_gb"])
                for name in ("f16", "q8_0") if f"{name}_gguf_numpy" in summary}
    rows = [[name, s["s_per_gb"], s["seconds"], s["out_gb"], s["peak_rss_mib"]] for name, s in summary.items()]
    print()
    print(common.table(["side", "s per GB of weights", "seconds", "GB written", "peak RSS MiB"], rows))
    print()
    for key, value in ratios.items():
        print(f"time ratio {key}: {value:.2f}x (1.0 = as fast as copying the weights)")
    for key, value in speedups.items():
        print(f"{key}: {value:.2f}x")
    data = {
        "benchmark": "export_speed",
        "machine": common.machine_info(),
        "versions": common.package_versions(["gguf", "numpy", "safetensors", "torch"]),
        "settings": vars(args),
        "model": model,
        "summary": summary,
        "ratios_time_vs_copy": ratios,
        "speedups_vs_gguf_numpy": speedups,
        "runs": runs,
    }
    return common.finish("export_speed", data, quick=args.quick, work=work, keep=bool(args.workdir))


if __name__ == "__main__":
    raise SystemExit(main())
