"""ChatbotTraining spec: what a user asks for.

`TrainingParams` holds everything the trainer needs (the seed workflow's inputs plus LoRA,
evaluation and export settings). `ChatbotTrainingSpec` adds what only the cluster needs
(GPUs, scheduling, storage, images, step policies, suspend). Field names are snake_case in
Python and camelCase in Kubernetes; both spellings are accepted on input.

Cross-field rules live in `CROSS_FIELD_RULES`: each one is a CEL expression for the CRD and
the same check in Python, so `kubectl apply` and the local CLI reject the same specs.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, StringConstraints, model_validator

from chatbot_api.base import ApiModel, CrossFieldRule
from chatbot_api.corev1 import (
    LOCAL_PATH,
    PVC_URI,
    Affinity,
    DnsSubdomain,
    ImageRef,
    LABEL_MAP_SCHEMA,
    MAX_LABELS,
    LabelKeyOfMap,
    LabelValue,
    ResourcesSpec,
    Toleration,
)
from chatbot_api.serve import SERVE_RULES, ServeSpec

GROUP = "chatbot.dev"
VERSION = "v1alpha1"
KIND = "ChatbotTraining"
PLURAL = "chatbottrainings"
SINGULAR = "chatbottraining"
SHORT_NAMES = ["cbt"]
CATEGORIES = ["ml"]

StepName = Literal["prepare", "configure", "train", "evaluate", "export"]
STEPS: tuple[str, ...] = ("prepare", "configure", "train", "evaluate", "export")
DEFAULT_TRAINING_STEPS = 1000  # when neither trainingSteps nor epochs is set
Quantization = Literal["f32", "f16", "bf16", "q8_0", "q4_0", "q4_k_m", "q5_k_m", "q6_k"]


# trainingData: a path in the image, pvc://<claim>/<path>, http(s)://…, s3://bucket/key, file://…,
# hf://datasets/<owner>/<name>[@<revision>][/<file>]
DATA_URI = (
    rf"^({PVC_URI}|https?://[^/\s]+.*|s3://[^/\s]+/+[^/].*|file://.+"
    rf"|hf://datasets/[^/@\s]+/[^/@\s]+(@[^/\s]+)?(/.*)?|{LOCAL_PATH})$"
)
# modelType: a preset, a hub id, a path in the image, or pvc://<claim>/<path>.
MODEL_REF = rf"^({PVC_URI}|{LOCAL_PATH})$"
# chatTemplate: a built-in template name, or a Jinja file (a path with a "/" in it, or
# pvc://<claim>/<path>).
CHAT_TEMPLATE_REF = rf"^([a-z][a-z0-9.-]*|[^:]*/[^:]*|{PVC_URI})$"


# ---------------------------------------------------------------------------- training


class DataSpec(ApiModel):
    format: Literal["auto", "messages", "sharegpt", "alpaca", "prompt_completion"] = Field(
        "auto", description="Record format of the training data; auto detects it per record."
    )
    eval_fraction: float = Field(
        0.1, ge=0.0, le=0.5, description="Share of conversations held out for evaluation."
    )
    max_bad_line_fraction: float = Field(
        0.1,
        ge=0.0,
        le=1.0,
        description="Fail the prepare step when more than this share of lines is malformed.",
    )
    system_prompt: str | None = Field(
        None,
        description="System prompt added to conversations that have none (the data's own "
        "system messages are kept).",
    )
    dedupe: bool = Field(True, description="Drop duplicate conversations.")


class LoraSpec(ApiModel):
    rank: int = Field(16, ge=1, le=1024, description="LoRA rank r.")
    alpha: int = Field(32, ge=1, le=4096, description="LoRA alpha (scaling = alpha / rank).")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    target_modules: list[str] | None = Field(
        None,
        description="Module names to adapt; default depends on the architecture "
        "(attention and MLP projections).",
    )


class EvaluationSpec(ApiModel):
    max_loss: float | None = Field(
        None, gt=0, description="Fail the run when the eval loss is above this value."
    )
    min_accuracy: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="Fail the run when the assistant-token accuracy is below this value.",
    )
    max_eval_examples: int | None = Field(
        None, ge=1, description="Evaluate on at most this many held-out conversations."
    )
    require_improvement: bool = Field(
        False,
        description="Fail the run when the fine-tuned model is not better than the base model: "
        "eval loss not below the base's, or answers with a lower fact recall or ROUGE-L than the "
        "base's (otherwise each is reported as a warning).",
    )
    min_fact_recall: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="Fail the run when the fine-tuned model's answers to the held-out questions "
        "state less than this share of the facts (numbers with units, prices, URLs, e-mail "
        "addresses, names) of the data's answers.",
    )
    min_answer_score: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="Fail the run when the mean ROUGE-L F1 of the fine-tuned model's answers "
        "against the data's answers is below this value.",
    )
    answer_questions: int = Field(
        64,
        ge=0,
        le=100_000,
        description="Held-out questions (the last user turn of a held-out conversation) answered "
        "greedily by the fine-tuned and the base model and scored against the data's answers "
        "(fact recall, ROUGE-L); 0 skips the answer metrics.",
    )
    sample_answers: int = Field(
        3,
        ge=0,
        le=10,
        description="Held-out questions answered by the base and the fine-tuned model (greedy), "
        "shown side by side in the result.",
    )


class ExportSpec(ApiModel):
    quantizations: list[Quantization] = Field(
        default_factory=lambda: ["f16", "q8_0"],
        min_length=1,
        max_length=5,
        description="GGUF files to write; the first one is reported as the model. "
        "q4_k_m, q5_k_m and q6_k are made from the F16 file by llama.cpp's quantizer.",
    )
    name: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,100}$",
        description="Base name of the exported files (default: the resource name).",
    )


class DistributedSpec(ApiModel):
    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="How several training processes share the work: ddp replicates the model "
        "on every GPU; fsdp shards the frozen base across them (for a base that does not fit "
        "one GPU; LoRA on a frozen base only).",
    )


class TrainingParams(ApiModel):
    """Everything the trainer needs. The seed workflow's inputs come first, with its defaults."""

    training_data: str = Field(
        ...,
        min_length=1,
        max_length=2048,
        pattern=DATA_URI,
        description="Chat data (JSONL, JSON array, parquet, or a folder saved with datasets' "
        "save_to_disk): a path in the image, pvc://<claim>/<path>, https://…, s3://bucket/key "
        "or hf://datasets/<owner>/<name>.",
    )
    model_type: str = Field(
        "gpt",
        min_length=1,
        max_length=1024,
        pattern=MODEL_REF,
        description="Base model: a preset (gpt, llama, qwen2, mistral, smollm, scratch-gpt, "
        "scratch-llama), a Hugging Face hub id, or a path on a volume.",
    )
    chat_template: str | None = Field(
        None,
        max_length=1024,
        pattern=CHAT_TEMPLATE_REF,
        description="Chat template to train with, instead of the base model's: a built-in "
        "(chatml: ChatML; chatml-tools: ChatML with tool definitions, calls and results in "
        "Qwen2.5's format, for ChatML models such as SmolLM2) or a Jinja file (a path with a / "
        "in it, in the image, or pvc://<claim>/<path>). Checked against the tokenizer's special tokens; "
        "written into the GGUF and the Modelfile.",
    )
    training_steps: int | None = Field(
        None,
        ge=1,
        le=1_000_000,
        description=f"Optimizer steps (default: {DEFAULT_TRAINING_STEPS} when epochs is unset; "
        "mutually exclusive with epochs).",
    )
    epochs: float | None = Field(
        None,
        gt=0.0,
        le=10_000.0,
        description="Passes over the training data, instead of trainingSteps: the configure step "
        "resolves it to ceil(epochs × packed training sequences / batchSize) steps.",
    )
    batch_size: int = Field(
        8, ge=1, le=4096, description="Conversations (or packed sequences) per optimizer step."
    )
    learning_rate: float | None = Field(
        None,
        gt=0.0,
        le=1.0,
        description="Peak learning rate. Unset: the base model's default (3e-4 for models of up "
        "to 1B parameters such as smollm, 1e-4 above), 1e-3 for a model built from a config.",
    )

    max_seq_length: int = Field(
        512, ge=16, le=131072, description="Tokens per sequence; longer conversations are dropped."
    )
    micro_batch_size: int | None = Field(
        None,
        ge=1,
        le=4096,
        description="Sequences per forward pass; batchSize/microBatchSize gives gradient "
        "accumulation. Default: chosen from the hardware.",
    )
    packing: bool = Field(True, description="Pack several conversations into one sequence.")
    lr_scheduler: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="Learning-rate schedule after warmup."
    )
    warmup_steps: int | None = Field(
        None, ge=0, description="Warmup steps (default: 3% of trainingSteps)."
    )
    weight_decay: float = Field(0.0, ge=0.0, le=1.0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0.0, description="Gradient clipping norm.")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto",
        description="Training precision; auto picks bf16 autocast where the GPU or CPU supports "
        "it natively (CPU: avx512_bf16 or AMX), fp32 elsewhere.",
    )
    compile: Literal["auto", "on", "off"] = Field(
        "auto",
        description="torch.compile of the decoder layers: on, off, or auto (eager: compiled LoRA "
        "layers measured slower than eager on CPU, not yet measured on GPUs).",
    )
    seed: int = Field(42, ge=0, description="Seed for the data split and training.")
    checkpoint_every: int = Field(
        100, ge=1, description="Save a resumable checkpoint every N steps."
    )
    log_every: int = Field(10, ge=1, description="Log training metrics every N steps.")

    data: DataSpec = Field(default_factory=DataSpec, description="Data preparation settings.")
    lora: LoraSpec = Field(default_factory=LoraSpec, description="LoRA adapter settings.")
    evaluation: EvaluationSpec = Field(
        default_factory=EvaluationSpec, description="Evaluation and quality thresholds."
    )
    export: ExportSpec = Field(default_factory=ExportSpec, description="GGUF export settings.")
    distributed: DistributedSpec = Field(
        default_factory=DistributedSpec,
        description="Training on several GPUs (gpu.count > 1) or nodes (nodes > 1).",
    )

    @model_validator(mode="after")
    def _cross_field_rules(self) -> "TrainingParams":
        problems = [rule.message for rule in CROSS_FIELD_RULES if not rule.holds(self)]
        if problems:
            raise ValueError("; ".join(problems))
        if self.training_steps is None and self.epochs is None:  # a default, not a choice:
            self.__dict__["training_steps"] = DEFAULT_TRAINING_STEPS  # kept out of model_fields_set
        return self

    def training_params(self) -> "TrainingParams":
        """The trainer's share of the spec (drops cluster-only fields)."""
        data = self.model_dump(include=set(TrainingParams.model_fields))
        return TrainingParams.model_validate(data)


