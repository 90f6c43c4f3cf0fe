"""Device, precision and micro-batch are decided on the node a step runs on.

In the cluster, configure runs without a GPU and train/evaluate on GPU nodes; a preempted
train pod may come back on another GPU type and must still resume its checkpoints."""

from __future__ import annotations

import pytest

from chatbot_trainer.errors import InvalidConfig
from chatbot_trainer.params import trainer_params
from chatbot_trainer.train import hardware
from chatbot_trainer.train import checkpoints
from chatbot_trainer.train.plan import TrainPlan

CPU = {"device": "cpu", "name": "cpu", "count": 0, "memory_gb": None, "bf16": False}
H100 = {"device": "cuda", "name": "NVIDIA H100", "count": 1, "memory_gb": 80.0, "bf16": True}
T4 = {"device": "cuda", "name": "Tesla T4", "count": 1, "memory_gb": 15.0, "bf16": False}


def params(**extra):
    return trainer_params({"training_data": "x.jsonl", "batch_size": 64, "max_seq_length": 1024, **extra})


def test_precision_and_micro_batch_follow_the_hardware():
    assert hardware.resolve(params(), CPU) | {"hardware": None, "precision_reason": None} == {
        "hardware": None, "device": "cpu", "precision": "fp32", "precision_reason": None,
        "micro_batch_size": 1, "gradient_accumulation_steps": 64}  # 1,024-token rows: one per pass
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
    plan = TrainPlan.from_configure(configure, p)
    assert (plan.device, plan.precision, plan.micro_batch_size, plan.gradient_accumulation_steps) == (
        "cuda", "bf16", 16, 4)


def test_checkpoints_resume_on_another_gpu_type(monkeypatch, tmp_path):
    p = params()
    configure = configure_result_from_a_cpu_pod(p)
    data = tmp_path / "train.jsonl"
    data.write_text('{"messages": []}\n')
    monkeypatch.setattr(hardware, "detect", lambda: H100)
    on_h100 = checkpoints.fingerprint(TrainPlan.from_configure(configure, p), p, data)
    monkeypatch.setattr(hardware, "detect", lambda: T4)
    on_t4 = checkpoints.fingerprint(TrainPlan.from_configure(configure, p), p, data)
    assert on_h100 == on_t4
    other = params(learning_rate=0.5)
    assert checkpoints.fingerprint(TrainPlan.from_configure(configure, other), other, data) != on_h100


SMOLLM2 = {"hidden_size": 576, "num_hidden_layers": 30, "intermediate_size": 1536, "vocab_size": 49152,
           "tie_word_embeddings": True}


def test_cpus_with_native_bf16_train_in_bf16_autocast():
    bf16_cpu = {**CPU, "bf16": True, "bf16_reason": "avx512_bf16"}
    chosen = hardware.resolve(params(), bf16_cpu)
    assert (chosen["precision"], chosen["precision_reason"]) == ("bf16", "CPU has avx512_bf16: bf16 autocast")
    plain = hardware.resolve(params(), {**CPU, "bf16_reason": "no avx512_bf16 or amx_bf16 in /proc/cpuinfo"})
    assert plain["precision"] == "fp32" and "no avx512_bf16" in plain["precision_reason"]
    assert hardware.resolve(params(precision="fp32"), bf16_cpu)["precision"] == "fp32"
    assert isinstance(hardware.cpu_bf16()[0], bool)


def test_cpu_micro_batches_fit_the_memory_of_the_machine():
    """SmolLM2-135M at 4 x 128 tokens peaked at 3.0 GB: on a 2.5 GiB machine that must be split."""
    p = params(batch_size=4, max_seq_length=128)
    roomy = hardware.resolve(p, {**CPU, "memory_gb": 22.0}, model_config=SMOLLM2)
    assert (roomy["micro_batch_size"], roomy["gradient_accumulation_steps"]) == (4, 1)  # 512 tokens
    small = hardware.resolve(p, {**CPU, "memory_gb": 2.5}, model_config=SMOLLM2)
    assert small["micro_batch_size"] < 4 and small["micro_batch_size"] * small["gradient_accumulation_steps"] == 4
    model_bytes, per_token = hardware.training_bytes(SMOLLM2)
    assert 0.4e9 < model_bytes < 0.7e9 and 3e6 < per_token < 6e6
    tiny = hardware.resolve(p, {**CPU, "memory_gb": 1.0}, model_config=SMOLLM2)
    assert tiny["micro_batch_size"] == 1  # the least it can do
    assert hardware.resolve(p, {**CPU, "memory_gb": None}, model_config=SMOLLM2)["micro_batch_size"] == 4
    # the CPU token budget: longer rows, fewer of them per pass, whatever the memory
    assert hardware.resolve(params(batch_size=8, max_seq_length=256), {**CPU, "memory_gb": 64.0},
                            model_config=SMOLLM2)["micro_batch_size"] == 2
    assert hardware.resolve(params(batch_size=4, micro_batch_size=4), {**CPU, "memory_gb": 1.0},
                            model_config=SMOLLM2)["micro_batch_size"] == 4  # what the user set wins
