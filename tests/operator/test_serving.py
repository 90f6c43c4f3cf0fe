"""spec.serve through the real operator: after a successful export, a Deployment and a Service
`<name>-server` run llama.cpp's server on the exported GGUF; status.serving reports them."""

from __future__ import annotations

import copy

from operator_support import NAMESPACE, Cluster, assert_rbac_allows_operator_requests, wait_for

from chatbot_api.crd import PRINTER_COLUMNS
from chatbot_api.spec import GROUP, STEPS

DEPLOYMENTS = "apps/v1/deployments"
SERVICES = "v1/services"
SPEC = {
    "trainingData": "pvc://chat-data/support.jsonl",
    "modelType": "gpt",
    "trainingSteps": 10,
    "gpu": {"count": 1},
    "outputPath": "pvc://models/support-bot",
    "serve": {"enabled": True},
}
EXPORT = {"model": {
    "path": "/mnt/pvc/models/support-bot/support-bot.f16.gguf", "format": "gguf", "size_mb": 245.0,
    "files": [
        {"path": "/mnt/pvc/models/support-bot/support-bot.f16.gguf", "quantization": "f16",
         "size_mb": 245.0},
        {"path": "/mnt/pvc/models/support-bot/support-bot.q8_0.gguf", "quantization": "q8_0",
         "size_mb": 130.5}]}}
OPERATOR = {"default_node_selector": {"pool": "gpu"},
            "default_tolerations": ({"key": "nvidia.com/gpu", "operator": "Exists",
                                     "effect": "NoSchedule"},)}


def server(cluster: Cluster, name: str = "support-bot") -> dict | None:
    return cluster.get(DEPLOYMENTS, f"{name}-server")


def container(deployment: dict) -> dict:
    return deployment["spec"]["template"]["spec"]["containers"][0]


def condition(cluster: Cluster, name: str, ctype: str = "Serving") -> dict | None:
    return next((c for c in cluster.status(name).get("conditions") or []
                 if c["type"] == ctype), None)


async def run_steps(cluster: Cluster, name: str, steps=STEPS, export=EXPORT) -> None:
    for step in steps:
        job = await wait_for(lambda: cluster.job(name, step), message=f"{step} Job")
        await cluster.succeed(job, export if step == "export" else {})


async def set_ready(cluster: Cluster, deployment: dict, ready: int) -> None:
    meta = deployment["metadata"]
    await cluster.call(
        "PATCH", f"/apis/apps/v1/namespaces/{meta['namespace']}/deployments/{meta['name']}/status",
        {"status": {"replicas": ready, "readyReplicas": ready, "availableReplicas": ready}})


