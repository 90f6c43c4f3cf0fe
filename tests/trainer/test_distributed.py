"""The train step on two real processes (torchrun, gloo on the CPU) against one process on the
same global batch: same logged losses, same adapter; a killed rank fails the run cleanly and
the checkpoint resumes on another world size; FSDP agrees with DDP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # pytest runs with --import-mode=importlib

from test_training import make_workspace, read_metrics, weights  # noqa: E402

# Measured (200 steps, micro-batch 4): DDP equals one process exactly, losses and adapter;
# FSDP (unfused AdamW, reduce-scatter sums) within 1.3e-4. Micro-batch 2 here: order may differ.
LOSS_TOLERANCE = 1e-5
ADAPTER_ATOL = 1e-4

pytestmark = pytest.mark.slow


def lora_workspace(root: Path, **params):
    """LoRA on a frozen tiny Llama (what DDP and FSDP wrap), deterministic: no dropout, fp32."""
    settings = dict(training_steps=12, batch_size=8, micro_batch_size=2, log_every=1,
                    checkpoint_every=6, precision="fp32", lora={"rank": 8, "dropout": 0.0})
    settings.update(params)
    return make_workspace(root, "tiny-llama", configure_overrides={"train_base_weights": False},
                          **settings)


def environment(**extra: str) -> dict[str, str]:
    path = os.pathsep.join([str(ROOT / "operator"), str(ROOT / "trainer-image"),
                            os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **extra}


def torchrun(ctx, nproc: int = 2, **extra_env: str) -> subprocess.Popen:
    """`chatbot-trainer train` on `nproc` processes, as the train Job of gpu.count=nproc runs it."""
    config = ctx.workspace / "config.json"
    config.write_text(json.dumps(ctx.params.to_api()))
    command = [sys.executable, "-m", "chatbot_trainer.launch", "--standalone",
               f"--nproc-per-node={nproc}", "-m", "chatbot_trainer.cli", "train",
               "--workspace", str(ctx.workspace), "--config", str(config),
               "--termination-log", str(ctx.workspace / "termination-log")]
    return subprocess.Popen(command, env=environment(**extra_env), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finished(process: subprocess.Popen, timeout: float = 120) -> tuple[int, str]:
    _, stderr = process.communicate(timeout=timeout)
    return process.returncode, stderr


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The reference: one process, the same global batch of 8 (4 micro-batches of 2)."""
    from chatbot_trainer.train.recipe import train

    ctx = lora_workspace(tmp_path_factory.mktemp("single"))
    result = train(ctx)
    return ctx, result


def adapters(ctx) -> dict:
    return weights(ctx.workspace / "train" / "adapter" / "adapter_model.safetensors")


def assert_same_run(ctx, reference, atol: float) -> None:
    losses = [m["loss"] for m in read_metrics(ctx)]
    expected = [m["loss"] for m in read_metrics(reference)]
    assert len(losses) == len(expected) == 12
    assert losses[:3] == pytest.approx(expected[:3], abs=LOSS_TOLERANCE)
    assert losses == pytest.approx(expected, abs=1e-4)
    ours, theirs = adapters(ctx), adapters(reference)
    assert ours.keys() == theirs.keys() and ours
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], atol=atol, rtol=0)


def test_two_ddp_processes_log_the_single_process_loss_and_train_the_same_adapter(tmp_path, single):
    reference, expected = single
    ctx = lora_workspace(tmp_path)
    code, stderr = finished(torchrun(ctx))
    assert code == 0, stderr[-3000:]
    result = json.loads((tmp_path / "train" / "result.json").read_text())
    assert result["distributed"] == {"world_size": 2, "nodes": 1, "processes_per_node": 2,
                                     "strategy": "ddp"}
    assert result["micro_batch_size"] == 2 and result["gradient_accumulation_steps"] == 2
    assert result["train_tokens"] == expected["train_tokens"]  # counted over both ranks
    assert result["final_loss"] == pytest.approx(expected["final_loss"], abs=1e-4)
    assert_same_run(ctx, reference, ADAPTER_ATOL)
    # One writer: one line per logged step, one copy of the progress lines.
    assert stderr.count("step 12/12") == 1
    assert sorted(p.name for p in (tmp_path / "train" / "checkpoints").iterdir()) == [
        "checkpoint-12", "checkpoint-6"]


