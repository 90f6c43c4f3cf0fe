"""Prometheus metrics of the operator, served on `/metrics` (CHATBOT_METRICS_PORT).

- `chatbot_trainings{phase}`: ChatbotTrainings this operator knows, by phase.
- `chatbot_step_duration_seconds{step}`: durations of finished steps (success or failure).
- `chatbot_eval_loss{namespace,name}`, `chatbot_eval_accuracy{namespace,name}`: evaluation
  results of each training that has them.
- `chatbot_reconcile_errors_total`: reconciliations that failed (and were retried).
- `chatbot_reconcile_duration_seconds`: time of one reconciliation.
- live progress of each running train or evaluate step (`{namespace,name}`, removed when the
  step ends): `chatbot_progress_percent`, `chatbot_progress_eta_seconds`, and of training
  `chatbot_train_step`, `chatbot_train_loss`, `chatbot_train_tokens_per_second`.
Plus the default process and Python collectors of prometheus-client.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import prometheus_client
from aiohttp import web

from chatbot_api.status import PHASES

from chatbot_operator.status_builder import step_transitions

REGISTRY = prometheus_client.REGISTRY

TRAININGS = prometheus_client.Gauge(
    "chatbot_trainings", "ChatbotTraining resources by phase.", ["phase"], registry=REGISTRY)
STEP_DURATION = prometheus_client.Histogram(
    "chatbot_step_duration_seconds", "Duration of finished training steps.", ["step"],
    buckets=(10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400, 43200, 86400, 259200, 604800),
    registry=REGISTRY)
EVAL_LOSS = prometheus_client.Gauge(
    "chatbot_eval_loss", "Evaluation loss of a ChatbotTraining.", ["namespace", "name"],
    registry=REGISTRY)
EVAL_ACCURACY = prometheus_client.Gauge(
    "chatbot_eval_accuracy", "Assistant-token accuracy of a ChatbotTraining.",
    ["namespace", "name"], registry=REGISTRY)
EVAL_FACT_RECALL = prometheus_client.Gauge(
    "chatbot_eval_fact_recall", "Share of the data's facts the fine-tuned model's answers to "
    "held-out questions state.", ["namespace", "name"], registry=REGISTRY)
RECONCILE_ERRORS = prometheus_client.Counter(
    "chatbot_reconcile_errors", "Reconciliations of a ChatbotTraining that failed.",
    registry=REGISTRY)
RECONCILE_DURATION = prometheus_client.Histogram(
    "chatbot_reconcile_duration_seconds", "Time of one reconciliation of a ChatbotTraining.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10), registry=REGISTRY)


LIVE_GAUGES = {  # status.progress key: gauge
    "percent": prometheus_client.Gauge(
        "chatbot_progress_percent", "Percent done of the running train or evaluate step.",
        ["namespace", "name"], registry=REGISTRY),
    "etaSeconds": prometheus_client.Gauge(
        "chatbot_progress_eta_seconds", "Estimated seconds until the running step's loop ends.",
        ["namespace", "name"], registry=REGISTRY),
}
TRAIN_GAUGES = {
    "completed": prometheus_client.Gauge(
        "chatbot_train_step", "Optimizer steps done by the running train step.",
        ["namespace", "name"], registry=REGISTRY),
    "loss": prometheus_client.Gauge(
        "chatbot_train_loss", "Training loss of the latest logged window.",
        ["namespace", "name"], registry=REGISTRY),
    "tokensPerSecond": prometheus_client.Gauge(
        "chatbot_train_tokens_per_second", "Training throughput of the latest logged window.",
        ["namespace", "name"], registry=REGISTRY),
}


def show_live_progress(namespace: str, name: str, block: Mapping[str, Any] | None) -> None:
    """Set the live-progress gauges of a training from its `status.progress` block; the
    series of values it lacks (all of them for None) are removed."""
    block = block or {}
    training = block.get("step") == "train"
    for gauges, applies in ((LIVE_GAUGES, bool(block)), (TRAIN_GAUGES, training)):
        for key, gauge in gauges.items():
            value = block.get(key) if applies else None
            if value is not None:
                gauge.labels(namespace=namespace, name=name).set(value)
            else:
                try:
                    gauge.remove(namespace, name)
                except KeyError:
                    pass


class TrainingTracker:
    """The phase of every training this operator has seen; backs `chatbot_trainings`."""

    def __init__(self) -> None:
        self._phases: dict[tuple[str, str], str] = {}
        for phase in PHASES:
            TRAININGS.labels(phase=phase).set_function(
                lambda phase=phase: sum(1 for p in self._phases.values() if p == phase))

    def count(self, phase: str) -> int:
        return sum(1 for p in self._phases.values() if p == phase)

    def record(self, namespace: str, name: str, old: Mapping[str, Any] | None,
               new: Mapping[str, Any]) -> None:
        """Account for one reconciliation's status change."""
        self._phases[(namespace, name)] = new.get("phase", "Pending")
        for change in step_transitions(old, new):
            if change.seconds is not None:
                STEP_DURATION.labels(step=change.step).observe(change.seconds)
        metrics = new.get("metrics") or {}
        if metrics.get("loss") is not None:
            EVAL_LOSS.labels(namespace=namespace, name=name).set(metrics["loss"])
        if metrics.get("accuracy") is not None:
            EVAL_ACCURACY.labels(namespace=namespace, name=name).set(metrics["accuracy"])
        if metrics.get("factRecall") is not None:
            EVAL_FACT_RECALL.labels(namespace=namespace, name=name).set(metrics["factRecall"])

    def forget(self, namespace: str, name: str) -> None:
        self._phases.pop((namespace, name), None)
        show_live_progress(namespace, name, None)
        for gauge in (EVAL_LOSS, EVAL_ACCURACY, EVAL_FACT_RECALL):
            try:
                gauge.remove(namespace, name)
            except KeyError:
                pass


async def _serve_metrics(request: web.Request) -> web.Response:
    body = prometheus_client.generate_latest(REGISTRY)
    return web.Response(body=body, headers={"Content-Type": prometheus_client.CONTENT_TYPE_LATEST})


async def start_server(port: int, host: str = "0.0.0.0") -> tuple[web.AppRunner, int]:
    """Serve `/metrics` in the operator's event loop; returns the runner and the bound port."""
    app = web.Application()
    app.router.add_get("/metrics", _serve_metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    server = getattr(site, "_server", None)
    sockets = getattr(server, "sockets", None) or []
    bound = sockets[0].getsockname()[1] if sockets else port
    return runner, bound
