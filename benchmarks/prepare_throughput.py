"""Data preparation throughput: conversations/s for clean + chat template + tokenize.

A synthetic set of 100k OpenAI-style conversations (JSONL) and one byte-level BPE tokenizer
with our ChatML template (trained once on the data, shared by both sides). Each run is a
fresh process; sides alternate; medians are reported.

- ours: ``chatbot_trainer.data.dataset.prepare_conversations`` (parse, detect the format,
  normalise, drop bad/duplicate rows, split) then ``chatbot_trainer.data.tokenization.
  tokenize_dataset`` on the train and eval conversations (ids + assistant-only labels).
- baseline (the usual recipe): ``datasets.load_dataset("json")`` then ``.map`` with
  ``tokenizer.apply_chat_template(..., tokenize=True, return_dict=True,
  return_assistant_tokens_mask=True)``, ``num_proc=1``, one conversation per call
  (``batched=False``, what most guides show) and, with ``--batched``, as a second baseline,
  1000 conversations per call (``batched=True``).
- floor (measured once on the first 20k conversations, for the analysis): the tokenizer's own
  ``encode_batch`` of the already rendered texts, i.e. the Rust BPE work every approach has
  to do.

One thread everywhere (``TOKENIZERS_PARALLELISM=false``), so the ratio compares the work done,
not the cores used; ``--tokenizer-threads`` lets the tokenizer's ``encode_batch`` use all cores
on both sides instead (results in ``prepare_throughput_tokenizer_threads.json``).
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

MAX_SEQ_LENGTH = 2048  # nothing of the synthetic set is dropped for length


def build_tokenizer(data_file: str, out_dir: str, sample: int) -> int:
    common.set_quiet_env(1)
    from chatbot_trainer.model.base_models import (
        build_scratch_tokenizer,
        conversation_texts,
    )

    rows = []
    with open(data_file) as handle:
        for line in handle:
            rows.append(json.loads(line))
            if len(rows) >= sample:
                break
    tokenizer = build_scratch_tokenizer(conversation_texts(rows), 2048)
    tokenizer.save_pretrained(out_dir)
    return len(tokenizer)


def run_ours(data_file: str, tokenizer_dir: str) -> dict[str, Any]:
    common.set_quiet_env(1)
    from transformers import AutoTokenizer

    from chatbot_trainer.data.dataset import prepare_conversations
    from chatbot_trainer.data.tokenization import tokenize_dataset
    from chatbot_trainer.steps.prepare import CHARS_PER_TOKEN_CEILING

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    started = time.perf_counter()
    prepared = prepare_conversations(data_file, max_chars=MAX_SEQ_LENGTH * CHARS_PER_TOKEN_CEILING)
    cleaned = time.perf_counter()
    examples, counts = tokenize_dataset(tokenizer, prepared.train + prepared.eval, MAX_SEQ_LENGTH)
    finished = time.perf_counter()
    return {
        "seconds": finished - started,
        "seconds_clean": cleaned - started,
        "seconds_tokenize": finished - cleaned,
        "conversations": prepared.report["lines_read"],
        "examples": len(examples),
        "tokens": counts["tokens"],
        "label_tokens": counts["label_tokens"],
    }


def run_baseline(data_file: str, tokenizer_dir: str, batched: bool) -> dict[str, Any]:
    common.set_quiet_env(1)
    import datasets
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    cache = tempfile.mkdtemp(prefix="bench-datasets-")

    def tokenize(example):
        out = tokenizer.apply_chat_template(
            example["messages"], tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        return {"input_ids": out["input_ids"], "assistant_masks": out["assistant_masks"]}

    try:
        started = time.perf_counter()
        dataset = datasets.load_dataset("json", data_files=data_file, split="train", cache_dir=cache)
        loaded = time.perf_counter()
        tokenized = dataset.map(tokenize, batched=batched, num_proc=1, remove_columns=dataset.column_names)
        finished = time.perf_counter()
        tokens = sum(len(ids) for ids in tokenized.with_format("arrow")["input_ids"].to_pylist()) \
            if len(tokenized) <= 20000 else None
        return {
            "seconds": finished - started,
            "seconds_load": loaded - started,
            "seconds_map": finished - loaded,
            "conversations": len(dataset),
            "examples": len(tokenized),
            "tokens": tokens,
        }
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def run_floor(data_file: str, tokenizer_dir: str, limit: int) -> dict[str, Any]:
    """The tokenizer's encode_batch alone on the rendered texts of the first `limit`
    conversations (rendering not timed)."""
    common.set_quiet_env(1)
    from transformers import AutoTokenizer

    from chatbot_trainer.data.tokenization import TOKENIZE_CHUNK, render_conversation

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    texts = []
    with open(data_file) as handle:
        for line in handle:
            texts.append(render_conversation(tokenizer, json.loads(line)["messages"])[0])
            if len(texts) >= limit:
                break
    backend = tokenizer.backend_tokenizer
    started = time.perf_counter()
    tokens = 0
    for i in range(0, len(texts), TOKENIZE_CHUNK):
        tokens += sum(len(e.ids) for e in backend.encode_batch(texts[i:i + TOKENIZE_CHUNK], add_special_tokens=False))
    return {"seconds": time.perf_counter() - started, "conversations": len(texts), "tokens": tokens}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--conversations", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batched", action="store_true",
                        help="also run the batched=True baseline (adds ~1.8 min on 2 cores)")
    parser.add_argument("--tokenizer-threads", action="store_true",
                        help="TOKENIZERS_PARALLELISM=true on both sides (encode_batch on all cores)")
    parser.add_argument("--workdir", help="where the data and tokenizer go (default: a temporary directory)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks that everything runs")
    args = parser.parse_args()
    if args.quick:
        args.conversations, args.repeats = 2000, 1
    if args.tokenizer_threads:
        os.environ["TOKENIZERS_PARALLELISM"] = "true"  # inherited by the runs' processes
    common.set_quiet_env(1)

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-prepare-"))
    work.mkdir(parents=True, exist_ok=True)
    data_file = work / "chats.jsonl"
    common.write_jsonl(data_file, common.synthetic_conversations(args.conversations, seed=2))
    tokenizer_dir = work / "tokenizer"
    vocab, _ = common.run_isolated(build_tokenizer, str(data_file), str(tokenizer_dir), 5000)
    size_mb = data_file.stat().st_size / 1e6
    print(f"{args.conversations} conversations ({size_mb:.0f} MB), tokenizer of {vocab} tokens", flush=True)

    def side(fn, *extra):
        def run(_: int) -> dict[str, Any]:
            result, peak = common.run_isolated(fn, str(data_file), str(tokenizer_dir), *extra)
            return {**result, "conversations_per_s": result["conversations"] / result["seconds"], "peak_rss": peak}
        return run

    sides = {"baseline_map": side(run_baseline, False), "ours": side(run_ours)}
    if args.batched:
        sides["baseline_map_batched"] = side(run_baseline, True)
    runs = common.alternate(sides, args.repeats)
    floor = side(run_floor, min(args.conversations, 20_000))(0)
    print(f"  floor (encode_batch only): {floor['conversations_per_s']:,.0f} conversations/s")

    summary = {
        name: {
            "conversations_per_s": common.median(r["conversations_per_s"] for r in results),
            "seconds": common.median(r["seconds"] for r in results),
            "peak_rss_mib": common.mib(common.median(r["peak_rss"] for r in results)),
            "examples": results[0]["examples"],
        }
        for name, results in runs.items()
    }
    ours = summary["ours"]
    ours_runs = runs["ours"]
    ours["seconds_clean"] = common.median(r["seconds_clean"] for r in ours_runs)
    ours["seconds_tokenize"] = common.median(r["seconds_tokenize"] for r in ours_runs)
    ratios = {f"ours_vs_{name}": common.ratio(ours["conversations_per_s"], s["conversations_per_s"])
              for name, s in summary.items() if name != "ours"}
    ratios["ours_vs_encode_floor"] = common.ratio(ours["conversations_per_s"], floor["conversations_per_s"])

    rows = [[name, s["conversations_per_s"], s["seconds"], s["peak_rss_mib"], s["examples"]]
            for name, s in summary.items()]
    rows.append(["floor: encode_batch only", floor["conversations_per_s"], None, None, floor["conversations"]])
    print()
    print(common.table(["side", "conversations/s", "seconds", "peak RSS MiB", "examples"], rows))
    print()
    print(f"ours: clean {ours['seconds_clean']:.2f} s + template/tokenize {ours['seconds_tokenize']:.2f} s")
    for key, value in ratios.items():
        print(f"ratio {key}: {value:.2f}x")
    data = {
        "benchmark": "prepare_throughput",
        "machine": common.machine_info(),
        "versions": common.package_versions(["transformers", "tokenizers", "datasets", "pyarrow"]),
        "settings": {**vars(args), "data_mb": round(size_mb, 1), "tokenizer_vocab": vocab,
                     "tokens": ours_runs[0]["tokens"], "label_tokens": ours_runs[0]["label_tokens"]},
        "summary": summary,
        "floor": floor,
        "ratios_conversations_per_s": ratios,
        "runs": runs,
    }
    name = "prepare_throughput" + ("_tokenizer_threads" if args.tokenizer_threads else "")
    data["settings"]["tokenizers_parallelism"] = os.environ.get("TOKENIZERS_PARALLELISM")
    return common.finish(name, data, quick=args.quick, work=work, keep=bool(args.workdir))


if __name__ == "__main__":
    raise SystemExit(main())