def test_fsdp_on_gloo_trains_like_ddp(tmp_path, single):
    reference, _ = single
    ctx = lora_workspace(tmp_path, distributed={"strategy": "fsdp"})
    code, stderr = finished(torchrun(ctx))
    assert code == 0, stderr[-3000:]
    result = json.loads((tmp_path / "train" / "result.json").read_text())
    assert result["distributed"]["strategy"] == "fsdp"
    assert_same_run(ctx, reference, ADAPTER_ATOL)
    # The checkpoint holds full tensors: a single process loads it.
    saved = weights(tmp_path / "train" / "checkpoints" / "checkpoint-12" / "trainable.safetensors")
    for key, value in adapters(reference).items():
        full = saved[key.replace(".weight", ".default.weight")]
        assert full.shape == value.shape


def rank_pid(marker: str, rank: int) -> int | None:
    """The pid of the training process of `rank` started with the environment `marker`."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            env = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"CHATBOT_TEST_RUN={marker}".encode() in env and f"RANK={rank}".encode() in env:
            return int(entry.name)
    return None


def test_a_killed_rank_fails_the_run_cleanly_and_one_process_resumes_the_checkpoint(tmp_path):
    from chatbot_trainer.train.checkpoints import complete_checkpoints
    from chatbot_trainer.train.recipe import train

    ctx = lora_workspace(tmp_path, training_steps=400, checkpoint_every=10, log_every=10)
    marker = uuid.uuid4().hex
    process = torchrun(ctx, CHATBOT_TEST_RUN=marker)
    checkpoints = tmp_path / "train" / "checkpoints"
    deadline = time.monotonic() + 120
    while not complete_checkpoints(checkpoints):
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "no checkpoint within 120 s"
        time.sleep(0.05)
    pid = rank_pid(marker, 1)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)

    code, stderr = finished(process)
    assert code == 128 + signal.SIGKILL  # the killed rank's own status, not torchrun's 1
    assert "error: training process rank 1 failed first (exit code -9)" in stderr
    assert not (tmp_path / "train" / "result.json").exists()
    assert not (tmp_path / "train" / "adapter").exists()
    step, path = complete_checkpoints(checkpoints)[-1]
    assert 10 <= step < 400

    # World size 1 now: same global batch, the checkpoint of two processes resumes.
    result = train(ctx)
    assert result["completed"] and result["resumed_from"] == str(path)
    assert result["steps_this_run"] == 400 - step
    assert result["distributed"]["world_size"] == 1
    steps = [m["step"] for m in read_metrics(ctx)]
    assert steps == [1] + list(range(10, 401, 10))


def test_a_batch_that_does_not_split_over_the_ranks_is_refused():
    from chatbot_trainer.errors import InvalidConfig
    from chatbot_trainer.train import distributed

    ranks = distributed.Ranks(rank=1, world_size=3, local_world_size=3)
    with pytest.raises(InvalidConfig, match="batchSize 8 cannot be split evenly over 3"):
        distributed.per_rank_batch(8, ranks)
    two = distributed.Ranks(rank=1, world_size=2, local_world_size=2)
    assert distributed.shard(list(range(8)), two) == [4, 5, 6, 7]
    assert distributed.ranks_from_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1",
                                       "LOCAL_WORLD_SIZE": "4"}).nodes == 2
    assert distributed.ranks_from_env({}) == distributed.Ranks()


def test_cpu_micro_batches_share_the_nodes_memory_between_processes():
    from chatbot_api.spec import TrainingParams
    from chatbot_trainer.train import hardware

    params = TrainingParams(training_data="x", batch_size=16, max_seq_length=128)
    shape = {"hidden_size": 576, "num_hidden_layers": 30, "intermediate_size": 1536, "vocab_size": 49152}
    machine = {"device": "cpu", "memory_gb": 8.0, "bf16": False, "name": "cpu"}
    alone = hardware.resolve(params, machine, shape)
    shared = hardware.resolve(params, machine, shape, world_size=4, processes_per_node=4)
    assert alone["micro_batch_size"] * alone["gradient_accumulation_steps"] == 16
    assert shared["micro_batch_size"] * shared["gradient_accumulation_steps"] == 4  # per rank
    assert shared["micro_batch_size"] < min(alone["micro_batch_size"], 4)


def test_the_cli_runs_the_train_step_on_n_processes(monkeypatch, tmp_path):
    from chatbot_trainer import cli, pipeline

    seen = {}

    def fake_pipeline(params, **kwargs):
        seen.update(kwargs)
        raise cli.StepError("stop here", exit_code=2)

    monkeypatch.setattr(pipeline, "run_pipeline", fake_pipeline)
    code = cli.training_main(["run", "-q", "--training_data", "x.jsonl", "-o", str(tmp_path),
                              "--nproc-per-node", "2"])
    assert code == 2 and seen["nproc_per_node"] == 2
