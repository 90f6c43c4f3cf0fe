"""Failures and stalls are reported with their cause and a fix, from the Pod and the Job."""

from __future__ import annotations

import asyncio
import json

import kmock

from operator_support import JOBS, Cluster, assert_rbac_allows_operator_requests, wait_for

SPEC = {
    "trainingData": "https://example.com/chat.jsonl",
    "batchSize": 16,
    "gpu": {"count": 1},
    "nodeSelector": {"nvidia.com/gpu.product": "H100"},
    "resources": {"limits": {"memory": "16Gi"}},
    "steps": {"train": {"activeDeadlineSeconds": 7200, "backoffLimit": 1}},
}


async def run_until(cluster: Cluster, name: str, step: str) -> dict:
    """Let the steps before `step` succeed; return `step`'s Job."""
    from chatbot_api.spec import STEPS
    for earlier in STEPS[: STEPS.index(step)]:
        job = await wait_for(lambda: cluster.job(name, earlier), message=f"{earlier} Job")
        await cluster.succeed(job, {"metrics": {"loss": 0.5}} if earlier == "evaluate" else {})
    return await wait_for(lambda: cluster.job(name, step), message=f"{step} Job")


def conditions(status: dict) -> dict:
    return {c["type"]: c for c in status.get("conditions", [])}


async def test_an_oom_killed_train_step_fails_the_run_with_advice(cluster: Cluster, start_operator):
    await start_operator()
    await cluster.apply_training("oom", SPEC)
    train = await run_until(cluster, "oom", "train")
    assert train["spec"]["backoffLimit"] == 1
    assert train["spec"]["activeDeadlineSeconds"] == 7200
    await cluster.fail(train, reason="BackoffLimitExceeded", failed=2,
                       message="Job has reached the specified backoff limit",
                       terminated={"exitCode": 137, "reason": "OOMKilled"})

    status = await wait_for(lambda: cluster.status("oom").get("phase") == "Failed"
                            and cluster.status("oom"), message="Failed")
    assert status["step"] == "train"
    assert status["reason"] == "OOMKilled"
    assert "reduce batchSize (or set microBatchSize)" in status["message"]
    assert "16Gi" in status["message"]
    assert status["steps"]["train"]["phase"] == "Failed"
    assert status["steps"]["train"]["reason"] == "OOMKilled"
    cond = conditions(status)
    assert cond["Failed"]["status"] == "True" and cond["Failed"]["reason"] == "OOMKilled"
    assert cond["Ready"]["status"] == "False" and cond["Progressing"]["status"] == "False"
    assert status["completionTime"]
    warnings = await wait_for(lambda: [e for e in cluster.events("oom") if e["type"] == "Warning"]
                              and len([e for e in cluster.events("oom")
                                       if e["type"] == "Warning"]) >= 2
                              and [e for e in cluster.events("oom") if e["type"] == "Warning"],
                              message="warning events")
    assert {e["reason"] for e in warnings} >= {"StepFailed", "OOMKilled"}
    await asyncio.sleep(1.2)  # a re-check round: a failed run creates nothing more
    assert cluster.job("oom", "evaluate") is None


async def test_a_quality_threshold_miss_fails_the_run_with_the_trainers_reason(
        cluster: Cluster, start_operator):
    await start_operator()
    await cluster.apply_training("weak", {**SPEC, "evaluation": {"minAccuracy": 0.8}})
    evaluate = await run_until(cluster, "weak", "evaluate")
    verdict = {"step": "evaluate", "ok": False, "reason": "QualityThresholdNotMet",
               "message": "accuracy 0.31 is below evaluation.minAccuracy 0.8: train longer "
                          "or use more data"}
    await cluster.fail(evaluate, reason="PodFailurePolicy",
                       message="Container trainer for pod ml/weak-evaluate-x failed with exit "
                               "code 3 matching FailJob rule at index 1",
                       terminated={"exitCode": 3, "reason": "Error", "message": json.dumps(verdict)})

    status = await wait_for(lambda: cluster.status("weak").get("phase") == "Failed"
                            and cluster.status("weak"), message="Failed")
    assert status["step"] == "evaluate"
    assert status["reason"] == "QualityThresholdNotMet"
    assert "below evaluation.minAccuracy 0.8" in status["message"]
    assert conditions(status)["Failed"]["reason"] == "QualityThresholdNotMet"
    await asyncio.sleep(1.2)
    assert cluster.job("weak", "export") is None
    assert cluster.emulator.count("POST", JOBS) == 4


