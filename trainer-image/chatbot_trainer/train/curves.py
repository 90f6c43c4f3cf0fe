"""``loss.png``: the training loss per logged window, with the eval loss of the base model
(before fine-tuning, at step 0) and of the fine-tuned model (at the last step) marked.

Drawn with matplotlib's Agg backend (no display needed) from what the steps left in the
workspace: ``train/metrics.jsonl`` and ``evaluate/metrics.json``. The export step writes it
next to the model; the local run names it in its summary.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger("chatbot_trainer.curves")

FILENAME = "loss.png"
SIZE_INCHES = (8.0, 4.5)
DPI = 100  # 800 × 450 pixels


def read_curves(workspace: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(train/metrics.jsonl records, evaluate/metrics.json or {}) of a workspace."""
    records = []
    metrics_file = Path(workspace) / "train" / "metrics.jsonl"
    if metrics_file.is_file():
        for line in metrics_file.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    evaluated_file = Path(workspace) / "evaluate" / "metrics.json"
    evaluated = json.loads(evaluated_file.read_text()) if evaluated_file.is_file() else {}
    return records, evaluated


def draw_loss_curve(path: Path, records: Sequence[Mapping[str, Any]],
                    evaluated: Mapping[str, Any] | None = None, title: str | None = None) -> Path:
    """Write the picture to `path` (atomically); returns `path`."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    figure = Figure(figsize=SIZE_INCHES, dpi=DPI)
    axes = figure.add_subplot()
    steps = [r["step"] for r in records if r.get("loss") is not None]
    losses = [r["loss"] for r in records if r.get("loss") is not None]
    axes.plot(steps, losses, marker="." if len(steps) < 50 else None, label="train loss (per logged window)")
    evaluated = evaluated or {}
    last_step = max(steps, default=0)
    base = (evaluated.get("base_metrics") or {}).get("loss")
    tuned = (evaluated.get("metrics") or {}).get("loss")
    if base is not None:
        axes.scatter([0], [base], marker="s", s=60, color="tab:gray", zorder=3,
                     label=f"eval loss, base model: {base:.3f}")
    if tuned is not None:
        axes.scatter([last_step], [tuned], marker="*", s=160, color="tab:red", zorder=3,
                     label=f"eval loss, fine-tuned: {tuned:.3f}")
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("loss (assistant tokens)")
    axes.set_title(title or "Training loss")
    axes.grid(True, alpha=0.3)
    axes.legend(loc="upper right")
    figure.tight_layout()

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            figure.savefig(handle, format="png", dpi=DPI)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_loss_curve(workspace: Path, out_dir: Path, title: str | None = None) -> str | None:
    """``out_dir/loss.png`` from a workspace; None (logged) when there is nothing to draw or
    drawing fails: a picture never fails a step."""
    records, evaluated = read_curves(workspace)
    if not records:
        return None
    try:
        return str(draw_loss_curve(Path(out_dir) / FILENAME, records, evaluated, title))
    except Exception as exc:  # noqa: BLE001 - a missing picture is not worth a failed export
        log.warning("no %s (%s: %s)", FILENAME, type(exc).__name__, exc)
        return None