# ---------------------------------------------------------------------------- cluster


class GpuSpec(ApiModel):
    count: int = Field(1, ge=0, le=16, description="GPUs for the train and evaluate steps.")
    resource_name: str = Field(
        "nvidia.com/gpu",
        pattern=r"^[A-Za-z0-9.-]+/[A-Za-z0-9._-]+$",
        description="Extended resource name of the GPU (e.g. nvidia.com/gpu, amd.com/gpu).",
    )


class WorkspaceSpec(ApiModel):
    existing_claim: DnsSubdomain | None = Field(
        None, description="Use this PersistentVolumeClaim as the shared workspace."
    )
    size: str = Field(
        "20Gi",
        pattern=r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|K|M|G|T|P)?$",
        description="Size of the workspace claim the operator creates.",
    )
    storage_class_name: DnsSubdomain | None = Field(
        None, description="StorageClass of the workspace claim the operator creates."
    )
    access_mode: Literal["ReadWriteOnce", "ReadWriteMany", "ReadWriteOncePod"] = Field(
        "ReadWriteOnce", description="Access mode of the workspace claim the operator creates."
    )
    reclaim_policy: Literal["Retain", "Delete"] = Field(
        "Retain",
        description="On deletion of the ChatbotTraining, keep (Retain) or delete (Delete) the "
        "workspace claim the operator created. An existing claim is never deleted.",
    )


