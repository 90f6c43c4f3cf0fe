"""spec.suspend: no new work while true, the running Job suspended; false resumes."""

from __future__ import annotations

import asyncio

from operator_support import JOBS, Cluster, wait_for


def conditions(status: dict) -> dict:
    return {c["type"]: c for c in status.get("conditions", [])}


async def test_a_training_created_suspended_starts_only_when_resumed(cluster: Cluster, start_operator):
    await start_operator()
    await cluster.apply_training("later", {"trainingData": "/data/a.jsonl", "suspend": True})
    status = await wait_for(lambda: cluster.status("later").get("phase") == "Suspended"
                            and cluster.status("later"), message="Suspended")
    assert conditions(status)["Suspended"]["status"] == "True"
    assert conditions(status)["Progressing"]["status"] == "False"
    await asyncio.sleep(1.2)  # a re-check round
    assert cluster.emulator.count("POST", JOBS) == 0

    await cluster.patch_training("later", {"spec": {"suspend": False}})
    job = await wait_for(lambda: cluster.job("later", "prepare"), message="prepare Job")
    assert job["spec"]["suspend"] is False
    status = await wait_for(lambda: cluster.status("later").get("phase") == "Pending"
                            and cluster.status("later"), message="Pending")
    assert conditions(status)["Suspended"]["status"] == "False"
    assert status["observedGeneration"] == 2
    await wait_for(lambda: {"Suspended", "Resumed"} <= {e["reason"] for e in cluster.events("later")},
                   message="Suspended and Resumed events")


async def test_suspending_a_running_training_suspends_its_job_and_resuming_continues(
        cluster: Cluster, start_operator):
    await start_operator()
    await cluster.apply_training("pause", {"trainingData": "/data/a.jsonl"})
    prepare = await wait_for(lambda: cluster.job("pause", "prepare"), message="prepare Job")
    await cluster.run_pod(prepare, phase="Running", state={"running": {"startedAt": "now"}})
    await wait_for(lambda: cluster.status("pause").get("phase") == "Running", message="Running")

    await cluster.patch_training("pause", {"spec": {"suspend": True}})
    job = await wait_for(lambda: (j := cluster.job("pause", "prepare"))["spec"]["suspend"] and j,
                         message="Job suspended")
    assert job["metadata"]["annotations"]["chatbot.dev/suspended-by-operator"] == "true"
    status = await wait_for(lambda: cluster.status("pause").get("phase") == "Suspended"
                            and cluster.status("pause"), message="Suspended")
    assert status["step"] == "prepare"
    assert conditions(status)["Suspended"]["status"] == "True"

    # The step happened to finish just before the suspension: nothing new starts.
    await cluster.succeed(prepare)
    await asyncio.sleep(1.2)
    assert cluster.job("pause", "configure") is None
    assert cluster.status("pause")["phase"] == "Suspended"

    await cluster.patch_training("pause", {"spec": {"suspend": False}})
    configure = await wait_for(lambda: cluster.job("pause", "configure"), message="configure Job")
    assert configure["spec"]["suspend"] is False
    await wait_for(lambda: cluster.status("pause").get("phase") == "Running", message="Running")


async def test_resuming_unsuspends_the_job_the_operator_suspended(cluster: Cluster, start_operator):
    await start_operator()
    await cluster.apply_training("again", {"trainingData": "/data/a.jsonl"})
    await wait_for(lambda: cluster.job("again", "prepare"), message="prepare Job")
    await cluster.patch_training("again", {"spec": {"suspend": True}})
    await wait_for(lambda: cluster.job("again", "prepare")["spec"]["suspend"], message="suspended")
    await cluster.patch_training("again", {"spec": {"suspend": False}})
    job = await wait_for(lambda: (j := cluster.job("again", "prepare"))["spec"]["suspend"] is False
                         and j, message="unsuspended")
    assert "chatbot.dev/suspended-by-operator" not in job["metadata"].get("annotations", {})
    assert cluster.emulator.count("POST", JOBS) == 1


async def test_a_job_suspended_by_a_queue_is_left_to_the_queue(cluster: Cluster, start_operator):
    await start_operator()
    await cluster.apply_training("queued", {"trainingData": "/data/a.jsonl", "queueName": "gpu-queue"})
    job = await wait_for(lambda: cluster.job("queued", "prepare"), message="prepare Job")
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"
    # Kueue suspends the Job until the workload is admitted.
    await cluster.call("PATCH", f"/apis/batch/v1/namespaces/ml/jobs/{job['metadata']['name']}",
                       {"spec": {"suspend": True}})
    status = await wait_for(lambda: cluster.status("queued").get("reason") == "Queued"
                            and cluster.status("queued"), message="Queued")
    assert "gpu-queue" in status["message"]
    await asyncio.sleep(1.2)
    assert cluster.job("queued", "prepare")["spec"]["suspend"] is True