async def test_a_step_past_its_deadline_names_the_setting_to_raise(cluster: Cluster, start_operator):
    await start_operator()
    await cluster.apply_training("slow", SPEC)
    train = await run_until(cluster, "slow", "train")
    await cluster.fail(train, reason="DeadlineExceeded",
                       message="Job was active longer than specified deadline")
    status = await wait_for(lambda: cluster.status("slow").get("phase") == "Failed"
                            and cluster.status("slow"), message="Failed")
    assert status["reason"] == "DeadlineExceeded"
    assert "spec.steps.train.activeDeadlineSeconds" in status["message"]
    assert "7200s" in status["message"]


async def test_unschedulable_and_image_pull_problems_are_explained_while_waiting(
        cluster: Cluster, start_operator):
    await start_operator(trainer_image="registry.example/trainer:missing")
    await cluster.apply_training("stuck", {**SPEC, "imagePullSecrets": ["regcred"]})

    prepare = await wait_for(lambda: cluster.job("stuck", "prepare"), message="prepare Job")
    await cluster.run_pod(prepare, phase="Pending", suffix="pull", state={"waiting": {
        "reason": "ImagePullBackOff",
        "message": 'Back-off pulling image "registry.example/trainer:missing"'}})
    status = await wait_for(lambda: cluster.status("stuck").get("reason") == "ImagePullBackOff"
                            and cluster.status("stuck"), message="ImagePullBackOff")
    assert status["phase"] == "Pending"
    assert "registry.example/trainer:missing" in status["message"]
    assert "spec.image" in status["message"] and "spec.imagePullSecrets" in status["message"]
    assert conditions(status)["Progressing"]["reason"] == "ImagePullBackOff"
    await wait_for(lambda: "ImagePullBackOff" in [e["reason"] for e in cluster.events("stuck")],
                   message="ImagePullBackOff event")

    await cluster.succeed(prepare)
    train = await run_until(cluster, "stuck", "train")
    await cluster.run_pod(train, phase="Pending", suffix="sched", conditions=[{
        "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
        "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."}])
    status = await wait_for(lambda: cluster.status("stuck").get("reason") == "Unschedulable"
                            and cluster.status("stuck"), message="Unschedulable")
    assert status["phase"] == "Running"
    assert status["step"] == "train"
    message = status["message"]
    assert "3 Insufficient nvidia.com/gpu" in message
    assert "1 x nvidia.com/gpu" in message and "nvidia.com/gpu.product=H100" in message
    assert "spec.nodeSelector" in message


async def test_a_rejected_job_fails_the_run_and_a_forbidden_one_is_retried(
        cluster: Cluster, start_operator):
    calls = {"forbidden": 0}

    def admission(request: kmock.Request) -> None:
        name = (request.data or {}).get("metadata", {}).get("name", "")
        if request.resource != kmock.resource(JOBS):
            return
        if name == "quota-prepare" and calls["forbidden"] < 1:
            calls["forbidden"] += 1
            raise cluster.emulator.error(403, "Forbidden",
                                         'jobs "quota-prepare" is forbidden: exceeded quota')
        if name == "bad-prepare":
            raise cluster.emulator.error(422, "Invalid", 'Job.batch "bad-prepare" is invalid: '
                                         'spec.template.spec.containers[0].resources: Invalid value')

    cluster.emulator.admission.append(admission)
    await start_operator()
    await cluster.apply_training("bad", {"trainingData": "/data/a.jsonl"})
    await cluster.apply_training("quota", {"trainingData": "/data/a.jsonl"})

    status = await wait_for(lambda: cluster.status("bad").get("phase") == "Failed"
                            and cluster.status("bad"), message="bad Failed")
    assert status["reason"] == "JobRejected"
    assert "resources: Invalid value" in status["message"]

    await wait_for(lambda: cluster.job("quota", "prepare"), message="quota Job after a retry")
    assert calls["forbidden"] == 1
    await wait_for(lambda: cluster.status("quota").get("reason") in ("StepStarting", "StepPending"),
                   message="the problem cleared")
    await asyncio.sleep(1.2)
    assert cluster.job("bad", "prepare") is None


