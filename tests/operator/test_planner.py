"""The pure reconciliation logic: next action, status, failure explanations, events."""

from __future__ import annotations

import json

import pytest

from chatbot_api.spec import STEPS, ChatbotTrainingSpec
from chatbot_api.status import ChatbotTrainingStatus
from chatbot_operator import manifests, planner, status_builder
from chatbot_operator.diagnose import condition_reason
from chatbot_operator.observe import format_duration
from chatbot_operator.settings import OperatorConfig

NOW = "2026-01-01T12:00:00Z"
CONFIG = OperatorConfig()


def training(spec: dict | None = None, status: dict | None = None, generation: int = 1) -> dict:
    body = {
        "apiVersion": "chatbot.dev/v1alpha1", "kind": "ChatbotTraining",
        "metadata": {"name": "bot", "namespace": "ml", "uid": "uid-1", "generation": generation},
        "spec": spec or {"trainingData": "/data/a.jsonl"},
    }
    if status is not None:
        body["status"] = status
    return body


def job_for(body: dict, step: str, *, condition: dict | None = None, suspend: bool = False,
            annotations: dict | None = None, status: dict | None = None) -> dict:
    spec = ChatbotTrainingSpec.model_validate(body["spec"])
    job = manifests.step_job(body, spec, step, CONFIG)
    job["metadata"]["uid"] = f"job-{step}"
    job["metadata"]["creationTimestamp"] = "2026-01-01T10:00:00Z"
    job["spec"]["suspend"] = suspend
    if annotations:
        job["metadata"]["annotations"].update(annotations)
    job["status"] = dict(status or {})
    if condition:
        job["status"].setdefault("conditions", []).append(
            {"status": "True", "lastTransitionTime": "2026-01-01T11:00:00Z", **condition})
        job["status"].setdefault("startTime", "2026-01-01T10:00:00Z")
    return job


def pod_for(job: dict, *, phase: str, state: dict | None = None, conditions: list | None = None,
            created: str = "2026-01-01T10:00:01Z", name: str = "p") -> dict:
    status: dict = {"phase": phase}
    if state is not None:
        status["containerStatuses"] = [{"name": "trainer", "image": "img:1", "state": state}]
    if conditions is not None:
        status["conditions"] = conditions
    labels = {**job["spec"]["template"]["metadata"]["labels"],
              "batch.kubernetes.io/job-name": job["metadata"]["name"],
              "batch.kubernetes.io/controller-uid": job["metadata"]["uid"]}
    return {"metadata": {"name": f"{job['metadata']['name']}-{name}", "labels": labels,
                         "creationTimestamp": created}, "status": status}


def done(body: dict, step: str, summary: dict | None = None) -> tuple[dict, dict]:
    job = job_for(body, step, condition={"type": "Complete"},
                  status={"succeeded": 1, "completionTime": "2026-01-01T11:00:00Z"})
    message = json.dumps({"step": step, "ok": True, "summary": summary or {}})
    pod = pod_for(job, phase="Succeeded", state={"terminated": {"exitCode": 0, "message": message}})
    return job, pod


def failed(body: dict, step: str, *, reason: str, terminated: dict | None = None,
           failures: int = 1) -> tuple[dict, list]:
    job = job_for(body, step, condition={"type": "Failed", "reason": reason, "message": "x"},
                  status={"failed": failures})
    pods = [pod_for(job, phase="Failed", state={"terminated": terminated})] if terminated else []
    return job, pods


def plan(body: dict, jobs: list, pods: list, config: OperatorConfig = CONFIG) -> planner.Plan:
    result = planner.plan(body, jobs, pods, now=NOW, config=config)
    ChatbotTrainingStatus.model_validate(result.status)  # the CRD's status schema accepts it
    return result


def plan_with_events(body: dict, jobs: list, pods: list, events: list) -> planner.Plan:
    result = planner.plan(body, jobs, pods, now=NOW, config=CONFIG, events=events)
    ChatbotTrainingStatus.model_validate(result.status)
    return result


def conditions(status: dict) -> dict:
    return {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]}


# ----------------------------------------------------------------------------- ordering