class StepPolicy(ApiModel):
    active_deadline_seconds: int | None = Field(
        None, ge=60, description="Kill the step's Job after this many seconds."
    )
    backoff_limit: int | None = Field(
        None, ge=0, le=20, description="Pod retries before the step fails."
    )


class StepPolicies(ApiModel):
    prepare: StepPolicy = Field(default_factory=StepPolicy)
    configure: StepPolicy = Field(default_factory=StepPolicy)
    train: StepPolicy = Field(default_factory=StepPolicy)
    evaluate: StepPolicy = Field(default_factory=StepPolicy)
    export: StepPolicy = Field(default_factory=StepPolicy)


DEFAULT_STEP_DEADLINES = {
    "prepare": 3600,
    "configure": 1800,
    "train": 7 * 24 * 3600,
    "evaluate": 6 * 3600,
    "export": 6 * 3600,
}
DEFAULT_BACKOFF_LIMIT = 2


class ChatbotTrainingSpec(TrainingParams):
    """The full spec of a ChatbotTraining resource."""

    gpu: GpuSpec = Field(default_factory=GpuSpec, description="GPUs for train and evaluate.")
    nodes: int = Field(
        1, ge=1, le=64,
        description="Nodes the train step runs on (Kubeflow's numNodes), each with gpu.count "
        "GPUs, as one Indexed Job; more than 1 needs a ReadWriteMany workspace.",
    )
    resources: ResourcesSpec | None = Field(
        None, description="CPU/memory requests and limits of the step containers."
    )
    node_selector: dict[LabelKeyOfMap, LabelValue] = Field(
        default_factory=dict, max_length=MAX_LABELS, json_schema_extra=LABEL_MAP_SCHEMA,
        description="Node labels the GPU steps must run on."
    )
    tolerations: list[Toleration] = Field(
        default_factory=list,
        max_length=64,
        description="Tolerations of the GPU steps (e.g. for GPU taints).",
    )
    affinity: Affinity | None = Field(
        None, description="Pod affinity of the GPU steps."
    )
    priority_class_name: DnsSubdomain | None = Field(
        None, description="PriorityClass of the step pods."
    )
    queue_name: (
        Annotated[DnsSubdomain, StringConstraints(max_length=63)] | None
    ) = Field(None, description="Kueue LocalQueue; set as the kueue.x-k8s.io/queue-name label.")
    image: ImageRef | None = Field(None, description="Trainer image (default: the operator's).")
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] | None = None
    image_pull_secrets: list[DnsSubdomain] = Field(
        default_factory=list, max_length=16, description="Secrets for pulling the trainer image."
    )
    service_account_name: DnsSubdomain | None = Field(
        None, description="ServiceAccount of the step pods (e.g. for s3:// access)."
    )
    env_from_secret: DnsSubdomain | None = Field(
        None, description="Secret whose keys become environment variables of the steps "
        "(e.g. AWS_ACCESS_KEY_ID, HF_TOKEN)."
    )
    workspace: WorkspaceSpec = Field(
        default_factory=WorkspaceSpec, description="Shared volume the steps work in."
    )
    output_path: str | None = Field(
        None,
        pattern=r"^pvc://[a-z0-9]([-a-z0-9]*[a-z0-9])?/.*$",
        description="Where the GGUF files go, as pvc://<claim>/<dir> "
        "(default: the workspace, under export/).",
    )
    steps: StepPolicies = Field(
        default_factory=StepPolicies, description="Per-step deadlines and retry limits."
    )
    suspend: bool = Field(
        False, description="Stop creating new work and suspend the running Job; false resumes."
    )
    serve: ServeSpec = Field(
        default_factory=ServeSpec, description="Serve the exported model once training succeeded."
    )

    @model_validator(mode="after")
    def _cluster_rules(self) -> "ChatbotTrainingSpec":
        problems = [rule.message for rule in CLUSTER_RULES if not rule.holds(self)]
        if problems:
            raise ValueError("; ".join(problems))
        return self


