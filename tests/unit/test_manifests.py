"""The pure builders of the objects the operator creates (PVC, ConfigMap, step Jobs)."""

from __future__ import annotations

import json

import pytest

from chatbot_api.spec import STEPS, ChatbotTrainingSpec
from chatbot_operator import manifests
from chatbot_operator.settings import OperatorConfig

TRAINING = {
    "apiVersion": "chatbot.dev/v1alpha1", "kind": "ChatbotTraining",
    "metadata": {"name": "support-bot", "namespace": "ml", "uid": "1234-abcd"},
}
CONFIG = OperatorConfig(trainer_image="ghcr.io/chatbot-training/trainer:0.1.0")


def spec(**fields) -> ChatbotTrainingSpec:
    return ChatbotTrainingSpec.model_validate({"trainingData": "/data/chat.jsonl", **fields})


def job(step: str, config: OperatorConfig = CONFIG, **fields) -> dict:
    return manifests.step_job(TRAINING, spec(**fields), step, config)


def pod(step: str, config: OperatorConfig = CONFIG, **fields) -> dict:
    return job(step, config, **fields)["spec"]["template"]["spec"]


def container(step: str, **fields) -> dict:
    return pod(step, **fields)["containers"][0]


def mounts(step: str, **fields) -> dict:
    return {m["mountPath"]: m for m in container(step, **fields)["volumeMounts"]}


def volumes(step: str, **fields) -> dict:
    return {v["name"]: v for v in pod(step, **fields)["volumes"]}


OWNER = {"apiVersion": "chatbot.dev/v1alpha1", "kind": "ChatbotTraining", "name": "support-bot",
         "uid": "1234-abcd", "controller": True, "blockOwnerDeletion": True}


@pytest.mark.parametrize("step", STEPS)
def test_every_step_job_has_the_common_contract(step):
    built = job(step)
    meta = built["metadata"]
    assert meta["name"] == f"support-bot-{step}"
    assert meta["namespace"] == "ml"
    assert meta["ownerReferences"] == [OWNER]
    assert meta["labels"] == {
        "app.kubernetes.io/name": "chatbot-training",
        "app.kubernetes.io/instance": "support-bot",
        "app.kubernetes.io/component": step,
        "app.kubernetes.io/managed-by": "chatbot-operator",
        "chatbot.dev/training": "support-bot",
        "chatbot.dev/step": step,
    }
    assert meta["annotations"] == {"chatbot.dev/training-name": "support-bot"}
    job_spec = built["spec"]
    assert job_spec["backoffLimit"] == 2
    assert job_spec["activeDeadlineSeconds"] > 0
    assert job_spec["suspend"] is False
    assert "ttlSecondsAfterFinished" not in job_spec
    assert job_spec["podFailurePolicy"] == {"rules": [
        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
        {"action": "FailJob", "onExitCodes": {"containerName": "trainer", "operator": "In",
                                               "values": [2, 3, 4]}},
    ]}
    template = job_spec["template"]
    assert template["metadata"]["labels"] == meta["labels"]
    pod_spec = template["spec"]
    assert pod_spec["restartPolicy"] == "Never"
    assert pod_spec["automountServiceAccountToken"] is False
    assert pod_spec["securityContext"] == {
        "runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 1000,
        "fsGroupChangePolicy": "OnRootMismatch", "seccompProfile": {"type": "RuntimeDefault"}}
    c = pod_spec["containers"][0]
    assert c["name"] == "trainer"
    assert c["image"] == "ghcr.io/chatbot-training/trainer:0.1.0"
    assert c["args"] == [step, "--workspace", "/workspace", "--config", "/etc/chatbot/config.json"]
    assert c["terminationMessagePath"] == "/dev/termination-log"
    assert c["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert c["securityContext"] == {"allowPrivilegeEscalation": False,
                                    "capabilities": {"drop": ["ALL"]},
                                    "readOnlyRootFilesystem": True, "runAsNonRoot": True}
    live = {"CHATBOT_PROGRESS_PORT": "8470"} if step in ("train", "evaluate") else {}
    assert {e["name"]: e["value"] for e in c["env"]} == {
        "HF_HOME": "/workspace/.cache/huggingface", "CHATBOT_PVC_ROOT": "/mnt/pvc",
        "HOME": "/tmp", "PYTHONUNBUFFERED": "1", **live}
    assert "envFrom" not in c and "imagePullPolicy" not in c
    vols = {v["name"]: v for v in pod_spec["volumes"]}
    assert vols["workspace"] == {"name": "workspace",
                                 "persistentVolumeClaim": {"claimName": "support-bot-workspace"}}
    assert vols["config"]["configMap"] == {"name": "support-bot-config",
                                           "items": [{"key": "config.json", "path": "config.json"}]}
    assert vols["tmp"] == {"name": "tmp", "emptyDir": {}}
    mounted = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert mounted["/workspace"]["name"] == "workspace"
    assert mounted["/etc/chatbot"] == {"name": "config", "mountPath": "/etc/chatbot", "readOnly": True}
    assert mounted["/tmp"]["name"] == "tmp"


