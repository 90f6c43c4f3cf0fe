"""ChatbotTraining status: what the operator reports back.

`metrics` and `model` carry the seed workflow's output JSON (in camelCase), so
`kubectl get -o jsonpath='{.status.model.path}'` gives the GGUF location.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from chatbot_api.serve import ServingStatus
from chatbot_api.spec import ApiModel, StepName

Phase = Literal["Pending", "Running", "Suspended", "Succeeded", "Failed"]
StepPhase = Literal["Pending", "Running", "Succeeded", "Failed", "Skipped"]
PHASES: tuple[str, ...] = ("Pending", "Running", "Suspended", "Succeeded", "Failed")


class Condition(ApiModel):
    """A standard metav1.Condition."""

    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str = Field(..., pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$")
    message: str = ""
    last_transition_time: str
    observed_generation: int | None = None


class Metrics(ApiModel):
    loss: float | None = Field(None, description="Eval loss on held-out conversations.")
    accuracy: float | None = Field(None, description="Next-token accuracy on assistant tokens.")
    perplexity: float | None = Field(None, description="exp(eval loss).")
    train_loss: float | None = Field(None, description="Final training loss.")
    base_loss: float | None = Field(None, description="Eval loss of the base model before fine-tuning.")
    base_accuracy: float | None = Field(None, description="Assistant-token accuracy of the base model.")
    fact_recall: float | None = Field(
        None, description="Share of the facts (numbers with units, prices, URLs, e-mail addresses, "
        "names) of the data's answers that the fine-tuned model's answers to held-out questions state.")
    rouge_l: float | None = Field(
        None, description="Mean ROUGE-L F1 of the fine-tuned model's answers against "
        "the data's answers.")
    base_fact_recall: float | None = Field(None, description="factRecall of the base model's answers.")
    base_rouge_l: float | None = Field(
        None, description="rougeL of the base model's answers.")


def answer_status_metrics(evaluate_summary: dict[str, Any] | None) -> dict[str, float]:
    """status.metrics' answer fields from the evaluate step's summary (its termination message):
    factRecall, rougeL, baseFactRecall, baseRougeL (those it reported)."""
    summary = evaluate_summary if isinstance(evaluate_summary, dict) else {}
    found = {}
    for prefix, key in (("", "metrics"), ("base", "base_metrics")):
        block = summary.get(key) if isinstance(summary.get(key), dict) else {}
        for name, field in (("fact_recall", "FactRecall"), ("rouge_l", "RougeL")):
            value = block.get(name)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value == value:
                found[(prefix + field) if prefix else field[0].lower() + field[1:]] = float(value)
    return found


class ModelFile(ApiModel):
    path: str
    quantization: str
    size_mb: float


class ModelOutput(ApiModel):
    path: str = Field(..., description="Location of the primary GGUF file.")
    format: str = "gguf"
    size_mb: float
    base_model: str | None = Field(None, description="The base model that was fine-tuned.")
    files: list[ModelFile] = Field(default_factory=list, description="All exported files.")
    modelfile: str | None = Field(None, description="Location of the Ollama Modelfile.")


class LiveProgress(ApiModel):
    """What the running train or evaluate step reports about itself (polled by the operator at
    most every CHATBOT_PROGRESS_SECONDS); removed when the step ends or its report goes stale."""

    step: StepName = Field(..., description="The step reporting.")
    unit: Literal["steps", "batches"] = Field(
        ..., description="What is counted: optimizer steps (train) or eval batches (evaluate).")
    completed: int = Field(..., ge=0, description="Steps or batches done.")
    total: int = Field(..., ge=0, description="Steps or batches in all.")
    percent: float | None = Field(None, description="completed / total, in percent.")
    eta_seconds: float | None = Field(None, description="Estimated seconds until the step's loop ends.")
    eta: str | None = Field(None, description="etaSeconds for people, e.g. 45s, 12m or 1h05m.")
    loss: float | None = Field(None, description="Training loss of the latest logged window.")
    tokens_per_second: float | None = Field(
        None, description="Training throughput of the latest logged window.")
    learning_rate: float | None = Field(None, description="Learning rate of the latest logged window.")
    phase: str | None = Field(
        None, max_length=128,
        description="Work between steps or batches that is running now (e.g. sample answers of the "
        "fine-tuned model); the ETA holds while it runs.")
    last_updated: str = Field(
        ..., description="When the operator last read this report from the step's pod.")


class StepStatus(ApiModel):
    phase: StepPhase = "Pending"
    job_name: str | None = None
    start_time: str | None = None
    completion_time: str | None = None
    attempts: int | None = None
    world_size: int | None = Field(None, description="Training processes (train step).")
    nodes: int | None = Field(None, description="Nodes the train step runs on.")
    reason: str | None = None
    message: str | None = None
    summary: dict[str, Any] | None = Field(
        None, description="The step's summary from its termination message."
    )


class ChatbotTrainingStatus(ApiModel):
    model_config = ApiModel.model_config | {"extra": "ignore"}

    phase: Phase = "Pending"
    step: StepName | None = Field(None, description="The step running now (or that ended the run).")
    reason: str | None = Field(None, description="Machine-readable reason for the phase.")
    message: str | None = Field(None, description="Human-readable explanation, with advice on failure.")
    observed_generation: int | None = None
    start_time: str | None = None
    completion_time: str | None = None
    workspace_claim: str | None = Field(None, description="The PVC the steps share.")
    config_map: str | None = Field(None, description="ConfigMap holding the resolved config.")
    steps: dict[str, StepStatus] = Field(default_factory=dict)
    conditions: list[Condition] = Field(default_factory=list)
    metrics: Metrics | None = None
    model: ModelOutput | None = None
    serving: ServingStatus | None = Field(None, description="The server of the model (spec.serve).")
    progress: LiveProgress | None = Field(
        None, description="Live progress of the running train or evaluate step.")
