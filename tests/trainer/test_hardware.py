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


# ---------------------------------------------------------------------------- CPU threads


def cgroup(tmp_path, v2: str | None = None, v1: tuple[int, int] | None = None):
    root = tmp_path / "cgroup"
    root.mkdir()
    if v2 is not None:
        (root / "cpu.max").write_text(v2 + "\n")
    if v1 is not None:
        (root / "cpu,cpuacct").mkdir()
        (root / "cpu,cpuacct" / "cpu.cfs_quota_us").write_text(f"{v1[0]}\n")
        (root / "cpu,cpuacct" / "cpu.cfs_period_us").write_text(f"{v1[1]}\n")
    return root


@pytest.mark.parametrize(("v2", "v1", "affinity", "threads", "limited"), [
    ("400000 100000", None, 64, 4, True),     # a pod asking for 4 CPUs on a 64-core node
    ("250000 100000", None, 64, 2, True),     # 2.5 CPUs: 2 threads, never more than the share
    ("50000 100000", None, 64, 1, True),      # half a CPU: still one thread
    ("800000 100000", None, 4, 4, False),     # the affinity mask is the smaller bound
    ("max 100000", None, 64, 64, False),      # no limit
    (None, (300000, 100000), 64, 3, True),    # cgroup v1
    (None, (-1, 100000), 64, 64, False),      # cgroup v1 without a quota
    (None, None, 8, 8, False),                # no cgroup files at all
])
def test_cpu_quota_threads_from_a_cgroup(tmp_path, v2, v1, affinity, threads, limited):
    info = hardware.cpu_quota_threads(cgroup(tmp_path, v2, v1), affinity=affinity)
    assert (info["threads"], info["limited"], info["cpus_allowed"]) == (threads, limited, affinity)
    assert (info["quota_cpus"] is None) == (v2 in (None, "max 100000") and (v1 is None or v1[0] < 0))


def test_apply_cpu_threads_sizes_every_pool_by_the_quota(tmp_path):
    environ: dict[str, str] = {"MKL_NUM_THREADS": "2"}  # set by the user: kept
    info = hardware.apply_cpu_threads(environ, cgroup(tmp_path, "400000 100000"), affinity=64)
    assert info["threads"] == 4 and info["decided_by"] == "cpu quota"
    assert environ == {"OMP_NUM_THREADS": "4", "OPENBLAS_NUM_THREADS": "4", "MKL_NUM_THREADS": "2",
                       "RAYON_NUM_THREADS": "4", "RAYON_RS_NUM_CPUS": "4"}


def test_an_explicit_omp_num_threads_wins(tmp_path):
    environ = {"OMP_NUM_THREADS": "6"}
    info = hardware.apply_cpu_threads(environ, cgroup(tmp_path, "400000 100000"), affinity=64)
    assert info["threads"] == 6 and info["decided_by"] == "OMP_NUM_THREADS"
    assert environ["OPENBLAS_NUM_THREADS"] == environ["RAYON_NUM_THREADS"] == "6"


def test_without_a_quota_the_pools_keep_their_defaults(tmp_path):
    environ: dict[str, str] = {}
    info = hardware.apply_cpu_threads(environ, cgroup(tmp_path, "max 100000"), affinity=16)
    assert environ == {} and info["decided_by"] == "defaults"


def test_a_step_process_starts_torch_with_the_quota_threads(tmp_path):
    """In a fresh process, as a step pod starts: torch's intra-op pool has the quota's size
    (1.5 CPUs: one thread, where torch would start one per core of this machine)."""
    import os
    import subprocess
    import sys

    root = cgroup(tmp_path, "150000 100000")
    code = (
        "from chatbot_trainer.train import hardware\n"
        f"info = hardware.apply_cpu_threads(cgroup_root={str(root)!r}, affinity=64)\n"
        "import torch, json\n"
        "print(json.dumps([info['threads'], torch.get_num_threads(), hardware.cpu_threads_in_effect()['torch_threads']]))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in hardware.THREAD_VARIABLES}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[1, 1, 1]"


def test_every_step_result_says_how_many_cpu_threads_it_ran(tmp_path):
    import json

    from chatbot_trainer.steps import run_step
    from chatbot_trainer.workspace import StepContext

    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"q{i}"},
                                                     {"role": "assistant", "content": f"a{i}"}]}) + "\n"
                            for i in range(5)))
    ctx = StepContext(workspace=tmp_path / "ws", params=trainer_params({"training_data": str(data)}), name="bot")
    result = run_step("prepare", ctx, termination_log=str(tmp_path / "msg"))
    written = json.loads((tmp_path / "ws" / "prepare" / "result.json").read_text())
    assert written["cpu_threads"] == result["cpu_threads"]
    assert result["cpu_threads"]["threads"] >= 1 and "source" in result["cpu_threads"]
