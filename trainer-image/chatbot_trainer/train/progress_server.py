"""Live progress of a running step, served read-only as JSON on ``GET /progress``.

The operator polls it on the step pod's IP (the Job's container port named ``progress``), so
the pod needs no API credentials and no log is scraped. The train step reports optimizer
steps, evaluate reports batches:

    {"step": "train", "unit": "steps", "completed": 120, "total": 1000, "percent": 12.0,
     "eta_seconds": 734.2, "loss": 1.2345, "tokens_per_second": 512.3,
     "learning_rate": 0.0001, "updated": "2026-01-01T12:00:00Z"}

and, between units, ``"phase"`` says what runs instead (``"sample answers of the fine-tuned
model"``); the remaining time then holds still.

``CHATBOT_PROGRESS_PORT`` names the port (the Job sets 8470); unset, empty or 0: no server
(a local run opens no port). Reporting never gets in the way of the work: a port that cannot
be bound is logged and skipped, a request never reaches the training thread, and anything
but ``GET /progress`` gets 404.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

log = logging.getLogger("chatbot_trainer.progress")

PORT_ENV = "CHATBOT_PROGRESS_PORT"
PATH = "/progress"


def port_from_env(environ: Mapping[str, str] | None = None) -> int | None:
    """The port to serve on, or None (unset, empty, 0 or not a port number)."""
    text = (os.environ if environ is None else environ).get(PORT_ENV, "").strip()
    if not text:
        return None
    try:
        port = int(text)
    except ValueError:
        log.warning("%s=%r is not a port number: live progress is not served", PORT_ENV, text)
        return None
    return port if 0 < port < 65536 else None


def _iso(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class ProgressBoard:
    """The latest report of one step. `update` is called by the work, `snapshot` by the
    server's thread.

    The remaining time is the units left times the time a unit takes, measured since the
    board's first update (a resumed run counts from where it resumed) and counted down to the
    request between updates, but never below the time of the units not yet started. Work
    between units (the evaluate step's sample answers, loading the base model) is announced
    with `pause(phase)`: the estimate then stops counting down, the report names the phase,
    and the rate is measured afresh once units come again, so the pause does not skew it.
    """

    def __init__(self, step: str, unit: str, total: int = 0) -> None:
        self._lock = threading.Lock()
        self._fields: dict[str, Any] = {"step": step, "unit": unit, "completed": 0, "total": int(total)}
        self._first: tuple[float, int] | None = None  # (monotonic time, completed) the rate counts from
        self._unit_seconds: float | None = None  # the latest measured time per unit
        self._paused = False
        self._eta: float | None = None
        self._updated_monotonic: float | None = None
        self._updated: str | None = None

    def update(self, completed: int, total: int | None = None, **values: Any) -> None:
        """`values`: loss, tokens_per_second, learning_rate (None values are left out)."""
        now = time.monotonic()
        with self._lock:
            if total is not None:
                self._fields["total"] = int(total)
            if self._first is None or self._paused:
                self._first = (now, int(completed))
                self._paused = False
                self._fields.pop("phase", None)
            self._fields["completed"] = int(completed)
            self._fields.update({k: v for k, v in values.items() if v is not None})
            self._eta = self._estimate(now, int(completed))
            self._updated_monotonic = now
            self._updated = _iso(time.time())

    def pause(self, phase: str) -> None:
        """Work that is not a unit starts (named by `phase`): hold the estimate until the next
        update."""
        with self._lock:
            self._paused = True
            self._fields["phase"] = phase
            if self._eta is not None and self._updated_monotonic is not None:
                self._eta = max(self._eta - (time.monotonic() - self._updated_monotonic), self._floor())
            self._updated = _iso(time.time())

    def _estimate(self, now: float, completed: int) -> float | None:
        total = self._fields["total"]
        if total > 0 and completed >= total:
            return 0.0
        first_time, first_done = self._first or (now, completed)
        done_here = completed - first_done
        if done_here > 0 and now > first_time:
            self._unit_seconds = (now - first_time) / done_here
        if total <= 0 or self._unit_seconds is None:
            return None
        return (total - completed) * self._unit_seconds

    def _floor(self) -> float:
        """The time of the units not started yet (all but the one under way)."""
        left = self._fields["total"] - self._fields["completed"] - 1
        return left * self._unit_seconds if left > 0 and self._unit_seconds else 0.0

    def snapshot(self) -> dict[str, Any]:
        """The report as served: percent, and the remaining time counted down to now."""
        with self._lock:
            report = dict(self._fields)
            eta, updated_at, updated = self._eta, self._updated_monotonic, self._updated
            if eta is not None and updated_at is not None and not self._paused:
                eta = max(self._floor(), eta - (time.monotonic() - updated_at))
        total = report["total"]
        report["percent"] = round(100.0 * min(report["completed"], total) / total, 1) if total > 0 else None
        report["eta_seconds"] = None if eta is None else round(eta, 1)
        report["updated"] = updated
        return report


def _handler_for(board: ProgressBoard) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "chatbot-trainer"

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            if self.path.split("?", 1)[0] != PATH:
                self.send_error(404)
                return
            body = json.dumps(board.snapshot()).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            pass  # one request every few seconds: not worth a log line

    return Handler


class ProgressServer:
    """`board` served on `port` from a daemon thread, until `close()`."""

    def __init__(self, board: ProgressBoard, port: int, host: str = "0.0.0.0") -> None:
        self.httpd = ThreadingHTTPServer((host, port), _handler_for(board))
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.5},
                                       name="progress-server", daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


def start_server(board: ProgressBoard, port: int | None = None) -> ProgressServer | None:
    """Serve `board` (port: `CHATBOT_PROGRESS_PORT` unless given); None when progress is not
    served or the port cannot be bound (logged: the step goes on without it)."""
    port = port_from_env() if port is None else port
    if not port:
        return None
    try:
        server = ProgressServer(board, port)
    except OSError as exc:
        log.warning("cannot serve live progress on port %s (%s); the step goes on without it", port, exc)
        return None
    log.info("live progress on port %d at %s", server.port, PATH)
    return server


@contextmanager
def serving(board: ProgressBoard, port: int | None = None) -> Iterator[ProgressServer | None]:
    """`start_server` for the duration of a block."""
    server = start_server(board, port)
    try:
        yield server
    finally:
        if server is not None:
            server.close()
