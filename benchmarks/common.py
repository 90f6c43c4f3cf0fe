"""Shared helpers of the benchmarks: environment, timing, memory, subprocesses, synthetic
chat data, machine description, JSON results and printed tables.

Every benchmark runs a named baseline and our code in the same script, alternating them
(A B A B …, each run in a fresh process where memory is compared), and reports medians and
the ratio ours / baseline. Absolute figures depend on the machine; the ratios are what the
benchmarks are for.
"""

from __future__ import annotations

import datetime
import json
import shutil
import multiprocessing
import os
import platform
import random
import resource
import statistics
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"


def set_quiet_env(threads: int | None = 1) -> None:
    """One intra-op thread (unless asked otherwise), no hub access, no telemetry, no tqdm bars.

    Call before torch is imported: the thread count is read at import.
    """
    if threads is not None:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ.setdefault(var, str(threads))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DATASETS_VERBOSITY", "error")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("PYTHONWARNINGS", "ignore")


# ------------------------------------------------------------------------------ statistics


def median(values: Iterable[float]) -> float:
    values = [v for v in values if v is not None]
    return float(statistics.median(values)) if values else float("nan")


def ratio(ours: float, baseline: float) -> float:
    return ours / baseline if baseline else float("nan")


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0…100), like numpy's default."""
    data = sorted(values)
    if not data:
        return float("nan")
    pos = (len(data) - 1) * q / 100.0
    low = int(pos)
    high = min(low + 1, len(data) - 1)
    return data[low] + (data[high] - data[low]) * (pos - low)


# ------------------------------------------------------------------------------ memory


