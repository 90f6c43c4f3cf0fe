"""The server Deployment's llama-server arguments and draining, from spec.serve (pure)."""

from __future__ import annotations

import pytest

from chatbot_api.spec import ChatbotTrainingSpec
from chatbot_operator import serving
from chatbot_operator.settings import OperatorConfig

TRAINING = {"apiVersion": "chatbot.dev/v1alpha1", "kind": "ChatbotTraining",
            "metadata": {"name": "support-bot", "namespace": "ml", "uid": "1234-abcd"}}
FILE = {"path": "pvc://models/support-bot/support-bot.q8_0.gguf", "quantization": "q8_0"}
BASE = ["-m", "/models/x.gguf", "--host", "0.0.0.0", "--port", "8080", "--metrics",
        "--alias", "support-bot"]


def spec(**serve) -> ChatbotTrainingSpec:
    return ChatbotTrainingSpec.model_validate({"trainingData": "/data/chat.jsonl",
                                               "serve": {"enabled": True, **serve}})


def args(**serve) -> list[str]:
    return serving.server_args("support-bot", spec(**serve), "/models/x.gguf")


def flags(**serve) -> dict[str, str]:
    rest = args(**serve)[len(BASE):]
    return dict(zip(rest[::2], rest[1::2]))


def test_defaults_four_slots_sharing_the_context_and_no_thread_count():
    assert args() == BASE + ["-c", "4096", "-np", "4", "--threads-http", "8"]
    assert serving.slot_context(spec()) == 1024


@pytest.mark.parametrize("resources, threads", [
    ({"limits": {"cpu": "2"}, "requests": {"cpu": "1"}}, "2"),  # the limit first
    ({"requests": {"cpu": "3"}}, "3"),                           # else the request
    ({"limits": {"cpu": "2500m"}}, "2"),                         # whole CPUs, rounded down
    ({"limits": {"cpu": "500m"}}, "1"),                          # at least one
    ({"requests": {"memory": "1Gi"}}, None),                     # no CPU: llama.cpp's choice
])
def test_threads_follow_the_cpu_of_the_pod(resources, threads):
    assert flags(resources=resources).get("-t") == threads


def test_parallel_and_context_give_the_slots():
    found = flags(parallel=2, contextSize=8192)
    assert (found["-c"], found["-np"], found["--threads-http"]) == ("8192", "2", "6")
    assert serving.slot_context(spec(parallel=2, contextSize=8192)) == 4096


def test_extra_args_replace_the_derived_flags():
    found = args(parallel=2, resources={"limits": {"cpu": "4"}},
                 extraArgs=["--parallel", "8", "--threads", "3", "--ctx-size", "16384"])
    assert found == BASE + ["--threads-http", "6", "--parallel", "8", "--threads", "3",
                            "--ctx-size", "16384"]


def test_gpu_offload_comes_before_extra_args():
    assert args(gpus=1, extraArgs=["--flash-attn", "on"])[-4:] == ["-ngl", "999", "--flash-attn",
                                                                  "on"]


def test_cpu_quantities():
    assert serving.cpu_quantity("250m") == 0.25 and serving.cpu_quantity(2) == 2.0
    assert serving.cpu_quantity("1.5") == 1.5 and serving.cpu_quantity("lots") is None


def deployment(**serve) -> dict:
    return serving.deployment(TRAINING, spec(**serve), OperatorConfig(), FILE)


def test_draining_a_pod_waits_before_sigterm_within_the_grace_period():
    pod = deployment()["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == 30
    assert pod["containers"][0]["lifecycle"] == {"preStop": {"sleep": {"seconds": 20}}}
    pod = deployment(drainSeconds=120)["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == 130
    assert pod["containers"][0]["lifecycle"]["preStop"]["sleep"]["seconds"] == 120
    pod = deployment(drainSeconds=0)["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == 10 and "lifecycle" not in pod["containers"][0]


def test_a_change_of_parallel_rolls_the_deployment():
    hash_key = serving.ANNOTATION_SPEC_HASH
    assert deployment(parallel=2)["metadata"]["annotations"][hash_key] != \
        deployment()["metadata"]["annotations"][hash_key]


def test_the_deployment_is_valid_kubernetes_1_37():
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    body = deployment(parallel=2, drainSeconds=45, resources={"limits": {"cpu": "2"}})
    kubernetes_validate.validate(body, "1.37", strict=True)