def test_a_new_training_starts_with_the_prepare_step():
    result = plan(training(), [], [])
    assert result.create_step == "prepare"
    assert result.status["phase"] == "Pending"
    assert result.status["step"] == "prepare"
    assert result.status["steps"] == {"prepare": {"phase": "Pending", "jobName": "bot-prepare",
                                                  "startTime": NOW}}
    assert result.status["observedGeneration"] == 1
    assert conditions(result.status) == {"Ready": ("False", "StepStarting"),
                                         "Progressing": ("True", "StepStarting"),
                                         "Failed": ("False", "NotFailed"),
                                         "Suspended": ("False", "NotSuspended")}


@pytest.mark.parametrize("finished", range(1, 5))
def test_the_next_step_starts_only_after_the_previous_one_succeeded(finished):
    body = training()
    jobs, pods = [], []
    for step in STEPS[:finished]:
        job, pod = done(body, step)
        jobs.append(job)
        pods.append(pod)
    assert plan(body, jobs, pods).create_step == STEPS[finished]
    # A running step holds the next one back.
    running = job_for(body, STEPS[finished], status={"active": 1})
    result = plan(body, jobs + [running], pods + [pod_for(running, phase="Running")])
    assert result.create_step is None
    assert result.status["phase"] == "Running"
    assert result.status["reason"] == "StepRunning"


def test_all_steps_done_is_success_with_metrics_and_model():
    body = training(spec={"trainingData": "/d.jsonl", "workspace": {"existingClaim": "space"}})
    summaries = {
        "train": {"train_loss": 0.5},
        "evaluate": {"metrics": {"loss": 0.2, "accuracy": 0.9, "perplexity": 1.22}},
        "export": {"model": {"path": "/workspace/export/bot.q8_0.gguf", "size_mb": 12.0,
                             "format": "gguf", "base_model": "gpt2",
                             "files": [{"path": "/workspace/export/bot.q8_0.gguf",
                                        "quantization": "q8_0", "size_mb": 12.0}],
                             "modelfile": "/workspace/export/Modelfile"}},
    }
    pairs = [done(body, step, summaries.get(step)) for step in STEPS]
    result = plan(body, [j for j, _ in pairs], [p for _, p in pairs])
    status = result.status
    assert result.create_step is None
    assert status["phase"] == "Succeeded" and status["step"] == "export"
    assert status["metrics"] == {"loss": 0.2, "accuracy": 0.9, "perplexity": 1.22, "trainLoss": 0.5}
    assert status["model"] == {"path": "pvc://space/export/bot.q8_0.gguf", "format": "gguf",
                               "sizeMb": 12.0, "baseModel": "gpt2",
                               "files": [{"path": "pvc://space/export/bot.q8_0.gguf",
                                          "quantization": "q8_0", "sizeMb": 12.0}],
                               "modelfile": "pvc://space/export/Modelfile"}
    assert status["completionTime"] == "2026-01-01T11:00:00Z"
    assert conditions(status)["Ready"] == ("True", "Succeeded")
    assert conditions(status)["Progressing"] == ("False", "Succeeded")


def test_a_recorded_success_survives_deleted_jobs_and_pods():
    body = training()
    pairs = [done(body, step, {"n": i}) for i, step in enumerate(STEPS)]
    first = plan(body, [j for j, _ in pairs], [p for _, p in pairs]).status
    again = plan(training(status=first), [], [])
    assert again.create_step is None
    assert again.status["phase"] == "Succeeded"
    assert again.status["steps"]["export"]["summary"] == {"n": 4}
    assert status_builder.status_patch(first, again.status) == {}


def test_a_finished_run_never_starts_new_work():
    body = training(status={"phase": "Failed", "reason": "JobRejected", "message": "no",
                            "step": "prepare",
                            "steps": {"prepare": {"phase": "Failed", "reason": "JobRejected"}}})
    result = plan(body, [], [])
    assert result.create_step is None
    assert result.status["phase"] == "Failed"
    assert result.status["reason"] == "JobRejected"


def test_jobs_of_an_earlier_training_with_the_same_name_are_not_adopted():
    body = training()
    old, pod = done(body, "prepare")
    old["metadata"]["ownerReferences"][0]["uid"] = "someone-else"
    result = plan(body, [old], [pod])
    assert result.create_step is None
    assert result.status["reason"] == "WaitingForOldJob"


def test_an_invalid_spec_fails_without_work():
    result = plan(training(spec={"trainingData": "/d", "batchSize": 4, "microBatchSize": 3}), [], [])
    assert result.create_step is None
    assert result.status["phase"] == "Failed"
    assert result.status["reason"] == "InvalidSpec"
    assert "batchSize must be a multiple of microBatchSize" in result.status["message"]


