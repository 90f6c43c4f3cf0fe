"""`python -m chatbot_trainer.launch [torchrun options] -m chatbot_trainer.cli train …`

torchrun (torch.distributed.run, same options), exiting with the failed rank's own exit code
where torchrun itself exits 1 whatever a rank's code was: the Job's podFailurePolicy and the
operator then still tell a permanent failure (invalid input 2, quality 3, out of memory 4)
from one worth retrying. A rank killed by a signal gives 128 + the signal's number.

`run_train_step()` runs a local pipeline's train step so (`chatbot-training run --nproc-per-node`).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from chatbot_trainer.errors import StepError

def run_train_step(ctx, nproc_per_node: int, termination_log: str) -> dict[str, Any]:
    """The train step of a local run on `nproc_per_node` processes (gloo on a CPU, NCCL on
    GPUs), as `chatbot-trainer train` under torchrun; returns its result."""
    config = ctx.step_dir("train") / "config.json"
    config.write_text(json.dumps({"name": ctx.name, **ctx.params.to_api()}))
    command = [sys.executable, "-m", "chatbot_trainer.launch", "--standalone",
               f"--nproc-per-node={nproc_per_node}", "-m", "chatbot_trainer.cli", "train",
               "--workspace", str(ctx.workspace), "--config", str(config),
               "--termination-log", termination_log]
    if ctx.show_progress:
        command.append("--progress")
    Path(termination_log).unlink(missing_ok=True)
    code = subprocess.run(command, check=False).returncode
    if code != 0:
        message = _failure_message(Path(termination_log))
        raise StepError(message or f"the train step on {nproc_per_node} processes failed "
                        f"(exit code {code}); see the output above", exit_code=code if code in (2, 3, 4) else 1)
    return ctx.read_result("train")


def _failure_message(path: Path) -> str | None:
    try:
        return json.loads(path.read_text()).get("message")
    except (OSError, ValueError, AttributeError):
        return None


def exit_code(failure_code: int) -> int:
    if failure_code > 0:
        return failure_code
    return 128 - failure_code if failure_code < 0 else 1


def main(argv: Sequence[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    try:
        torchrun(list(sys.argv[1:] if argv is None else argv))
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        print(f"error: training process rank {rank} failed first (exit code {failure.exitcode}); "
              f"the other ranks were stopped", file=sys.stderr)
        return exit_code(failure.exitcode)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