# ---------------------------------------------------------------------------- rules


def _has(value: Any) -> bool:
    return value is not None


CROSS_FIELD_RULES: tuple[CrossFieldRule, ...] = (
    CrossFieldRule(
        cel="!has(self.microBatchSize) || self.microBatchSize <= self.batchSize",
        message="microBatchSize must not exceed batchSize",
        holds=lambda s: not _has(s.micro_batch_size) or s.micro_batch_size <= s.batch_size,
    ),
    CrossFieldRule(
        cel="!has(self.microBatchSize) || self.batchSize % self.microBatchSize == 0",
        message="batchSize must be a multiple of microBatchSize",
        holds=lambda s: not _has(s.micro_batch_size) or s.batch_size % s.micro_batch_size == 0,
    ),
    CrossFieldRule(
        cel="!has(self.warmupSteps) || !has(self.trainingSteps) || self.warmupSteps < self.trainingSteps",
        message="warmupSteps must be less than trainingSteps",
        holds=lambda s: not _has(s.warmup_steps) or not _has(s.training_steps)
        or s.warmup_steps < s.training_steps,
    ),
    CrossFieldRule(
        cel="!has(self.epochs) || !has(self.trainingSteps)",
        message="trainingSteps and epochs are mutually exclusive: set one of them, epochs counts "
        "passes over the packed training data",
        holds=lambda s: not (_has(s.epochs) and _has(s.training_steps)),
    ),
)

