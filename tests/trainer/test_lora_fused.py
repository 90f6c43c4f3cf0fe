"""The fused LoRA linear node computes what peft's lora.Linear computes: outputs, gradients, masks."""

import copy

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora.layer import Linear as LoraLinear
from transformers import AutoModelForCausalLM, LlamaConfig

from chatbot_trainer.model import lora_fused
from chatbot_trainer.model.lora_dropout import use_cheap_masks
from chatbot_trainer.model.lora_fused import use_fused_lora

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")  # peft on transformers 5

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_base(bias: bool = False):
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         attention_bias=bias)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


def tiny_lora_model(dropout: float, bias: bool = False):
    model = get_peft_model(tiny_base(bias), LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout,
                                             target_modules=TARGETS, task_type="CAUSAL_LM"))
    for name, param in model.named_parameters():  # B starts at 0: give it values so every gradient flows
        if "lora_B" in name:
            with torch.no_grad():
                param.normal_(0, 0.1)
    use_cheap_masks(model)
    return model


def loss_and_grads(model, ids, seed=3):
    torch.manual_seed(seed)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    return loss.detach(), grads


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("bias", [False, True])
def test_fused_layers_give_peft_s_loss_and_gradients(dropout, bias, monkeypatch):
    """Same seed, same dropout masks: the fused model matches peft's to fp32 rounding."""
    reference = tiny_lora_model(dropout, bias).train()
    fused = copy.deepcopy(reference)
    assert use_fused_lora(fused) == 2 * len(TARGETS)
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    ref_loss, ref_grads = loss_and_grads(reference, ids)
    calls = []
    apply = lora_fused._LoraLinearFunction.apply
    monkeypatch.setattr(lora_fused._LoraLinearFunction, "apply", lambda *a: calls.append(1) or apply(*a))
    loss, grads = loss_and_grads(fused, ids)
    assert len(calls) == 2 * len(TARGETS)  # every adapted layer took the fused path
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys() and len(grads) == 2 * 2 * len(TARGETS)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)
        assert grad.abs().sum() > 0, name


def test_under_bf16_autocast_the_fused_layers_follow_peft_within_bf16_rounding():
    reference = tiny_lora_model(0.1).train()
    fused = copy.deepcopy(reference)
    use_fused_lora(fused)
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_loss, ref_grads = loss_and_grads(reference, ids)
        loss, grads = loss_and_grads(fused, ids)
    torch.testing.assert_close(loss, ref_loss, rtol=2e-2, atol=2e-2)
    for name, grad in grads.items():
        assert grad.dtype == torch.float32, name  # the adapter's fp32 weights get fp32 gradients
        cosine = torch.nn.functional.cosine_similarity(grad.flatten(), ref_grads[name].flatten(), dim=0)
        assert cosine > 0.99, (name, cosine)


def test_dropout_masks_are_drawn_and_reproduced_by_the_seed():
    model = tiny_lora_model(0.5).train()
    use_fused_lora(model)
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    first, _ = loss_and_grads(model, ids, seed=5)
    again, _ = loss_and_grads(model, ids, seed=5)
    other, _ = loss_and_grads(model, ids, seed=6)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_evaluation_merging_and_saving_are_peft_s():
    reference = tiny_lora_model(0.1)
    fused = copy.deepcopy(reference)
    use_fused_lora(fused)
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    reference.eval(), fused.eval()
    with torch.no_grad():
        torch.testing.assert_close(fused(input_ids=ids).logits, reference(input_ids=ids).logits)
    assert fused.state_dict().keys() == reference.state_dict().keys()
    layers = [m for m in fused.modules() if isinstance(m, LoraLinear)]
    assert layers and all(type(m) is not LoraLinear for m in layers)  # fused subclass, still a lora.Linear
    merged = copy.deepcopy(fused).merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, reference(input_ids=ids).logits,
                                   rtol=1e-4, atol=1e-5)


def test_saved_adapter_loads_into_plain_peft(tmp_path):
    fused = tiny_lora_model(0.1)
    use_fused_lora(fused)
    fused.save_pretrained(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(tiny_base(), tmp_path / "adapter")
    assert all(type(m) is LoraLinear for m in loaded.modules() if isinstance(m, LoraLinear))
    saved = {n: p for n, p in fused.named_parameters() if "lora_" in n}
    assert saved and saved.keys() == {n for n, _ in loaded.named_parameters() if "lora_" in n}
    for name, param in loaded.named_parameters():
        if "lora_" in name:
            torch.testing.assert_close(param, saved[name])


def test_a_disabled_adapter_falls_back_to_peft():
    model = tiny_lora_model(0.0).train()
    use_fused_lora(model)
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    with model.disable_adapter():
        base_loss = model(input_ids=ids, labels=ids).loss
    plain = tiny_lora_model(0.0).train()
    with plain.disable_adapter():
        torch.testing.assert_close(base_loss, plain(input_ids=ids, labels=ids).loss)
