"""The operator image, started as the chart's Deployment starts it, against the Kubernetes API
emulator of tests/operator.

The container gets the Deployment's env (rendered by the real helm from the chart, with the
trainer image set to the one these tests build), uid/gid 1000, a read-only root filesystem,
dropped capabilities and the 64 MiB tmpfs /tmp. What differs from a cluster: the API server is
the emulator on 127.0.0.1 (the container shares the host's network and gets a kubeconfig
instead of a service account token), and the metrics and health ports are free ports of this
machine instead of 8080/8081. It must answer its health probe, take the peering lock, and
reconcile one ChatbotTraining to its first step Job, with the trainer image and the step
contract the trainer image implements.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from images_support import BUILD_TIMEOUT, REPO_ROOT, Engine, Sources, images_sh, in_ci, run_args

pytestmark = [pytest.mark.images, pytest.mark.timeout(BUILD_TIMEOUT + 600)]

sys.path.insert(0, str(REPO_ROOT / "tests" / "operator"))
sys.path.insert(0, str(REPO_ROOT / "tests" / "deploy"))

import kmock  # noqa: E402
from kmock._internal import parsing as kmock_parsing  # noqa: E402
from operator_support import (  # noqa: E402
    Cluster, ClusterEmulator, _parse_path, assert_rbac_allows_operator_requests,
)

from chatbot_operator import manifests  # noqa: E402

RELEASE_NAMESPACE = "chatbot-training"
NAME = "support-bot"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def helm(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    proc = subprocess.run(["bash", str(REPO_ROOT / "scripts" / "get-helm.sh")],
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        message = f"scripts/get-helm.sh could not provide helm:\n{proc.stdout}\n{proc.stderr}"
        if in_ci():
            pytest.fail(message)
        pytest.skip(message)
    home = tmp_path_factory.mktemp("helm-home")
    env = {**os.environ, "HOME": str(home), "HELM_CACHE_HOME": str(home / "cache"),
           "HELM_CONFIG_HOME": str(home / "config"), "HELM_DATA_HOME": str(home / "data"),
           "KUBECONFIG": str(home / "no-kubeconfig")}
    return REPO_ROOT / ".cache" / "bin" / "helm", env


def deployment(helm: tuple[Path, dict[str, str]], trainer_image: str) -> dict[str, Any]:
    """The chart's operator Deployment, with the trainer image these tests build."""
    repository, _, tag = trainer_image.rpartition(":")
    binary, env = helm
    proc = subprocess.run(
        [str(binary), "template", "chatbot-training", str(REPO_ROOT / "helm" / "chatbot-training"),
         "--namespace", RELEASE_NAMESPACE, "--set", f"trainer.image.repository={repository}",
         "--set", f"trainer.image.tag={tag}"],
        env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    (found,) = [d for d in yaml.safe_load_all(proc.stdout) if d and d.get("kind") == "Deployment"]
    return found


def kubeconfig(server_url: str) -> str:
    return yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "emulator",
        "clusters": [{"name": "emulator", "cluster": {"server": server_url}}],
        "users": [{"name": "operator", "user": {"token": "test-token"}}],
        "contexts": [{"name": "emulator", "context": {"cluster": "emulator", "user": "operator"}}],
    })


async def wait_for(predicate, timeout: float, message: str, process: subprocess.Popen, log: Path) -> Any:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = await predicate() if asyncio.iscoroutinefunction(predicate) else predicate()
        if value:
            return value
        if process.poll() is not None:
            raise AssertionError(f"the operator container exited {process.returncode} while waiting "
                                 f"for {message}:\n{log.read_text()[-5000:]}")
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {message}:\n"
                                 f"{log.read_text()[-5000:]}")
        await asyncio.sleep(0.2)


