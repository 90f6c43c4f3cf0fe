"""What the train loop reports once per logged window.

- ``train/metrics.jsonl``: one JSON line per window (``MetricsLog``), checked for a loss or
  gradient norm that is no longer finite (``check_finite``: the run stops as diverged);
- the live progress board (step, total, percent, remaining time, loss, tokens/s, learning
  rate), served to the operator by `progress_server` while the step runs;
- TensorBoard event files in ``<workspace>/train/tensorboard/`` (tensorboardX): ``train/loss``,
  ``train/learning_rate``, ``train/grad_norm``, ``train/tokens_per_second`` per window, and
  ``eval/loss``, ``eval/accuracy``, ``eval/perplexity`` from the evaluate step (the base
  model at step 0, the fine-tuned one at the last step).

Reporting never stops a training (a writer that fails is logged once and dropped); only a
loss that diverged does.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from chatbot_trainer.errors import TrainingDiverged
from chatbot_trainer.train.progress_server import ProgressBoard, start_server

log = logging.getLogger("chatbot_trainer.train")

TENSORBOARD_DIR = "tensorboard"  # under <workspace>/train/
TRAIN_TAGS = {  # TensorBoard tag: key of a train/metrics.jsonl record
    "train/loss": "loss",
    "train/learning_rate": "lr",
    "train/grad_norm": "grad_norm",
    "train/tokens_per_second": "tokens_per_second",
}
EVAL_TAGS = {"eval/loss": "loss", "eval/accuracy": "accuracy", "eval/perplexity": "perplexity"}
FLUSH_SECONDS = 10  # the writer's thread flushes the file this often (a killed pod loses less)


def tensorboard_dir(workspace: Path) -> Path:
    return Path(workspace) / "train" / TENSORBOARD_DIR


class _Scalars:
    """A TensorBoard event writer that logs its first failure and then stays quiet."""

    def __init__(self, log_dir: Path, purge_step: int | None = None) -> None:
        self.writer = None
        try:
            from tensorboardX import SummaryWriter

            log_dir.mkdir(parents=True, exist_ok=True)
            # purge_step: TensorBoard drops what an interrupted run logged after the resume point
            self.writer = SummaryWriter(logdir=str(log_dir), purge_step=purge_step or None,
                                        flush_secs=FLUSH_SECONDS)
        except Exception as exc:  # noqa: BLE001 - reporting must not stop the work
            log.warning("no TensorBoard logs (%s: %s)", type(exc).__name__, exc)

    def add(self, step: int, values: Mapping[str, Any]) -> None:
        if self.writer is None:
            return
        try:
            for tag, value in values.items():
                if value is not None:
                    self.writer.add_scalar(tag, float(value), step)
        except Exception as exc:  # noqa: BLE001
            log.warning("TensorBoard logging stopped (%s: %s)", type(exc).__name__, exc)
            self.close()

    def close(self) -> None:
        writer, self.writer = self.writer, None
        if writer is not None:
            try:
                writer.close()
            except Exception:  # noqa: BLE001
                pass


class TrainMonitor:
    """One object, one call per logged window (`window(record)`), `close()` after the loop."""

    def __init__(self, workspace: Path, total_steps: int, start_step: int = 0, *,
                 port: int | None = None) -> None:
        self.board = ProgressBoard("train", "steps", total_steps)
        self.board.update(start_step)
        self.server = start_server(self.board, port)
        self.scalars = _Scalars(tensorboard_dir(workspace), purge_step=start_step)

    def window(self, record: Mapping[str, Any]) -> None:
        """A train/metrics.jsonl record: step, loss, lr, grad_norm, tokens_per_second."""
        self.board.update(record["step"], loss=record.get("loss"), learning_rate=record.get("lr"),
                          tokens_per_second=record.get("tokens_per_second"))
        self.scalars.add(record["step"], {tag: record.get(key) for tag, key in TRAIN_TAGS.items()})

    def close(self) -> None:
        self.scalars.close()
        if self.server is not None:
            self.server.close()
            self.server = None


class NoMonitor:
    """What ranks other than the first get: rank 0 alone serves progress and writes the files."""

    def window(self, record: Mapping[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


def record_evaluation(workspace: Path, training_steps: int, metrics: Mapping[str, Any],
                      base_metrics: Mapping[str, Any] | None = None) -> None:
    """The evaluate step's results as TensorBoard scalars beside the training's."""
    scalars = _Scalars(tensorboard_dir(workspace))
    if base_metrics:
        scalars.add(0, {tag: base_metrics.get(key) for tag, key in EVAL_TAGS.items()})
    scalars.add(training_steps, {tag: metrics.get(key) for tag, key in EVAL_TAGS.items()})
    scalars.close()


class MetricsLog:
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
