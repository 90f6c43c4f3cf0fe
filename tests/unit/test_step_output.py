"""What a step pod tells: its progress in `kubectl logs`, one line each, without a TTY; and
readable data errors.

The step's work is replaced by a stand-in that logs what the train step logs (resume point,
a training window), so that this runs without torch; the logging set-up, the step runner's
lines and the exit are the real ones.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

STAND_IN = textwrap.dedent('''
    import logging, sys, types
    from chatbot_trainer import cli
    step = types.ModuleType("chatbot_trainer.steps.train")
    def run(ctx):
        log = logging.getLogger("chatbot_trainer.train")
        log.info("resuming from %s (step %d of %d)", "checkpoints/step-20", 20, 40)
        log.info("step %d/%d loss %.4f lr %.3g %.0f tokens/s", 30, 40, 1.2345, 1e-4, 812.0)
        logging.getLogger("some.library").info("not shown: other libraries keep their levels")
        return {"summary": {"train_loss": 1.2345}}
    step.run = run
    sys.modules["chatbot_trainer.steps.train"] = step
    sys.exit(cli.trainer_main(sys.argv[1:]))
''')


def test_a_step_pod_log_shows_the_steps_progress(tmp_path: Path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"name": "bot", "trainingData": "/data/chat.jsonl",
                                  "trainingSteps": 40}))
    proc = subprocess.run(
        [sys.executable, "-c", STAND_IN, "train", "--workspace", str(tmp_path / "ws"),
         "--config", str(config), "--termination-log", str(tmp_path / "termination")],
        capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    assert [line.split(" ", 2)[2] for line in lines] == [
        "train: starting (model gpt, data /data/chat.jsonl, workspace " + str(tmp_path / "ws") + ")",
        "resuming from checkpoints/step-20 (step 20 of 40)",
        "step 30/40 loss 1.2345 lr 0.0001 812 tokens/s",
        f"train: done in {lines[-1].split(' done in ')[1].split(' s')[0]} s: "
        '{"train_loss": 1.2345}',
    ]
    assert all(line.split(" ")[1] == "INFO" for line in lines)
    assert json.loads(proc.stdout)["ok"] is True


def test_a_failed_step_says_so_in_its_log(tmp_path: Path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"name": "bot", "trainingData": "/data/chat.jsonl"}))
    failing = STAND_IN.replace('return {"summary": {"train_loss": 1.2345}}',
                               'from chatbot_trainer.errors import StepError; '
                               'raise StepError("the base model has no chat template")')
    proc = subprocess.run(
        [sys.executable, "-c", failing, "train", "--workspace", str(tmp_path / "ws"),
         "--config", str(config), "--termination-log", str(tmp_path / "termination")],
        capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert proc.returncode != 0
    lines = proc.stderr.splitlines()
    assert "train: starting" in lines[0] and "step 30/40" in lines[2]
    assert lines[-1] == "error: the base model has no chat template"


def test_json_errors_say_at_once():
    import json as json_module

    import pytest

    from chatbot_trainer.data.readers import json_error

    for text, expected in (('{"a": "b', "Unterminated string starting at column 7"),
                           ('{"a": }', "Expecting value at column 7"),
                           ('{"a": "b\x01"}', "Invalid control character at column 9")):
        with pytest.raises(json_module.JSONDecodeError) as error:
            json_module.loads(text)
        assert json_error(error.value) == expected
        assert " at at " not in json_error(error.value, with_line=True)
