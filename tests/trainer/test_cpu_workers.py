"""A step's micro-batches side by side on CPU threads: when, and that the step is the same step."""

import json

import pytest
import torch
from test_lora_fused import tiny_base, tiny_lora_model

from chatbot_trainer.model.lora_fused import use_fused_lora
from chatbot_trainer.train import cpu_workers
from chatbot_trainer.train.cpu_workers import plan, run_step

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

GiB = 2**30
CPU = dict(device="cpu", threads=2, batch_size=4, micro_batch_size=2, micro_batch_requested=False,
           world_size=1, compiled=False)
REQUESTED = {**CPU, "micro_batch_requested": True}


@pytest.fixture(autouse=True)
def auto(monkeypatch):
    monkeypatch.delenv("CHATBOT_CPU_WORKERS", raising=False)


def test_the_node_s_micro_batch_is_split_among_the_cores():
    """As many tokens in flight as in turn: 2 micro-batches of 1 side by side instead of 1 of 2."""
    chosen = plan(**CPU)
    assert (chosen.workers, chosen.micro_batch_size) == (2, 1)
    assert "run as 2 of 1 side by side" in chosen.reason
    assert plan(**{**CPU, "batch_size": 8, "micro_batch_size": 4}).micro_batch_size == 2
    assert plan(**{**CPU, "threads": 4, "micro_batch_size": 4}).workers == 4


def test_a_requested_micro_batch_is_kept_and_each_core_takes_whole_ones():
    chosen = plan(**REQUESTED)
    assert (chosen.workers, chosen.micro_batch_size) == (2, 2)
    assert "2 micro-batches of 2 at a time, one core each" in chosen.reason
    # a micro-batch of 1 cannot be split: whole ones side by side where there are enough
    assert plan(**{**CPU, "micro_batch_size": 1}).workers == 2