# ----------------------------------------------------------------------------- suspend


def test_suspend_creates_nothing_and_suspends_the_running_job():
    body = training(spec={"trainingData": "/d", "suspend": True})
    assert plan(body, [], []).create_step is None
    running = job_for(body, "prepare", status={"active": 1})
    result = plan(body, [running], [])
    assert result.suspend_jobs == {"bot-prepare": True}
    assert result.status["phase"] == "Suspended"
    assert conditions(result.status)["Suspended"] == ("True", "Suspended")
    # Already suspended: nothing more to do.
    suspended = job_for(body, "prepare", suspend=True,
                        annotations={manifests.ANNOTATION_SUSPENDED: "true"})
    assert plan(body, [suspended], []).suspend_jobs == {}


def test_resume_unsuspends_only_jobs_the_operator_suspended():
    body = training()
    ours = job_for(body, "prepare", suspend=True,
                   annotations={manifests.ANNOTATION_SUSPENDED: "true"})
    assert plan(body, [ours], []).suspend_jobs == {"bot-prepare": False}
    queued = job_for(training(spec={"trainingData": "/d", "queueName": "q"}), "prepare",
                     suspend=True)
    result = plan(training(spec={"trainingData": "/d", "queueName": "q"}), [queued], [])
    assert result.suspend_jobs == {}
    assert result.status["reason"] == "Queued"
    assert "in queue q" in result.status["message"]


# ----------------------------------------------------------------------------- failures


def test_the_trainers_own_verdict_comes_first():
    body = training()
    verdict = {"step": "evaluate", "ok": False, "reason": "QualityThresholdNotMet",
               "message": "loss 3.1 is above evaluation.maxLoss 2.5"}
    job, pods = failed(body, "evaluate", reason="PodFailurePolicy",
                       terminated={"exitCode": 3, "message": json.dumps(verdict)})
    result = plan(body, [job], pods)
    assert result.status["phase"] == "Failed" and result.status["step"] == "evaluate"
    assert result.status["reason"] == "QualityThresholdNotMet"
    assert "above evaluation.maxLoss 2.5" in result.status["message"]
    assert conditions(result.status)["Failed"] == ("True", "QualityThresholdNotMet")


def test_oom_killed_pods_explain_a_backoff_limit_failure():
    body = training(spec={"trainingData": "/d", "resources": {"limits": {"memory": "8Gi"}}})
    job, pods = failed(body, "train", reason="BackoffLimitExceeded", failures=3,
                       terminated={"exitCode": 137, "reason": "OOMKilled"})
    status = plan(body, [job], pods).status
    assert status["reason"] == "OOMKilled"
    assert "was OOMKilled (memory limit 8Gi): reduce batchSize (or set microBatchSize)" in status["message"]


def test_deadline_names_the_step_setting():
    body = training()
    job, pods = failed(body, "train", reason="DeadlineExceeded")
    status = plan(body, [job], pods).status
    assert status["reason"] == "DeadlineExceeded"
    assert "spec.steps.train.activeDeadlineSeconds" in status["message"]
    assert f"{7 * 24 * 3600}s" in status["message"]


def test_backoff_limit_without_details_names_the_retry_setting():
    body = training()
    job, pods = failed(body, "prepare", reason="BackoffLimitExceeded", failures=3,
                       terminated={"exitCode": 1, "message": "Traceback: boom"})
    status = plan(body, [job], pods).status
    assert status["reason"] == "BackoffLimitExceeded"
    assert "spec.steps.prepare.backoffLimit (2)" in status["message"]
    assert "boom" in status["message"]


def test_an_exit_code_rule_without_a_message_is_explained_by_the_code():
    body = training()
    job, pods = failed(body, "prepare", reason="PodFailurePolicy",
                       terminated={"exitCode": 2, "message": "not json"})
    status = plan(body, [job], pods).status
    assert status["reason"] == "InvalidInput"
    assert "not json" in status["message"]


