"""Slots: how many requests the local server runs at once, and the queue in front of them.

llama-cpp-python runs one completion at a time on a model instance, so the server loads the
GGUF file once per slot (`--parallel`, default 1; the weights are memory-mapped, so the slots
share them and each adds its own context: the KV cache). A request takes a free slot or waits
in a queue of at most `--queue` requests; one more is answered at once with a 503 in OpenAI's
shape (clients such as the `openai` package retry it). llama.cpp's server has the same model:
`-np` slots, and the tasks beyond them wait in its queue.
"""

from __future__ import annotations

import asyncio
import math
import os
from pathlib import Path
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Busy(Exception):
    """Every slot runs a request and the queue is full."""


class Slots(Generic[T]):
    """A pool of model instances with a bounded queue of waiting requests (asyncio)."""

    def __init__(self, instances: list[T], max_queue: int) -> None:
        self.size = len(instances)
        self.max_queue = max_queue
        self.waiting = 0
        self._free: asyncio.Queue[T] = asyncio.Queue()
        for instance in instances:
            self._free.put_nowait(instance)

    @property
    def running(self) -> int:
        return self.size - self._free.qsize()

    async def acquire(self) -> T:
        """A free instance, after waiting in the queue if needed; Busy when the queue is full."""
        if self._free.empty() and self.waiting >= self.max_queue:
            raise Busy(f"all {self.size} slots are busy and {self.waiting} requests are waiting "
                       f"(the queue holds {self.max_queue})")
        self.waiting += 1
        try:
            return await self._free.get()
        finally:
            self.waiting -= 1

    def release(self, instance: T) -> None:
        self._free.put_nowait(instance)


def available_cpus(cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    """CPUs this process may use: its CPU affinity, capped by the cgroup's CPU quota (a
    container's CPU limit), which `os.cpu_count()` does not see."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    quota = cgroup_cpu_quota(cgroup_root)
    if quota is not None:
        cpus = min(cpus, max(1, math.ceil(quota)))
    return max(1, cpus)


def cgroup_cpu_quota(root: Path) -> float | None:
    """The cgroup's CPU limit in CPUs (cgroup v2 cpu.max, else v1 cfs quota), or None."""
    try:
        text = (root / "cpu.max").read_text().split()
        if text and text[0] != "max":
            return int(text[0]) / int(text[1])
        return None
    except (OSError, ValueError, IndexError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def threads_per_slot(cpus: int, parallel: int) -> int:
    """Each slot's llama.cpp threads when not given: the CPUs but one (the event loop and the
    HTTP side need one too) shared among the slots, at least 1. llama.cpp's threads wait for
    each other at every step, so more threads than free cores is much slower, not faster (2
    threads on 2 busy cores: 1.3–2.5 tokens/s; 1 thread: 14–25)."""
    return max(1, (cpus - 1) // max(1, parallel))


def describe(slots: Slots[Any]) -> dict[str, int]:
    return {"slots": slots.size, "running": slots.running, "waiting": slots.waiting,
            "queue": slots.max_queue}