@pytest.mark.parametrize("change, why", [
    ({"device": "cuda"}, "on cuda"),
    ({"world_size": 2}, "several training processes"),
    ({"compiled": True}, "compiled"),
    ({"threads": 1}, "one thread"),
    ({"micro_batch_size": 4, "micro_batch_requested": True}, "1 micro-batch(es) of 4 per step for 2 threads"),
    ({"threads": 4, "micro_batch_size": 2}, "2 micro-batch(es) of 2 per step for 4 threads"),
    ({**REQUESTED, "memory": 3 * GiB, "sequence_bytes": GiB // 2, "model_bytes": GiB // 2},
     "memory for one micro-batch"),
])
def test_in_turn_where_side_by_side_does_not_apply(change, why):
    chosen = plan(**{**CPU, **change})
    assert chosen.workers == 1 and why in chosen.reason
    assert chosen.micro_batch_size == {**CPU, **change}["micro_batch_size"]


def test_memory_bounds_whole_micro_batches_side_by_side():
    roomy = dict(memory=16 * GiB, sequence_bytes=GiB // 2, model_bytes=GiB)
    assert plan(**{**REQUESTED, **roomy}).workers == 2
    assert plan(**{**REQUESTED, "threads": 8, "batch_size": 16, **roomy}).workers == 8
    # 0.7 × 6 GiB - 1.5 GiB of model leaves room for 2 micro-batches of 1 GiB, not 4
    assert plan(**{**REQUESTED, "threads": 4, "batch_size": 8, **roomy, "memory": 6 * GiB}).workers == 2


def test_other_dropout_layers_keep_micro_batches_in_turn():
    model = tiny_lora_model(0.1)
    assert plan(**CPU, model=model).workers == 2  # LoRA's own dropout draws per micro-batch seed
    model.base_model.model.model.layers[0].mlp.register_module("drop", torch.nn.Dropout(0.1))
    assert "dropout layers besides LoRA's" in plan(**CPU, model=model).reason


def test_the_environment_sets_the_count(monkeypatch):
    monkeypatch.setenv("CHATBOT_CPU_WORKERS", "1")
    assert plan(**CPU) == cpu_workers.WorkerPlan(1, "CHATBOT_CPU_WORKERS=1", 2)
    monkeypatch.setenv("CHATBOT_CPU_WORKERS", "3")
    assert plan(**{**CPU, "threads": 1, "batch_size": 8}).workers == 3
    monkeypatch.setenv("CHATBOT_CPU_WORKERS", "many")
    with pytest.raises(ValueError, match="CHATBOT_CPU_WORKERS='many'"):
        plan(**CPU)


# ---------------------------------------------------------------------------- the step


def _step(model, batches, workers):
    params = [p for p in model.parameters() if p.requires_grad]
    model.zero_grad(set_to_none=True)
    torch.manual_seed(7)
    sums = run_step(lambda ids: model(input_ids=ids, labels=ids).loss * ids.numel(), batches,
                    1.0 / sum(b.numel() for b in batches), params, workers, lambda: torch.autocast("cpu", enabled=False))
    return torch.stack(sums), [p.grad.clone() for p in params]


@pytest.mark.parametrize("fused", [False, True])
def test_side_by_side_gives_the_gradients_of_micro_batches_in_turn(fused):
    """Same seeds per micro-batch, whatever thread runs it: the gradients of a step run in turn,
    summed in another order (fp32 rounding apart), and bit for bit the same on a rerun."""
    model = tiny_lora_model(0.1).train()
    if fused:
        use_fused_lora(model)
    generator = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 64, (2, 12), generator=generator) for _ in range(5)]
    in_turn = _step(model, batches, 1)
    side_by_side = _step(model, batches, 2)
    again = _step(model, batches, 2)
    torch.testing.assert_close(side_by_side[0], in_turn[0])
    for a, b in zip(side_by_side[1], in_turn[1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert torch.equal(again[0], side_by_side[0])
    assert all(torch.equal(a, b) for a, b in zip(again[1], side_by_side[1]))
    # the masks do drop something: other seeds give other gradients
    torch.manual_seed(8)
    params = [p for p in model.parameters() if p.requires_grad]
    model.zero_grad(set_to_none=True)
    run_step(lambda ids: model(input_ids=ids, labels=ids).loss * ids.numel(), batches,
             1.0 / sum(b.numel() for b in batches), params, 2, lambda: torch.autocast("cpu", enabled=False))
    assert not torch.allclose(params[0].grad, side_by_side[1][0])


def test_grads_add_to_what_is_already_there_and_threads_come_back():
    model = tiny_base()
    params = [p for p in model.parameters() if p.requires_grad]
    batches = [torch.randint(0, 64, (1, 8), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    for p in params:
        p.grad = torch.ones_like(p)
    threads = torch.get_num_threads()
    run_step(lambda ids: model(input_ids=ids, labels=ids).loss, batches, 1.0, params, 2,
             lambda: torch.autocast("cpu", enabled=False))
    assert torch.get_num_threads() == threads
    model.zero_grad(set_to_none=True)
    run_step(lambda ids: model(input_ids=ids, labels=ids).loss, batches, 1.0, params, 2,
             lambda: torch.autocast("cpu", enabled=False))
    fresh = [p.grad.clone() for p in params]
    model.zero_grad(set_to_none=True)
    for p in params:
        p.grad = torch.ones_like(p)
    run_step(lambda ids: model(input_ids=ids, labels=ids).loss, batches, 1.0, params, 2,
             lambda: torch.autocast("cpu", enabled=False))
    for p, g in zip(params, fresh):
        torch.testing.assert_close(p.grad, g + 1)


def test_an_error_in_a_worker_reaches_the_training_loop():
    model = tiny_base()

    def failing(ids):
        raise MemoryError("no room for this micro-batch")

    with pytest.raises(MemoryError, match="no room"):
        run_step(failing, [torch.zeros(1, 4, dtype=torch.long)] * 2, 1.0, list(model.parameters()), 2,
                 lambda: torch.autocast("cpu", enabled=False))


# ---------------------------------------------------------------------------- in training


def test_training_with_micro_batches_side_by_side_is_reproducible(tmp_path, monkeypatch):
    from test_training import make_workspace

    from chatbot_trainer.train.recipe import train

    monkeypatch.setenv("CHATBOT_CPU_WORKERS", "2")
    results = []
    for run in ("a", "b"):
        ctx = make_workspace(tmp_path / run, "tiny-llama", training_steps=10, checkpoint_every=100)
        result = train(ctx)
        metrics = [json.loads(line) for line in (tmp_path / run / "train" / "metrics.jsonl").read_text().splitlines()]
        results.append((result, [m["loss"] for m in metrics]))
    (first, losses), (second, losses_again) = results
    assert first["micro_batches_at_once"] == {"workers": 2, "reason": "CHATBOT_CPU_WORKERS=2",
                                              "micro_batch_size": 4}
    assert first["gradient_accumulation_steps"] == 2
    assert losses == losses_again and first["final_loss"] < first["initial_loss"]


def test_on_two_threads_training_splits_the_node_s_micro_batch_between_two_cores(tmp_path):
    from test_training import make_workspace

    from chatbot_trainer.train.recipe import train

    ctx = make_workspace(tmp_path, "tiny-llama", training_steps=4, checkpoint_every=100, micro_batch_size=None)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        result = train(ctx)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    at_once = result["micro_batches_at_once"]
    assert at_once["workers"] == 2 and "side by side, one core each" in at_once["reason"]
    assert result["micro_batch_size"] == at_once["micro_batch_size"]
    assert result["gradient_accumulation_steps"] == 8 // result["micro_batch_size"]
