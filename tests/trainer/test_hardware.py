"""Device, precision and micro-batch are decided on the node a step runs on.

In the cluster, configure runs without a GPU and train/evaluate on GPU nodes; a preempted
train pod may come back on another GPU type and must still resume its checkpoints."""

from __future__ import annotations

import pytest

from chatbot_trainer import hardware, training
from chatbot_trainer.errors import InvalidConfig
from chatbot_trainer.params import trainer_params

CPU = {"device": "cpu", "name": "cpu", "count": 0, "memory_gb": None, "bf16": False}
H100 = {"device": "cuda", "name": "NVIDIA H100", "count": 1, "memory_gb": 80.0, "bf16": True}
T4 = {"device": "cuda", "name": "Tesla T4", "count": 1, "memory_gb": 15.0, "bf16": False}


def params(**extra):
    return trainer_params({"training_data": "x.jsonl", "batch_size": 64, "max_seq_length": 1024, **extra})


def test_precision_and_micro_batch_follow_the_hardware():
    assert hardware.resolve(params(), CPU) | {"hardware": None} == {
        "hardware": None, "device": "cpu", "precision": "fp32", "micro_batch_size": 64,
        "gradient_accumulation_steps": 1}
    h100 = hardware.resolve(params(), H100)
    assert (h100["precision"], h100["micro_batch_size"], h100["gradient_accumulation_steps"]) == ("bf16", 16, 4)
    assert hardware.resolve(params(), T4)["precision"] == "fp16"
    assert hardware.resolve(params(micro_batch_size=8), H100)["micro_batch_size"] == 8


def test_impossible_precision_is_named():
    with pytest.raises(InvalidConfig, match="fp16 needs a CUDA GPU"):
        hardware.resolve(params(precision="fp16"), CPU)
    with pytest.raises(InvalidConfig, match="Tesla T4 has no bf16"):
        hardware.resolve(params(precision="bf16"), T4)


def configure_result_from_a_cpu_pod(p):
    return {"base_model": {"architecture": "llama", "source": "hub", "name_or_path": "org/m"},
            "base_model_path": "org/m", "warmup_steps": 3, "target_modules": ["q_proj"],
            "train_base_weights": False, **hardware.resolve(p, CPU)}


def test_train_plan_uses_the_gpu_of_its_own_node(monkeypatch):
    p = params()
    configure = configure_result_from_a_cpu_pod(p)
    assert configure["device"] == "cpu"
    monkeypatch.setattr(hardware, "detect", lambda: H100)
    plan = training.TrainPlan.from_configure(configure, p)
    assert (plan.device, plan.precision, plan.micro_batch_size, plan.gradient_accumulation_steps) == (
        "cuda", "bf16", 16, 4)


def test_checkpoints_resume_on_another_gpu_type(monkeypatch, tmp_path):
    p = params()
    configure = configure_result_from_a_cpu_pod(p)
    data = tmp_path / "train.jsonl"
    data.write_text('{"messages": []}\n')
    monkeypatch.setattr(hardware, "detect", lambda: H100)
    on_h100 = training._fingerprint(training.TrainPlan.from_configure(configure, p), p, data)
    monkeypatch.setattr(hardware, "detect", lambda: T4)
    on_t4 = training._fingerprint(training.TrainPlan.from_configure(configure, p), p, data)
    assert on_h100 == on_t4
    other = params(learning_rate=0.5)
    assert training._fingerprint(training.TrainPlan.from_configure(configure, other), other, data) != on_h100
