"""torch.compile of the decoder layers: when it is chosen, and that a compiled run trains the same."""

from __future__ import annotations

import json

import pytest

from chatbot_trainer import compilation
from chatbot_trainer.errors import InvalidConfig

from test_training import make_workspace

SMOLLM_MATMUL_PARAMS = 134_515_008  # tied embeddings: all parameters take part in a matmul
CPU_FLOPS = 100e9  # one AVX2 core, fp32 512x512 matmuls (measured)


def test_off_and_on_are_obeyed():
    assert compilation.decide("off", "cpu", matmul_params=1, tokens=10**12, compiler="/usr/bin/c++")[0] is False
    assert compilation.decide("on", "cpu", matmul_params=1, tokens=1, compiler="/usr/bin/c++")[0] is True
    assert compilation.decide("on", "cuda", matmul_params=1, tokens=1, compiler=None)[0] is True


def test_on_without_a_compiler_on_cpu_is_a_clear_error():
    with pytest.raises(InvalidConfig, match="C\\+\\+ compiler"):
        compilation.decide("on", "cpu", matmul_params=1, tokens=1, compiler=None)


def test_auto_compiles_long_cpu_runs_only():
    short = 32 * 4 * 128  # the demo: 32 steps of 4 sequences of <= 128 tokens
    long = 1000 * 8 * 400  # the seed workflow's 1,000 steps of 8 sequences
    compiled, why = compilation.decide("auto", "cpu", matmul_params=SMOLLM_MATMUL_PARAMS, tokens=short,
                                       flops=CPU_FLOPS, compiler="/usr/bin/c++")
    assert compiled is False and "too short" in why
    compiled, why = compilation.decide("auto", "cpu", matmul_params=SMOLLM_MATMUL_PARAMS, tokens=long,
                                       flops=CPU_FLOPS, compiler="/usr/bin/c++")
    assert compiled is True and "saves" in why


def test_auto_stays_eager_on_gpus_and_without_a_compiler():
    long = 10**9
    assert compilation.decide("auto", "cuda", matmul_params=SMOLLM_MATMUL_PARAMS, tokens=long,
                              flops=CPU_FLOPS, compiler="/usr/bin/c++")[0] is False
    compiled, why = compilation.decide("auto", "cpu", matmul_params=SMOLLM_MATMUL_PARAMS, tokens=long,
                                       flops=CPU_FLOPS, compiler=None)
    assert compiled is False and "compiler" in why


def test_the_cpu_speed_probe_leaves_the_global_rng_alone():
    import torch

    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    assert compilation.cpu_matmul_flops(size=64) > 0
    assert torch.equal(torch.rand(4), expected)  # a resumed run replays the same dropout masks


@pytest.mark.parametrize("preset", ["tiny-gpt", "tiny-llama"])
def test_decoder_layers_are_found(tmp_path, preset):
    from chatbot_trainer.training import load_causal_lm

    ctx = make_workspace(tmp_path, preset=preset)
    model = load_causal_lm(str(tmp_path / "configure" / "base-model"))
    layers = compilation.decoder_layers(model)
    assert len(layers) == model.config.num_hidden_layers and len(layers) > 1
    assert ctx is not None


@pytest.mark.skipif(compilation.cxx_compiler() is None, reason="Inductor needs a C++ compiler on CPU")
def test_a_compiled_run_trains_like_the_eager_one(tmp_path):
    """Packed rows with per-example attention (dynamic segment layouts) through compiled layers."""
    from chatbot_trainer.training import train

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