def peak_rss_self() -> int:
    """This process's peak resident set size in bytes (ru_maxrss is KiB on Linux)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def rss_now() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


class RssSampler:
    """Samples a process's RSS in a thread; ``peak`` is the highest value seen while running.

    Use it for the peak of one phase (``ru_maxrss`` only knows the whole process's peak).
    """

    def __init__(self, pid: int | None = None, interval: float = 0.01) -> None:
        import psutil

        self.process = psutil.Process(pid)
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _sample(self) -> None:
        try:
            self.peak = max(self.peak, int(self.process.memory_info().rss))
        except Exception:  # the process ended
            self._stop.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> "RssSampler":
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


# ------------------------------------------------------------------------------ subprocesses


def _child_main(conn, fn: Callable[..., Any], args: tuple, kwargs: dict) -> None:
    try:
        result = fn(*args, **kwargs)
        conn.send(("ok", result, peak_rss_self()))
    except BaseException as exc:  # reported in the parent
        conn.send(("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}", peak_rss_self()))
    finally:
        conn.close()


def run_isolated(fn: Callable[..., Any], *args: Any, timeout: float | None = None, **kwargs: Any) -> tuple[Any, int]:
    """Run ``fn(*args, **kwargs)`` in a fresh (spawned) Python process.

    Returns ``(result, peak_rss_bytes)`` where the peak is the child's own ``ru_maxrss``: each
    side of a comparison gets a process of its own, so its peak memory is its own.
    ``fn`` must be importable (a module-level function) and its result picklable.
    """
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    process = ctx.Process(target=_child_main, args=(child, fn, args, kwargs))
    process.start()
    child.close()
    try:
        if not parent.poll(timeout):
            raise TimeoutError(f"{getattr(fn, '__name__', fn)} took more than {timeout} s")
        status, payload, peak = parent.recv()
    except EOFError:
        process.join()
        raise RuntimeError(f"{getattr(fn, '__name__', fn)} died (exit code {process.exitcode})") from None
    finally:
        process.join(30)
        if process.is_alive():
            process.kill()
    if status != "ok":
        raise RuntimeError(f"{getattr(fn, '__name__', fn)} failed in its subprocess: {payload}")
    return payload, peak


def alternate(sides: dict[str, Callable[[int], Any]], repeats: int, log: Callable[[str], None] = print) -> dict[str, list[Any]]:
    """Run each side once per round, in alternating order (A B, B A, A B, …), ``repeats`` rounds.

    Alternating cancels slow drifts of the machine (another job starting, thermal limits).
    """
    names = list(sides)
    results: dict[str, list[Any]] = {name: [] for name in names}
    for round_index in range(repeats):
        order = names if round_index % 2 == 0 else list(reversed(names))
        for name in order:
            started = time.perf_counter()
            value = sides[name](round_index)
            results[name].append(value)
            log(f"  round {round_index + 1}/{repeats} {name}: {short(value)} ({time.perf_counter() - started:.1f} s)")
    return results


def short(value: Any) -> str:
    if isinstance(value, dict):
        keys = [k for k in value if isinstance(value[k], (int, float)) and not isinstance(value[k], bool)][:4]
        return ", ".join(f"{k}={fmt(value[k])}" for k in keys)
    return fmt(value)


# ------------------------------------------------------------------------------ synthetic chats

_WORDS = (
    "account billing invoice password reset login storage plan upgrade downgrade refund order "
    "shipping delivery tracking number address email support ticket issue error message app "
    "mobile desktop browser cache cookie setting profile team member invite role admin access "
    "export import file folder share link permission backup restore sync device phone tablet "
    "subscription trial cancel renew annual monthly price discount coupon payment card bank "
    "transfer receipt tax region language timezone notification alert report dashboard chart "
    "api key token webhook integration calendar contact customer product feature release "
    "update version install uninstall download upload limit quota usage gigabyte minute hour "
    "today tomorrow week please thanks hello sorry help question answer quickly simply first "
    "then after before click open select choose enter confirm save delete remove add create "
    "the a an to of in on for with from by at your our my this that it you we they is are "
    "can will should would could does do not be have has was were if when where how what which"
).split()


def synthetic_conversation(rng: random.Random, index: int, *, max_words: int = 260) -> dict[str, Any]:
    """One OpenAI-style conversation: optional system prompt, 1-3 user/assistant turns, with
    message lengths drawn from log-normal distributions (short questions, longer answers),
    made unique by a ticket number."""

    def sentence(words: int) -> str:
        text = " ".join(rng.choice(_WORDS) for _ in range(max(1, words)))
        return text[:1].upper() + text[1:] + rng.choice([".", "?", "!", "."])

    def text(mean_words: float) -> str:
        words = int(min(max_words / 2, max(2.0, rng.lognormvariate(0.0, 0.6) * mean_words)))
        parts, left = [], words
        while left > 0:
            take = min(left, rng.randint(5, 16))
            parts.append(sentence(take))
            left -= take
        return " ".join(parts)

    messages: list[dict[str, str]] = []
    if rng.random() < 0.3:
        messages.append({"role": "system", "content": "You are the support assistant of Acme Cloud. Be brief."})
    turns = rng.choice([1, 1, 1, 2, 2, 3])
    budget = max_words
    for turn in range(turns):
        question = text(14)
        if turn == 0:
            question = f"Ticket {index}: {question}"
        answer = text(45)
        cost = len(question.split()) + len(answer.split())
        if turn and cost > budget:
            break
        messages.append({"role": "user", "content": question})
        messages.append({"role": "assistant", "content": answer})
        budget -= cost
    return {"messages": messages}


def synthetic_conversations(count: int, seed: int = 0, **kwargs: Any) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    return [synthetic_conversation(rng, i, **kwargs) for i in range(count)]


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False))
            handle.write("\n")
    return path


# ------------------------------------------------------------------------------ reporting


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory_gib = None
    try:
        import psutil

        memory_gib = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpus": os.cpu_count(),
        "cpu_model": cpu,
        "memory_gib": memory_gib,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


def package_versions(names: Sequence[str]) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def write_results(name: str, data: dict[str, Any], quick: bool = False) -> Path:
    """benchmarks/results/<name>.json (``<name>.quick.json`` for --quick runs, not committed)."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / (f"{name}.quick.json" if quick else f"{name}.json")
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    return path


def finish(name: str, data: dict[str, Any], *, quick: bool, work: Path, keep: bool) -> int:
    """Write the results, say where, and remove the scratch folder unless it was given."""
    path = write_results(name, data, quick=quick)
    print(f"results: {path}")
    if not keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def fmt(value: Any, digits: int = 3) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value != value:  # nan
            return "n/a"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.{digits}g}"
    return str(value)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table (also readable as plain text)."""
    cells = [[str(h) for h in headers]] + [[fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(cells[0], widths)) + " |",
             "| " + " | ".join("-" * w for w in widths) + " |"]
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in cells[1:]]
    return "\n".join(lines)


def mib(nbytes: float | None) -> float | None:
    return None if nbytes is None else nbytes / 2**20
