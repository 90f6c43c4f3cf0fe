"""The train step on several processes: torchrun on one node, an Indexed Job on several."""

from __future__ import annotations

import re

import pytest

from chatbot_api.spec import ChatbotTrainingSpec
from chatbot_operator import manifests, multinode
from chatbot_operator.settings import OperatorConfig

TRAINING = {
    "apiVersion": "chatbot.dev/v1alpha1", "kind": "ChatbotTraining",
    "metadata": {"name": "support-bot", "namespace": "ml", "uid": "1234-abcd"},
}
CONFIG = OperatorConfig(trainer_image="ghcr.io/chatbot-training/trainer:0.1.0")
SHARED = {"accessMode": "ReadWriteMany", "storageClassName": "nfs"}
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def spec(**fields) -> ChatbotTrainingSpec:
    return ChatbotTrainingSpec.model_validate({"trainingData": "/data/chat.jsonl", **fields})


def objects(step: str = "train", training: dict = TRAINING, attempt: int = 1, **fields) -> list[dict]:
    return multinode.step_objects(training, spec(**fields), step, CONFIG, attempt)


def two_nodes(attempt: int = 1, **fields) -> tuple[dict, dict]:
    service, job = objects(attempt=attempt, nodes=2, gpu={"count": 4}, workspace=SHARED, **fields)
    return service, job


def test_one_gpu_and_one_node_keep_todays_plain_job():
    for fields in ({}, {"gpu": {"count": 1}}, {"gpu": {"count": 0}}):
        (job,) = objects(**fields)
        assert job == manifests.step_job(TRAINING, spec(**fields), "train", CONFIG)
        container = job["spec"]["template"]["spec"]["containers"][0]
        assert "command" not in container  # the image's entrypoint: chatbot-trainer
        assert container["args"][0] == "train"