# ----------------------------------------------------------------------------- what a cluster adds


async def test_a_pod_that_admission_refuses_is_explained_while_the_step_waits(
        cluster: Cluster, start_operator):
    """The Job controller's FailedCreate Events are the only trace of a refused pod."""
    await start_operator()
    await cluster.apply_training("prio", {"trainingData": "/data/a.jsonl",
                                          "priorityClassName": "no-such-class"})
    await cluster.apply_training("quota", {"trainingData": "/data/a.jsonl"})
    prio = await wait_for(lambda: cluster.job("prio", "prepare"), message="prio Job")
    quota = await wait_for(lambda: cluster.job("quota", "prepare"), message="quota Job")
    await cluster.refuse_pods(prio, 'pods "prio-prepare-x7k2p" is forbidden: no PriorityClass '
                                    'with name no-such-class was found')
    await cluster.refuse_pods(quota, 'pods "quota-prepare-b9q4d" is forbidden: exceeded quota: '
                                     'pods, requested: pods=1, used: pods=0, limited: pods=0', count=4)

    status = await wait_for(lambda: cluster.status("prio").get("reason") == "PriorityClassNotFound"
                            and cluster.status("prio"), message="PriorityClassNotFound")
    assert status["phase"] == "Pending"  # it keeps waiting: the class may be created
    assert "no PriorityClass with name no-such-class was found" in status["message"]
    assert "create PriorityClass no-such-class or correct spec.priorityClassName" in status["message"]
    assert conditions(status)["Progressing"]["reason"] == "PriorityClassNotFound"

    status = await wait_for(lambda: cluster.status("quota").get("reason") == "QuotaExceeded"
                            and cluster.status("quota"), message="QuotaExceeded")
    assert "exceeded quota: pods, requested: pods=1" in status["message"]
    assert "raise the ResourceQuota of namespace ml or lower spec.resources" in status["message"]
    assert not status["message"].startswith("Step prepare cannot create its pod: Error creating")
    await wait_for(lambda: "QuotaExceeded" in [e["reason"] for e in cluster.events("quota")
                                              if e["type"] == "Warning"], message="a Warning")

    # The quota grows: the Job controller creates the pod, and the status says so.
    await cluster.run_pod(quota, phase="Running", state={"running": {}})
    await wait_for(lambda: cluster.status("quota").get("reason") == "StepRunning",
                   message="StepRunning")
    assert_rbac_allows_operator_requests(cluster)