def test_waiting_pods_are_diagnosed():
    body = training(spec={"trainingData": "/d", "gpu": {"count": 4, "resourceName": "amd.com/gpu"},
                          "nodeSelector": {"gpu": "mi300"}, "envFromSecret": "creds"})
    jobs = [done(body, s)[0] for s in ("prepare", "configure")]
    train = job_for(body, "train", status={"active": 1})
    unschedulable = pod_for(train, phase="Pending", conditions=[{
        "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
        "message": "0/2 nodes are available: 2 Insufficient amd.com/gpu."}])
    status = plan(body, jobs + [train], [unschedulable]).status
    assert status["reason"] == "Unschedulable" and status["phase"] == "Running"
    assert "4 x amd.com/gpu on a node matching nodeSelector gpu=mi300" in status["message"]
    assert "2 Insufficient amd.com/gpu. It needs" in status["message"]
    assert ".." not in status["message"]

    secret = pod_for(train, phase="Pending", state={"waiting": {
        "reason": "CreateContainerConfigError", "message": 'secret "creds" not found'}})
    status = plan(body, jobs + [train], [secret]).status
    assert status["reason"] == "CreateContainerConfigError"
    assert "Secret creds (spec.envFromSecret)" in status["message"]

    retry = pod_for(train, phase="Failed", state={"terminated": {"exitCode": 137, "reason": "OOMKilled"}})
    status = plan(body, jobs + [train], [retry]).status
    assert status["reason"] == "Retrying"
    assert "attempt 1 of 3" in status["message"] and "reduce batchSize" in status["message"]


def test_a_missing_claim_is_explained_by_the_field_that_names_it():
    body = training(spec={"trainingData": "pvc://no-such-claim/x.jsonl"})
    prepare = job_for(body, "prepare", status={"active": 1})
    pending = pod_for(prepare, phase="Pending", conditions=[{
        "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
        "message": '0/3 nodes are available: persistentvolumeclaim "no-such-claim" not found. '
                   "preemption: 0/3 nodes are available: 3 Preemption is not helpful for "
                   "scheduling."}])
    status = plan(body, [prepare], [pending]).status
    assert status["reason"] == "ClaimNotFound"
    assert status["message"] == (
        "Step prepare cannot start: PersistentVolumeClaim no-such-claim (spec.trainingData) "
        "does not exist in namespace ml. Waiting; create it or correct spec.trainingData.")

    unbound = pod_for(prepare, phase="Pending", conditions=[{
        "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
        "message": "0/3 nodes are available: pod has unbound immediate PersistentVolumeClaims."}])
    status = plan(body, [prepare], [unbound]).status
    assert status["reason"] == "ClaimNotBound"
    assert "no-such-claim (spec.trainingData)" in status["message"]
    assert "bot-workspace (the workspace claim the operator creates)" in status["message"]
    assert "add capacity" not in status["message"]

    # Other scheduling problems keep their advice, with one period per sentence.
    busy = pod_for(prepare, phase="Pending", conditions=[{
        "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
        "message": "0/3 nodes are available: 3 Insufficient cpu. preemption: 0/3 nodes are "
                   "available: 3 Preemption is not helpful for scheduling."}])
    status = plan(body, [prepare], [busy]).status
    assert status["reason"] == "Unschedulable"
    assert status["message"].endswith("not helpful for scheduling. Waiting; add capacity or "
                                      "lower spec.resources.")


def test_a_job_without_pods_is_explained_by_its_failed_create_events():
    body = training(spec={"trainingData": "/d", "serviceAccountName": "s3-reader"})
    prepare = job_for(body, "prepare")
    first = planner.plan(body, [prepare], [], now=NOW, config=CONFIG)
    assert first.events_of_job is prepare  # the reconciler reads the Job's Events
    assert first.status["reason"] == "StepPending"
    event = {"reason": "FailedCreate", "type": "Warning",
             "involvedObject": {"kind": "Job", "name": "bot-prepare", "uid": "job-prepare"},
             "message": 'Error creating: pods "bot-prepare-abcde" is forbidden: error looking up '
                        'service account ml/s3-reader: serviceaccount "s3-reader" not found'}
    other = {**event, "involvedObject": {"kind": "Job", "name": "other-prepare", "uid": "x"}}
    status = plan_with_events(body, [prepare], [], [other, event]).status
    assert status["reason"] == "ServiceAccountNotFound" and status["phase"] == "Pending"
    assert status["message"] == (
        'Step prepare cannot create its pod: pods "bot-prepare-abcde" is forbidden: error '
        "looking up service account ml/s3-reader: serviceaccount \"s3-reader\" not found. "
        "Waiting; create ServiceAccount s3-reader in namespace ml or correct "
        "spec.serviceAccountName.")
    # Once the pod exists, the Events are history.
    running = pod_for(prepare, phase="Running", state={"running": {}})
    assert plan_with_events(body, [prepare], [running], [event]).status["reason"] == "StepRunning"
    assert planner.plan(body, [prepare], [running], now=NOW, config=CONFIG).events_of_job is None