async def test_operator_image_reconciles_a_training_to_its_first_job(
        engine: Engine, operator_image: str, helm, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    trainer_image = images_sh("name", "--torch", "cpu", "trainer").stdout.strip()
    operator = deployment(helm, trainer_image)
    pod = operator["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["image"] == operator_image, "the chart's default image is the one built"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True

    monkeypatch.setattr(kmock_parsing, "parse_path", _parse_path)
    metrics_port, health_port = free_port(), free_port()
    name = f"chatbot-test-operator-{uuid.uuid4().hex[:8]}"
    log = tmp_path / "operator.log"
    async with ClusterEmulator() as emulator, kmock.Server(emulator) as server:
        emulator.register_builtins()
        url = str(server.url).rstrip("/")
        assert "127.0.0.1" in url, url
        config_dir = tmp_path / "kube"
        config_dir.mkdir()
        (config_dir / "config").write_text(kubeconfig(url))
        (config_dir / "config").chmod(0o644)
        args = run_args(
            engine, pod, Sources(field_refs={"metadata.name": name,
                                             "metadata.namespace": RELEASE_NAMESPACE}),
            name=name, network="host",
            env_overrides={"CHATBOT_METRICS_PORT": str(metrics_port),
                           "CHATBOT_HEALTH_PORT": str(health_port)},
            extra_env={"KUBECONFIG": "/etc/chatbot-test/kubeconfig/config"},
            extra_mounts=[f"{config_dir}:/etc/chatbot-test/kubeconfig:ro"])
        process = engine.popen(*args, log=log)
        connector = aiohttp.TCPConnector(force_close=True)
        try:
            async with aiohttp.ClientSession(base_url=url, connector=connector) as session, \
                    aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as probe:
                cluster = Cluster(emulator, session)

                async def healthy() -> bool:
                    try:
                        async with probe.get(f"http://127.0.0.1:{health_port}/healthz") as response:
                            return response.status == 200
                    except aiohttp.ClientError:
                        return False

                await wait_for(healthy, 120, "/healthz (the Deployment's probes)", process, log)
                peering = operator_peering(cluster, container)
                await wait_for(peering, 60, "the operator's peering object", process, log)

                spec = {"trainingData": "/opt/chatbot/examples/data/support.jsonl",
                        "modelType": "smollm", "trainingSteps": 3, "gpu": {"count": 0}}
                await cluster.apply_training(NAME, spec)
                job = await wait_for(lambda: cluster.job(NAME, "prepare"), 60,
                                     "the prepare Job", process, log)
                status = await wait_for(lambda: cluster.status(NAME).get("phase"), 30,
                                        "the training's status", process, log)

                async with probe.get(f"http://127.0.0.1:{metrics_port}/metrics") as response:
                    assert response.status == 200
                    metrics = await response.text()
                training = cluster.training(NAME)
                config_map = cluster.get("v1/configmaps", manifests.config_map_name(NAME))
                assert_rbac_allows_operator_requests(cluster)  # the chart's RBAC suffices
        finally:
            stop = await asyncio.to_thread(engine.run, "stop", "--time", "20", name, timeout=120)
            try:
                await asyncio.to_thread(process.wait, 60)
            finally:
                engine.remove(name)
        assert stop.returncode == 0, stop.stderr

    # The first Job: the trainer image, the step contract, the step pods' security settings.
    step_container = job["spec"]["template"]["spec"]["containers"][0]
    assert step_container["image"] == trainer_image
    assert step_container["args"][:1] == ["prepare"]
    assert step_container["args"][1:] == ["--workspace", manifests.WORKSPACE_DIR,
                                          "--config", manifests.CONFIG_PATH]
    assert step_container["terminationMessagePath"] == manifests.TERMINATION_LOG
    assert step_container["securityContext"]["readOnlyRootFilesystem"] is True
    assert job["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == 1000
    assert json.loads(config_map["data"][manifests.CONFIG_KEY])["name"] == NAME
    assert job["metadata"]["ownerReferences"][0]["uid"] == training["metadata"]["uid"]
    assert status in ("Pending", "Running"), status
    assert "chatbot" in metrics
    # SIGTERM (as the kubelet stops a pod) ends Kopf cleanly within the grace period.
    assert process.returncode == 0, log.read_text()[-5000:]


def operator_peering(cluster: Cluster, container: dict[str, Any]):
    env = {e["name"]: e.get("value") for e in container["env"]}
    peering = env.get("CHATBOT_PEERING_NAME")
    namespaces = env.get("CHATBOT_NAMESPACES")

    def found() -> bool:
        if not peering:
            return True
        if namespaces:
            return cluster.get("kopf.dev/v1/kopfpeerings", peering,
                               namespace=namespaces.split(",")[0]) is not None
        return cluster.get("kopf.dev/v1/clusterkopfpeerings", peering, namespace=None) is not None

    return found
