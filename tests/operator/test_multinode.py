"""Multi-node training: a failed node makes the operator start the train Job again (it resumes
from the last checkpoint), attempts counted; Kueue sees one suspended workload."""

from __future__ import annotations

import asyncio
import copy
import json

from operator_support import JOBS, Cluster, assert_rbac_allows_operator_requests, wait_for

from chatbot_operator.multinode import COMPLETION_INDEX

SPEC = {
    "trainingData": "https://example.com/chat.jsonl",
    "batchSize": 16,
    "nodes": 2,
    "gpu": {"count": 4},
    "workspace": {"accessMode": "ReadWriteMany", "storageClassName": "nfs"},
    "steps": {"train": {"backoffLimit": 1}},
}


async def run_until_train(cluster: Cluster, name: str) -> dict:
    for step in ("prepare", "configure"):
        job = await wait_for(lambda: cluster.job(name, step), message=f"{step} Job")
        await cluster.succeed(job)
    return await wait_for(lambda: cluster.job(name, "train"), message="train Job")


async def fail_node(cluster: Cluster, job: dict, index: int, terminated: dict) -> None:
    """The pod of one index fails; the Job controller fails the whole Job (podFailurePolicy)."""
    indexed = copy.deepcopy(job)
    indexed["spec"]["template"]["metadata"]["annotations"][COMPLETION_INDEX] = str(index)
    await cluster.run_pod(indexed, phase="Failed", suffix=f"{index}-x", state={"terminated": {
        "startedAt": "2026-01-01T00:00:00Z", "finishedAt": "2026-01-01T00:10:00Z", **terminated}})
    await cluster.fail(job, reason="PodFailurePolicy",
                       message=f"Container trainer for pod ml/{job['metadata']['name']}-{index}-x "
                               f"failed with exit code {terminated['exitCode']} matching FailJob rule")


def events(cluster: Cluster, name: str, reason: str) -> list[dict]:
    return [e for e in cluster.events(name) if e.get("reason") == reason]


async def test_a_failed_node_starts_the_train_job_again_and_the_run_goes_on(
        cluster: Cluster, start_operator):
    await start_operator()
    await cluster.apply_training("mn", SPEC)
    train = await run_until_train(cluster, "mn")
    assert train["spec"]["completionMode"] == "Indexed" and train["spec"]["completions"] == 2
    service = cluster.get("v1/services", "mn-train")
    assert service and service["spec"]["clusterIP"] == "None"
    status = await wait_for(lambda: cluster.status("mn").get("steps", {}).get("train")
                            and cluster.status("mn"), message="train status")
    assert status["steps"]["train"]["worldSize"] == 8 and status["steps"]["train"]["nodes"] == 2

    await fail_node(cluster, train, 1, {"exitCode": 1, "reason": "Error",
                                        "message": "RuntimeError: NCCL error: unhandled system error"})
    second = await wait_for(lambda: cluster.get(JOBS, "mn-train-2"), message="attempt 2")
    assert second["metadata"]["labels"]["chatbot.dev/attempt"] == "2"
    assert "mn-train-2-0.mn-train-2.ml.svc" in " ".join(
        second["spec"]["template"]["spec"]["containers"][0]["args"])
    assert cluster.get("v1/services", "mn-train-2")
    status = await wait_for(lambda: cluster.status("mn").get("steps", {}).get("train", {}).get(
        "attempts") == 2 and cluster.status("mn"), message="attempts 2")
    assert status["phase"] == "Running" and status["step"] == "train"
    assert status["steps"]["train"]["jobName"] == "mn-train-2"
    retrying = await wait_for(lambda: events(cluster, "mn", "StepRetrying"), message="StepRetrying")
    message = retrying[0]["message"]
    assert retrying[0]["type"] == "Warning"
    assert "attempt 1 of 2 failed: node 1 (pod mn-train-1-x) failed first" in message
    assert "NCCL error" in message and "resumes from the last checkpoint" in message

    await cluster.succeed(second, {"train_loss": 1.2})
    await wait_for(lambda: cluster.job("mn", "evaluate"), message="evaluate Job")
    status = await wait_for(lambda: cluster.status("mn").get("step") == "evaluate"
                            and cluster.status("mn"), message="step evaluate")
    assert status["steps"]["train"]["phase"] == "Succeeded"
    assert status["steps"]["train"]["attempts"] == 2
    await asyncio.sleep(1.2)  # a re-check round: nothing more is created for the train step
    assert cluster.emulator.count("POST", JOBS) == 5
    assert len(events(cluster, "mn", "StepRetrying")) == 1
    assert_rbac_allows_operator_requests(cluster)


async def test_no_attempts_left_or_a_permanent_failure_fails_the_run(cluster: Cluster, start_operator):
    await start_operator()
    await cluster.apply_training("last", {**SPEC, "steps": {"train": {"backoffLimit": 0}}})
    train = await run_until_train(cluster, "last")
    await fail_node(cluster, train, 0, {"exitCode": 137, "reason": "Error"})
    status = await wait_for(lambda: cluster.status("last").get("phase") == "Failed"
                            and cluster.status("last"), message="Failed")
    assert "attempt 1 of 1" in status["message"] and "node 0" in status["message"]
    assert cluster.get(JOBS, "last-train-2") is None

    await cluster.apply_training("bad", SPEC)
    train = await run_until_train(cluster, "bad")
    verdict = {"step": "train", "ok": False, "reason": "InvalidData", "message": "no conversation fits"}
    await fail_node(cluster, train, 1, {"exitCode": 2, "reason": "Error", "message": json.dumps(verdict)})
    status = await wait_for(lambda: cluster.status("bad").get("phase") == "Failed"
                            and cluster.status("bad"), message="Failed")
    assert status["reason"] == "InvalidData"
    await asyncio.sleep(1.2)
    assert cluster.get(JOBS, "bad-train-2") is None


async def test_a_queued_multi_node_train_job_waits_suspended_for_kueue(cluster: Cluster, start_operator):
    await start_operator()
    await cluster.apply_training("queued", {**SPEC, "queueName": "team-a"})
    train = await run_until_train(cluster, "queued")
    assert train["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    assert train["spec"]["suspend"] is True
    assert "kueue.x-k8s.io/job-min-parallelism" not in (train["metadata"].get("annotations") or {})
    status = await wait_for(lambda: cluster.status("queued").get("reason") == "Queued"
                            and cluster.status("queued"), message="Queued")
    assert "waiting for admission in queue team-a" in status["message"]
    await asyncio.sleep(1.2)  # the operator leaves admission to Kueue
    assert cluster.job("queued", "train")["spec"]["suspend"] is True
