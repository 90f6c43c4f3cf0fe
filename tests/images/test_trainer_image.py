"""The trainer image, run as the operator's step Jobs run it.

Each step's container is started from the Job the operator builds (manifests.step_job): its
image, args (`chatbot-trainer <step> --workspace /workspace --config /etc/chatbot/config.json`),
env, uid/gid 1000, read-only root filesystem, dropped capabilities, a tmpfs /tmp, the
workspace claim (a host folder) and the config map (a host folder holding config.json), the
termination message file at /dev/termination-log, and no network at all: the `smollm` preset's
offline SmolLM2 file and the example data set come from the image. Then the result JSON and
the GGUF files are read on the volume, and the termination messages through the operator's
own readers (observe.termination_message, step_states.observe_step,
status_builder.collect_metrics / collect_model).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from images_support import BUILD_TIMEOUT, Engine, Sources, run_args, termination_file

from chatbot_api.spec import GROUP, KIND, STEPS, VERSION, ChatbotTrainingSpec
from chatbot_operator import manifests, observe, status_builder, step_states
from chatbot_operator.settings import OperatorConfig

pytestmark = [pytest.mark.images, pytest.mark.timeout(BUILD_TIMEOUT + 1800)]

NAME = "support-bot"
NAMESPACE = "ml"
UID = 1000
# A few steps of short sequences on the bundled data: the point is the path through the image.
SPEC: dict[str, Any] = {
    "trainingData": "/opt/chatbot/examples/data/support.jsonl",
    "modelType": "smollm",
    "trainingSteps": 3,
    "batchSize": 2,
    "learningRate": 0.0003,
    "maxSeqLength": 128,
    "evaluation": {"maxEvalExamples": 6, "sampleAnswers": 2},
    "export": {"quantizations": ["f16", "q4_k_m"]},
    "gpu": {"count": 0},
}
# The machine's cores are shared: one thread per container (pods get their CPU limit).
THREADS = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def training_object(spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND,
            "metadata": {"name": NAME, "namespace": NAMESPACE, "uid": str(uuid.uuid4())},
            "spec": spec}


class StepRun:
    def __init__(self, step: str, job: dict, proc: subprocess.CompletedProcess, message: str,
                 seconds: float) -> None:
        self.step, self.job, self.proc, self.message, self.seconds = step, job, proc, message, seconds

    def pod(self) -> dict[str, Any]:
        """The Pod as the kubelet reports it: exit code and termination message."""
        container = self.job["spec"]["template"]["spec"]["containers"][0]
        labels = {**self.job["spec"]["template"]["metadata"]["labels"],
                  "batch.kubernetes.io/job-name": self.job["metadata"]["name"]}
        return {"metadata": {"name": f"{self.job['metadata']['name']}-x", "labels": labels},
                "status": {"phase": "Succeeded" if self.proc.returncode == 0 else "Failed",
                           "containerStatuses": [{"name": container["name"], "state": {"terminated": {
                               "exitCode": self.proc.returncode,
                               "reason": "Completed" if self.proc.returncode == 0 else "Error",
                               "message": self.message}}}]}}

    def finished_job(self) -> dict[str, Any]:
        """The Job as the Job controller leaves it after this pod."""
        if self.proc.returncode == 0:
            status = {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}
        else:
            status = {"failed": 1, "conditions": [
                {"type": "FailureTarget", "status": "True", "reason": "PodFailurePolicy"},
                {"type": "Failed", "status": "True", "reason": "PodFailurePolicy",
                 "message": f"Container trainer failed with exit code {self.proc.returncode}"}]}
        return {**self.job, "status": status}

    def explain(self) -> str:
        return (f"step {self.step} exited {self.proc.returncode} after {self.seconds:.0f}s\n"
                f"stdout: {self.proc.stdout[-3000:]}\nstderr: {self.proc.stderr[-5000:]}")


class Steps:
    """Runs step Jobs of one ChatbotTraining in containers on one workspace folder."""

    def __init__(self, engine: Engine, image: str, root: Path, spec: dict[str, Any]) -> None:
        self.engine, self.root = engine, root
        self.spec = ChatbotTrainingSpec.model_validate(spec)
        self.training = training_object(spec)
        self.config = OperatorConfig(trainer_image=image)
        self.workspace = root / "workspace"
        self.workspace.mkdir()
        os.chown(self.workspace, UID, UID)  # what fsGroup does for a fresh claim
        config_dir = root / "config"
        config_dir.mkdir()
        (config_dir / manifests.CONFIG_KEY).write_text(manifests.config_json(NAME, self.spec))
        self.sources = Sources(
            claims={manifests.workspace_claim_name(NAME, self.spec): self.workspace},
            config_maps={manifests.config_map_name(NAME): config_dir})

    def run(self, step: str) -> StepRun:
        job = manifests.step_job(self.training, self.spec, step, self.config)
        pod = job["spec"]["template"]["spec"]
        folder = self.root / f"pod-{step}"
        folder.mkdir()
        log = termination_file(folder, UID)
        name = f"chatbot-test-{step}-{uuid.uuid4().hex[:8]}"
        args = run_args(self.engine, pod, self.sources, name=name, termination_log=log,
                        network="none", extra_env=THREADS)
        start = time.monotonic()
        try:
            proc = self.engine.run(*args, timeout=1200)
        finally:
            self.engine.remove(name)
        return StepRun(step, job, proc, log.read_text(), time.monotonic() - start)


@pytest.fixture(scope="module")
def pipeline(engine: Engine, trainer_image: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[Steps, dict[str, StepRun]]:
    """The five steps, in the operator's order, each in its own container."""
    steps = Steps(engine, trainer_image, tmp_path_factory.mktemp("trainer-image"), SPEC)
    runs: dict[str, StepRun] = {}
    for step in STEPS:
        runs[step] = steps.run(step)
        assert runs[step].proc.returncode == 0, runs[step].explain()
    # Shown with `pytest -rP`: what each step's container took, start to exit.
    print("step containers:", ", ".join(f"{s} {r.seconds:.1f} s" for s, r in runs.items()))
    return steps, runs


