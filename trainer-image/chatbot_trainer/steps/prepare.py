"""Step 1, prepare: read the chat data, normalise it, drop bad rows, split train/eval.

The data report (``prepare/report.json``, and ``data`` in the local run's details.json) locates
every row that was not used, adjusted or flagged by its line number; the status summary holds
the counts and the first line numbers per reason.
"""

from __future__ import annotations

from typing import Any

from chatbot_trainer.data.dataset import (
    DataError,
    prepare_conversations,
    report_summary,
    resolve_source,
    write_jsonl,
)
from chatbot_trainer.errors import InvalidData
from chatbot_trainer.workspace import StepContext, write_json_atomic

# Conversations above this many characters per allowed token cannot fit maxSeqLength with any
# tokenizer we support; they are dropped here, the exact token count is checked in train.
CHARS_PER_TOKEN_CEILING = 32


def run(ctx: StepContext) -> dict[str, Any]:
    params = ctx.params
    out = ctx.step_dir("prepare")
    try:
        path = resolve_source(params.training_data, cache_dir=ctx.workspace / ".cache" / "data")
        prepared = prepare_conversations(
            path,
            fmt=params.data.format,
            eval_fraction=params.data.eval_fraction,
            seed=params.seed,
            max_bad_line_fraction=params.data.max_bad_line_fraction,
            max_chars=params.max_seq_length * CHARS_PER_TOKEN_CEILING,
            dedupe=params.data.dedupe,
            system_prompt=params.data.system_prompt,
        )
    except DataError as exc:
        raise InvalidData(f"{exc} (trainingData: {params.training_data})") from exc
    report = {**prepared.report, "source": params.training_data}
    write_jsonl(out / "train.jsonl", prepared.train)
    write_jsonl(out / "eval.jsonl", prepared.eval)
    write_json_atomic(out / "report.json", report)
    return {
        "train_path": str(out / "train.jsonl"),
        "eval_path": str(out / "eval.jsonl"),
        "report": report,
        "summary": report_summary(report),
    }
