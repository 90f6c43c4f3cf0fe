"""The five steps. Each module `chatbot_trainer.steps.<step>` has `run(ctx) -> dict`.

A step's result dict holds everything worth keeping (written to `<step>/result.json`) and a
`summary` key: the compact part the operator copies into status (the termination message).
`run_step` is the one place that writes results, termination messages and turns failures into
StepErrors, for the Job entry point and the local pipeline alike.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from chatbot_api.spec import STEPS
from chatbot_trainer.errors import OutOfMemory, StepError
from chatbot_trainer.train.distributed import is_main_process
from chatbot_trainer.train.hardware import cpu_threads_in_effect
from chatbot_trainer.workspace import (
    TERMINATION_LOG_DEFAULT,
    StepContext,
    write_termination_message,
)

log = logging.getLogger("chatbot_trainer.steps")


def _is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    name = type(exc).__name__
    return name == "OutOfMemoryError" or (isinstance(exc, RuntimeError) and "out of memory" in str(exc))


def _report_failure(termination_log: str | None, payload: dict[str, Any]) -> None:
    """The termination message of a failed step. Of several training processes the first
    failure is kept: the others usually fail because of it (a peer went away)."""
    if int(os.environ.get("WORLD_SIZE") or 1) > 1:
        path = termination_log or os.environ.get("CHATBOT_TERMINATION_LOG") or TERMINATION_LOG_DEFAULT
        try:
            if '"ok":false' in Path(path).read_text():
                return
        except OSError:
            pass
    write_termination_message(termination_log, payload)


def run_step(step: str, ctx: StepContext, termination_log: str | None = None) -> dict[str, Any]:
    if step not in STEPS:
        raise StepError(f"unknown step {step!r}; steps are: {', '.join(STEPS)}", exit_code=2)
    module = importlib.import_module(f"chatbot_trainer.steps.{step}")
    started = time.time()
    log.info("%s: starting (model %s, data %s, workspace %s)", step, ctx.params.model_type,
             ctx.params.training_data, ctx.workspace)
    try:
        try:
            result = module.run(ctx)
        except StepError:
            raise
        except Exception as exc:
            if _is_out_of_memory(exc):
                raise OutOfMemory(
                    f"the {step} step ran out of memory ({type(exc).__name__}): reduce batchSize "
                    "(or set a smaller microBatchSize) or maxSeqLength, or use a GPU with more memory"
                ) from exc
            raise
    except StepError as exc:
        _report_failure(
            termination_log, {"step": step, "ok": False, "reason": exc.reason, "message": exc.message}
        )
        raise
    except Exception as exc:
        _report_failure(
            termination_log,
            {"step": step, "ok": False, "reason": "StepFailed", "message": f"{type(exc).__name__}: {exc}"},
        )
        raise
    result = {"step": step, **result, "seconds": round(time.time() - started, 3),
              "cpu_threads": cpu_threads_in_effect()}
    if not is_main_process():  # one of several training processes: rank 0 reports
        return result
    log.info("%s: done in %.1f s: %s", step, result["seconds"],
             json.dumps(result.get("summary", {}), default=str)[:1000])
    ctx.write_result(step, result)
    write_termination_message(
        termination_log,
        {"step": step, "ok": True, "summary": {**result.get("summary", {}), "seconds": result["seconds"]}},
    )
    return result
