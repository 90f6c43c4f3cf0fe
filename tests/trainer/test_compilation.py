"""torch.compile of the decoder layers: when it is chosen, and that a compiled run trains the same."""

from __future__ import annotations

import json

import pytest
from test_training import make_workspace

from chatbot_trainer.errors import InvalidConfig
from chatbot_trainer.model import compilation


def test_off_and_on_are_obeyed():
    assert compilation.decide("off", "cpu", compiler="/usr/bin/c++")[0] is False
    assert compilation.decide("on", "cpu", compiler="/usr/bin/c++")[0] is True
    assert compilation.decide("on", "cuda", compiler=None)[0] is True


def test_on_without_a_compiler_on_cpu_is_a_clear_error():
    with pytest.raises(InvalidConfig, match="C\\+\\+ compiler"):
        compilation.decide("on", "cpu", compiler=None)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_auto_is_eager_with_the_reason(device):
    compiled, why = compilation.decide("auto", device, compiler="/usr/bin/c++")
    assert compiled is False and why.startswith("eager:")


@pytest.mark.parametrize("preset", ["tiny-gpt", "tiny-llama"])
def test_decoder_layers_are_found(tmp_path, preset):
    from chatbot_trainer.model.loading import load_causal_lm

    ctx = make_workspace(tmp_path, preset=preset)
    model = load_causal_lm(str(tmp_path / "configure" / "base-model"))
    layers = compilation.decoder_layers(model)
    assert len(layers) == model.config.num_hidden_layers and len(layers) > 1
    assert ctx is not None


@pytest.mark.skipif(compilation.cxx_compiler() is None, reason="Inductor needs a C++ compiler on CPU")
def test_a_compiled_run_trains_like_the_eager_one(tmp_path):
    """Packed rows with per-example attention (dynamic segment layouts) through compiled layers."""
    from chatbot_trainer.train.recipe import train

    settings = dict(preset="tiny-llama", training_steps=6, log_every=1, lora={"dropout": 0.0})
    eager = train(make_workspace(tmp_path / "eager", compile="off", **settings))
    compiled = train(make_workspace(tmp_path / "compiled", compile="on", **settings))
    assert eager["compile"]["compiled"] is False
    assert compiled["compile"] == {"compiled": True, "reason": "compile on requested",
                                   "layers": compiled["compile"]["layers"]}
    assert compiled["compile"]["layers"] >= 2
    assert compiled["attention"] == eager["attention"] == "segments"

    def losses(result):
        return [json.loads(line)["loss"] for line in open(result["metrics_path"])]

    # fused kernels round differently; all weights of the tiny model train at a high learning rate
    assert losses(compiled) == pytest.approx(losses(eager), rel=1e-4)
