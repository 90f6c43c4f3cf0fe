"""Operator at scale: 200 ChatbotTrainings created at once against the Kubernetes API emulator.

The emulator is the one the operator tests use (``tests/operator/operator_support.py``:
kmock's Kubernetes emulator with uid/resourceVersion/generation, watches, label selectors,
the status subresource, finalizers and garbage collection), served over HTTP in this process.
The real operator (Kopf + ``chatbot_operator.handlers``) runs in a child process with its
production settings (Kopf's defaults plus the operator's own, re-check every 60 s, metrics
server on), standalone (no peering object) and watching all namespaces.

Per repeat (fresh emulator and operator each time):

1. idle latency: one training at a time, ``--idle`` times: time from its POST to the POST of
   its first Job (``<name>-prepare``);
2. burst: ``--count`` trainings POSTed concurrently: the same latency for each (p50, p95,
   max), the time until all have their first Job, the operator's CPU time and peak RSS, and
   its handler invocations and reconciliations while it worked through them.

Both POSTs are timestamped by the emulator when it receives them (an admission hook). The
headline ratio is "p95 at 200 / p50 at 1": how much slower the worst-served trainings of a
burst start than a training on an idle operator.

3. writes: every write the operator sends (POST, PUT, PATCH, DELETE; by kind and verb, the
   training's own patches split into metadata and status) per training of the burst, before
   its first Job and, with ``--complete`` (the default), over the whole run: the benchmark
   then plays the Job controller, completing each step's Job with a pod whose termination
   message is the trainer's summary, until every training of the burst has Succeeded.

The writes are what bounds a burst on a real API server (etcd): a burst of N trainings needs
N × writes-per-training writes before the last first Job, at the server's write rate. The
emulator serves writes far faster, so its latencies hide that.

The emulator runs in this process and competes with the operator for the CPUs; its own CPU
time is reported too.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import resource
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent / "tests" / "operator"))  # operator_support.py, reused as is

import common  # noqa: E402

SPEC = {"trainingData": "pvc://chat-data/support.jsonl", "modelType": "gpt", "trainingSteps": 100,
        "batchSize": 8, "gpu": {"count": 1}}
STEPS = ("prepare", "configure", "train", "evaluate", "export")
# What each step's pod reports in its termination message (as the trainer does).
SUMMARIES = {
    "prepare": {"train_examples": 90, "eval_examples": 10},
    "configure": {"base_model": "gpt2", "device": "cuda", "precision": "bf16"},
    "train": {"train_loss": 0.42, "steps": 100, "tokens_per_second": 1234.5},
    "evaluate": {"metrics": {"loss": 0.15, "accuracy": 0.92, "perplexity": 1.16}},
    "export": {"model": {"path": "/mnt/pvc/models/bot/bot.q8_0.gguf", "format": "gguf",
                         "size_mb": 130.5, "base_model": "gpt2"}},
}
OPERATOR_AGENTS = ("kopf/", "chatbot-operator")


# ------------------------------------------------------------------------------ the operator


def _count_handler_calls(registry, counts: dict[str, int]) -> None:
    """Wrap the chatbot handlers registered in Kopf so that each call is counted."""
    import dataclasses

    for sub in (registry._watching, registry._changing, registry._spawning):
        for index, handler in enumerate(list(sub._handlers)):
            fn = handler.fn
            if getattr(fn, "__module__", "") != "chatbot_operator.handlers":
                continue
            name = fn.__name__
            counts.setdefault(name, 0)

            @functools.wraps(fn)
            async def counted(*args, __fn=fn, __name=name, **kwargs):
                counts[__name] += 1
                return await __fn(*args, **kwargs)

            sub._handlers[index] = dataclasses.replace(handler, fn=counted)


def operator_process(conn, profile: str | None = None) -> None:
    """The operator in its own process; answers "stats" and "stop" on the pipe.

    ``profile``: write cProfile statistics of the operator's thread to this file at the end."""
    common.set_quiet_env(1)
    import logging

    import kopf
    import prometheus_client

    import chatbot_operator.handlers  # noqa: F401 - registers the handlers
    from chatbot_operator.settings import OperatorConfig

    logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger("kopf").setLevel(logging.ERROR)  # no notes about streams left at shutdown
    config = OperatorConfig(metrics_port=0, health_port=-1, peering_name=None)
    registry = kopf.get_default_registry()
    calls: dict[str, int] = {}
    _count_handler_calls(registry, calls)
    stop_flag, ready_flag = threading.Event(), threading.Event()
    errors: list[str] = []

    def run() -> None:
        profiler = None
        if profile:
            import cProfile

            profiler = cProfile.Profile()
            profiler.enable()
        try:
            asyncio.run(kopf.operator(registry=registry, memo=kopf.Memo(config=config), standalone=True,
                                      clusterwide=True, stop_flag=stop_flag, ready_flag=ready_flag))
        except BaseException as exc:  # reported to the parent
            errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            if profiler is not None:
                profiler.disable()
                profiler.dump_stats(profile)

    thread = threading.Thread(target=run, name="operator", daemon=True)
    thread.start()
    ready_flag.wait(30)
    conn.send({"ready": ready_flag.is_set(), "rss": common.rss_now(), "errors": errors})
    while True:
        command = conn.recv()
        reconciles = prometheus_client.REGISTRY.get_sample_value("chatbot_reconcile_duration_seconds_count") or 0
        reconcile_seconds = prometheus_client.REGISTRY.get_sample_value("chatbot_reconcile_duration_seconds_sum") or 0
        usage = resource.getrusage(resource.RUSAGE_SELF)
        conn.send({"calls": dict(calls), "reconciles": int(reconciles), "reconcile_seconds": reconcile_seconds,
                   "cpu_seconds": usage.ru_utime + usage.ru_stime, "peak_rss": common.peak_rss_self(),
                   "rss": common.rss_now(), "errors": errors})
        if command == "stop":
            stop_flag.set()
            thread.join(30)
            return


