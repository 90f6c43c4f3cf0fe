"""Failures a step reports: a reason (for status), a one-line message with the fix, an exit code.

Exit codes tell the Job whether a retry can help: 1 may be transient (retried), 2 is bad
input, 3 a quality threshold or a diverged training, 4 out of memory (the operator's podFailurePolicy fails the Job
at once for 2, 3 and 4).
"""

from __future__ import annotations


class StepError(Exception):
    reason = "StepFailed"
    exit_code = 1

    def __init__(self, message: str, *, reason: str | None = None, exit_code: int | None = None):
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = reason
        if exit_code is not None:
            self.exit_code = exit_code


class InvalidData(StepError):
    reason = "InvalidData"
    exit_code = 2


class InvalidConfig(StepError):
    reason = "InvalidConfig"
    exit_code = 2


class UnsupportedArchitecture(StepError):
    reason = "UnsupportedArchitecture"
    exit_code = 2


class ModelNotFound(StepError):
    reason = "ModelNotFound"
    exit_code = 2


class QualityThresholdNotMet(StepError):
    reason = "QualityThresholdNotMet"
    exit_code = 3


class OutOfMemory(StepError):
    reason = "OutOfMemory"
    exit_code = 4


class TrainingDiverged(StepError):
    """The training loss became NaN or infinite: retrying the same settings gives the same."""

    reason = "TrainingDiverged"
    exit_code = 3
