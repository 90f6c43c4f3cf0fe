"""Operator configuration (environment and flags), entry points and RBAC rules."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import sys
from pathlib import Path

import aiohttp
import pytest

from operator_support import Cluster, wait_for

from chatbot_operator import rbac
from chatbot_operator.__main__ import build_parser, config_from_args, kopf_options
from chatbot_operator.settings import (
    DEFAULT_TRAINER_IMAGE,
    ConfigError,
    OperatorConfig,
    resync_seconds_from_env,
)

VENV_BIN = Path(sys.executable).parent


def test_defaults():
    config = OperatorConfig.from_env({})
    assert config.trainer_image == DEFAULT_TRAINER_IMAGE == "ghcr.io/chatbot-training/trainer:0.1.0"
    assert config.namespaces == () and config.clusterwide
    assert config.metrics_port == 8080 and config.health_port == 8081
    assert config.peering_name == "chatbot-operator" and not config.standalone
    assert config.step_uid == 1000
    assert config.default_node_selector == {} and config.default_tolerations == ()
    assert config.image_pull_policy is None
    assert resync_seconds_from_env({}) == 60.0


def test_environment():
    config = OperatorConfig.from_env({
        "CHATBOT_TRAINER_IMAGE": "registry.local/trainer:2",
        "CHATBOT_NAMESPACES": "ml, research,ml",
        "CHATBOT_METRICS_PORT": "9090",
        "CHATBOT_HEALTH_PORT": "9091",
        "CHATBOT_PEERING_NAME": "",
        "CHATBOT_DEFAULT_NODE_SELECTOR": '{"pool": "gpu"}',
        "CHATBOT_DEFAULT_TOLERATIONS": '[{"key": "gpu", "operator": "Exists"}]',
        "CHATBOT_IMAGE_PULL_POLICY": "Always",
        "CHATBOT_STEP_UID": "4242",
    })
    assert config.trainer_image == "registry.local/trainer:2"
    assert config.namespaces == ("ml", "research") and not config.clusterwide
    assert (config.metrics_port, config.health_port) == (9090, 9091)
    assert config.standalone
    assert config.default_node_selector == {"pool": "gpu"}
    assert config.default_tolerations == ({"key": "gpu", "operator": "Exists"},)
    assert config.image_pull_policy == "Always" and config.step_uid == 4242


@pytest.mark.parametrize("env, message", [
    ({"CHATBOT_DEFAULT_NODE_SELECTOR": "pool=gpu"}, "CHATBOT_DEFAULT_NODE_SELECTOR is not valid JSON"),
    ({"CHATBOT_DEFAULT_NODE_SELECTOR": '{"a": 1}'}, "JSON object of strings"),
    ({"CHATBOT_DEFAULT_TOLERATIONS": '{"key": "gpu"}'}, "JSON list of tolerations"),
    ({"CHATBOT_METRICS_PORT": "http"}, "CHATBOT_METRICS_PORT must be an integer"),
    ({"CHATBOT_STEP_UID": "0"}, "non-root"),
    ({"CHATBOT_IMAGE_PULL_POLICY": "Sometimes"}, "CHATBOT_IMAGE_PULL_POLICY must be one of"),
])
def test_invalid_environment_is_named(env, message):
    with pytest.raises(ConfigError, match=message):
        OperatorConfig.from_env(env)


def test_invalid_resync_interval():
    with pytest.raises(ConfigError, match="CHATBOT_RESYNC_SECONDS"):
        resync_seconds_from_env({"CHATBOT_RESYNC_SECONDS": "-1"})


def test_flags_override_the_environment():
    base = OperatorConfig.from_env({"CHATBOT_NAMESPACES": "ml", "CHATBOT_METRICS_PORT": "1"})
    args = build_parser().parse_args(["-n", "a", "--namespace", "b", "--metrics-port", "7000",
                                      "--health-port", "-1", "--standalone", "--verbose"])
    config = config_from_args(args, base)
    assert config.namespaces == ("a", "b") and config.metrics_port == 7000
    assert config.health_port == -1 and config.standalone
    assert config_from_args(build_parser().parse_args(["-A"]), base).clusterwide
    peered = config_from_args(build_parser().parse_args(["--peering", "p", "--priority", "7"]), base)
    assert peered.peering_name == "p" and peered.peering_priority == 7
    with pytest.raises(SystemExit):
        build_parser().parse_args(["-A", "-n", "x"])


def test_kopf_options():
    options = kopf_options(OperatorConfig(namespaces=("ml",), peering_priority=5))
    assert options == {"clusterwide": False, "namespaces": ["ml"], "standalone": False,
                       "peering_name": "chatbot-operator", "priority": 5,
                       "liveness_endpoint": "http://0.0.0.0:8081/healthz"}
    replica = kopf_options(OperatorConfig())
    assert replica["clusterwide"] is True and replica["priority"] >= 1  # random: one active
    alone = kopf_options(OperatorConfig(peering_name=None, health_port=-1))
    assert alone == {"clusterwide": True, "namespaces": [], "standalone": True}


def test_rbac_rules_are_least_privilege():
    verbs = {(group, resource): set(rule["verbs"])
             for rule in rbac.RBAC_RULES for group in rule["apiGroups"]
             for resource in rule["resources"]}
    assert verbs[("chatbot.dev", "chatbottrainings")] == {"get", "list", "watch", "patch"}
    assert verbs[("chatbot.dev", "chatbottrainings/status")] == {"patch"}
    assert verbs[("batch", "jobs")] == {"create", "list", "watch", "patch"}
    assert verbs[("", "pods")] <= {"get", "list", "watch"}
    assert verbs[("", "persistentvolumeclaims")] == {"create"}
    assert verbs[("", "events")] == {"create", "list"}  # post ours, read FailedCreate
    assert verbs[("kopf.dev", "clusterkopfpeerings")] == {"create", "list", "watch", "patch"}
    # The model's server (spec.serve): deleted when serving is turned off; nothing else is.
    assert verbs[("apps", "deployments")] == {"create", "get", "list", "watch", "patch", "delete"}
    assert verbs[("", "services")] == {"create", "delete"}
    assert {key for key, values in verbs.items() if "delete" in values} == {
        ("apps", "deployments"), ("", "services")}
    everything = {verb for values in verbs.values() for verb in values}
    assert not everything & {"deletecollection", "escalate", "bind", "impersonate", "*"}
    assert not any("*" in rule["apiGroups"] or "*" in rule["resources"] for rule in rbac.RBAC_RULES)
    assert rbac.allows("batch", "jobs", "create") and not rbac.allows("batch", "jobs", "delete")
    assert not rbac.allows("", "secrets", "get")


# ----------------------------------------------------------------------------- entry points


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


async def run_entry_point(cluster: Cluster, argv: list[str], env: dict[str, str],
                          check=None, name: str = "cli") -> str:
    """Run the operator as its own process: it must start the first step; then `check()`.
    Returns what it logged."""
    process = await asyncio.create_subprocess_exec(
        *argv, env={**os.environ, "OMP_NUM_THREADS": "1", **env},
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    logged = asyncio.create_task(process.stderr.read())
    try:
        await cluster.apply_training(name, {"trainingData": "/data/a.jsonl"})
        await wait_for(lambda: cluster.job(name, "prepare") or process.returncode is not None,
                       timeout=30, message="the operator process to create a Job")
        assert process.returncode is None, (await logged).decode()[-2000:]
        if check is not None:
            await check()
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), 20)
            except TimeoutError:
                process.kill()
                await process.wait()
    return (await logged).decode()


async def test_the_chatbot_operator_command_serves_metrics_and_health(cluster: Cluster):
    metrics, health = free_ports(2)
    env = {"KUBECONFIG": os.environ["KUBECONFIG"], "CHATBOT_TRAINER_IMAGE": "my/trainer:1"}
    argv = [str(VENV_BIN / "chatbot-operator"), "--standalone", "--all-namespaces",
            "--metrics-port", str(metrics), "--health-port", str(health)]

    async def check() -> None:
        job = cluster.job("cli", "prepare")
        assert job["spec"]["template"]["spec"]["containers"][0]["image"] == "my/trainer:1"
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{health}/healthz") as response:
                assert response.status == 200
            async with session.get(f"http://127.0.0.1:{metrics}/metrics") as response:
                text = await response.text()
        assert "chatbot_trainings" in text and "chatbot_reconcile_errors_total" in text

    await run_entry_point(cluster, argv, env, check)


async def test_kopf_run_with_the_handlers_module_works(cluster: Cluster):
    env = {"KUBECONFIG": os.environ["KUBECONFIG"], "CHATBOT_METRICS_PORT": "-1"}
    argv = [str(VENV_BIN / "kopf"), "run", "--standalone", "--all-namespaces",
            "-m", "chatbot_operator.handlers"]
    await run_entry_point(cluster, argv, env)


async def test_the_operator_creates_its_peering_object_and_names_the_object_in_its_logs(
        cluster: Cluster):
    """With peering (the default), the install manifests hold no peering object: the operator
    creates it, or Kopf would wait for it forever. A pod's routine events leave no line at
    INFO; with --verbose they do, at DEBUG, and every line about a training names it."""
    env = {"KUBECONFIG": os.environ["KUBECONFIG"], "CHATBOT_METRICS_PORT": "-1",
           "CHATBOT_HEALTH_PORT": "-1"}
    argv = [str(VENV_BIN / "chatbot-operator"), "--all-namespaces"]

    def check(name: str):
        async def steps() -> None:
            peering = cluster.get("kopf.dev/v1/clusterkopfpeerings", "chatbot-operator",
                                  namespace=None)
            assert peering is not None and peering["metadata"]["labels"][
                "app.kubernetes.io/managed-by"] == "chatbot-operator"
            job = cluster.job(name, "prepare")
            await cluster.run_pod(job, phase="Running", state={"running": {}})
            await cluster.succeed(job)
            await wait_for(lambda: cluster.job(name, "configure"), message="configure Job")
        return steps

    logs = await run_entry_point(cluster, argv, env, check("quiet"), name="quiet")
    assert "Handler 'step_pod_changed' succeeded" not in logs
    assert "Created ClusterKopfPeering chatbot-operator" in logs

    logs = await run_entry_point(cluster, argv + ["--verbose"], env, check("loud"), name="loud")
    routine = [line for line in logs.splitlines() if "Handler 'step_pod_changed' succeeded" in line]
    assert routine and all(re.search(r"\[DEBUG   \] \[ml/(loud|quiet)-", line)
                           for line in routine), routine
    about_objects = [line for line in logs.splitlines() if " kopf.objects " in line]
    assert about_objects and all(re.search(r"\] \[ml/(loud|quiet)", line) for line in about_objects)