class Operator:
    def __init__(self, kubeconfig: Path, profile: str | None = None) -> None:
        import multiprocessing

        os.environ["KUBECONFIG"] = str(kubeconfig)
        os.environ.pop("KUBERNETES_SERVICE_HOST", None)
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=operator_process, args=(child, profile), daemon=True)

    async def start(self) -> dict[str, Any]:
        self.process.start()
        ready = await asyncio.to_thread(self.conn.recv)
        if not ready["ready"]:
            raise RuntimeError(f"the operator did not start: {ready['errors']}")
        return ready

    async def ask(self, command: str = "stats") -> dict[str, Any]:
        self.conn.send(command)
        return await asyncio.to_thread(self.conn.recv)

    async def stop(self) -> dict[str, Any]:
        stats = await self.ask("stop")
        await asyncio.to_thread(self.process.join, 30)
        if self.process.is_alive():
            self.process.kill()
        return stats


# ------------------------------------------------------------------------------ the emulator


def bench_emulator_class():
    """The tests' ClusterEmulator, keeping only the requests in flight in kmock's request log.

    kmock matches every incoming request against its reactions by filtering the whole request
    history (``request in payload._source``), so each request costs O(requests so far) and a
    burst of thousands of requests O(n²): the emulator, not the operator, would be measured.
    The API semantics are unchanged; only the (unused here) history is not kept.
    """
    from operator_support import ClusterEmulator

    class BenchEmulator(ClusterEmulator):
        writes: list = []  # (time, kind of write, object name, training named by the object)

        async def _handle(self, request):
            if request.method.value.upper() in WRITE_METHODS and request.headers.get(
                    "User-Agent", "").startswith(OPERATOR_AGENTS):
                self.writes.append((time.perf_counter(), write_kind(request), *write_target(request)))
            try:
                return await super()._handle(request)
            finally:
                log = self._requests
                for index in range(len(log) - 1, -1, -1):
                    if log[index] is request:
                        del log[index]
                        break

    return BenchEmulator


WRITE_METHODS = ("POST", "PUT", "PATCH", "DELETE")


