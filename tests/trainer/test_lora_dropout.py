"""LoRA dropout with cheap masks: the same distribution, scaling, gradients and seeding as nn.Dropout."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig

from chatbot_trainer.model.lora_dropout import (
    LANES,
    CheapMaskDropout,
    drop_threshold,
    keep_lanes,
    use_cheap_masks,
)

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")  # peft on transformers 5


def test_threshold_rounds_p_to_a_multiple_of_one_lane_value():
    assert drop_threshold(0.05) == 3277
    assert drop_threshold(0.0) == 0
    assert abs(drop_threshold(0.1) / LANES - 0.1) < 1 / LANES


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])
def test_every_lane_of_a_random_word_drops_at_rate_p(p):
    """Elements i, i+4, … share a lane position: a lane that never drops would show here."""
    torch.manual_seed(0)
    keep = keep_lanes(torch.Size([250_000, 4]), p).bool()
    dropped = (~keep).double().mean(dim=0)
    assert torch.allclose(dropped, torch.full((4,), p, dtype=torch.float64), atol=0.003), dropped


def test_odd_sizes_and_shapes():
    mask = keep_lanes(torch.Size([3, 7, 5]), 0.05)
    assert mask.shape == (3, 7, 5) and mask.dtype == torch.uint8 and set(mask.unique().tolist()) <= {0, 1}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kept_elements_are_scaled_and_gradients_follow_the_mask(dtype):
    dropout = CheapMaskDropout(0.1).train()
    x = torch.rand(512, 96, dtype=dtype) + 1
    x.requires_grad_(True)
    y = dropout(x)
    scale = LANES / (LANES - drop_threshold(0.1))
    kept = y != 0
    assert y.dtype == dtype
    assert torch.allclose(y[kept].float(), (x.detach()[kept] * scale).float())
    assert abs((~kept).float().mean().item() - 0.1) < 0.01
    y.sum().backward()
    assert torch.equal(x.grad != 0, kept)
    assert torch.allclose(x.grad[kept].float(), torch.full((int(kept.sum()),), scale).to(dtype).float())


def test_expectation_is_kept():
    torch.manual_seed(1)
    y = CheapMaskDropout(0.05).train()(torch.ones(1_000_000))
    assert abs(y.mean().item() - 1) < 0.002


def test_eval_mode_and_zero_p_are_the_identity():
    x = torch.randn(64, 32)
    assert torch.equal(CheapMaskDropout(0.05).eval()(x), x)
    assert torch.equal(CheapMaskDropout(0.0).train()(x), x)


def test_the_seed_reproduces_the_masks():
    dropout = CheapMaskDropout(0.05).train()
    x = torch.randn(128, 64)
    torch.manual_seed(7)
    first = dropout(x)
    torch.manual_seed(7)
    assert torch.equal(dropout(x), first)
    assert not torch.equal(dropout(x), first)


def tiny_lora_model(dropout: float):
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout,
                                            target_modules=["q_proj", "v_proj", "down_proj"], task_type="CAUSAL_LM"))


def test_every_lora_dropout_of_a_peft_model_is_swapped():
    model = tiny_lora_model(0.05)
    assert use_cheap_masks(model) == 2 * 3
    dropouts = [m for m in model.modules() if isinstance(m, nn.Dropout) and m.p == 0.05]
    assert dropouts and all(type(m) is CheapMaskDropout for m in dropouts)
    assert use_cheap_masks(model) == 0  # already swapped


def test_no_dropout_leaves_the_model_alone():
    model = tiny_lora_model(0.0)
    assert use_cheap_masks(model) == 0


def test_a_swapped_model_trains_and_its_eval_output_is_unchanged():
    model = tiny_lora_model(0.05)
    ids = torch.randint(0, 64, (2, 16))
    model.eval()
    before = model(input_ids=ids).logits
    use_cheap_masks(model)
    assert torch.equal(model(input_ids=ids).logits, before)
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]  # lora_A's are 0 while B is 0
    assert grads and all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
