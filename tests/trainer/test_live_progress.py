"""Live progress served by the train and evaluate steps, TensorBoard event files, loss.png."""

from __future__ import annotations

import json
import logging
import random
import socket
import struct
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from chatbot_api.spec import TrainingParams
from chatbot_trainer.model.base_models import materialize_base_model, resolve_base_model
from chatbot_trainer.train import monitor as train_monitor
from chatbot_trainer.train import progress_server
from chatbot_trainer.train.progress_server import ProgressBoard, ProgressServer
from chatbot_trainer.workspace import StepContext

STEPS, LOG_EVERY = 20, 5


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get(port: int, path: str = "/progress", method: str = "GET") -> tuple[int, dict | None]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, None


def counting(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        start = rng.randint(0, 20)
        rows.append({"messages": [{"role": "user", "content": f"count from {start}"},
                                  {"role": "assistant", "content": " ".join(str(start + i) for i in range(5))}]})
    return rows


def make_workspace(root: Path) -> StepContext:
    """A workspace as prepare and configure leave it (tiny Llama built from a config)."""
    (root / "prepare").mkdir(parents=True)
    train_rows, held_out = counting(120, 1), counting(24, 2)
    for name, rows in (("train", train_rows), ("eval", held_out)):
        (root / "prepare" / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    params = TrainingParams(
        training_data="data.jsonl", model_type="tiny-llama", training_steps=STEPS, batch_size=8,
        micro_batch_size=4, learning_rate=3e-3, max_seq_length=64, warmup_steps=2,
        log_every=LOG_EVERY, checkpoint_every=100, seed=0,
        evaluation={"sample_answers": 0}, export={"quantizations": ["f16"]},
    )
    choice = resolve_base_model("tiny-llama")
    base_dir = root / "configure" / "base-model"
    materialize_base_model(choice, base_dir, train_rows, 64, 0)
    ctx = StepContext(workspace=root, params=params, name="bot")
    ctx.write_result("configure", {
        "base_model": {**choice.to_dict(), "label": "tiny-llama"}, "base_model_path": str(base_dir),
        "device": "cpu", "precision": "fp32", "micro_batch_size": 4, "gradient_accumulation_steps": 2,
        "warmup_steps": 2, "target_modules": None, "train_base_weights": True, "params": params.to_api(),
    })
    return ctx


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """train, evaluate and export of a tiny model, with CHATBOT_PROGRESS_PORT set; what the
    progress endpoint served at each logged window (train) and each batch (evaluate)."""
    from chatbot_trainer.steps import evaluate, run_step

    monkeypatch = pytest.MonkeyPatch()
    root = tmp_path_factory.mktemp("live-progress")
    ctx = make_workspace(root / "workspace")
    port = free_port()
    monkeypatch.setenv("CHATBOT_PROGRESS_PORT", str(port))
    monkeypatch.setenv("CHATBOT_TERMINATION_LOG", str(root / "termination-log"))
    served: dict[str, list] = {"train": [], "evaluate": []}

    window = train_monitor.TrainMonitor.window

    def window_then_ask(self, record):
        window(self, record)
        served["train"].append(get(port)[1])

    class AskingBoard(ProgressBoard):
        def update(self, completed, total=None, **values):
            super().update(completed, total, **values)
            served["evaluate"].append(get(port)[1])

    monkeypatch.setattr(train_monitor.TrainMonitor, "window", window_then_ask)
    monkeypatch.setattr(evaluate, "ProgressBoard", AskingBoard)
    results = {step: run_step(step, ctx) for step in ("train", "evaluate", "export")}
    monkeypatch.undo()
    return ctx, results, served, port


# ---------------------------------------------------------------------------- the endpoint


def test_the_board_is_served_as_json_and_nothing_else():
    board = ProgressBoard("train", "steps", total=100)
    server = ProgressServer(board, 0, host="127.0.0.1")
    try:
        board.update(0)
        time.sleep(0.05)
        board.update(10, loss=1.5, learning_rate=1e-4, tokens_per_second=321.0)
        status, report = get(server.port)
        assert status == 200
        assert report["step"] == "train" and report["unit"] == "steps"
        assert (report["completed"], report["total"], report["percent"]) == (10, 100, 10.0)
        assert (report["loss"], report["learning_rate"], report["tokens_per_second"]) == (1.5, 1e-4, 321.0)
        # 10 steps took >= 50 ms: 90 more take >= 450 ms, counted down to the request
        assert 0.3 < report["eta_seconds"] < 60
        assert report["updated"].endswith("Z")
        assert get(server.port, "/metrics")[0] == 404
        assert get(server.port, "/progress", method="POST")[0] == 501
        assert get(server.port, "/progress", method="DELETE")[0] == 501
    finally:
        server.close()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", server.port), timeout=1).close()


def test_no_port_no_server_and_a_taken_port_only_logs(caplog):
    assert progress_server.port_from_env({}) is None
    assert progress_server.port_from_env({"CHATBOT_PROGRESS_PORT": ""}) is None
    assert progress_server.port_from_env({"CHATBOT_PROGRESS_PORT": "0"}) is None
    assert progress_server.port_from_env({"CHATBOT_PROGRESS_PORT": "8470"}) == 8470
    assert progress_server.port_from_env({"CHATBOT_PROGRESS_PORT": "x"}) is None
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        with caplog.at_level(logging.WARNING, logger="chatbot_trainer.progress"):
            assert progress_server.start_server(ProgressBoard("train", "steps"), taken.getsockname()[1]) is None
    assert "goes on without it" in caplog.text


# ---------------------------------------------------------------------------- the steps


def test_train_and_evaluate_serve_their_progress(pipeline):
    ctx, results, served, port = pipeline
    windows = [1, *range(LOG_EVERY, STEPS + 1, LOG_EVERY)]
    metrics = [json.loads(line) for line in (ctx.workspace / "train" / "metrics.jsonl").read_text().splitlines()]
    assert [r["completed"] for r in served["train"]] == windows == [m["step"] for m in metrics]
    for report, record in zip(served["train"], metrics):
        assert report["step"] == "train" and report["unit"] == "steps" and report["total"] == STEPS
        assert report["loss"] == record["loss"] and report["learning_rate"] == record["lr"]
        assert report["tokens_per_second"] == record["tokens_per_second"]
        assert report["percent"] == round(100 * record["step"] / STEPS, 1)
        assert report["eta_seconds"] >= 0
    assert served["train"][-1]["eta_seconds"] == 0.0

    evaluate = served["evaluate"]
    assert evaluate and all(r["step"] == "evaluate" and r["unit"] == "batches" for r in evaluate)
    done = [r["completed"] for r in evaluate]
    assert done == sorted(done) and done[0] == 0 and done[-1] == evaluate[-1]["total"] > 0
    assert evaluate[-1]["percent"] == 100.0
    # both servers are gone with their steps
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


def test_tensorboard_event_files_hold_train_and_eval_scalars(pipeline):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ctx, results, _, _ = pipeline
    accumulator = EventAccumulator(str(ctx.workspace / "train" / "tensorboard"))
    accumulator.Reload()
    tags = set(accumulator.Tags()["scalars"])
    assert tags == {"train/loss", "train/learning_rate", "train/grad_norm", "train/tokens_per_second",
                    "eval/loss", "eval/accuracy", "eval/perplexity"}
    windows = [1, *range(LOG_EVERY, STEPS + 1, LOG_EVERY)]
    metrics = [json.loads(line) for line in (ctx.workspace / "train" / "metrics.jsonl").read_text().splitlines()]
    for tag in ("train/loss", "train/learning_rate", "train/grad_norm", "train/tokens_per_second"):
        assert [e.step for e in accumulator.Scalars(tag)] == windows, tag
    assert [e.value for e in accumulator.Scalars("train/loss")] == pytest.approx(
        [m["loss"] for m in metrics], rel=1e-6)
    evaluated = results["evaluate"]
    for tag, key in (("eval/loss", "loss"), ("eval/accuracy", "accuracy"), ("eval/perplexity", "perplexity")):
        events = accumulator.Scalars(tag)
        assert [e.step for e in events] == [0, STEPS], tag
        assert [e.value for e in events] == pytest.approx(
            [evaluated["base_metrics"][key], evaluated["metrics"][key]], rel=1e-6)


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_export_puts_the_loss_curve_next_to_the_model(pipeline):
    ctx, results, _, _ = pipeline
    exported = results["export"]
    curve = Path(exported["loss_curve"])
    assert curve == ctx.workspace / "export" / "loss.png"
    assert curve.parent == Path(exported["files"][0]["path"]).parent
    assert png_size(curve) == (800, 450)


def test_loss_curve_marks_base_and_fine_tuned_eval_loss(tmp_path):
    from matplotlib.image import imread

    from chatbot_trainer.train.curves import draw_loss_curve

    records = [{"step": s, "loss": 5.0 / s} for s in (1, 5, 10, 15, 20)]
    plain = draw_loss_curve(tmp_path / "plain.png", records)
    marked = draw_loss_curve(tmp_path / "marked.png", records,
                             {"base_metrics": {"loss": 4.0}, "metrics": {"loss": 0.5}})
    assert png_size(plain) == png_size(marked) == (800, 450)
    red = imread(marked)[..., :3]
    # the fine-tuned marker is drawn in tab:red (0.839, 0.153, 0.157); the plain curve has none
    is_red = (abs(red[..., 0] - 0.839) < 0.05) & (red[..., 1] < 0.3) & (red[..., 2] < 0.3)
    assert is_red.sum() > 20
    plain_red = imread(plain)[..., :3]
    assert ((abs(plain_red[..., 0] - 0.839) < 0.05) & (plain_red[..., 1] < 0.3) & (plain_red[..., 2] < 0.3)).sum() == 0


def test_the_local_summary_names_the_loss_curve():
    from chatbot_trainer.pipeline import summary_text

    details = {"base_model": "tiny-gpt", "metrics": {"loss": 1.0, "accuracy": 0.5, "perplexity": 2.7},
               "model": {"path": "/out/bot.f16.gguf", "size_mb": 1.5}, "loss_curve": "/out/loss.png"}
    assert "loss curve: /out/loss.png" in summary_text(details).splitlines()


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_remaining_time_holds_while_work_between_batches_runs(monkeypatch):
    """Evaluate: 11 batches of the fine-tuned model, its sample answers and the base model's
    loading (no batches for a long while), then the base model's 11 batches. The remaining time
    never reaches 0 while batches are left."""
    from chatbot_trainer.train import progress_server

    clock = FakeClock()
    monkeypatch.setattr(progress_server.time, "monotonic", clock)
    board = ProgressBoard("evaluate", "batches")
    for done in range(12):  # 0..11 of 22, one second each
        board.update(done, 22)
        clock.now += 1.0
    clock.now -= 1.0
    assert board.snapshot()["eta_seconds"] == 11.0
    board.pause("sample answers of the fine-tuned model")
    clock.now += 300.0  # answers and loading take longer than the remaining batches
    report = board.snapshot()
    assert (report["eta_seconds"], report["phase"], report["completed"]) == (11.0, "sample answers of the fine-tuned model", 11)
    board.pause("loading the base model")
    clock.now += 60.0
    board.update(11, 22)  # the base model's first batch starts: the rate restarts here
    assert "phase" not in board.snapshot() and board.snapshot()["eta_seconds"] == 11.0
    clock.now += 2.0
    board.update(12, 22)  # the base model is twice as slow per batch
    assert board.snapshot()["eta_seconds"] == 20.0
    clock.now += 100.0  # a slow batch: counted down, but not below the batches not started
    assert board.snapshot()["eta_seconds"] == 18.0
    board.update(22, 22)
    assert board.snapshot()["eta_seconds"] == 0.0


def test_the_countdown_between_updates_stops_at_the_batches_not_started(monkeypatch):
    from chatbot_trainer.train import progress_server

    clock = FakeClock()
    monkeypatch.setattr(progress_server.time, "monotonic", clock)
    board = ProgressBoard("train", "steps", total=100)
    board.update(0)
    clock.now += 10.0
    board.update(10)
    assert board.snapshot()["eta_seconds"] == 90.0
    clock.now += 0.5
    assert board.snapshot()["eta_seconds"] == 89.5
    clock.now += 1000.0
    assert board.snapshot()["eta_seconds"] == 89.0