def write_kind(request) -> str:
    """"<verb> <resource>[/<subresource>]"; the training's own patches also name what they
    change (metadata: finalizers or annotations; status)."""
    verb = request.method.value.upper()
    plural = request.resource.plural if request.resource is not None else request.path
    kind = f"{verb} {plural}" + (f"/{request.subresource}" if request.subresource else "")
    if verb == "PATCH" and plural == "chatbottrainings" and not request.subresource:
        data = request.data
        if isinstance(data, list):  # a JSON patch, as Kopf's finalizer changes are
            parts = sorted({op.get("path", "").split("/")[2] for op in data
                            if op.get("path", "").startswith("/metadata/")} or {"?"})
        elif isinstance(data, dict):
            parts = sorted([*(f"{k}" for k in (data.get("metadata") or {})),
                            *(k for k in data if k != "metadata")])
        else:
            parts = ["?"]
        kind += f" ({', '.join(parts)})"
    return kind


def write_target(request) -> tuple[str | None, str | None]:
    """The written object's name, and the training it belongs to (as far as the body says)."""
    data = request.data if isinstance(request.data, dict) else {}
    meta = data.get("metadata") or {}
    name = request.name or meta.get("name")
    if request.resource is not None and request.resource.plural == "chatbottrainings":
        return name, name
    if request.resource is not None and request.resource.plural == "events":
        return name, (data.get("involvedObject") or {}).get("name")
    return name, (meta.get("labels") or {}).get("chatbot.dev/training")


def writes_per_training(writes: list, names: list[str], until: dict[str, float] | None = None) -> dict:
    """Writes of the trainings `names` (each only up to its time in `until`, if given), by kind:
    {"total": per training, "by_kind": {kind: per training}}."""
    by_name = sorted(names, key=len, reverse=True)
    counts: dict[str, int] = {}
    total = 0
    for when, kind, obj, owner in writes:
        if owner not in names:  # e.g. a ConfigMap patch: name the training by the object's name
            owner = next((n for n in by_name if obj and obj.startswith(n + "-")), None)
        if owner is None or (until is not None and when > until[owner]):
            continue
        counts[kind] = counts.get(kind, 0) + 1
        total += 1
    count = len(names) or 1
    return {"total": total / count, "by_kind": {k: v / count for k, v in sorted(counts.items())}}


# ------------------------------------------------------------------------------ one repeat


async def settle(operator: Operator, quiet: float = 1.0, limit: float = 30.0) -> dict[str, Any]:
    """Stats once the operator has finished reacting (no reconciliation for `quiet` seconds):
    its CPU time then includes the status updates and events that follow the Job creations."""
    stats = await operator.ask()
    deadline = time.perf_counter() + limit
    while time.perf_counter() < deadline:
        await asyncio.sleep(quiet)
        latest = await operator.ask()
        if latest["reconciles"] == stats["reconciles"] and latest["calls"] == stats["calls"]:
            return latest
        stats = latest
    return stats


async def one_recheck_round(operator: Operator, count: int, limit: float) -> dict[str, Any]:
    """Operator CPU for one round of the periodic re-check of `count` unfinished trainings
    (each training's timer fires once per CHATBOT_RESYNC_SECONDS; those of a burst together)."""
    before = await operator.ask()
    deadline = time.perf_counter() + limit
    while time.perf_counter() < deadline:
        await asyncio.sleep(0.5)
        stats = await operator.ask()
        if stats["calls"].get("recheck_training", 0) - before["calls"].get("recheck_training", 0) >= count:
            break
    after = await settle(operator)
    checks = after["calls"].get("recheck_training", 0) - before["calls"].get("recheck_training", 0)
    cpu = after["cpu_seconds"] - before["cpu_seconds"]
    return {"recheck_calls": checks, "recheck_cpu_s": cpu,
            "recheck_reconciles": after["reconciles"] - before["reconciles"],
            "recheck_cpu_ms_per_training": 1000 * cpu / checks if checks else None}