def test_every_gpu_of_a_node_gets_a_process_through_torchrun():
    (job,) = objects(gpu={"count": 4})
    assert job["metadata"]["name"] == "support-bot-train"
    assert job["spec"]["completions"] == 1 and "completionMode" not in job["spec"]
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["python", "-m", "chatbot_trainer.launch"]
    assert container["args"] == [
        "--standalone", "--nproc-per-node=4", "-m", "chatbot_trainer.cli",
        "train", "--workspace", "/workspace", "--config", "/etc/chatbot/config.json"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "4"
    # Evaluate and the other steps stay single-process.
    (evaluate,) = objects("evaluate", gpu={"count": 4})
    assert "command" not in evaluate["spec"]["template"]["spec"]["containers"][0]


def test_two_nodes_of_four_gpus_make_an_indexed_job_and_a_headless_service():
    service, job = two_nodes()
    name = job["metadata"]["name"]
    assert name == "support-bot-train"
    assert job["metadata"]["labels"]["chatbot.dev/attempt"] == "1"
    job_spec = job["spec"]
    assert job_spec["completionMode"] == "Indexed"
    assert job_spec["completions"] == job_spec["parallelism"] == 2
    assert job_spec["backoffLimit"] == 0
    rules = job_spec["podFailurePolicy"]["rules"]
    assert {"action": "FailJob", "onExitCodes": {"containerName": "trainer", "operator": "NotIn",
                                                 "values": [0]}} in rules
    assert {"action": "FailJob", "onPodConditions": [
        {"type": "DisruptionTarget", "status": "True"}]} in rules
    assert all(rule["action"] == "FailJob" for rule in rules)  # any failed pod fails the Job

    pod = job_spec["template"]["spec"]
    assert pod["subdomain"] == service["metadata"]["name"]
    container = pod["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "4"  # per node
    assert container["command"] == ["python", "-m", "chatbot_trainer.launch"]
    master = f"{name}-0.{service['metadata']['name']}.ml.svc"
    assert container["args"] == [
        "--nnodes=2", "--nproc-per-node=4", "--node-rank=$(JOB_COMPLETION_INDEX)",
        f"--master-addr={master}", "--master-port=29500", "-m", "chatbot_trainer.cli",
        "train", "--workspace", "/workspace", "--config", "/etc/chatbot/config.json"]
    env = {e["name"]: e for e in container["env"]}
    assert env["JOB_COMPLETION_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"] == (
        "metadata.annotations['batch.kubernetes.io/job-completion-index']")
    assert container["ports"] == [{"name": "progress", "containerPort": 8470, "protocol": "TCP"},
                                  {"name": "rendezvous", "containerPort": 29500}]
    assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == "support-bot-workspace"

    assert service["kind"] == "Service" and service["metadata"]["namespace"] == "ml"
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True
    assert service["spec"]["selector"] == {"batch.kubernetes.io/job-name": name}
    assert service["spec"]["ports"] == [{"name": "rendezvous", "port": 29500, "targetPort": 29500}]
    assert service["metadata"]["ownerReferences"][0]["uid"] == "1234-abcd"


def test_later_attempts_get_their_own_job_and_service():
    service, job = two_nodes(attempt=3)
    assert job["metadata"]["name"] == "support-bot-train-3"
    assert job["metadata"]["labels"]["chatbot.dev/attempt"] == "3"
    assert service["spec"]["selector"] == {"batch.kubernetes.io/job-name": "support-bot-train-3"}
    assert multinode.matches_step_job("support-bot", "train", job)
    assert not multinode.matches_step_job("other-bot", "train", job)


@pytest.mark.parametrize("name", ["a" * 53, "1" + "b" * 52, "team.bot-" + "c" * 44])
def test_names_fit_in_63_characters_and_are_dns_labels(name):
    training = {**TRAINING, "metadata": {**TRAINING["metadata"], "name": name}}
    for attempt in (1, 2, 21):
        service, job = objects(training=training, attempt=attempt, nodes=64, gpu={"count": 8}, batchSize=512,
                               workspace=SHARED)
        job_name = job["metadata"]["name"]
        assert len(job_name) <= 60 and DNS_LABEL.match(job_name)
        assert len(f"{job_name}-63") <= 63  # the last pod's hostname
        assert DNS_1035.match(service["metadata"]["name"]) and len(service["metadata"]["name"]) <= 63
        assert job["spec"]["template"]["spec"]["subdomain"] == service["metadata"]["name"]
        assert multinode.matches_step_job(name, "train", job)
        assert multinode.train_job_name(name, spec(nodes=2, workspace=SHARED), attempt) == job_name


def test_a_queued_train_job_is_one_suspended_kueue_workload_without_partial_admission():
    service, job = two_nodes(queueName="team-a")
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    assert job["spec"]["suspend"] is True
    annotations = job["metadata"].get("annotations") or {}
    assert "kueue.x-k8s.io/job-min-parallelism" not in annotations
    assert "kueue.x-k8s.io/queue-name" not in service["metadata"]["labels"]
    (plain,) = objects("prepare", queueName="team-a")
    assert plain["spec"]["suspend"] is True
    (unqueued,) = objects("prepare")
    assert unqueued["spec"]["suspend"] is False


def test_world_size():
    assert multinode.world_size(spec(nodes=2, gpu={"count": 4}, workspace=SHARED)) == 8
    assert multinode.world_size(spec(gpu={"count": 0})) == 1
    assert multinode.world_size(spec(nodes=3, gpu={"count": 0}, workspace=SHARED, batchSize=9)) == 3


def test_the_two_node_objects_pass_the_kubernetes_schemas():
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    for obj in two_nodes(queueName="team-a"):
        kubernetes_validate.validate(obj, "1.33", strict=True)


def test_the_live_progress_port_stays_beside_the_rendezvous_port():
    """The operator reads live progress from the train pod's `progress` port on one node as on
    several; an operator run without it gets the rendezvous port alone."""
    one_node = objects(gpu={"count": 2})[0]["spec"]["template"]["spec"]["containers"][0]
    _, job = two_nodes()
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert [p for p in container["ports"] if p["name"] == manifests.PROGRESS_PORT_NAME] == one_node["ports"]
    assert {e["name"] for e in container["env"]} >= {"CHATBOT_PROGRESS_PORT"}
    without = multinode.step_objects(TRAINING, spec(nodes=2, workspace=SHARED), "train",
                                     OperatorConfig(trainer_image="t:1", progress_port=0))[1]
    assert without["spec"]["template"]["spec"]["containers"][0]["ports"] == [
        {"name": "rendezvous", "containerPort": 29500}]