async def test_the_failure_count_is_the_final_one(cluster: Cluster, start_operator):
    """The Job controller sets FailureTarget before it counts the last failed pod."""
    await start_operator()
    await cluster.apply_training("flaky", {"trainingData": "/data/a.jsonl"})
    prepare = await wait_for(lambda: cluster.job("flaky", "prepare"), message="prepare Job")
    crash = {"exitCode": 1, "reason": "Error", "message": "Traceback: boom"}
    for attempt in range(3):
        await cluster.run_pod(prepare, phase="Failed", suffix=f"try{attempt}",
                              state={"terminated": crash})
    # Three of three attempts failed; nothing is retried any more.
    status = await wait_for(lambda: cluster.status("flaky").get("reason") == "BackoffLimitReached"
                            and cluster.status("flaky"), message="BackoffLimitReached")
    assert "failed 3 time(s)" in status["message"] and "retrying" not in status["message"]

    await cluster.mark_failing(prepare, reason="BackoffLimitExceeded", failed=2,
                               message="Job has reached the specified backoff limit")
    status = await wait_for(lambda: cluster.status("flaky").get("reason") == "StepFailing"
                            and cluster.status("flaky"), message="StepFailing")
    assert status["phase"] == "Running"  # not final yet: the count is not
    await asyncio.sleep(1.2)  # a re-check round
    assert cluster.status("flaky")["phase"] == "Running"
    assert not [e for e in cluster.events("flaky") if e["type"] == "Warning"]

    await cluster.mark_failed(prepare, reason="BackoffLimitExceeded", failed=3,
                              message="Job has reached the specified backoff limit")
    status = await wait_for(lambda: cluster.status("flaky").get("phase") == "Failed"
                            and cluster.status("flaky"), message="Failed")
    assert "Step prepare failed 3 time(s), more than spec.steps.prepare.backoffLimit (2)" in status[
        "message"]
    assert status["steps"]["prepare"]["attempts"] == 3
    warnings = await wait_for(lambda: [e["message"] for e in cluster.events("flaky")
                                       if e["type"] == "Warning" and e["reason"] == "StepFailed"],
                              message="StepFailed event")
    assert len(warnings) == 1 and "failed 3 time(s)" in warnings[0]


async def test_what_the_schema_cannot_refuse_fails_before_any_job(cluster: Cluster, start_operator):
    """The emulator, like an API server with an older CRD, accepts these; the operator refuses
    them before it creates anything, naming the field."""
    await start_operator()
    long_name = "support-bot-for-the-customer-care-team-of-the-emea-region"  # 57 characters
    await cluster.apply_training(long_name, {"trainingData": "/data/a.jsonl"})
    await cluster.apply_training("keys", {"trainingData": "/data/a.jsonl",
                                          "nodeSelector": {"gpu type": "h100"}})
    status = await wait_for(lambda: cluster.status(long_name).get("phase") == "Failed"
                            and cluster.status(long_name), message="long name Failed")
    assert status["reason"] == "InvalidName"
    assert "metadata.name must have at most 53 characters" in status["message"]
    status = await wait_for(lambda: cluster.status("keys").get("phase") == "Failed"
                            and cluster.status("keys"), message="bad key Failed")
    assert status["reason"] == "InvalidSpec"
    assert "nodeSelector" in status["message"] and "'gpu type' is not a label key" in status["message"]
    await asyncio.sleep(1.2)
    assert cluster.list(JOBS) == []
    assert cluster.list("v1/persistentvolumeclaims") == [] and cluster.list("v1/configmaps") == []


async def test_a_refused_claim_is_named_as_the_claim(cluster: Cluster, start_operator):
    def admission(request: kmock.Request) -> None:
        if request.resource == kmock.resource("v1/persistentvolumeclaims"):
            raise cluster.emulator.error(
                422, "Invalid", 'PersistentVolumeClaim "big-workspace" is invalid: '
                'spec.resources.requests[storage]: Invalid value: "5Pi": exceeds the maximum.')

    cluster.emulator.admission.append(admission)
    await start_operator()
    await cluster.apply_training("big", {"trainingData": "/data/a.jsonl"})
    status = await wait_for(lambda: cluster.status("big").get("phase") == "Failed"
                            and cluster.status("big"), message="Failed")
    assert status["reason"] == "PersistentVolumeClaimRejected"
    assert status["message"].startswith(
        "The API server rejected PersistentVolumeClaim big-workspace of step prepare: "
        'PersistentVolumeClaim "big-workspace" is invalid')
    assert not status["message"].endswith("..")
    assert cluster.job("big", "prepare") is None