async def play_job_controller(cluster, names: list[str], timeout: float) -> float:
    """Complete each step's Job of `names` (a pod exits 0 with the step's summary, the Job
    completes) until every training has Succeeded; returns the seconds that took."""
    from operator_support import JOBS, TRAININGS

    started = time.perf_counter()
    done: set[str] = set()  # Job names completed
    wanted = set(names)
    while True:
        succeeded = {n for n in wanted
                     if ((cluster.get(TRAININGS, n) or {}).get("status") or {}).get("phase") == "Succeeded"}
        if succeeded == wanted:
            return time.perf_counter() - started
        if time.perf_counter() - started > timeout:
            raise TimeoutError(f"after {timeout} s only {len(succeeded)} of {len(wanted)} trainings "
                               f"have Succeeded")
        jobs = [job for job in cluster.list(JOBS) if job["metadata"]["name"] not in done
                and (job["metadata"].get("labels") or {}).get("chatbot.dev/training") in wanted]
        for job in jobs:
            done.add(job["metadata"]["name"])
        await asyncio.gather(*(cluster.succeed(job, SUMMARIES[job["metadata"]["labels"]["chatbot.dev/step"]])
                               for job in jobs))
        await asyncio.sleep(0.1)


async def one_repeat(count: int, idle: int, timeout: float, verbose: bool = True,
                     profile: str | None = None, recheck: float | None = None,
                     complete: bool = True) -> dict[str, Any]:
    import aiohttp
    import kmock
    import yaml
    from kmock._internal import parsing as kmock_parsing

    import operator_support
    from chatbot_operator import manifests
    from operator_support import JOBS, TRAININGS, Cluster

    kmock_parsing.parse_path = operator_support._parse_path  # what the tests' fixture patches
    created: dict[str, float] = {}
    first_job: dict[str, float] = {}
    arrived = asyncio.Event()
    expected: set[str] = set()
    trainings, jobs = kmock.resource(TRAININGS), kmock.resource(JOBS)

    def stamp(request) -> None:
        if request.method.value.upper() != "POST" or not isinstance(request.data, dict):
            return
        now = time.perf_counter()
        meta = request.data.get("metadata") or {}
        if request.resource == trainings:
            created.setdefault(meta.get("name"), now)
        elif request.resource == jobs:
            owner = (meta.get("labels") or {}).get(manifests.LABEL_TRAINING)
            if owner and owner not in first_job:
                first_job[owner] = now
                if expected and expected <= first_job.keys():
                    arrived.set()

    tmp = Path(tempfile.mkdtemp(prefix="bench-operator-"))
    async with bench_emulator_class()() as emulator, kmock.Server(emulator) as server:
        emulator.register_builtins()
        emulator.writes = []
        emulator.admission.append(stamp)
        kubeconfig = tmp / "kubeconfig"
        kubeconfig.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "emulator",
            "clusters": [{"name": "emulator", "cluster": {"server": str(server.url).rstrip("/")}}],
            "users": [{"name": "bench", "user": {"token": "bench-token"}}],
            "contexts": [{"name": "emulator", "context": {"cluster": "emulator", "user": "bench"}}],
        }))
        operator = Operator(kubeconfig, profile)
        started = await operator.start()
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(base_url=str(server.url), connector=connector) as session:
            cluster = Cluster(emulator, session)

            async def wait_for(names: set[str]) -> None:
                expected.clear()
                expected.update(names)
                arrived.clear()
                deadline = time.perf_counter() + timeout
                while not names <= first_job.keys():
                    try:
                        await asyncio.wait_for(arrived.wait(), 10)
                    except asyncio.TimeoutError:
                        if time.perf_counter() > deadline:
                            raise TimeoutError(f"after {timeout} s only {len(names & first_job.keys())} of "
                                               f"{len(names)} trainings have their first Job") from None
                        if verbose:
                            print(f"    … {len(names & first_job.keys())}/{len(names)} first Jobs, "
                                  f"{len(created)} trainings created", flush=True)

            # 1. one at a time, operator otherwise idle
            idle_latency = []
            for i in range(idle):
                name = f"idle-{i}"
                await cluster.apply_training(name, SPEC)
                await wait_for({name})
                idle_latency.append(first_job[name] - created[name])
                await asyncio.sleep(0.5)
            await asyncio.sleep(1.0)

            # 2. the burst
            names = [f"bot-{i:03d}" for i in range(count)]
            before = await operator.ask()
            cpu_parent = time.process_time()
            with common.RssSampler(operator.process.pid) as sampler:
                burst_started = time.perf_counter()
                await asyncio.gather(*(cluster.apply_training(n, SPEC) for n in names))
                posted = time.perf_counter()
                await wait_for(set(names))
                finished = time.perf_counter()
                after = await settle(operator)
            emulator_cpu = time.process_time() - cpu_parent
            writes_first_job = writes_per_training(emulator.writes, names, until=first_job)
            writes_burst = writes_per_training(emulator.writes, names)
            rechecked = await one_recheck_round(operator, count, recheck) if recheck else {}
            whole: dict[str, Any] = {}
            if complete:
                whole["run_through_s"] = await play_job_controller(cluster, names, timeout)
                await settle(operator)
                whole["writes_whole_run"] = writes_per_training(emulator.writes, names)
        stopped = await operator.stop()
    shutil.rmtree(tmp, ignore_errors=True)

    latency = [first_job[n] - created[n] for n in names]
    calls = {k: after["calls"].get(k, 0) - before["calls"].get(k, 0) for k in after["calls"]}
    handler_calls = sum(calls.values())
    reconciles = after["reconciles"] - before["reconciles"]
    cpu = after["cpu_seconds"] - before["cpu_seconds"]
    return {
        "idle_p50": common.median(idle_latency),
        "idle_latency": idle_latency,
        "p50": common.percentile(latency, 50),
        "p95": common.percentile(latency, 95),
        "max": max(latency),
        "all_first_jobs_s": max(first_job[n] for n in names) - burst_started,
        "posting_s": posted - burst_started,
        "operator_cpu_s": cpu,
        "cpu_ms_per_reconcile": 1000 * cpu / reconciles if reconciles else None,
        "cpu_ms_per_handler_call": 1000 * cpu / handler_calls if handler_calls else None,
        "reconciles": reconciles,
        "reconcile_wall_ms_mean": 1000 * (after["reconcile_seconds"] - before["reconcile_seconds"]) / reconciles
        if reconciles else None,
        "handler_calls": calls,
        "operator_rss_start": started["rss"],
        "operator_rss_before_burst": before["rss"],
        "operator_peak_rss": max(stopped["peak_rss"], sampler.peak),
        "operator_peak_rss_sampled": sampler.peak,
        "emulator_cpu_s": emulator_cpu,
        "burst_wall_s": finished - burst_started,
        "errors": stopped["errors"],
        "writes_before_first_job": writes_first_job,
        "writes_burst_settled": writes_burst,
        **rechecked,
        **whole,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=200, help="trainings created at once")
    parser.add_argument("--idle", type=int, default=5, help="trainings created one at a time first")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=240.0, help="seconds to wait for the first Jobs")
    parser.add_argument("--profile", metavar="FILE",
                        help="cProfile the operator during the last repeat (python -m pstats FILE)")
    parser.add_argument("--resync", type=float, default=60.0,
                        help="CHATBOT_RESYNC_SECONDS of the operator (its re-check period)")
    parser.add_argument("--recheck", action="store_true",
                        help="after the burst, also measure one re-check round of all trainings")
    parser.add_argument("--complete", action=argparse.BooleanOptionalAction, default=True,
                        help="after the burst, play the Job controller until every training has "
                             "Succeeded, counting the operator's writes over the whole run")
    parser.add_argument("--quick", action="store_true", help="small sizes: checks that everything runs")
    args = parser.parse_args()
    if args.quick:
        args.count, args.idle, args.repeats = 20, 2, 1
    common.set_quiet_env(1)
    os.environ["CHATBOT_RESYNC_SECONDS"] = str(args.resync)

    runs = []
    for i in range(args.repeats):
        started = time.perf_counter()
        profile = args.profile if args.profile and i == args.repeats - 1 else None
        result = asyncio.run(one_repeat(args.count, args.idle, args.timeout, profile=profile,
                                        recheck=args.resync + 60 if args.recheck else None,
                                        complete=args.complete))
        runs.append(result)
        print(f"  repeat {i + 1}/{args.repeats}: {common.short(result)}, p95={result['p95']:.3f}, "
              f"all={result['all_first_jobs_s']:.2f} s ({time.perf_counter() - started:.1f} s)", flush=True)

    keys = ["idle_p50", "p50", "p95", "max", "all_first_jobs_s", "operator_cpu_s", "cpu_ms_per_reconcile",
            "cpu_ms_per_handler_call", "reconciles", "reconcile_wall_ms_mean", "emulator_cpu_s"]
    summary: dict[str, Any] = {k: common.median(r[k] for r in runs) for k in keys}
    summary["operator_peak_rss_mib"] = common.mib(common.median(r["operator_peak_rss"] for r in runs))
    summary["operator_rss_before_burst_mib"] = common.mib(common.median(r["operator_rss_before_burst"] for r in runs))
    summary["handler_calls"] = runs[len(runs) // 2]["handler_calls"]
    summary["p95_at_count_over_p50_at_1"] = common.ratio(summary["p95"], summary["idle_p50"])
    summary["cpu_ms_per_training"] = 1000 * summary["operator_cpu_s"] / args.count
    if args.recheck:
        for key in ("recheck_cpu_s", "recheck_cpu_ms_per_training", "recheck_reconciles"):
            summary[key] = common.median(r[key] for r in runs)

    rows = [
        ["first Job latency, idle (p50 of 1 at a time)", f"{summary['idle_p50'] * 1000:.0f} ms"],
        [f"first Job latency, burst of {args.count}: p50", f"{summary['p50']:.2f} s"],
        [f"first Job latency, burst of {args.count}: p95", f"{summary['p95']:.2f} s"],
        [f"first Job latency, burst of {args.count}: max", f"{summary['max']:.2f} s"],
        [f"all {args.count} have their first Job", f"{summary['all_first_jobs_s']:.2f} s"],
        ["operator peak RSS", f"{summary['operator_peak_rss_mib']:.0f} MiB "
                              f"({summary['operator_rss_before_burst_mib']:.0f} MiB before the burst)"],
        ["operator CPU time for the burst", f"{summary['operator_cpu_s']:.2f} s"],
        ["reconciliations during the burst", f"{summary['reconciles']:.0f}"],
        ["CPU per training (operator CPU / trainings)", f"{summary['cpu_ms_per_training']:.1f} ms"],
        ["CPU per reconcile (operator CPU / reconciles)", f"{summary['cpu_ms_per_reconcile']:.1f} ms"],
        ["CPU per handler call", f"{summary['cpu_ms_per_handler_call']:.1f} ms"],
        ["emulator CPU time (same machine)", f"{summary['emulator_cpu_s']:.2f} s"],
        [f"ratio p95 at {args.count} / p50 at 1", f"{summary['p95_at_count_over_p50_at_1']:.1f}x"],
    ]
    if args.recheck:
        rows += [
            [f"one re-check round of {args.count} trainings: operator CPU",
             f"{summary['recheck_cpu_s']:.2f} s ({summary['recheck_cpu_ms_per_training']:.1f} ms "
             f"per training, {summary['recheck_reconciles']:.0f} reconciliations)"],
        ]
    print()
    print(common.table(["figure", "value"], rows))
    print(f"handler calls during the burst: {json.dumps(summary['handler_calls'])}")
    middle = runs[len(runs) // 2]
    windows = [("before its first Job", "writes_before_first_job"),
               ("burst, settled", "writes_burst_settled"), ("whole run", "writes_whole_run")]
    for title, key in windows:
        if key in middle:
            summary[key] = middle[key]
            print(f"operator writes per training, {title}: {middle[key]['total']:.2f}")
            for kind, value in middle[key]["by_kind"].items():
                print(f"    {value:6.2f}  {kind}")
    data = {
        "benchmark": "operator_scale",
        "machine": common.machine_info(),
        "versions": common.package_versions(["kopf", "kmock", "aiohttp", "kubernetes"]),
        "settings": vars(args),
        "summary": summary,
        "runs": runs,
    }
    path = common.write_results("operator_scale", data, quick=args.quick)
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
