"""End to end on a real pretrained chat model: SmolLM2-135M-Instruct, from its offline GGUF copy.

raw JSONL → prepare → configure (the Q4_1 GGUF dequantized into a model directory) → train
(LoRA only) → evaluate → export (F16 and q4_k_m) → llama.cpp loads each file, tokenizes a chat
exactly like the Hugging Face tokenizer, answers and stops at <|im_end|>; the merged model and
the F16 file agree on greedy tokens. A few steps of short sequences: the point is the path, not
the learning (the demo shows that).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from chatbot_trainer.model import packaged_models

CHAT = [
    {"role": "user", "content": "Order 12345 was charged $19.99 twice on 2026-11-30. Why?"},
]

pytestmark = [pytest.mark.slow, pytest.mark.llama_cpp]


@pytest.fixture(scope="module")
def run(real_smollm_run):
    return real_smollm_run


@pytest.fixture(scope="module")
def merged(run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = run / "workspace" / "export" / "merged"
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def llama(path: Path, **kwargs):
    import llama_cpp

    return llama_cpp.Llama(model_path=str(path), n_ctx=512, n_threads=1, verbose=False, **kwargs)


def test_the_real_base_was_dequantized_and_only_the_adapter_trained(run):
    details = json.loads((run / "details.json").read_text())
    assert "SmolLM2-135M-Instruct" in details["base_model"] and "from Q4_1" in details["base_model"]
    assert details["base_model_import"]["quantization"] == "Q4_1"
    assert details["base_model_import"]["pre_tokenizer_restored"] is True  # digits split as SmolLM does
    trained = json.loads((run / "workspace" / "train" / "result.json").read_text())
    assert trained["base_weights_trained"] is False and trained["added_tokens"] == []
    assert trained["trainable_params"] < 0.1 * trained["total_params"]
    # fp32: the library for the products was timed at SmolLM2's layer shapes, and the faster kept
    blas = trained["cpu_blas"]
    if trained["precision"] == "fp32":
        assert blas["backend"] == ("openblas" if blas["speedup"] >= 1.1 else "torch"), blas
    else:
        assert blas["backend"] == "torch" and "bfloat16" in blas["reason"], blas
    assert details["modelfile_system"]["system"].startswith("You are a helpful AI assistant named SmolLM")
    assert len(details["samples"]) == 2 and all(row["fine_tuned"] and row["base"] for row in details["samples"])


def test_packed_examples_stay_apart_in_bf16_on_thirty_layers(run, monkeypatch):
    """precision: bf16 keeps packing: the probe's half-precision tolerance holds on the real model,
    whose 30 bf16 layers drift between a packed and a lone example on CPUs without native bf16."""
    import torch
    from transformers import AutoModelForCausalLM

    import chatbot_trainer.data.packing as packing

    base_path = json.loads((run / "workspace" / "configure" / "result.json").read_text())["base_model_path"]
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.bfloat16)
    model.config.use_cache = False
    assert packing.choose_attention_mode(model) == "segments"
    packing.restore_attention(model)
    original = packing.model_inputs

    def leaky_inputs(batch, *args, **kwargs):  # a mask of ones: examples attend to each other
        return {**original(batch, *args, **kwargs), "attention_mask": torch.ones_like(batch.input_ids)}

    monkeypatch.setattr(packing, "model_inputs", leaky_inputs)
    assert not packing.packing_isolated(model, "position_ids")  # a leak still fails the probe


def test_k_quant_file_is_made_by_llama_cpp_and_reports_fallbacks(run):
    export = json.loads((run / "workspace" / "export" / "result.json").read_text())
    by_quant = {f["quantization"]: f for f in export["files"]}
    assert set(by_quant) == {"f16", "q4_k_m"}
    types = by_quant["q4_k_m"]["tensor_types"]
    assert types.get("Q4_K", 0) > 0  # rows of 1536 values (down_proj) are K-quantized
    assert types.get("Q5_0", 0) > 0  # rows of 576 values are not a multiple of 256: llama.cpp's fallback
    assert any("fallback" in note for note in by_quant["q4_k_m"]["notes"])
    assert by_quant["q4_k_m"]["size_mb"] < 0.5 * by_quant["f16"]["size_mb"]
    assert not list(run.glob(".*.gguf*"))  # no temporary F16 source or half file left


@pytest.mark.parametrize("quant", ["f16", "q4_k_m"])
def test_llama_cpp_tokenizes_like_hf_answers_and_stops(run, merged, quant):
    _, tokenizer = merged
    llm = llama(run / f"bot.{quant}.gguf")
    text = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    hf_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == hf_ids
    assert llm.token_eos() == tokenizer.convert_tokens_to_ids("<|im_end|>")  # where generation stops
    out = llm.create_chat_completion([{"role": "user", "content": "What is the capital of France?"}],
                                     temperature=0.0, max_tokens=64)
    choice = out["choices"][0]
    assert choice["message"]["content"].strip() and "<|im_end|>" not in choice["message"]["content"]
    if quant == "f16":
        # The 4-bit file of a 135M model sits at the edge of coherence: whether its greedy answer
        # ends within 64 tokens flips with rounding-level changes to a 3-step fine-tune (seen:
        # a French loop). The F16 file must answer and stop.
        assert choice["finish_reason"] == "stop" and "Paris" in choice["message"]["content"]


def test_merged_model_and_f16_file_agree_on_greedy_tokens(run, merged):
    import torch

    model, tokenizer = merged
    prompt = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    new_tokens = 24
    with torch.no_grad():
        hf = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                            do_sample=False, max_new_tokens=new_tokens, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id)[0, len(prompt):].tolist()
    llm = llama(run / "bot.f16.gguf")
    ours = []
    for token in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
        if token == tokenizer.eos_token_id or len(ours) == new_tokens:
            break
        ours.append(token)
    hf = [t for t in hf if t != tokenizer.eos_token_id]
    assert ours == hf[: len(ours)] and len(ours) == len(hf)


def test_dequantized_base_matches_llama_cpp_on_the_original_file(run):
    """The GGUF-as-base path: transformers' dequantized weights vs llama.cpp computing on the
    Q4_1 file itself (which also rounds activations to 8 bits in its matmuls)."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_dir = run / "workspace" / "configure" / "base-model"
    model = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    ids = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    with torch.no_grad():
        hf = model(torch.tensor([ids])).logits[0].numpy()
    llm = llama(packaged_models.find("smollm"), logits_all=True)
    llm.eval(ids)
    cpp = np.array(llm.scores[: len(ids)])
    relative = np.abs(hf - cpp).max() / np.abs(hf).max()
    top1 = (hf.argmax(-1) == cpp.argmax(-1)).mean()
    print(f"dequantized base vs llama.cpp on Q4_1: max |dlogit| / max |logit| = {relative:.4f}, top-1 {top1:.3f}")
    # measured 0.067 and 1.0 (llama.cpp rounds activations to 8 bits in quantized matmuls)
    assert relative < 0.1, relative
    assert top1 >= 0.9, top1
