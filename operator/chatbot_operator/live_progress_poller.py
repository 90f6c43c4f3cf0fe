"""Reads the live progress of running train and evaluate steps into `status.progress`.

The side effects of live progress (the rules are in live_progress.py). The reconciler tells
the poller which pod of a training to read (`watch`, after each reconciliation). Every
CHATBOT_PROGRESS_SECONDS one round reads `GET /progress` from each of them: at most
MAX_CONCURRENT at once, each given TIMEOUT_SECONDS, so a training's status changes at most
once a round. What was read goes into the status through the reconciler (under the
training's lock), and into the Prometheus gauges. A pod that does not answer changes nothing
until its last report goes stale; nothing here ever fails a training or a reconciliation.

Why this channel: the step pods keep no API credentials (automountServiceAccountToken:
false), the operator needs no RBAC verb beyond those it has, no log is scraped, and the load
is bounded by the operator's own polling, not by what the pods send.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import aiohttp

from chatbot_operator import live_progress, metrics
from chatbot_operator.observe import now_iso
from chatbot_operator.settings import OperatorConfig

logger = logging.getLogger(__name__)

MAX_CONCURRENT = 16
TIMEOUT_SECONDS = 2.0
MAX_REPORT_BYTES = 64 * 1024

StatusChange = Callable[[Mapping[str, Any]], dict[str, Any]]
UpdateStatus = Callable[[str, str, StatusChange], Awaitable[None]]


async def fetch_report(session: aiohttp.ClientSession, url: str) -> Any | None:
    """The JSON a pod serves at `url`; None when it cannot be read, for whatever reason."""
    try:
        async with session.get(url, allow_redirects=False) as response:
            if response.status != 200:
                return None
            return json.loads(await response.content.read(MAX_REPORT_BYTES))
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError):
        return None


class ProgressPoller:
    def __init__(self, update_status: UpdateStatus, config: OperatorConfig) -> None:
        self._update_status = update_status
        self.interval = config.progress_seconds
        self.enabled = config.progress_port > 0
        self._targets: dict[tuple[str, str], live_progress.Target] = {}
        self._task: asyncio.Future | None = None

    def watch(self, namespace: str, name: str, target: live_progress.Target | None) -> None:
        """Read `target` from the next round on (None: nothing to read for this training)."""
        if target is None:
            self.forget(namespace, name)
            return
        self._targets[(namespace, name)] = target
        if self.enabled and (self._task is None or self._task.done()):
            self._task = asyncio.ensure_future(self._run())

    def forget(self, namespace: str, name: str) -> None:
        if self._targets.pop((namespace, name), None) is not None:
            metrics.show_live_progress(namespace, name, None)

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while self._targets:
            started = loop.time()
            try:
                await self.poll_once()
            except Exception as exc:  # noqa: BLE001 - the next round tries again
                logger.warning("Reading live progress failed: %s", exc)
            await asyncio.sleep(max(0.0, self.interval - (loop.time() - started)))

    async def poll_once(self) -> None:
        """One round: every watched pod read once."""
        targets = dict(self._targets)
        if not targets:
            return
        limit = asyncio.Semaphore(MAX_CONCURRENT)
        timeout = aiohttp.ClientTimeout(total=TIMEOUT_SECONDS)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            await asyncio.gather(*(self._poll(session, limit, key, target)
                                   for key, target in targets.items()))

    async def _poll(self, session: aiohttp.ClientSession, limit: asyncio.Semaphore,
                    key: tuple[str, str], target: live_progress.Target) -> None:
        namespace, name = key
        async with limit:
            report = await fetch_report(session, target.url)
        if report is None:
            logger.debug("[%s/%s] No live progress from pod %s", namespace, name, target.pod)
        now = now_iso()
        shown: dict[str, Any] = {}

        def change(status: Mapping[str, Any]) -> dict[str, Any]:
            block = live_progress.refreshed(status, target.step, report, now, self.interval)
            shown["block"] = block
            return live_progress.with_progress(status, block)

        try:
            await self._update_status(namespace, name, change)
        except Exception as exc:  # noqa: BLE001 - an API error: the next round tries again
            logger.debug("[%s/%s] Cannot write live progress: %s", namespace, name, exc)
            return
        if self._targets.get(key) == target:
            metrics.show_live_progress(namespace, name, shown.get("block"))