@pytest.mark.parametrize("step", STEPS)
def test_only_train_and_evaluate_get_the_gpu_and_its_scheduling(step):
    fields = dict(gpu={"count": 2, "resourceName": "amd.com/gpu"},
                  nodeSelector={"gpu": "mi300"},
                  tolerations=[{"key": "amd.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                  affinity={"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
                      "nodeSelectorTerms": [{"matchExpressions": [
                          {"key": "zone", "operator": "In", "values": ["a"]}]}]}}},
                  resources={"requests": {"cpu": "4", "memory": "16Gi"},
                             "limits": {"memory": "32Gi", "ephemeral-storage": "50Gi"}})
    built = pod(step, **fields)
    resources = built["containers"][0]["resources"]
    assert resources["requests"] == {"cpu": "4", "memory": "16Gi"}
    mounted = {m["mountPath"] for m in built["containers"][0]["volumeMounts"]}
    if step in ("train", "evaluate"):
        assert resources["limits"] == {"memory": "32Gi", "ephemeral-storage": "50Gi",
                                       "amd.com/gpu": "2"}
        assert built["nodeSelector"] == {"gpu": "mi300"}
        assert built["tolerations"] == fields["tolerations"]
        assert built["affinity"] == fields["affinity"]
        assert {"name": "dshm", "emptyDir": {"medium": "Memory"}} in built["volumes"]
        assert "/dev/shm" in mounted
    else:
        assert resources["limits"] == {"memory": "32Gi", "ephemeral-storage": "50Gi"}
        assert not {"nodeSelector", "tolerations", "affinity"} & set(built)
        assert "/dev/shm" not in mounted


def test_zero_gpus_requests_no_gpu():
    assert "resources" not in container("train", gpu={"count": 0})


def test_operator_defaults_merge_under_the_spec():
    config = OperatorConfig(
        default_node_selector={"pool": "gpu", "gpu": "any"},
        default_tolerations=({"key": "nvidia.com/gpu", "operator": "Exists",
                              "effect": "NoSchedule"},),
        image_pull_policy="IfNotPresent", step_uid=2000)
    toleration = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    built = pod("train", config, nodeSelector={"gpu": "a100"}, tolerations=[toleration])
    assert built["nodeSelector"] == {"pool": "gpu", "gpu": "a100"}
    assert built["tolerations"] == [toleration]  # no duplicate
    assert built["containers"][0]["imagePullPolicy"] == "IfNotPresent"
    assert built["securityContext"]["runAsUser"] == 2000
    assert "nodeSelector" not in pod("prepare", config)
    # The spec's pull policy wins over the operator's.
    assert pod("train", config, imagePullPolicy="Always")["containers"][0]["imagePullPolicy"] == "Always"


def test_cluster_options_of_the_spec():
    built = pod("prepare", image="my/trainer:2", imagePullSecrets=["a", "b"],
                serviceAccountName="s3-reader", priorityClassName="low", envFromSecret="hf")
    assert built["containers"][0]["image"] == "my/trainer:2"
    assert built["imagePullSecrets"] == [{"name": "a"}, {"name": "b"}]
    assert built["serviceAccountName"] == "s3-reader"
    assert built["priorityClassName"] == "low"
    assert built["containers"][0]["envFrom"] == [{"secretRef": {"name": "hf"}}]


def test_step_policies_and_suspend():
    built = job("train", steps={"train": {"activeDeadlineSeconds": 600, "backoffLimit": 0}},
                suspend=True)
    assert built["spec"]["activeDeadlineSeconds"] == 600
    assert built["spec"]["backoffLimit"] == 0
    assert built["spec"]["suspend"] is True
    assert job("prepare")["spec"]["activeDeadlineSeconds"] == 3600
    assert job("train")["spec"]["activeDeadlineSeconds"] == 7 * 24 * 3600