def test_failure_target_alone_is_not_final_and_counts_are_the_pods():
    body = training()
    prepare = job_for(body, "prepare", condition={"type": "FailureTarget",
                                                  "reason": "BackoffLimitExceeded"},
                      status={"failed": 2})
    crashed = [pod_for(prepare, phase="Failed", name=f"p{i}", created=f"2026-01-01T10:00:0{i}Z",
                       state={"terminated": {"exitCode": 1}}) for i in range(3)]
    status = plan(body, [prepare], crashed).status
    assert status["phase"] == "Running" and status["reason"] == "StepFailing"
    assert status["steps"]["prepare"]["attempts"] == 3
    prepare["status"]["conditions"].append({"type": "Failed", "status": "True",
                                            "reason": "BackoffLimitExceeded",
                                            "lastTransitionTime": "2026-01-01T11:00:01Z"})
    status = plan(body, [prepare], crashed).status  # status.failed still says 2
    assert status["phase"] == "Failed"
    assert "Step prepare failed 3 time(s)" in status["message"]
    # Before any condition: no retry is left, so none is announced.
    bare = job_for(body, "prepare", status={"failed": 2})
    status = plan(body, [bare], crashed).status
    assert status["reason"] == "BackoffLimitReached" and "retrying" not in status["message"]
    # Preempted pods do not count (podFailurePolicy ignores them).
    preempted = pod_for(bare, phase="Failed", name="pre", conditions=[
        {"type": "DisruptionTarget", "status": "True", "reason": "PreemptionByScheduler"}])
    status = plan(body, [bare], crashed[:1] + [preempted]).status
    assert status["reason"] == "Retrying" and "attempt 1 of 3" in status["message"]


def test_rejected_and_problem_statuses():
    status = plan(training(), [], []).status
    rejected = status_builder.rejected(status, "prepare", "Job bot-prepare", "bad quantity", NOW, 1)
    assert rejected["phase"] == "Failed" and rejected["reason"] == "JobRejected"
    assert rejected["steps"]["prepare"]["phase"] == "Failed"
    ChatbotTrainingStatus.model_validate(rejected)
    # The object that was refused is named, whichever it was.
    claim = status_builder.rejected(status, "prepare", "PersistentVolumeClaim bot-workspace",
                              'PersistentVolumeClaim "bot-workspace" is invalid: spec.resources.'
                              'requests[storage]: Invalid value.', NOW, 1)
    assert claim["reason"] == "PersistentVolumeClaimRejected"
    assert claim["message"].startswith(
        "The API server rejected PersistentVolumeClaim bot-workspace of step prepare: "
        'PersistentVolumeClaim "bot-workspace" is invalid')
    assert not claim["message"].endswith("..")
    problem = status_builder.with_problem(status, "ApiError", "Cannot create: 403", NOW, 1)
    assert problem["phase"] == status["phase"] and problem["reason"] == "ApiError"


# ----------------------------------------------------------------------------- helpers


@pytest.mark.parametrize("path, uri", [
    ("/workspace/export/x.gguf", "pvc://ws/export/x.gguf"),
    ("/mnt/pvc/models/bots/x.gguf", "pvc://models/bots/x.gguf"),
    ("/opt/model.gguf", "/opt/model.gguf"),
    ("/workspacex/a", "/workspacex/a"),
])
def test_container_paths_become_claim_uris(path, uri):
    assert status_builder.to_pvc_uri(path, "ws") == uri


def test_status_patch_is_a_minimal_merge_patch():
    old = {"phase": "Running", "steps": {"a": {"phase": "Running", "x": 1}}, "gone": 1}
    new = {"phase": "Running", "steps": {"a": {"phase": "Succeeded"}}, "metrics": {"loss": 1.0}}
    assert status_builder.status_patch(old, new) == {
        "steps": {"a": {"phase": "Succeeded", "x": None}}, "gone": None, "metrics": {"loss": 1.0}}
    assert status_builder.status_patch(new, new) == {}


