"""Changes that arrive while a reconciliation runs are never lost (no cluster: the reconciler's
triggers with its reading and writing replaced by a recorder)."""

from __future__ import annotations

import asyncio

import pytest

from chatbot_operator.reconciler import Reconciler, Seen
from chatbot_operator.settings import OperatorConfig

KEY = ("ml", "support-bot")


def seen_version(version: str):
    """A nudge's test: was the server Deployment's `version` already seen?"""
    return lambda seen: seen.versions.get("deployment-uid") == version


@pytest.fixture
def reconciler(monkeypatch):
    reconciler = Reconciler(client=None, config=OperatorConfig())  # type: ignore[arg-type]
    reconciler.runs = []
    reconciler.gate = asyncio.Event()

    async def recorded(namespace, name, fresh=None, report_later=False):
        reconciler.runs.append(name)
        if len(reconciler.runs) == 1:
            await reconciler.gate.wait()  # the first run is in flight while changes arrive
        reconciler._seen[KEY] = Seen(uid="training-uid", versions={"deployment-uid": "1"})
        return {}

    monkeypatch.setattr(reconciler, "_reconcile", recorded)
    return reconciler


async def settle():
    for _ in range(5):
        await asyncio.sleep(0)


async def test_a_change_folded_into_a_waiting_run_is_not_skipped_with_it(reconciler):
    """The server's Deployment is created (version 1) by a run still in flight, then becomes
    ready (version 2): the run waiting for the version-1 event must not skip version 2's."""
    first = asyncio.create_task(reconciler.reconcile(*KEY))
    await settle()
    created = asyncio.create_task(reconciler.nudge(*KEY, unless=seen_version("1")))
    await settle()
    await reconciler.nudge(*KEY, unless=seen_version("2"))  # folded into the waiting run
    reconciler.gate.set()
    await asyncio.gather(first, created)
    assert reconciler.runs == ["support-bot", "support-bot"]


async def test_a_waiting_run_whose_changes_were_all_seen_is_skipped(reconciler):
    first = asyncio.create_task(reconciler.reconcile(*KEY))
    await settle()
    waiting = asyncio.create_task(reconciler.nudge(*KEY, unless=seen_version("1")))
    await settle()
    await reconciler.nudge(*KEY, unless=seen_version("1"))
    reconciler.gate.set()
    await asyncio.gather(first, waiting)
    assert reconciler.runs == ["support-bot"]
    assert KEY not in reconciler._folded