def test_queue_name_labels_the_job_but_not_its_pods():
    built = job("prepare", queueName="team-a")
    assert built["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    assert "kueue.x-k8s.io/queue-name" not in built["spec"]["template"]["metadata"]["labels"]
    assert "kueue.x-k8s.io/queue-name" not in job("prepare")["metadata"]["labels"]


def test_pvc_uris_are_mounted_where_they_are_needed():
    fields = dict(trainingData="pvc://chat-data/support.jsonl",
                  outputPath="pvc://models/bots/support", modelType="pvc://base-models/llama")
    prepare = mounts("prepare", **fields)
    assert prepare["/mnt/pvc/chat-data"]["readOnly"] is True
    assert "/mnt/pvc/models" not in prepare and "/mnt/pvc/base-models" not in prepare
    train = mounts("train", **fields)
    assert train["/mnt/pvc/base-models"]["readOnly"] is True
    assert "/mnt/pvc/chat-data" not in train
    export = mounts("export", **fields)
    assert "readOnly" not in export["/mnt/pvc/models"]
    assert container("export", **fields)["args"][-2:] == ["--output", "/mnt/pvc/models/bots/support"]
    claims = {v["persistentVolumeClaim"]["claimName"]: v["persistentVolumeClaim"]
              for v in pod("export", **fields)["volumes"] if "persistentVolumeClaim" in v}
    assert claims["models"] == {"claimName": "models"}
    assert claims["base-models"] == {"claimName": "base-models", "readOnly": True}


def test_a_pvc_chat_template_is_mounted_for_configure_and_train():
    fields = dict(chatTemplate="pvc://templates/chat/mine.jinja")
    for step in ("configure", "train"):
        assert mounts(step, **fields)["/mnt/pvc/templates"]["readOnly"] is True
    for step in ("prepare", "evaluate", "export"):  # evaluate and export read the saved tokenizer
        assert "/mnt/pvc/templates" not in mounts(step, **fields)


def test_a_claim_used_for_input_and_output_is_writable_in_export():
    fields = dict(trainingData="pvc://chat-data/support.jsonl", outputPath="pvc://chat-data/out/")
    assert mounts("prepare", **fields)["/mnt/pvc/chat-data"]["readOnly"] is True
    assert "readOnly" not in mounts("export", **fields)["/mnt/pvc/chat-data"]
    assert container("export", **fields)["args"][-1] == "/mnt/pvc/chat-data/out"


def test_data_on_the_workspace_claim_reuses_the_workspace_volume():
    fields = dict(trainingData="pvc://team-space/data.jsonl", workspace={"existingClaim": "team-space"})
    prepare = mounts("prepare", **fields)
    assert prepare["/mnt/pvc/team-space"] == {"name": "workspace", "mountPath": "/mnt/pvc/team-space"}
    claims = [v for v in pod("prepare", **fields)["volumes"] if "persistentVolumeClaim" in v]
    assert claims == [{"name": "workspace", "persistentVolumeClaim": {"claimName": "team-space"}}]


def test_workspace_claim():
    pvc = manifests.workspace_pvc(TRAINING, spec(workspace={"size": "50Gi",
                                                            "storageClassName": "fast",
                                                            "accessMode": "ReadWriteMany"}))
    assert pvc["metadata"]["name"] == "support-bot-workspace"
    assert pvc["metadata"]["labels"]["app.kubernetes.io/component"] == "workspace"
    assert "ownerReferences" not in pvc["metadata"]  # Retain: outlives the training
    assert pvc["spec"] == {"accessModes": ["ReadWriteMany"],
                           "resources": {"requests": {"storage": "50Gi"}},
                           "storageClassName": "fast"}
    owned = manifests.workspace_pvc(TRAINING, spec(workspace={"reclaimPolicy": "Delete"}))
    assert owned["metadata"]["ownerReferences"] == [OWNER]
    assert manifests.workspace_pvc(TRAINING, spec(workspace={"existingClaim": "mine"})) is None
    assert volumes("prepare", workspace={"existingClaim": "mine"})["workspace"] == {
        "name": "workspace", "persistentVolumeClaim": {"claimName": "mine"}}


def test_config_map_holds_the_trainer_config():
    built = manifests.config_map(TRAINING, spec(trainingSteps=200, gpu={"count": 4},
                                                export={"quantizations": ["q8_0"]}))
    assert built["metadata"]["name"] == "support-bot-config"
    assert built["metadata"]["ownerReferences"] == [OWNER]
    config = json.loads(built["data"]["config.json"])
    assert config["name"] == "support-bot"
    assert config["trainingData"] == "/data/chat.jsonl"
    assert config["trainingSteps"] == 200
    assert config["export"]["quantizations"] == ["q8_0"]
    assert not {"gpu", "workspace", "suspend", "steps", "image"} & set(config)
    # The trainer reads it back as TrainingParams.
    from chatbot_api.spec import TrainingParams
    TrainingParams.model_validate({k: v for k, v in config.items() if k != "name"})


def test_long_names_stay_within_label_limits():
    name = "a-very-long-training-name-" + "x" * 60
    training = {**TRAINING, "metadata": {**TRAINING["metadata"], "name": name}}
    built = manifests.step_job(training, spec(), "configure", CONFIG)
    assert len(built["metadata"]["name"]) <= 63
    assert built["metadata"]["name"].endswith("-configure")
    assert built["metadata"]["name"] == manifests.job_name(name, "configure")
    assert all(len(v) <= 63 for v in built["metadata"]["labels"].values())
    assert built["metadata"]["annotations"]["chatbot.dev/training-name"] == name
    assert manifests.job_name(name, "train") != manifests.job_name(name + "y", "train")
    assert manifests.job_name("short", "train") == "short-train"


@pytest.mark.parametrize("uri, parsed", [
    ("pvc://chat-data/support.jsonl", ("chat-data", "support.jsonl")),
    ("pvc://models/", ("models", "")),
    ("pvc://models", ("models", "")),
    ("s3://bucket/key", None),
    ("/data/x.jsonl", None),
    (None, None),
])
def test_parse_pvc_uri(uri, parsed):
    assert manifests.parse_pvc_uri(uri) == parsed
