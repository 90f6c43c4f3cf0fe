"""A ChatbotTraining from creation to an exported model, driven through the real operator."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import kmock

from operator_support import (
    JOBS,
    NAMESPACE,
    TRAININGS,
    Cluster,
    assert_rbac_allows_operator_requests,
    operator_requests,
    wait_for,
)

from chatbot_api.crd import PRINTER_COLUMNS
from chatbot_api.spec import GROUP, STEPS

SPEC = {
    "trainingData": "pvc://chat-data/support.jsonl",
    "modelType": "gpt",
    "trainingSteps": 50,
    "batchSize": 8,
    "learningRate": 0.0001,
    "gpu": {"count": 2},
    "nodeSelector": {"nvidia.com/gpu.product": "A100"},
    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    "resources": {"requests": {"cpu": "2"}, "limits": {"memory": "32Gi"}},
    "outputPath": "pvc://models/support-bot",
    "workspace": {"size": "5Gi", "reclaimPolicy": "Delete"},
    "imagePullSecrets": ["regcred"],
    "envFromSecret": "hf-token",
    "priorityClassName": "batch-low",
    "evaluation": {"minAccuracy": 0.5},
}
SUMMARIES = {
    "prepare": {"train_examples": 90, "eval_examples": 10, "dropped": {"duplicate": 2}},
    "configure": {"base_model": "gpt2", "device": "cuda", "precision": "bf16"},
    "train": {"train_loss": 0.42, "steps": 50, "tokens_per_second": 1234.5},
    "evaluate": {"metrics": {"loss": 0.15, "accuracy": 0.92, "perplexity": 1.16, "fact_recall": 0.61,
                             "rouge_l": 0.55},
                 "base_metrics": {"loss": 2.1, "accuracy": 0.5, "perplexity": 8.2, "fact_recall": 0.05,
                                  "rouge_l": 0.2}},
    "export": {"model": {
        "path": "/mnt/pvc/models/support-bot/support-bot.q8_0.gguf", "format": "gguf",
        "size_mb": 130.5, "base_model": "gpt2",
        "files": [
            {"path": "/mnt/pvc/models/support-bot/support-bot.q8_0.gguf",
             "quantization": "q8_0", "size_mb": 130.5},
            {"path": "/mnt/pvc/models/support-bot/support-bot.f16.gguf",
             "quantization": "f16", "size_mb": 245.0}],
        "modelfile": "/mnt/pvc/models/support-bot/Modelfile"}},
}
OPERATOR = {
    "trainer_image": "registry.example/chatbot-trainer:test",
    "default_node_selector": {"pool": "gpu"},
    "default_tolerations": ({"key": "dedicated", "operator": "Equal", "value": "ml",
                             "effect": "NoSchedule"},),
}


def json_path(obj: dict, path: str):
    for key in path.strip(".").split("."):
        obj = obj.get(key) if isinstance(obj, dict) else None
    return obj


def volumes(job: dict) -> dict:
    return {v["name"]: v for v in job["spec"]["template"]["spec"]["volumes"]}


def mounts(job: dict) -> dict:
    return {m["mountPath"]: m for m in job["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]}


def container(job: dict) -> dict:
    return job["spec"]["template"]["spec"]["containers"][0]


def check_common_job(job: dict, training: dict, step: str) -> None:
    meta = job["metadata"]
    assert meta["name"] == f"support-bot-{step}"
    assert meta["labels"] == {
        "app.kubernetes.io/name": "chatbot-training",
        "app.kubernetes.io/instance": "support-bot",
        "app.kubernetes.io/component": step,
        "app.kubernetes.io/managed-by": "chatbot-operator",
        "chatbot.dev/training": "support-bot",
        "chatbot.dev/step": step,
    }
    assert meta["ownerReferences"] == [{
        "apiVersion": f"{GROUP}/v1alpha1", "kind": "ChatbotTraining", "name": "support-bot",
        "uid": training["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}]
    spec = job["spec"]
    assert spec["backoffLimit"] == 2 and spec["suspend"] is False
    assert spec["podFailurePolicy"]["rules"][0]["action"] == "Ignore"
    assert spec["podFailurePolicy"]["rules"][1]["onExitCodes"]["values"] == [2, 3, 4]
    assert "ttlSecondsAfterFinished" not in spec
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 1000
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert pod["priorityClassName"] == "batch-low"
    c = container(job)
    assert c["name"] == "trainer"
    assert c["image"] == "registry.example/chatbot-trainer:test"
    args = c["args"]
    if step == "train":  # gpu.count 2: torchrun, one training process per GPU
        assert c["command"] == ["python", "-m", "chatbot_trainer.launch"]
        assert args[:4] == ["--standalone", "--nproc-per-node=2", "-m", "chatbot_trainer.cli"]
        args = args[4:]
    assert args[:5] == [step, "--workspace", "/workspace", "--config", "/etc/chatbot/config.json"]
    assert c["securityContext"] == {"allowPrivilegeEscalation": False,
                                    "capabilities": {"drop": ["ALL"]},
                                    "readOnlyRootFilesystem": True, "runAsNonRoot": True}
    assert c["terminationMessagePath"] == "/dev/termination-log"
    assert c["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert c["envFrom"] == [{"secretRef": {"name": "hf-token"}}]
    env = {e["name"]: e["value"] for e in c["env"]}
    assert env["HF_HOME"] == "/workspace/.cache/huggingface" and env["HOME"] == "/tmp"
    assert env["CHATBOT_PVC_ROOT"] == "/mnt/pvc"
    assert volumes(job)["workspace"]["persistentVolumeClaim"]["claimName"] == "support-bot-workspace"
    assert volumes(job)["config"]["configMap"]["name"] == "support-bot-config"
    assert mounts(job)["/etc/chatbot"]["readOnly"] is True
    assert "emptyDir" in volumes(job)["tmp"]


async def test_training_runs_all_steps_to_an_exported_model(cluster: Cluster, start_operator, capsys):
    run = await start_operator(**OPERATOR)
    job_posted: list[float] = []
    cluster.emulator.admission.append(
        lambda request: request.resource == kmock.resource(JOBS) and not job_posted
        and job_posted.append(time.perf_counter()))
    started = time.perf_counter()
    training = await cluster.apply_training("support-bot", SPEC)
    created = time.perf_counter()
    job = await wait_for(lambda: cluster.job("support-bot", "prepare"), message="prepare Job")
    with capsys.disabled():
        print(f"\nreconcile latency: ChatbotTraining POST sent -> prepare Job POST received: "
              f"{(job_posted[0] - started) * 1000:.0f} ms "
              f"(from the training's creation response: {(job_posted[0] - created) * 1000:.0f} ms)")

    # prepare: data claim mounted read-only, no GPU, no GPU scheduling constraints.
    check_common_job(job, training, "prepare")
    assert container(job)["args"] == ["prepare", "--workspace", "/workspace", "--config",
                                      "/etc/chatbot/config.json"]
    assert container(job)["resources"] == {"requests": {"cpu": "2"}, "limits": {"memory": "32Gi"}}
    assert mounts(job)["/mnt/pvc/chat-data"]["readOnly"] is True
    pod = job["spec"]["template"]["spec"]
    assert not {"nodeSelector", "tolerations", "affinity"} & set(pod)
    assert "dshm" not in volumes(job)
    assert job["spec"]["activeDeadlineSeconds"] == 3600

    config_map = cluster.get("v1/configmaps", "support-bot-config")
    config = json.loads(config_map["data"]["config.json"])
    assert config["name"] == "support-bot"
    assert config["trainingData"] == "pvc://chat-data/support.jsonl"
    assert config["evaluation"] == {"minAccuracy": 0.5, "requireImprovement": False, "answerQuestions": 64,
                                    "sampleAnswers": 3}
    assert "gpu" not in config and "workspace" not in config
    pvc = cluster.get("v1/persistentvolumeclaims", "support-bot-workspace")
    assert pvc["spec"]["resources"]["requests"]["storage"] == "5Gi"
    assert pvc["metadata"]["ownerReferences"][0]["uid"] == training["metadata"]["uid"]

    status = await wait_for(lambda: cluster.status("support-bot").get("step") == "prepare"
                            and cluster.status("support-bot"), message="status")
    assert status["phase"] == "Pending"
    assert status["steps"]["prepare"]["jobName"] == "support-bot-prepare"
    assert status["workspaceClaim"] == "support-bot-workspace"
    assert status["observedGeneration"] == 1

    jobs = {"prepare": job}
    for step in STEPS:
        job = jobs[step] = await wait_for(lambda: cluster.job("support-bot", step),
                                          message=f"{step} Job")
        check_common_job(job, training, step)
        limits = container(job).get("resources", {}).get("limits", {})
        pod = job["spec"]["template"]["spec"]
        if step in ("train", "evaluate"):
            assert limits == {"memory": "32Gi", "nvidia.com/gpu": "2"}
            assert pod["nodeSelector"] == {"pool": "gpu", "nvidia.com/gpu.product": "A100"}
            assert pod["tolerations"] == [OPERATOR["default_tolerations"][0], SPEC["tolerations"][0]]
            assert volumes(job)["dshm"]["emptyDir"] == {"medium": "Memory"}
            assert mounts(job)["/dev/shm"]["name"] == "dshm"
        else:
            assert "nvidia.com/gpu" not in limits
            assert "nodeSelector" not in pod and "tolerations" not in pod
        if step == "export":
            assert container(job)["args"][5:] == ["--output", "/mnt/pvc/models/support-bot"]
            assert mounts(job)["/mnt/pvc/models"].get("readOnly") is not True
        await cluster.succeed(job, SUMMARIES[step])

    status = await wait_for(lambda: cluster.status("support-bot").get("phase") == "Succeeded"
                            and cluster.status("support-bot"), message="Succeeded")
    assert status["step"] == "export"
    assert status["metrics"] == {"loss": 0.15, "accuracy": 0.92, "perplexity": 1.16,
                                 "trainLoss": 0.42, "baseLoss": 2.1, "baseAccuracy": 0.5,
                                 "factRecall": 0.61, "rougeL": 0.55, "baseFactRecall": 0.05,
                                 "baseRougeL": 0.2}
    assert status["model"] == {
        "path": "pvc://models/support-bot/support-bot.q8_0.gguf", "format": "gguf",
        "sizeMb": 130.5, "baseModel": "gpt2",
        "files": [
            {"path": "pvc://models/support-bot/support-bot.q8_0.gguf", "quantization": "q8_0",
             "sizeMb": 130.5},
            {"path": "pvc://models/support-bot/support-bot.f16.gguf", "quantization": "f16",
             "sizeMb": 245.0}],
        "modelfile": "pvc://models/support-bot/Modelfile"}
    assert all(status["steps"][s]["phase"] == "Succeeded" for s in STEPS)
    assert status["steps"]["evaluate"]["summary"] == SUMMARIES["evaluate"]
    assert status["completionTime"] and status["startTime"]
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["Ready"]["status"] == "True" and conditions["Ready"]["reason"] == "Succeeded"
    assert conditions["Progressing"]["status"] == "False"
    assert conditions["Failed"]["status"] == "False"
    assert conditions["Suspended"]["status"] == "False"
    assert "pvc://models/support-bot/support-bot.q8_0.gguf" in status["message"]

    # Finished: the re-check timer stops and Kopf removes its finalizer.
    await wait_for(lambda: not cluster.training("support-bot")["metadata"].get("finalizers"),
                   message="finalizer removed")

    # What `kubectl get chatbottrainings -o wide` shows.
    training = cluster.training("support-bot")
    columns = {c["name"]: json_path(training, c["jsonPath"]) for c in PRINTER_COLUMNS}
    assert columns == {"Phase": "Succeeded", "Step": "export", "Progress": None, "ETA": None,
                       "Loss": 0.15, "Accuracy": 0.92, "FactRecall": 0.61,
                       "Model": "pvc://models/support-bot/support-bot.q8_0.gguf",
                       "Serving": None, "Age": training["metadata"]["creationTimestamp"]}

    # One Event per step start and success, and one for the run.
    reasons = await wait_for(lambda: (r := [e["reason"] for e in cluster.events("support-bot")])
                             and r.count("StepSucceeded") == 5 and "Succeeded" in r and r,
                             message="events")
    assert reasons.count("StepStarted") == 5
    assert all(e["type"] == "Normal" for e in cluster.events("support-bot"))

    # Each Job was created exactly once; the claim and the ConfigMap once, before the first;
    # the training's metadata was written twice: Kopf's finalizer on, then off.
    assert cluster.emulator.count("POST", JOBS) == 5
    writes = writes_by_kind(cluster, "support-bot")
    assert writes["POST persistentvolumeclaims"] == writes["POST configmaps"] == 1
    assert writes["PATCH chatbottrainings"] == 2

    # Prometheus metrics.
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{run.memo.metrics_port}/metrics") as response:
            text = await response.text()
    assert 'chatbot_trainings{phase="Succeeded"} 1.0' in text
    assert 'chatbot_eval_loss{name="support-bot",namespace="ml"} 0.15' in text
    assert 'chatbot_eval_accuracy{name="support-bot",namespace="ml"} 0.92' in text
    assert 'chatbot_eval_fact_recall{name="support-bot",namespace="ml"} 0.61' in text
    assert 'chatbot_step_duration_seconds_count{step="train"}' in text
    assert "chatbot_reconcile_errors_total" in text

    # Every request the operator made is allowed by the ClusterRole rules.
    assert_rbac_allows_operator_requests(cluster)


async def test_operator_finishes_the_run_after_a_restart_without_duplicates(
        cluster: Cluster, start_operator):
    first = await start_operator()
    await cluster.apply_training("bot", {"trainingData": "/data/chat.jsonl", "gpu": {"count": 1}})
    prepare = await wait_for(lambda: cluster.job("bot", "prepare"), message="prepare Job")
    await wait_for(lambda: "StepStarted" in [e["reason"] for e in cluster.events("bot")],
                   message="StepStarted event")
    await first.stop()

    # The step finishes while no operator runs.
    await cluster.succeed(prepare, {"train_examples": 10})
    await asyncio.sleep(0.2)
    assert cluster.job("bot", "configure") is None

    await start_operator()
    configure = await wait_for(lambda: cluster.job("bot", "configure"), message="configure Job")
    await cluster.succeed(configure)
    await wait_for(lambda: cluster.job("bot", "train"), message="train Job")
    await wait_for(lambda: cluster.status("bot").get("step") == "train", message="step train")
    await asyncio.sleep(1.5)  # a resync round and any late events

    posts = [r.data["metadata"]["name"] for r in cluster.emulator.requests
             if r.method.value.upper() == "POST" and r.resource == kmock.resource(JOBS)]
    assert sorted(posts) == ["bot-configure", "bot-prepare", "bot-train"]
    assert len(cluster.list(JOBS)) == 3
    started = [e["message"] for e in cluster.events("bot") if e["reason"] == "StepStarted"]
    assert len(started) == 3
    status = cluster.status("bot")
    assert status["phase"] == "Running"
    assert status["steps"]["prepare"]["phase"] == "Succeeded"
    assert status["steps"]["configure"]["phase"] == "Succeeded"


async def test_deleting_the_training_lets_the_garbage_collector_remove_its_objects(
        cluster: Cluster, start_operator):
    await start_operator()
    owned = await cluster.apply_training(
        "owned", {"trainingData": "/data/a.jsonl", "workspace": {"reclaimPolicy": "Delete"}})
    kept = await cluster.apply_training("kept", {"trainingData": "/data/b.jsonl"})
    shared = await cluster.apply_training(
        "shared", {"trainingData": "/data/c.jsonl", "workspace": {"existingClaim": "team-space"}})
    for name in ("owned", "kept", "shared"):
        await wait_for(lambda: cluster.job(name, "prepare"), message=f"{name} Job")
        # Kopf's finalizer is on while the run is unfinished (it stops the re-check cleanly).
        await wait_for(lambda: "chatbot.dev/finalizer" in cluster.training(name)["metadata"].get(
            "finalizers", []), message=f"{name} finalizer")

    uid = owned["metadata"]["uid"]
    for resource, name in ((JOBS, "owned-prepare"), ("v1/configmaps", "owned-config"),
                           ("v1/persistentvolumeclaims", "owned-workspace")):
        refs = cluster.get(resource, name)["metadata"]["ownerReferences"]
        assert refs == [{"apiVersion": "chatbot.dev/v1alpha1", "kind": "ChatbotTraining",
                         "name": "owned", "uid": uid, "controller": True,
                         "blockOwnerDeletion": True}]
    # Retain: the claim is not owned; existingClaim: no claim is created at all.
    assert "ownerReferences" not in cluster.get("v1/persistentvolumeclaims", "kept-workspace")["metadata"]
    assert cluster.get("v1/persistentvolumeclaims", "shared-workspace") is None
    shared_job = cluster.job("shared", "prepare")
    assert volumes(shared_job)["workspace"]["persistentVolumeClaim"]["claimName"] == "team-space"
    assert kept["metadata"]["uid"] != uid and shared["metadata"]["uid"] != uid

    for name in ("owned", "kept"):
        await cluster.delete_training(name)
        await wait_for(lambda: cluster.training(name) is None, message=f"{name} deleted")
    assert cluster.job("owned", "prepare") is None
    assert cluster.get("v1/configmaps", "owned-config") is None
    assert cluster.get("v1/persistentvolumeclaims", "owned-workspace") is None
    assert cluster.job("kept", "prepare") is None
    assert cluster.get("v1/persistentvolumeclaims", "kept-workspace") is not None
    assert cluster.job("shared", "prepare") is not None


async def test_a_training_in_an_unserved_namespace_is_left_alone(cluster: Cluster, start_operator):
    await start_operator(namespaces=(NAMESPACE,))
    await cluster.apply_training("elsewhere", {"trainingData": "/data/a.jsonl"}, namespace="other")
    await cluster.apply_training("here", {"trainingData": "/data/a.jsonl"})
    await wait_for(lambda: cluster.job("here", "prepare"), message="Job in the served namespace")
    await asyncio.sleep(0.5)
    assert cluster.get(JOBS, "elsewhere-prepare", namespace="other") is None
    assert not cluster.get(TRAININGS, "elsewhere", namespace="other").get("status")
    assert_rbac_allows_operator_requests(cluster)  # incl. Kopf's namespace listing


async def test_starting_and_rechecking_a_training_costs_few_requests(cluster: Cluster,
                                                                   start_operator):
    """A new training gets its first Job without a read; the events it causes (its Job's
    ADDED, its own status update, Kopf's finalizer) bring nothing new and are skipped; the
    periodic re-checks (every second here) share one listing of the namespace."""
    await start_operator()
    await cluster.apply_training("cheap", {"trainingData": "/data/a.jsonl"})
    await wait_for(lambda: cluster.job("cheap", "prepare"), message="prepare Job")
    await asyncio.sleep(2.5)  # two re-check rounds
    mine = [r for r in cluster.emulator.requests
            if r.headers.get("User-Agent", "").startswith("chatbot-operator")]
    reads_of_one = [r for r in mine if r.method.value.upper() == "GET" and (
        r.name == "cheap" or "=cheap" in (r.params.get("labelSelector") or ""))]
    assert reads_of_one == []
    assert cluster.emulator.count("POST", JOBS) == 1
    assert len([r for r in mine if r.subresource == "status"]) == 1
    listings = [r for r in mine if r.method.value.upper() == "GET" and r.name is None]
    assert 2 <= len(listings) <= 9  # Jobs, Pods, Events: per re-check round, not per training


WRITES = ("POST", "PUT", "PATCH", "DELETE")


def writes_by_kind(cluster: Cluster, name: str, requests: list | None = None) -> dict[str, int]:
    """The operator's writes of the training `name` and of its objects ("<verb> <resource>")."""
    counts: dict[str, int] = {}
    for request in operator_requests(cluster) if requests is None else requests:
        if request.method.value.upper() not in WRITES or request.resource is None:
            continue
        data = request.data if isinstance(request.data, dict) else {}
        target = request.name or (data.get("metadata") or {}).get("name") or ""
        if request.resource.plural == "events":
            target = (data.get("involvedObject") or {}).get("name") or ""
        if target == name or target.startswith(f"{name}-"):
            kind = f"{request.method.value.upper()} {request.resource.plural}"
            kind += f"/{request.subresource}" if request.subresource else ""
            counts[kind] = counts.get(kind, 0) + 1
    return counts


async def test_a_new_training_costs_few_writes(cluster: Cluster, start_operator):
    """The writes a burst of new trainings waits for on a real API server: three creates
    before the first Job; then one status patch and Kopf's finalizer, each written once
    (the status waits for the finalizer, so neither patch is refused and sent again), and
    no bookkeeping annotations of Kopf."""
    await start_operator()
    names = [f"burst-{i}" for i in range(3)]
    await asyncio.gather(*(cluster.apply_training(n, {"trainingData": "/data/a.jsonl"})
                           for n in names))
    for name in names:
        await wait_for(lambda: cluster.status(name).get("step") == "prepare"
                       and cluster.training(name)["metadata"].get("finalizers"),
                       message=f"{name}: status and finalizer")
    await asyncio.sleep(1.0)  # anything that would follow
    requests = operator_requests(cluster)
    for name in names:
        job = next(i for i, r in enumerate(requests) if r.method.value.upper() == "POST"
                   and r.resource == kmock.resource(JOBS) and r.data["metadata"]["name"] == f"{name}-prepare")
        assert writes_by_kind(cluster, name, requests[:job + 1]) == {
            "POST configmaps": 1, "POST persistentvolumeclaims": 1, "POST jobs": 1}
        assert writes_by_kind(cluster, name) == {
            "POST configmaps": 1, "POST persistentvolumeclaims": 1, "POST jobs": 1,
            "POST events": 1,  # StepStarted
            "PATCH chatbottrainings": 1,  # Kopf's finalizer
            "PATCH chatbottrainings/status": 1}
        training = cluster.training(name)
        assert training["metadata"]["finalizers"] == [f"{GROUP}/finalizer"]
        assert not [a for a in training["metadata"].get("annotations") or {} if GROUP in a or "kopf" in a]
        assert cluster.status(name)["phase"] == "Pending"


async def test_a_new_training_that_has_the_finalizer_already_is_reported_at_once(
        cluster: Cluster, start_operator):
    """Its first status is not held back for a finalizer patch that will not come."""
    await start_operator()
    await cluster.call("POST", f"/apis/{GROUP}/v1alpha1/namespaces/{NAMESPACE}/chatbottrainings", {
        "apiVersion": f"{GROUP}/v1alpha1", "kind": "ChatbotTraining",
        "metadata": {"name": "kept", "namespace": NAMESPACE, "finalizers": [f"{GROUP}/finalizer"]},
        "spec": {"trainingData": "/data/a.jsonl"}}, "application/json")
    await wait_for(lambda: cluster.job("kept", "prepare"), message="prepare Job")
    await wait_for(lambda: cluster.status("kept").get("step") == "prepare", timeout=3.0,
                   message="status well before the 5 s a held status may wait")
    assert writes_by_kind(cluster, "kept").get("PATCH chatbottrainings") is None


async def test_a_later_step_reads_its_config_map_and_refreshes_what_changed(
        cluster: Cluster, start_operator):
    """Once a Job exists, the ConfigMap is read rather than created again (a refused write),
    patched when mutable settings changed, and the claim is not created again."""
    await start_operator()
    await cluster.apply_training("tuned", {"trainingData": "/data/a.jsonl",
                                           "evaluation": {"minAccuracy": 0.5}})
    prepare = await wait_for(lambda: cluster.job("tuned", "prepare"), message="prepare Job")
    await wait_for(lambda: cluster.status("tuned").get("step") == "prepare", message="status")
    await cluster.patch_training("tuned", {"spec": {"evaluation": {"minAccuracy": 0.8}}})
    await wait_for(lambda: cluster.status("tuned").get("observedGeneration") == 2,
                   message="the spec change reconciled")
    await cluster.succeed(prepare)
    await wait_for(lambda: cluster.job("tuned", "configure"), message="configure Job")
    config = json.loads(cluster.get("v1/configmaps", "tuned-config")["data"]["config.json"])
    assert config["evaluation"]["minAccuracy"] == 0.8
    writes = writes_by_kind(cluster, "tuned")
    assert writes["POST configmaps"] == writes["PATCH configmaps"] == 1
    assert writes["POST persistentvolumeclaims"] == 1