def world_size(spec: "ChatbotTrainingSpec") -> int:
    """Training processes of the train step: one per GPU (at least one) on each node."""
    return spec.nodes * max(spec.gpu.count, 1)


# Rules over the cluster-only part of the spec (not checked by the trainer).
CLUSTER_RULES: tuple[CrossFieldRule, ...] = (
    CrossFieldRule(
        cel="self.batchSize % ((has(self.nodes) ? self.nodes : 1) * (has(self.gpu) && "
        "has(self.gpu.count) && self.gpu.count > 1 ? self.gpu.count : 1)) == 0",
        message="batchSize must be a multiple of the number of training processes, "
        "nodes × gpu.count: each process takes an equal share of every batch",
        holds=lambda s: s.batch_size % world_size(s) == 0,
    ),
    CrossFieldRule(
        cel="!has(self.workspace) || !has(self.workspace.existingClaim) "
        "|| !has(self.workspace.storageClassName)",
        message="workspace.existingClaim and workspace.storageClassName are mutually exclusive",
        holds=lambda s: not (s.workspace.existing_claim and s.workspace.storage_class_name),
    ),
    *SERVE_RULES,
    CrossFieldRule(
        cel="!has(self.nodes) || self.nodes <= 1 || (has(self.workspace) && "
        "(has(self.workspace.existingClaim) || (has(self.workspace.accessMode) && "
        "self.workspace.accessMode == 'ReadWriteMany')))",
        message="nodes > 1 needs a workspace every node can mount: set workspace.accessMode "
        "to ReadWriteMany, with a StorageClass that provides it, or workspace.existingClaim "
        "to a ReadWriteMany claim",
        holds=lambda s: s.nodes <= 1 or bool(s.workspace.existing_claim)
        or s.workspace.access_mode == "ReadWriteMany",
    ),
)

# The operator names what it creates after the training: the Jobs <name>-<step>, whose names
# are also a label value of their pods (at most 63 characters), <name>-config and
# <name>-workspace. The longest suffix sets how long the name may be.
DERIVED_SUFFIXES: tuple[str, ...] = tuple(f"-{step}" for step in STEPS) + ("-config", "-workspace")
MAX_NAME_LENGTH = 63 - max(len(suffix) for suffix in DERIVED_SUFFIXES)
NAME_RULE = CrossFieldRule(
    cel=f"size(self.metadata.name) <= {MAX_NAME_LENGTH}",
    message=f"metadata.name must have at most {MAX_NAME_LENGTH} characters: the Job "
    "<name>-configure must fit in a 63-character label value",
    holds=lambda name: len(name) <= MAX_NAME_LENGTH,
)

# Fields that cannot change once a run started: changing them mid-run would mix two runs.
IMMUTABLE_FIELDS: tuple[str, ...] = (
    "trainingData",
    "modelType",
    "chatTemplate",
    "trainingSteps",
    "epochs",
    "batchSize",
    "learningRate",
    "maxSeqLength",
    "seed",
    "data",
    "lora",
    "workspace",
    "distributed",
)
