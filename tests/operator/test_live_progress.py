"""Live progress: the operator reads GET /progress from the running train or evaluate pod and
shows it in status.progress, the Progress and ETA columns and Prometheus, at a bounded rate;
what it cannot read never fails a run, and a stale report is removed.

The step pod is played by a small HTTP server on 127.0.0.1 (the pod's status.podIP), on the
port the operator puts into the Job (OperatorConfig.progress_port)."""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any

import prometheus_client
from aiohttp import web

from operator_support import Cluster, assert_rbac_allows_operator_requests, wait_for

from chatbot_api.crd import PRINTER_COLUMNS
from chatbot_api.status import ChatbotTrainingStatus
from chatbot_operator import live_progress, metrics

POLL = 0.5  # progress_seconds of the operator in these tests
REPORT = {"step": "train", "unit": "steps", "completed": 120, "total": 1000, "percent": 12.0,
          "eta_seconds": 734.2, "loss": 1.2345, "tokens_per_second": 512.3,
          "learning_rate": 0.0001, "updated": "2026-01-01T12:00:00Z"}


class FakeStepPod:
    """What a train or evaluate pod serves on its progress port."""

    def __init__(self) -> None:
        self.report: dict[str, Any] = dict(REPORT)
        self.mode = "answer"  # answer | fail (503) | hang
        self.requests: list[float] = []
        self.release = asyncio.Event()
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(time.monotonic())
        if self.mode == "hang":
            try:
                await asyncio.wait_for(self.release.wait(), 30)
            except asyncio.TimeoutError:
                pass
        if self.mode != "answer":
            return web.Response(status=503)
        return web.json_response(self.report)

    async def __aenter__(self) -> "FakeStepPod":
        app = web.Application()
        app.router.add_get("/progress", self.handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self.release.set()
        await self.runner.cleanup()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def gauge(name: str, training: str) -> float | None:
    return prometheus_client.REGISTRY.get_sample_value(name, {"namespace": "ml", "name": training})


def column(training: dict, name: str) -> Any:
    (path,) = [c["jsonPath"] for c in PRINTER_COLUMNS if c["name"] == name]
    value: Any = training
    for key in path.strip(".").split("."):
        value = value.get(key) if isinstance(value, dict) else None
    return value


async def start_training_step(cluster: Cluster, name: str) -> dict:
    """A training whose prepare and configure steps succeeded and whose train pod runs, with
    127.0.0.1 as its IP; returns the train Job."""
    await cluster.apply_training(name, {"trainingData": "/data/chat.jsonl", "trainingSteps": 1000})
    for step in ("prepare", "configure"):
        job = await wait_for(lambda: cluster.job(name, step), message=f"{step} Job")
        await cluster.succeed(job)
    train = await wait_for(lambda: cluster.job(name, "train"), message="train Job")
    pod = await cluster.run_pod(train, phase="Running", state={"running": {"startedAt": "now"}})
    await cluster.call("PATCH", f"/api/v1/namespaces/ml/pods/{pod['metadata']['name']}/status",
                       {"status": {"podIP": "127.0.0.1"}})
    return train


# ------------------------------------------------------------------------- against the emulator


async def test_progress_appears_while_training_runs_and_goes_when_the_step_ends(
        cluster: Cluster, start_operator):
    async with FakeStepPod() as pod:
        await start_operator(progress_port=pod.port, progress_seconds=POLL)
        train = await start_training_step(cluster, "bot")
        container = train["spec"]["template"]["spec"]["containers"][0]
        assert container["ports"] == [{"name": "progress", "containerPort": pod.port, "protocol": "TCP"}]
        assert {"name": "CHATBOT_PROGRESS_PORT", "value": str(pod.port)} in container["env"]

        status = await wait_for(lambda: cluster.status("bot").get("progress") and cluster.status("bot"),
                                message="status.progress")
        block = status["progress"]
        assert {k: v for k, v in block.items() if k != "lastUpdated"} == {
            "step": "train", "unit": "steps", "completed": 120, "total": 1000, "percent": 12.0,
            "etaSeconds": 734.2, "eta": "12m", "loss": 1.2345, "tokensPerSecond": 512.3,
            "learningRate": 0.0001}
        assert block["lastUpdated"].endswith("Z")
        assert status["phase"] == "Running" and status["step"] == "train"
        ChatbotTrainingStatus.model_validate(status)
        training = cluster.training("bot")
        assert (column(training, "Progress"), column(training, "ETA")) == (12.0, "12m")
        await wait_for(lambda: gauge("chatbot_train_loss", "bot") == 1.2345, message="loss gauge")
        assert gauge("chatbot_progress_percent", "bot") == 12.0
        assert gauge("chatbot_progress_eta_seconds", "bot") == 734.2
        assert gauge("chatbot_train_step", "bot") == 120
        assert gauge("chatbot_train_tokens_per_second", "bot") == 512.3

        # The report moves on: so does the status.
        pod.report.update(completed=480, percent=48.0, eta_seconds=3900, loss=0.9)
        block = await wait_for(lambda: (p := cluster.status("bot").get("progress", {})).get(
            "completed") == 480 and p, message="newer report")
        assert (block["percent"], block["eta"], block["loss"]) == (48.0, "1h05m", 0.9)

        # At most one read per interval; the block stays through the re-checks (every 1 s).
        pod.requests.clear()
        for _ in range(50):
            await asyncio.sleep(POLL / 5)
            assert cluster.status("bot").get("progress", {}).get("completed") == 480
        reads = list(pod.requests)
        assert 5 <= len(reads) <= 11, reads
        gaps = [b - a for a, b in zip(reads, reads[1:])]
        assert min(gaps) > 0.8 * POLL, gaps

        # The step ends: the block and its series go, and the pod is read no more.
        await cluster.succeed(train, {"train_loss": 0.9})
        status = await wait_for(lambda: cluster.status("bot").get("step") == "evaluate"
                                and cluster.status("bot"), message="evaluate step")
        await wait_for(lambda: "progress" not in cluster.status("bot"), message="progress removed")
        await wait_for(lambda: gauge("chatbot_progress_percent", "bot") is None, message="series removed")
        assert gauge("chatbot_train_loss", "bot") is None and gauge("chatbot_train_step", "bot") is None
        await asyncio.sleep(3 * POLL)
        read = len(pod.requests)
        await asyncio.sleep(3 * POLL)
        assert len(pod.requests) == read
        assert "progress" not in cluster.status("bot")
    # Reading progress needed no RBAC verb the operator did not have.
    assert_rbac_allows_operator_requests(cluster)


async def test_evaluate_reports_batches(cluster: Cluster, start_operator):
    async with FakeStepPod() as pod:
        await start_operator(progress_port=pod.port, progress_seconds=POLL)
        train = await start_training_step(cluster, "evalbot")
        await cluster.succeed(train, {"train_loss": 0.9})
        evaluate = await wait_for(lambda: cluster.job("evalbot", "evaluate"), message="evaluate Job")
        pod.report = {"step": "evaluate", "unit": "batches", "completed": 30, "total": 40,
                      "percent": 75.0, "eta_seconds": 12.4}
        running = await cluster.run_pod(evaluate, phase="Running", state={"running": {"startedAt": "now"}})
        await cluster.call("PATCH", f"/api/v1/namespaces/ml/pods/{running['metadata']['name']}/status",
                           {"status": {"podIP": "127.0.0.1"}})
        block = await wait_for(lambda: cluster.status("evalbot").get("progress"), message="progress")
        assert {k: v for k, v in block.items() if k != "lastUpdated"} == {
            "step": "evaluate", "unit": "batches", "completed": 30, "total": 40, "percent": 75.0,
            "etaSeconds": 12.4, "eta": "13s"}
        await wait_for(lambda: gauge("chatbot_progress_percent", "evalbot") == 75.0, message="gauge")
        assert gauge("chatbot_train_loss", "evalbot") is None  # training series only for train


async def test_an_unreachable_endpoint_never_fails_the_run(cluster: Cluster, start_operator):
    await start_operator(progress_port=free_port(), progress_seconds=POLL)  # nothing listens
    train = await start_training_step(cluster, "quiet")
    await wait_for(lambda: cluster.status("quiet").get("steps", {}).get("train", {}).get(
        "phase") == "Running", message="train running")
    await asyncio.sleep(6 * POLL)
    status = cluster.status("quiet")
    assert status["phase"] == "Running" and "progress" not in status
    assert status["reason"] == "StepRunning"
    await cluster.succeed(train, {"train_loss": 0.5})
    for step in ("evaluate", "export"):
        job = await wait_for(lambda: cluster.job("quiet", step), message=f"{step} Job")
        await cluster.succeed(job, {"metrics": {"loss": 0.4, "accuracy": 0.8, "perplexity": 1.5}}
                              if step == "evaluate" else {})
    await wait_for(lambda: cluster.status("quiet").get("phase") == "Succeeded", message="Succeeded")


async def test_a_stale_report_is_removed_not_shown_as_live(cluster: Cluster, start_operator):
    async with FakeStepPod() as pod:
        await start_operator(progress_port=pod.port, progress_seconds=POLL)
        await start_training_step(cluster, "stale")
        await wait_for(lambda: cluster.status("stale").get("progress"), message="progress")

        pod.mode = "hang"  # the pod stops answering (each read now times out after 2 s)
        hung = time.monotonic()
        await wait_for(lambda: "progress" not in cluster.status("stale"), timeout=15,
                       message="stale progress removed")
        # not before STALE_POLLS intervals (timestamps have whole seconds)
        assert time.monotonic() - hung > live_progress.STALE_POLLS * POLL - 1
        await wait_for(lambda: gauge("chatbot_progress_percent", "stale") is None, message="series removed")
        status = cluster.status("stale")
        assert status["phase"] == "Running" and status["step"] == "train"

        pod.mode = "answer"  # it answers again: the report is live again
        await wait_for(lambda: cluster.status("stale").get("progress"), message="progress again")


# ------------------------------------------------------------------------- the rules


NOW = "2026-01-01T12:00:10Z"
RUNNING = {"phase": "Running", "step": "train",
           "steps": {"train": {"phase": "Running", "jobName": "bot-train"}}}


def pod(name: str, *, step: str = "train", job: str = "bot-train", phase: str = "Running",
        ip: str | None = "10.0.0.7", port: int | None = 8470, created: str = "2026-01-01T12:00:00Z") -> dict:
    container: dict = {"name": "trainer"}
    if port:
        container["ports"] = [{"name": "progress", "containerPort": port}]
    status: dict = {"phase": phase}
    if ip:
        status["podIP"] = ip
    return {"metadata": {"name": name, "creationTimestamp": created,
                         "labels": {"chatbot.dev/step": step, "batch.kubernetes.io/job-name": job}},
            "spec": {"containers": [container]}, "status": status}


def test_the_target_is_the_newest_running_pod_of_the_running_step():
    pods = [pod("old", created="2026-01-01T11:00:00Z"), pod("new", ip="fd00::7"),
            pod("failed", phase="Failed", created="2026-01-01T13:00:00Z"),
            pod("other-step", step="configure", job="bot-configure", created="2026-01-01T13:00:00Z")]
    assert live_progress.target(RUNNING, pods) == live_progress.Target(
        step="train", pod="new", url="http://[fd00::7]:8470/progress")
    assert live_progress.target(RUNNING, [pod("no-ip", ip=None)]) is None
    assert live_progress.target(RUNNING, [pod("no-port", port=None)]) is None
    for status in ({**RUNNING, "phase": "Suspended"},
                   {**RUNNING, "steps": {"train": {"phase": "Succeeded", "jobName": "bot-train"}}},
                   {"phase": "Running", "step": "prepare", "steps": {"prepare": {"phase": "Running"}}}):
        assert live_progress.target(status, pods) is None


def test_a_report_of_another_step_or_malformed_is_not_shown():
    assert live_progress.from_report(REPORT, "train", NOW)["lastUpdated"] == NOW
    assert live_progress.from_report({**REPORT, "step": "evaluate"}, "train", NOW) is None
    assert live_progress.from_report({**REPORT, "unit": "epochs"}, "train", NOW) is None
    assert live_progress.from_report({**REPORT, "completed": "many"}, "train", NOW) is None
    assert live_progress.from_report(["not", "a", "report"], "train", NOW) is None
    block = live_progress.from_report({**REPORT, "loss": float("nan"), "eta_seconds": None}, "train", NOW)
    assert "loss" not in block and "eta" not in block and "etaSeconds" not in block


def test_staleness_and_what_a_rebuilt_status_keeps():
    block = live_progress.from_report(REPORT, "train", "2026-01-01T12:00:00Z")
    with_block = {**RUNNING, "progress": block}
    # fresh for three intervals, then gone
    assert live_progress.carried(block, RUNNING, "2026-01-01T12:00:30Z", 10) == block
    assert live_progress.carried(block, RUNNING, "2026-01-01T12:00:31Z", 10) is None
    # a poll that read nothing keeps a fresh block, drops a stale one
    assert live_progress.refreshed(with_block, "train", None, "2026-01-01T12:00:20Z", 10) == block
    assert live_progress.refreshed(with_block, "train", None, "2026-01-01T12:00:31Z", 10) is None
    # nothing after the step ends
    ended = {**RUNNING, "steps": {"train": {"phase": "Succeeded"}}, "progress": block}
    assert live_progress.refreshed(ended, "train", REPORT, "2026-01-01T12:00:01Z", 10) is None
    assert live_progress.carried(block, {**RUNNING, "phase": "Failed"}, "2026-01-01T12:00:01Z", 10) is None


def test_eta_for_people():
    assert [live_progress.format_eta(s) for s in (None, 0, 12.2, 59.9, 90, 734.2, 3599, 3900, 90000)] == [
        None, "0s", "13s", "1m", "2m", "12m", "1h00m", "1h05m", "1d01h"]


def test_gauges_follow_the_block():
    metrics.show_live_progress("ml", "g", live_progress.from_report(REPORT, "train", NOW))
    assert gauge("chatbot_train_step", "g") == 120 and gauge("chatbot_progress_percent", "g") == 12.0
    metrics.show_live_progress("ml", "g", live_progress.from_report(
        {"step": "evaluate", "unit": "batches", "completed": 1, "total": 4, "percent": 25.0}, "evaluate", NOW))
    assert gauge("chatbot_progress_percent", "g") == 25.0
    assert gauge("chatbot_train_step", "g") is None and gauge("chatbot_progress_eta_seconds", "g") is None
    metrics.show_live_progress("ml", "g", None)
    assert gauge("chatbot_progress_percent", "g") is None


def test_the_phase_between_units_is_shown_while_it_runs():
    """evaluate names the work between its batches (sample answers, loading the base model)."""
    phase = "sample answers of the fine-tuned model"
    block = live_progress.from_report({**REPORT, "phase": phase}, "train", NOW)
    assert block["phase"] == phase
    assert "phase" not in live_progress.from_report(REPORT, "train", NOW)
    assert "phase" not in live_progress.from_report({**REPORT, "phase": 3}, "train", NOW)
