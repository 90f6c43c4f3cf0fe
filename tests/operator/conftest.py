"""Operator tests: the real Kopf operator, in-process, against a Kubernetes API emulator
(see operator_support.py for what the emulator models and what it does not)."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
from pathlib import Path
from typing import Any

import aiohttp
import kmock
import kubernetes.config.kube_config
import kopf
import pytest
import yaml
from kmock._internal import parsing as kmock_parsing

# The tests import their helpers from operator_support.py beside this file (pytest runs with
# --import-mode=importlib, which puts no test folder on sys.path).
sys.path.insert(0, str(Path(__file__).resolve().parent))

from operator_support import Cluster, ClusterEmulator, _parse_path  # noqa: E402

# The re-check timer's interval is fixed when the handlers are registered (at import).
os.environ.setdefault("CHATBOT_RESYNC_SECONDS", "1")
import chatbot_operator.handlers  # noqa: E402,F401 - registers the handlers in Kopf's registry
from chatbot_operator.settings import OperatorConfig  # noqa: E402


# ------------------------------------------------------------------------- fixtures


@pytest.fixture()
def emulator_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kmock_parsing, "parse_path", _parse_path)


@pytest.fixture()
async def cluster(emulator_paths: None, tmp_path: Path,
                  monkeypatch: pytest.MonkeyPatch) -> Any:
    """The emulated cluster on a local port, with a kubeconfig pointing at it."""
    async with ClusterEmulator() as emulator, kmock.Server(emulator) as server:
        emulator.register_builtins()
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "emulator",
            "clusters": [{"name": "emulator", "cluster": {"server": str(server.url).rstrip("/")}}],
            "users": [{"name": "tester", "user": {"token": "test-token"}}],
            "contexts": [{"name": "emulator",
                          "context": {"cluster": "emulator", "user": "tester"}}],
        }))
        monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
        # The kubernetes client reads $KUBECONFIG once, at import.
        monkeypatch.setattr(kubernetes.config.kube_config, "KUBE_CONFIG_DEFAULT_LOCATION",
                            str(kubeconfig))
        monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(base_url=str(server.url), connector=connector) as session:
            yield Cluster(emulator, session)


def fast_settings() -> kopf.OperatorSettings:
    """Kopf settings for fast tests: short backoffs, no idle waiting."""
    settings = kopf.OperatorSettings()
    settings.watching.reconnect_backoff = 0.05
    settings.watching.inactivity_timeout = 300
    settings.queueing.idle_timeout = 0.5
    settings.queueing.exit_timeout = 0.5
    settings.networking.error_backoffs = [0.1, 0.2, 0.5]
    settings.posting.default_backoffs = [0.1, 0.2]
    settings.posting.idle_timeout = 0.2
    settings.process.ultimate_exiting_timeout = 10
    return settings


class OperatorRun:
    """The operator in its own thread and event loop, as in its own process."""

    def __init__(self, config: OperatorConfig) -> None:
        self.config = config
        self.memo = kopf.Memo(config=config)
        self.stop_flag = threading.Event()
        self.ready_flag = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._main, name="operator", daemon=True)

    def _main(self) -> None:
        try:
            asyncio.run(kopf.operator(
                registry=kopf.get_default_registry(), settings=fast_settings(), memo=self.memo,
                standalone=True, clusterwide=self.config.clusterwide,
                namespaces=list(self.config.namespaces),
                stop_flag=self.stop_flag, ready_flag=self.ready_flag,
            ))
        except BaseException as exc:  # noqa: BLE001 - reported by start()/stop()
            self.error = exc

    async def start(self) -> "OperatorRun":
        self.thread.start()
        await asyncio.to_thread(
            lambda: self.ready_flag.wait(15) or not self.thread.is_alive())
        if self.error is not None:
            raise self.error
        assert self.ready_flag.is_set(), "the operator did not start within 15 s"
        return self

    async def stop(self) -> None:
        self.stop_flag.set()
        await asyncio.to_thread(self.thread.join, 15)
        assert not self.thread.is_alive(), "the operator did not stop within 15 s"
        if self.error is not None:
            raise self.error


@pytest.fixture()
async def start_operator(cluster: Cluster) -> Any:
    """Start the real operator (Kopf + the chatbot handlers) against the emulated cluster."""
    runs: list[OperatorRun] = []

    async def start(**overrides: Any) -> OperatorRun:
        values = {"metrics_port": 0, "health_port": -1, "peering_name": None,
                  **overrides}
        run = OperatorRun(OperatorConfig(**values))
        runs.append(run)
        return await run.start()

    yield start
    for run in runs:
        if run.thread.is_alive():
            await run.stop()
