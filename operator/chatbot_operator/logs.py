"""Operator log lines: each names its object, routine successes only in debug logging.

Kopf logs "Handler 'step_pod_changed' succeeded." (and the same for the re-check timer) at
INFO after every event of every step pod: most of an operator's log, and no news. Those lines
become DEBUG lines (shown with `--verbose`); warnings and errors are untouched.
The `[namespace/name]` prefix comes from Kopf's log formatter (`log_prefix=True`).
"""

from __future__ import annotations

import logging
import re

ROUTINE = re.compile(r"^(Handler|Timer) '[^']+' succeeded\.$")


class RoutineSuccessFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.INFO or not ROUTINE.match(str(record.msg)):
            return True
        record.levelno, record.levelname = logging.DEBUG, logging.getLevelName(logging.DEBUG)
        return logging.getLogger().isEnabledFor(logging.DEBUG)


def quiet_routine_successes() -> None:
    """Install the filter on Kopf's per-object logger (once)."""
    objects = logging.getLogger("kopf.objects")
    if not any(isinstance(f, RoutineSuccessFilter) for f in objects.filters):
        objects.addFilter(RoutineSuccessFilter())