def test_condition_transition_times_change_only_with_the_status():
    first = status_builder.build_conditions("Running", "StepRunning", "m", [], "t1", 1)
    second = status_builder.build_conditions("Running", "Retrying", "m2", first, "t2", 1)
    assert {c["type"]: c["lastTransitionTime"] for c in second}["Progressing"] == "t1"
    third = status_builder.build_conditions("Succeeded", "Succeeded", "ok", second, "t3", 1)
    times = {c["type"]: c["lastTransitionTime"] for c in third}
    assert times["Ready"] == "t3" and times["Progressing"] == "t3" and times["Failed"] == "t1"


def test_events_for_step_and_phase_transitions():
    old = {"phase": "Running", "steps": {"train": {"phase": "Running"}}}
    new = {"phase": "Failed", "reason": "OOMKilled", "message": "reduce batchSize",
           "steps": {"train": {"phase": "Failed", "reason": "OOMKilled", "message": "m",
                               "startTime": "2026-01-01T10:00:00Z",
                               "completionTime": "2026-01-01T10:01:05Z"}}}
    events = status_builder.transition_events(old, new)
    assert [(e.type, e.reason) for e in events] == [("Warning", "StepFailed"),
                                                    ("Warning", "OOMKilled")]
    assert status_builder.step_transitions(old, new)[0].seconds == 65
    assert status_builder.transition_events(new, new) == []
    succeeded = {"phase": "Succeeded", "message": "done",
                 "steps": {"export": {"phase": "Succeeded", "jobName": "bot-export"}}}
    assert [e.reason for e in status_builder.transition_events({}, succeeded)] == ["StepSucceeded",
                                                                             "Succeeded"]


def test_reasons_are_valid_condition_reasons():
    assert condition_reason("quality threshold not-met") == "QualityThresholdNotMet"
    assert condition_reason("") == "StepFailed"
    assert condition_reason("42") == "StepFailed"
    assert format_duration(3725) == "1h02m05s"


def test_non_finite_numbers_in_a_summary_are_dropped():
    body = training()
    job = job_for(body, "train", condition={"type": "Complete"}, status={"succeeded": 1})
    message = '{"step": "train", "ok": true, "summary": {"train_loss": NaN, "steps": [1, Infinity]}}'
    pod = pod_for(job, phase="Succeeded", state={"terminated": {"exitCode": 0, "message": message}})
    jobs = [done(body, s)[0] for s in ("prepare", "configure")] + [job]
    status = plan(body, jobs, [pod]).status
    assert status["steps"]["train"]["summary"] == {"train_loss": None, "steps": [1, None]}
    json.dumps(status, allow_nan=False)
    assert "trainLoss" not in (status.get("metrics") or {})


def test_a_model_no_better_than_its_base_is_a_warning_condition():
    """The evaluate step's verdict on base vs fine-tuned reaches status: Improved and metrics."""
    from chatbot_operator.observe import StepState
    from chatbot_operator.status_builder import collect_metrics, improvement_condition

    def states(summary):
        return {step: StepState(step, summary=summary if step == "evaluate" else None)
                for step in ("prepare", "configure", "train", "evaluate", "export")}

    worse = {"metrics": {"loss": 11.1, "accuracy": 0.002, "perplexity": 66000.0},
             "base_metrics": {"loss": 3.2, "accuracy": 0.38, "perplexity": 24.5},
             "warnings": ["the fine-tuned model is not better than the base model: eval loss 11.1 vs 3.2"]}
    condition = improvement_condition(states(worse), [], "2026-12-01T00:00:00Z", 3)
    assert (condition["type"], condition["status"], condition["reason"]) == ("Improved", "False", "NotBetterThanBase")
    assert "11.1 vs 3.2" in condition["message"] and condition["observedGeneration"] == 3
    assert collect_metrics(states(worse))["baseLoss"] == 3.2

    better = {**worse, "metrics": {"loss": 2.0, "accuracy": 0.57, "perplexity": 7.4}, "warnings": []}
    later = improvement_condition(states(better), [condition], "2026-12-01T00:01:00Z", 3)
    assert (later["status"], later["reason"]) == ("True", "LowerEvalLoss")
    assert later["lastTransitionTime"] == "2026-12-01T00:01:00Z"
    assert improvement_condition(states(None), [], "2026-12-01T00:00:00Z", 3) is None