def test_every_step_succeeds_offline_and_reports_to_the_operator(pipeline) -> None:
    steps, runs = pipeline
    assert list(runs) == list(STEPS)
    for step, run in runs.items():
        data, raw = observe.termination_message(run.pod())
        assert raw is None and data is not None, f"{step}: not the trainer's JSON: {run.message!r}"
        assert data["ok"] is True and data["step"] == step, data
        assert len(run.message.encode()) <= 4096
    # What the operator's status computes from the Jobs and Pods: phase, summary, metrics.
    states = {step: step_states.observe_step(step, run.finished_job(), [run.pod()], steps.spec)
              for step, run in runs.items()}
    assert all(state.phase == "Succeeded" and state.summary for state in states.values()), states
    metrics = status_builder.collect_metrics(states)
    assert metrics and "loss" in metrics, metrics
    # status.model: pvc:// URIs of files that are on the workspace volume.
    claim = manifests.workspace_claim_name(NAME, steps.spec)
    model = status_builder.collect_model(states, claim)
    assert model and model["format"] == "gguf", model
    for uri in [model["path"], *(f["path"] for f in model.get("files", []))]:
        assert uri.startswith(f"pvc://{claim}/"), uri
        assert (steps.workspace / uri[len(f"pvc://{claim}/"):]).is_file(), uri


def test_results_and_gguf_files_are_on_the_volume(pipeline) -> None:
    steps, _ = pipeline
    for step in STEPS:
        result = steps.workspace / step / "result.json"
        assert result.is_file(), f"{result} missing"
        assert result.stat().st_uid == UID
        json.loads(result.read_text())
    export = json.loads((steps.workspace / "export" / "result.json").read_text())
    ggufs = sorted(steps.workspace.rglob("*.gguf"))
    names = " ".join(p.name.lower() for p in ggufs)
    assert "f16" in names and "q4_k_m" in names, ggufs
    for path in ggufs:
        assert path.read_bytes()[:4] == b"GGUF", path
        assert path.stat().st_size > 10_000_000, path  # SmolLM2-135M, not a stub
    assert export, export


def test_gguf_loads_in_the_hosts_reader(pipeline) -> None:
    gguf = pytest.importorskip("gguf")
    steps, _ = pipeline
    path = next(p for p in sorted(steps.workspace.rglob("*.gguf")) if "f16" in p.name.lower())
    reader = gguf.GGUFReader(str(path))
    assert reader.fields["general.architecture"].contents() == "llama"
    assert "tokenizer.chat_template" in reader.fields


def test_help_matches_the_step_contract(engine: Engine, trainer_image: str) -> None:
    """`chatbot-trainer --help` in the image is the step CLI of this source tree, with the five
    steps and the flags the operator passes (the image's default command is --help)."""
    from chatbot_trainer.cli import build_step_parser

    base = ["run", "--rm", "--network=none", "--read-only", "--user", f"{UID}:{UID}",
            "--env", "COLUMNS=100"]
    if engine.name == "podman":
        base.append("--read-only-tmpfs=false")
    proc = engine.run(*base, "--tmpfs", "/tmp", trainer_image, "--help", timeout=300, check=True)
    os.environ["COLUMNS"] = "100"
    try:
        expected = build_step_parser().format_help()
    finally:
        del os.environ["COLUMNS"]
    assert proc.stdout == expected
    for step in STEPS:
        assert step in proc.stdout
    spec = ChatbotTrainingSpec.model_validate({"trainingData": "/data/x.jsonl", "outputPath": "pvc://out/models"})
    for flag in manifests.step_args(spec, "export"):
        if flag.startswith("--"):
            assert flag in proc.stdout, flag
    default = engine.run(*base, "--tmpfs", "/tmp", trainer_image, timeout=300, check=True)
    assert default.stdout == expected


def test_a_failing_step_reports_its_reason_to_the_operator(engine: Engine, trainer_image: str,
                                                           tmp_path: Path) -> None:
    """Bad input: exit code 2 (the Job's podFailurePolicy fails it at once) and the trainer's
    JSON in the termination message, which the operator turns into the status reason."""
    spec = {**SPEC, "trainingData": "/opt/chatbot/examples/data/no-such-file.jsonl"}
    steps = Steps(engine, trainer_image, tmp_path, spec)
    run = steps.run("prepare")
    assert run.proc.returncode == manifests.EXIT_INVALID_INPUT, run.explain()
    rules = run.job["spec"]["podFailurePolicy"]["rules"]
    assert any(r["action"] == "FailJob" and run.proc.returncode in r["onExitCodes"]["values"]
               for r in rules if "onExitCodes" in r)
    data, raw = observe.termination_message(run.pod())
    assert raw is None and data is not None, run.message
    assert data["ok"] is False and data["step"] == "prepare" and data["reason"], data
    assert "no-such-file.jsonl" in data["message"]
    state = step_states.observe_step("prepare", run.finished_job(), [run.pod()], steps.spec)
    assert state.phase == "Failed"
    reason, message = state.reason, state.message
    assert reason == data["reason"]
    assert message.startswith("Step prepare failed: ") and "no-such-file.jsonl" in message
    # A step whose predecessor has not run: the same contract, another reason.
    later = steps.run("train")
    assert later.proc.returncode == manifests.EXIT_INVALID_INPUT, later.explain()
    data, _ = observe.termination_message(later.pod())
    assert data["ok"] is False and data["reason"] == "MissingStepResult", data
