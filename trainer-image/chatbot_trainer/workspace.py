"""The shared workspace: where steps read earlier results and write their own.

Each step writes `<workspace>/<step>/result.json` last (atomically), so its presence means the
step finished. The termination message is the compact summary the operator reads from the Pod.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chatbot_api.spec import TrainingParams

from chatbot_trainer.errors import StepError

TERMINATION_LOG_DEFAULT = "/dev/termination-log"
TERMINATION_MESSAGE_LIMIT = 4096


def write_json_atomic(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as handle:
        json.dump(data, handle, indent=2, sort_keys=False)
        handle.write("\n")
    os.chmod(tmp, 0o644)  # mkstemp makes 0600; results are read by other users (serving pods)
    os.replace(tmp, path)


@contextmanager
def replace_dir_atomically(target: Path) -> Iterator[Path]:
    """Yield a temporary directory beside `target`; on success it replaces `target` whole, on
    failure it is removed. A killed step never leaves a half-written directory under `target`."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        yield tmp
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@dataclass
class StepContext:
    """What a step function gets: where to work, what was asked for, how to report."""

    workspace: Path
    params: TrainingParams
    name: str = "chatbot"
    output_dir: Path | None = None
    show_progress: bool = False
    extras: dict[str, Any] = field(default_factory=dict)

    def step_dir(self, step: str) -> Path:
        path = self.workspace / step
        path.mkdir(parents=True, exist_ok=True)
        return path

    def result_path(self, step: str) -> Path:
        return self.workspace / step / "result.json"

    def read_result(self, step: str) -> dict[str, Any]:
        path = self.result_path(step)
        if not path.is_file():
            raise StepError(
                f"{path} is missing: the {step} step has not finished in this workspace; run it first",
                reason="MissingStepResult",
                exit_code=2,
            )
        return json.loads(path.read_text())

    def write_result(self, step: str, result: dict[str, Any]) -> None:
        write_json_atomic(self.result_path(step), result)


def compact_message(payload: dict[str, Any], limit: int = TERMINATION_MESSAGE_LIMIT) -> str:
    """Serialise the termination message within Kubernetes' 4 KiB, dropping detail if needed."""
    text = json.dumps(payload, separators=(",", ":"), default=str)
    if len(text.encode()) <= limit:
        return text
    summary = dict(payload.get("summary") or {})
    for key in sorted(summary, key=lambda k: -len(json.dumps(summary[k], default=str))):
        if key in ("metrics", "model"):
            continue
        summary.pop(key)
        text = json.dumps({**payload, "summary": summary}, separators=(",", ":"), default=str)
        if len(text.encode()) <= limit:
            return text
    trimmed = {k: payload[k] for k in ("step", "ok", "reason") if k in payload}
    trimmed["message"] = str(payload.get("message", ""))[: limit // 2]
    for key in ("metrics", "model"):
        if key in summary:
            trimmed.setdefault("summary", {})[key] = summary[key]
    return json.dumps(trimmed, separators=(",", ":"), default=str)[:limit]


def write_termination_message(path: str | os.PathLike | None, payload: dict[str, Any]) -> None:
    """Best effort: a missing /dev/termination-log outside Kubernetes is not an error."""
    target = path or os.environ.get("CHATBOT_TERMINATION_LOG") or TERMINATION_LOG_DEFAULT
    try:
        Path(target).write_text(compact_message(payload))
    except OSError:
        pass