async def test_the_exported_model_is_served_after_success(cluster: Cluster, start_operator):
    await start_operator(**OPERATOR)
    training = await cluster.apply_training("support-bot", SPEC)
    await run_steps(cluster, "support-bot", STEPS[:-1])
    await wait_for(lambda: cluster.job("support-bot", "export"), message="export Job")
    assert server(cluster) is None  # nothing is served before the export is complete
    assert condition(cluster, "support-bot") is None
    await run_steps(cluster, "support-bot", ["export"])

    deployment = await wait_for(lambda: server(cluster), message="server Deployment")
    owner = {"apiVersion": f"{GROUP}/v1alpha1", "kind": "ChatbotTraining", "name": "support-bot",
             "uid": training["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}
    assert deployment["metadata"]["ownerReferences"] == [owner]
    assert deployment["metadata"]["labels"]["chatbot.dev/training"] == "support-bot"
    labels = {"app.kubernetes.io/name": "chatbot-training",
              "app.kubernetes.io/instance": "support-bot", "app.kubernetes.io/component": "server"}
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["selector"] == {"matchLabels": labels}
    template = deployment["spec"]["template"]
    assert template["metadata"]["labels"] == labels  # not a step pod: no training label
    pod = template["spec"]
    c = container(deployment)
    # The smallest exported file (q8_0), from its claim mounted read-only.
    assert c["image"] == "ghcr.io/ggml-org/llama.cpp:server-b11312"
    assert c["args"] == ["-m", "/models/support-bot/support-bot.q8_0.gguf", "--host", "0.0.0.0",
                         "--port", "8080", "--metrics", "--alias", "support-bot", "-c", "4096",
                         "-np", "4", "--threads-http", "8"]
    # Draining: out of the Service's endpoints, then SIGTERM after the requests finished.
    assert c["lifecycle"] == {"preStop": {"sleep": {"seconds": 20}}}
    assert pod["terminationGracePeriodSeconds"] == 30
    assert pod["volumes"][0] == {"name": "model", "persistentVolumeClaim": {
        "claimName": "models", "readOnly": True}}
    assert c["volumeMounts"][0] == {"name": "model", "mountPath": "/models", "readOnly": True}
    for probe in (c["startupProbe"], c["readinessProbe"]):
        assert probe["httpGet"] == {"path": "/health", "port": "http"}
    assert c["ports"] == [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]
    assert "resources" not in c and "nodeSelector" not in pod and "tolerations" not in pod
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    service = await wait_for(lambda: cluster.get(SERVICES, "support-bot-server"), message="Service")
    assert service["spec"]["selector"] == labels
    assert service["spec"]["ports"] == [{"name": "http", "port": 8080, "targetPort": "http",
                                         "protocol": "TCP"}]
    assert service["metadata"]["ownerReferences"] == [owner]

    url = f"http://support-bot-server.{NAMESPACE}.svc:8080/v1"
    starting = await wait_for(lambda: condition(cluster, "support-bot"), message="Serving")
    assert (starting["status"], starting["reason"]) == ("False", "Starting")
    assert cluster.status("support-bot")["serving"] == {
        "service": "support-bot-server", "url": url, "ready": False,
        "modelFile": "pvc://models/support-bot/support-bot.q8_0.gguf", "quantization": "q8_0",
        "replicas": 1, "readyReplicas": 0}
    assert cluster.status("support-bot")["phase"] == "Succeeded"

    # The Deployment controller reports a ready pod: status.serving follows.
    await set_ready(cluster, deployment, 1)
    ready = await wait_for(lambda: (c := condition(cluster, "support-bot"))
                           and c["status"] == "True" and c, message="Serving=True")
    assert ready["reason"] == "Ready" and url in ready["message"]
    serving = cluster.status("support-bot")["serving"]
    assert serving["ready"] is True and serving["readyReplicas"] == 1
    training = cluster.training("support-bot")
    column = next(c for c in PRINTER_COLUMNS if c["name"] == "Serving")
    assert column["jsonPath"] == ".status.serving.url" and column.get("priority") == 1
    # The other conditions stay as the training left them.
    assert condition(cluster, "support-bot", "Ready")["status"] == "True"

    # serve off: both objects go, and so does status.serving.
    await cluster.patch_training("support-bot", {"spec": {"serve": {"enabled": False}}})
    await wait_for(lambda: server(cluster) is None
                   and cluster.get(SERVICES, "support-bot-server") is None,
                   message="server deleted")
    await wait_for(lambda: "serving" not in cluster.status("support-bot")
                   and condition(cluster, "support-bot") is None, message="status.serving removed")
    assert cluster.status("support-bot")["phase"] == "Succeeded"

    # on again: served again.
    await cluster.patch_training("support-bot", {"spec": {"serve": {"enabled": True}}})
    await wait_for(lambda: server(cluster), message="server again")
    assert_rbac_allows_operator_requests(cluster)


async def test_gpu_server_options_changes_and_deletion(cluster: Cluster, start_operator):
    await start_operator(**OPERATOR)
    spec = copy.deepcopy(SPEC)
    spec["serve"] = {
        "enabled": True, "quantization": "f16", "gpus": 1, "replicas": 2, "contextSize": 8192,
        "apiKeySecret": {"name": "bot-api", "key": "token"},
        "nodeSelector": {"gpu": "l4"}, "extraArgs": ["--parallel", "4"], "drainSeconds": 50,
        "resources": {"requests": {"cpu": "2", "memory": "4Gi"}}}
    await cluster.apply_training("support-bot", spec)
    await run_steps(cluster, "support-bot")
    deployment = await wait_for(lambda: server(cluster), message="server Deployment")
    c = container(deployment)
    pod = deployment["spec"]["template"]["spec"]
    assert c["image"] == "ghcr.io/ggml-org/llama.cpp:server-cuda-b11312"
    assert c["args"] == ["-m", "/models/support-bot/support-bot.f16.gguf", "--host", "0.0.0.0",
                         "--port", "8080", "--metrics", "--alias", "support-bot", "-c", "8192",
                         "--threads-http", "8", "-t", "2", "-ngl", "999", "--parallel", "4"]
    assert pod["terminationGracePeriodSeconds"] == 60
    assert c["lifecycle"] == {"preStop": {"sleep": {"seconds": 50}}}
    assert c["resources"] == {"requests": {"cpu": "2", "memory": "4Gi"},
                              "limits": {"nvidia.com/gpu": "1"}}
    assert {"name": "LLAMA_API_KEY", "valueFrom": {"secretKeyRef": {
        "name": "bot-api", "key": "token"}}} in c["env"]
    assert pod["nodeSelector"] == {"pool": "gpu", "gpu": "l4"}
    assert pod["tolerations"] == [dict(OPERATOR["default_tolerations"][0])]
    assert deployment["spec"]["replicas"] == 2

    # A change of spec.serve patches the Deployment (no GPU now: no GPU defaults, CPU image).
    await cluster.patch_training("support-bot", {"spec": {"serve": {
        "gpus": 0, "contextSize": 2048, "parallel": 2, "nodeSelector": None,
        "resources": {"requests": {"cpu": "2", "memory": "4Gi"}, "limits": {"cpu": "1"}}}}})
    patched = await wait_for(lambda: (d := server(cluster)) and "-ngl" not in container(d)["args"]
                             and d, message="Deployment patched")
    c = container(patched)
    assert c["args"][-8:] == ["-c", "2048", "--threads-http", "6", "-t", "1", "--parallel", "4"]
    assert c["image"] == "ghcr.io/ggml-org/llama.cpp:server-b11312"
    assert "nodeSelector" not in patched["spec"]["template"]["spec"]
    assert "tolerations" not in patched["spec"]["template"]["spec"]
    assert c["resources"] == {"requests": {"cpu": "2", "memory": "4Gi"}, "limits": {"cpu": "1"}}
    hash_key = "chatbot.dev/server-spec-hash"
    assert patched["metadata"]["annotations"][hash_key] != \
        deployment["metadata"]["annotations"][hash_key]

    # Deleting the training deletes the server (ownerReferences: the garbage collector).
    await cluster.delete_training("support-bot")
    await wait_for(lambda: server(cluster) is None
                   and cluster.get(SERVICES, "support-bot-server") is None,
                   message="server garbage-collected")
    assert_rbac_allows_operator_requests(cluster)


async def test_a_failed_export_is_never_served(cluster: Cluster, start_operator):
    await start_operator()
    await cluster.apply_training("support-bot", SPEC)
    await run_steps(cluster, "support-bot", STEPS[:-1])
    job = await wait_for(lambda: cluster.job("support-bot", "export"), message="export Job")
    await cluster.fail(job, reason="BackoffLimitExceeded", terminated={
        "exitCode": 1, "reason": "Error",
        "message": '{"step": "export", "ok": false, "reason": "StepFailed", '
                   '"message": "disk full"}'})
    failed = await wait_for(lambda: condition(cluster, "support-bot"), message="Serving")
    assert cluster.status("support-bot")["phase"] == "Failed"
    assert (failed["status"], failed["reason"]) == ("False", "TrainingFailed")
    assert server(cluster) is None and cluster.get(SERVICES, "support-bot-server") is None
    assert "serving" not in cluster.status("support-bot")


async def test_a_name_that_cannot_name_a_service_is_explained(cluster: Cluster, start_operator):
    await start_operator()
    await cluster.apply_training("1bot", SPEC)
    await run_steps(cluster, "1bot")
    problem = await wait_for(lambda: condition(cluster, "1bot"), message="Serving")
    assert (problem["status"], problem["reason"]) == ("False", "InvalidName")
    assert "'1bot-server' must be a DNS-1035 label" in problem["message"]
    assert cluster.status("1bot")["phase"] == "Succeeded"
    assert server(cluster, "1bot") is None
