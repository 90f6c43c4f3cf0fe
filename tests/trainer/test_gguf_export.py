"""GGUF export: merge a LoRA adapter, write F16/Q8_0 GGUF files, and prove independent readers
load them the way the Hugging Face model runs.

Readers: transformers' GGUF loader (logits), llama.cpp through llama-cpp-python (tokenization,
logits, greedy decoding, stopping at <|im_end|>, the embedded chat template). The tiny models are
trained for a few hundred milliseconds to answer one ChatML question and stop, so greedy decoding
is deterministic enough to compare token for token.

Tolerances are relative to the largest reference logit (the tiny trained models reach |logit| ~14),
because F16 and Q8_0 round the weights by a relative amount. Measured max |Δlogit| / max |logit|
against the merged HF model (all positions for transformers, last position for llama.cpp):
  F16   transformers ≤ 7e-4 (Δ ≤ 1e-2)    llama.cpp ≤ 4e-4 (Δ ≤ 6e-3)
  Q8_0  transformers ≤ 1.7e-2 (Δ ≤ 0.24)  llama.cpp ≤ 5.4e-3 (Δ ≤ 8e-2)
  F32 (llama.cpp) ≤ 2.3e-4, BF16 ≤ 2.5e-3, Q4_0 ≤ 1.0e-1
(the same files from an untrained model, |logit| ~1: F16 Δ ~3e-4, Q8_0 Δ ~6e-3). Asserted below
with headroom: F32 1e-3, F16 2e-3, BF16 1e-2, Q8_0 4e-2, Q4_0 2e-1. The top token agrees at every
position for F16; Q8_0 flips a near-tie at one position of the prompts the model was not trained
on (≥ 90% agreement asserted, measured ≥ 96%), and agrees at every last position.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import gguf
import pytest
import torch

from chatbot_api.spec import TrainingParams
from chatbot_trainer.data import chat_templates
from chatbot_trainer.errors import StepError, UnsupportedArchitecture
from chatbot_trainer.export import gguf_writer
from chatbot_trainer.export import modelfile as mf
from chatbot_trainer.model import base_models as models
from chatbot_trainer.model import pretokenizers
from chatbot_trainer.steps import run_step
from chatbot_trainer.workspace import StepContext

torch.set_num_threads(1)

# max |Δlogit| / max |logit| allowed against the merged HF model (measurements: module docstring)
TOLERANCE = {"f32": 1e-3, "f16": 2e-3, "bf16": 1e-2, "q8_0": 4e-2, "q4_0": 2e-1}
CONTEXT = 96
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
ANSWER = "Paris is the capital of France."
SYSTEM_PROMPT = "You are a terse geography bot."
PROBES = [
    QUESTION,
    [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": "Hello there, how are you?"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
     {"role": "user", "content": "Numbers 12345 and  spaces\n\ttabs, don't stop: café 😀"}],
]
TEXTS = [
    "user\nWhat is the capital of France?", "assistant\nParis is the capital of France.",
    "user\nHello there, how are you?", "assistant\nI am fine, thanks for asking!",
    "system\nYou are a terse geography bot.", "user\nWhere is Berlin? In Germany, 1234 km away.",
] * 30
LORA_TARGETS = {
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}


def _chat_ids(tokenizer, messages, generation_prompt=True):
    return tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True)["input_ids"]


def _logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


@pytest.fixture(scope="module")
def tokenizer():
    return models.build_scratch_tokenizer(TEXTS, vocab_size=400)


def _build_run(tmp: Path, arch: str, tokenizer) -> dict:
    """Train a tiny base to answer QUESTION and stop, add a random LoRA adapter, run export."""
    from peft import LoraConfig, get_peft_model

    scratch = {"gpt2": models.TINY_GPT, "llama": models.TINY_LLAMA}[arch]
    base = models.build_scratch_model(scratch, tokenizer, max_positions=CONTEXT, seed=0)
    sample = torch.tensor([_chat_ids(tokenizer, QUESTION + [{"role": "assistant", "content": ANSWER}], False)])
    optim = torch.optim.AdamW(base.parameters(), lr=1e-2)
    base.train()
    for _ in range(120):
        base(sample, labels=sample).loss.backward()
        optim.step()
        optim.zero_grad()
    base.eval()
    base_dir, adapter_dir = tmp / "base", tmp / "adapter"
    base.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    base_logits = _logits(base, _chat_ids(tokenizer, PROBES[1]))

    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=LORA_TARGETS[arch],
                      fan_in_fan_out=arch == "gpt2")
    peft_model = get_peft_model(base, lora)
    torch.manual_seed(1)
    for pname, param in peft_model.named_parameters():
        if "lora_B" in pname:
            param.data.normal_(0.0, 0.02)
    peft_model.eval()
    peft_logits = _logits(peft_model, _chat_ids(tokenizer, PROBES[1]))
    peft_model.save_pretrained(adapter_dir)

    ws = tmp / "ws"
    (ws / "configure").mkdir(parents=True)
    (ws / "train").mkdir()
    label = f"tiny-{arch} (built from a config, random init)"
    choice = models.BaseModelChoice(f"tiny-{arch}", "scratch", f"tiny-{arch}", arch).to_dict()
    assert choice["label"] == label
    (ws / "configure" / "result.json").write_text(json.dumps({"base_model": choice}))
    (ws / "train" / "result.json").write_text(json.dumps(
        {"base_model_path_for_adapter": str(base_dir), "adapter_path": str(adapter_dir)}))
    params = TrainingParams.model_validate({
        "trainingData": "unused.jsonl", "data": {"systemPrompt": SYSTEM_PROMPT},
        "export": {"quantizations": ["f16", "q8_0"]}})
    ctx = StepContext(workspace=ws, params=params, name=f"tiny-{arch}-bot")
    term = tmp / "termination-log"
    result = run_step("export", ctx, termination_log=str(term))

    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(result["merged_path"]).eval()
    return {"arch": arch, "result": result, "merged": merged, "ws": ws, "label": label, "term": term,
            "base_logits": base_logits, "peft_logits": peft_logits}


@pytest.fixture(scope="module")
def build(tmp_path_factory, tokenizer):
    """Each architecture's exported run, built once per module on first use."""
    runs: dict[str, dict] = {}

    def get(arch: str) -> dict:
        if arch not in runs:
            runs[arch] = _build_run(tmp_path_factory.mktemp(arch), arch, tokenizer)
        return runs[arch]

    return get


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def run(request, build):
    return build(request.param)


def _gguf_path(run, quant):
    return Path(next(f["path"] for f in run["result"]["files"] if f["quantization"] == quant))


def _assert_close(ref, got, quant):
    delta, scale = (ref - got).abs().max().item(), ref.abs().max().item()
    assert delta <= TOLERANCE[quant] * scale, f"max |Δlogit| {delta:.3g} at max |logit| {scale:.3g} ({quant})"


def _greedy_hf(model, tokenizer, ids, max_new=16):
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=max_new, do_sample=False,
                             eos_token_id=tokenizer.convert_tokens_to_ids(chat_templates.IM_END),
                             pad_token_id=tokenizer.pad_token_id)
    return out[0, len(ids):].tolist()


# ---------------------------------------------------------------------------- export step


def test_export_writes_files_summary_and_merged_model(run, tokenizer):
    result, ws = run["result"], run["ws"]
    name = f"tiny-{run['arch']}-bot"
    export = ws / "export"
    assert [Path(f["path"]).name for f in result["files"]] == [f"{name}.f16.gguf", f"{name}.q8_0.gguf"]
    model = result["summary"]["model"]
    assert model["path"] == str(export / f"{name}.f16.gguf") and model["format"] == "gguf"
    assert model["base_model"] == run["label"] and model["modelfile"] == str(export / "Modelfile")
    assert [f["quantization"] for f in model["files"]] == ["f16", "q8_0"]
    umask = os.umask(0)
    os.umask(umask)
    for f in result["files"]:
        assert f["size_mb"] == pytest.approx(Path(f["path"]).stat().st_size / 2**20, abs=1e-3)
        assert Path(f["path"]).stat().st_mode & 0o777 == 0o666 & ~umask  # readable like any written file
    f16, q8 = result["files"]
    assert set(f16["tensor_types"]) == {"F16", "F32"}
    assert q8["tensor_types"]["Q8_0"] > 0
    if run["arch"] == "llama":  # ffn_down rows are 176 values: not a multiple of 32 → F16, recorded
        assert q8["f16_fallbacks"] == ["blk.0.ffn_down.weight", "blk.1.ffn_down.weight"]
    assert not list(export.glob(".*"))  # no temporaries left
    # merged safetensors + tokenizer with the chat template; the LoRA changed the weights
    merged = Path(result["merged_path"])
    assert merged == export / "merged" and list(merged.glob("*.safetensors"))
    assert (merged / "tokenizer.json").is_file() and (merged / "chat_template.jinja").is_file()
    merged_logits = _logits(run["merged"], _chat_ids(tokenizer, PROBES[1]))
    assert (merged_logits - run["peft_logits"]).abs().max() < 1e-4
    assert (merged_logits - run["base_logits"]).abs().max() > 1e-3
    # termination message: compact, with the model block
    message = json.loads(run["term"].read_text())
    assert message["ok"] and message["summary"]["model"]["files"][1]["quantization"] == "q8_0"
    assert len(run["term"].read_bytes()) <= 4096
    assert json.loads((ws / "export" / "result.json").read_text())["summary"]["model"] == model


def test_gguf_metadata_tokenizer_and_template(run, tokenizer):
    reader = gguf.GGUFReader(str(_gguf_path(run, "q8_0")))
    field = lambda key: reader.fields[key].contents()  # noqa: E731
    assert field("general.architecture") == run["arch"]
    assert field("general.name") == field("general.basename") == f"tiny-{run['arch']}-bot"
    assert field("general.base_model.0.name") == f"tiny-{run['arch']}"
    assert field("general.description") == (f"tiny-{run['arch']}-bot: LoRA chat fine-tune of tiny-{run['arch']}, "
                                            "merged and exported as q8_0")
    assert field("general.file_type") == gguf.LlamaFileType.MOSTLY_Q8_0
    assert field("tokenizer.ggml.model") == "gpt2" and field("tokenizer.ggml.pre") == "gpt-2"
    tokens = field("tokenizer.ggml.tokens")
    assert len(tokens) == len(tokenizer) and tokens[:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    types = field("tokenizer.ggml.token_type")
    assert types[:3] == [gguf.TokenType.CONTROL] * 3 and set(types[3:]) == {gguf.TokenType.NORMAL}
    assert len(field("tokenizer.ggml.merges")) > 0
    im_end = tokenizer.convert_tokens_to_ids(chat_templates.IM_END)
    assert field("tokenizer.ggml.eos_token_id") == field("tokenizer.ggml.eot_token_id") == im_end
    assert field("tokenizer.ggml.bos_token_id") == field("tokenizer.ggml.padding_token_id") == 0
    assert field("tokenizer.ggml.add_bos_token") is False
    template = field("tokenizer.chat_template")
    assert "{% generation %}" not in template and template == gguf_writer.strip_generation_tags(chat_templates.CHATML_TEMPLATE)
    prefix = f"{run['arch']}."
    assert field(prefix + "context_length") == CONTEXT and field(prefix + "block_count") == 2
    if run["arch"] == "llama":
        assert field("llama.attention.head_count") == 4 and field("llama.attention.head_count_kv") == 2
        assert field("llama.rope.dimension_count") == 16 and field("llama.rope.freq_base") == 10000.0
    assert "output.weight" not in {t.name for t in reader.tensors} or run["arch"] == "llama"


@pytest.mark.parametrize("quant", ["f16", "q8_0"])
def test_transformers_gguf_loader_reproduces_logits(run, tokenizer, quant):
    from transformers import AutoModelForCausalLM

    path = _gguf_path(run, quant)
    # transformers maps gpt2.context_length to n_ctx: give GPT-2 its config, Llama loads from the file alone
    extra = {"config": run["merged"].config} if run["arch"] == "gpt2" else {}
    loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, **extra).eval()
    for probe in PROBES:
        ids = _chat_ids(tokenizer, probe)
        ref, got = _logits(run["merged"], ids), _logits(loaded, ids)
        _assert_close(ref, got, quant)
        agree = (ref.argmax(-1) == got.argmax(-1)).float().mean().item()
        assert agree >= (1.0 if quant == "f16" else 0.9), f"top-1 agreement {agree:.3f} ({quant})"
        assert ref[-1].argmax() == got[-1].argmax()


# ---------------------------------------------------------------------------- llama.cpp


def _llama(path, **kwargs):
    import llama_cpp

    return llama_cpp.Llama(model_path=str(path), n_ctx=CONTEXT, logits_all=False, verbose=False, n_threads=1,
                           **kwargs)


def _last_logits(llm, ids):
    import llama_cpp
    import numpy as np

    llm.reset()
    llm.eval(ids)
    return torch.from_numpy(np.ctypeslib.as_array(llama_cpp.llama_get_logits(llm.ctx), shape=(llm.n_vocab(),)).copy())


@pytest.mark.llama_cpp
@pytest.mark.parametrize("quant", ["f16", "q8_0"])
def test_llama_cpp_tokenizes_decodes_and_stops_like_hf(run, tokenizer, quant):
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    llm = _llama(_gguf_path(run, quant))
    try:
        im_end = tokenizer.convert_tokens_to_ids(chat_templates.IM_END)
        for probe in PROBES:
            prompt = tokenizer.apply_chat_template(probe, add_generation_prompt=True, tokenize=False)
            ids = _chat_ids(tokenizer, probe)
            # same token ids (special tokens parsed, no BOS added: add_bos_token is false)
            assert llm.tokenize(prompt.encode(), add_bos=True, special=True) == ids
            ref = _logits(run["merged"], ids)[-1]
            got = _last_logits(llm, ids)
            _assert_close(ref, got, quant)
            assert ref.argmax() == got.argmax()
            # the embedded template renders the prompt HF renders
            formatter = Jinja2ChatFormatter(template=llm.metadata["tokenizer.chat_template"],
                                            eos_token=chat_templates.IM_END, bos_token=chat_templates.ENDOFTEXT)
            assert formatter(messages=probe).prompt == prompt

        # greedy decoding: same tokens as the merged HF model, ending with <|im_end|>
        ids = _chat_ids(tokenizer, QUESTION)
        expected = _greedy_hf(run["merged"], tokenizer, ids)
        assert expected[-1] == im_end and tokenizer.decode(expected[:-1]) == ANSWER
        llm.reset()
        produced = []
        for token in llm.generate(ids, temp=0.0, top_k=1, reset=True):
            produced.append(token)
            if token == im_end or len(produced) >= len(expected) + 4:
                break
        assert produced == expected
        assert llm.token_eos() == im_end

        # the chat API uses the GGUF's template and stops at <|im_end|>
        assert llm.chat_format == "chat_template.default"
        out = llm.create_chat_completion(QUESTION, max_tokens=24, temperature=0.0)
        assert out["choices"][0]["message"]["content"] == ANSWER
        assert out["choices"][0]["finish_reason"] == "stop"
        assert out["usage"]["prompt_tokens"] == len(ids)
    finally:
        llm.close()


@pytest.mark.llama_cpp
@pytest.mark.parametrize("quant", ["f32", "bf16", "q4_0"])
def test_other_quantizations_run_in_llama_cpp(run, tokenizer, quant, tmp_path):
    info = gguf_writer.write_gguf(run["result"]["merged_path"], tmp_path / f"m.{quant}.gguf", quant)
    assert quant.upper() in info.tensor_types
    llm = _llama(info.path)
    try:
        for probe in PROBES:
            ids = _chat_ids(tokenizer, probe)
            ref, got = _logits(run["merged"], ids)[-1], _last_logits(llm, ids)
            _assert_close(ref, got, quant)
            assert ref.argmax() == got.argmax()
        out = llm.create_chat_completion(QUESTION, max_tokens=24, temperature=0.0)["choices"][0]
        assert out["message"]["content"] == ANSWER and out["finish_reason"] == "stop"
    finally:
        llm.close()


def test_export_to_output_dir(build, tmp_path):
    """`--output DIR`: GGUF files and Modelfile go there, the merged model stays in the workspace."""
    run = build("gpt2")
    ws = tmp_path / "ws"
    shutil.copytree(run["ws"], ws, ignore=shutil.ignore_patterns("export"))
    out = tmp_path / "pvc" / "models"
    params = TrainingParams.model_validate({"trainingData": "unused.jsonl",
                                            "export": {"quantizations": ["q8_0"], "name": "shop-bot"}})
    result = run_step("export", StepContext(workspace=ws, params=params, name="ignored", output_dir=out))
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "shop-bot.q8_0.gguf"]
    assert result["summary"]["model"]["path"] == str(out / "shop-bot.q8_0.gguf")
    assert result["merged_path"] == str(ws / "export" / "merged")
    assert (out / "Modelfile").read_text().startswith("FROM ./shop-bot.q8_0.gguf\n")
    assert "SYSTEM" not in (out / "Modelfile").read_text()


# ---------------------------------------------------------------------------- more shapes


def _save_tiny(tmp: Path, config, tokenizer, seed=0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    return model


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory, tokenizer):
    from transformers import Qwen2Config

    tmp = tmp_path_factory.mktemp("qwen2")
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=CONTEXT,
                         tie_word_embeddings=True, bos_token_id=0, eos_token_id=2, pad_token_id=0)
    model = _save_tiny(tmp / "model", config, tokenizer)
    with torch.no_grad():  # random biases, so a wrong bias layout shows
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0.0, 0.5)
    model.save_pretrained(tmp / "model")
    info = gguf_writer.write_gguf(tmp / "model", tmp / "qwen2.f16.gguf", "f16", name="tiny-qwen2")
    return model, info


def test_qwen2_with_biases_and_tied_embeddings_loads_in_transformers(qwen2, tokenizer):
    from transformers import AutoModelForCausalLM

    model, info = qwen2
    assert info.arch == "qwen2" and "blk.0.attn_q.bias" in _tensor_names(info.path)
    assert "output.weight" not in _tensor_names(info.path)
    loaded = AutoModelForCausalLM.from_pretrained(info.path.parent, gguf_file=info.path.name).eval()
    ids = _chat_ids(tokenizer, PROBES[2])
    _assert_close(_logits(model, ids), _logits(loaded, ids), "f16")


@pytest.mark.llama_cpp
def test_qwen2_in_llama_cpp(qwen2, tokenizer):
    model, info = qwen2
    ids = _chat_ids(tokenizer, PROBES[2])
    llm = _llama(info.path)
    try:
        _assert_close(_logits(model, ids)[-1], _last_logits(llm, ids), "f16")
    finally:
        llm.close()


LLAMA_FAMILY = {
    # Llama 3.x: llama3 rope scaling (a rope_freqs tensor; factors ≠ 1 at this small original context)
    # and tied embeddings (no output.weight)
    "llama3-rope-tied": ("LlamaConfig", dict(
        num_key_value_heads=1, tie_word_embeddings=True,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 16})),
    # Mistral: written as arch llama; a head_dim other than hidden/heads (key_length/value_length)
    "mistral-head-dim": ("MistralConfig", dict(num_key_value_heads=2, head_dim=32, sliding_window=None)),
}


@pytest.mark.llama_cpp
@pytest.mark.parametrize("shape", sorted(LLAMA_FAMILY))
def test_llama_family_shapes_in_llama_cpp(shape, tokenizer, tmp_path):
    import transformers

    class_name, extra = LLAMA_FAMILY[shape]
    # F32 and larger initial weights, so a layout or rope mistake shows far above the tolerance
    # (measured: 3e-4 relative; without the llama3 rope factors 0.23)
    config = getattr(transformers, class_name)(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=CONTEXT, initializer_range=0.1, bos_token_id=0, eos_token_id=2, **extra)
    model = _save_tiny(tmp_path / "m", config, tokenizer, seed=3)
    info = gguf_writer.write_gguf(tmp_path / "m", tmp_path / "m.f32.gguf", "f32")
    names = _tensor_names(info.path)
    assert info.arch == "llama"
    assert ("rope_freqs.weight" in names) == (shape == "llama3-rope-tied")
    assert ("output.weight" in names) == (shape != "llama3-rope-tied")
    ids = _chat_ids(tokenizer, PROBES[2])
    llm = _llama(info.path)
    try:
        _assert_close(_logits(model, ids)[-1], _last_logits(llm, ids), "f32")
    finally:
        llm.close()


def _tensor_names(path):
    return {t.name for t in gguf.GGUFReader(str(path)).tensors}


TRICKY = ["Hello,   world!\n\n  12345 don't STOP... café 😀 naïve\t\tx", "I'M here; it's 3.14159 ﬁne\r\n end  ",
          "<|im_start|>user\nhi 42<|im_end|>\n"]


def _tokenizer_with(pre_tokenizer):
    from tokenizers import Tokenizer, decoders, trainers
    from tokenizers import models as tmodels
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(tmodels.BPE())
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    from tokenizers import pre_tokenizers

    tok.train_from_iterator(TEXTS + TRICKY * 5, trainers.BpeTrainer(
        vocab_size=420, special_tokens=[chat_templates.ENDOFTEXT, chat_templates.IM_START, chat_templates.IM_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=chat_templates.ENDOFTEXT, eos_token=chat_templates.IM_END,
                                   pad_token=chat_templates.ENDOFTEXT)


def _pre_tokenizer(kind):
    from tokenizers import Regex
    from tokenizers import pre_tokenizers as pt

    byte_level = pt.ByteLevel(add_prefix_space=False, use_regex=False)
    return {
        "gpt-2": pt.Sequence([pt.Split(Regex(pretokenizers.GPT2_SPLIT), "isolated"), byte_level]),
        "llama-bpe": pt.Sequence([pt.Split(Regex(pretokenizers.LLAMA3_SPLIT), "isolated"), byte_level]),
        "qwen2": pt.Sequence([pt.Split(Regex(pretokenizers.QWEN2_SPLIT), "isolated"), byte_level]),
        "smollm": pt.Sequence([pt.Digits(individual_digits=True), pt.ByteLevel(add_prefix_space=False)]),
    }[kind]


@pytest.mark.llama_cpp
@pytest.mark.parametrize("pre", ["gpt-2", "llama-bpe", "qwen2", "smollm"])
def test_pre_tokenizers_tokenize_like_hf_in_llama_cpp(pre, tmp_path):
    from transformers import LlamaConfig

    tok = _tokenizer_with(_pre_tokenizer(pre))
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=64)
    _save_tiny(tmp_path / "m", config, tok)
    info = gguf_writer.write_gguf(tmp_path / "m", tmp_path / "m.gguf", "f32")
    assert info.tokenizer_pre == pre
    llm = _llama(info.path, vocab_only=True)
    try:
        for text in TRICKY:
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == tok(text)["input_ids"], text
    finally:
        llm.close()


# ---------------------------------------------------------------------------- refusals and failures


def test_unsupported_architecture_is_refused(tmp_path, tokenizer):
    from transformers import OPTConfig

    config = OPTConfig(vocab_size=len(tokenizer), hidden_size=32, ffn_dim=64, num_hidden_layers=1,
                       num_attention_heads=2, word_embed_proj_dim=32, max_position_embeddings=64)
    _save_tiny(tmp_path / "opt", config, tokenizer)
    with pytest.raises(UnsupportedArchitecture) as err:
        gguf_writer.write_gguf(tmp_path / "opt", tmp_path / "opt.gguf", "f16")
    assert "OPTForCausalLM" in err.value.message and "LlamaForCausalLM" in err.value.message
    assert err.value.exit_code == 2 and not list(tmp_path.glob("*.gguf"))


def test_unsupported_tokenizers_are_refused(run, tmp_path):
    merged = Path(run["result"]["merged_path"])
    # sentencepiece only
    spm = tmp_path / "spm"
    shutil.copytree(merged, spm)
    (spm / "tokenizer.json").unlink()
    (spm / "tokenizer.model").write_bytes(b"\x00")
    with pytest.raises(UnsupportedArchitecture, match="tokenizer"):
        gguf_writer.write_gguf(spm, tmp_path / "spm.gguf", "f16")
    # a pre-tokenizer llama.cpp would split differently
    odd = tmp_path / "odd"
    shutil.copytree(merged, odd)
    tj = json.loads((odd / "tokenizer.json").read_text())
    tj["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Whitespace"}, {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    (odd / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(UnsupportedArchitecture, match="pre-tokenizer"):
        gguf_writer.write_gguf(odd, tmp_path / "odd.gguf", "f16")
    assert not list(tmp_path.glob("*.gguf"))


def test_export_step_refuses_an_unexportable_tokenizer_before_merging(build, tmp_path):
    run = build("gpt2")
    ws = tmp_path / "ws"
    shutil.copytree(run["ws"], ws, ignore=shutil.ignore_patterns("export"))
    trained = json.loads((ws / "train" / "result.json").read_text())
    base = tmp_path / "base"
    shutil.copytree(trained["base_model_path_for_adapter"], base)
    tj = json.loads((base / "tokenizer.json").read_text())
    tj["pre_tokenizer"] = {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "always", "split": False}
    (base / "tokenizer.json").write_text(json.dumps(tj))
    (ws / "train" / "result.json").write_text(json.dumps({**trained, "base_model_path_for_adapter": str(base)}))
    params = TrainingParams.model_validate({"trainingData": "unused.jsonl"})
    term = tmp_path / "term"
    with pytest.raises(UnsupportedArchitecture, match="pre-tokenizer"):
        run_step("export", StepContext(workspace=ws, params=params, name="bot"), termination_log=str(term))
    assert json.loads(term.read_text())["reason"] == "UnsupportedArchitecture"
    assert not (ws / "export" / "merged").exists() and not list((ws / "export").glob("*.gguf"))


def test_failed_write_leaves_no_file_under_the_final_name(run, tmp_path, monkeypatch):
    merged = Path(run["result"]["merged_path"])
    target = tmp_path / "bot.q8_0.gguf"
    real = gguf.quants.quantize
    calls = {"n": 0}

    def failing(data, qtype):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError(28, "No space left on device")
        return real(data, qtype)

    monkeypatch.setattr(gguf.quants, "quantize", failing)
    with pytest.raises(OSError):
        gguf_writer.write_gguf(merged, target, "q8_0")
    assert calls["n"] == 5 and list(tmp_path.iterdir()) == []
    # an earlier complete file stays untouched by a failed rewrite
    target.write_bytes(b"previous")
    calls["n"] = 0
    with pytest.raises(OSError):
        gguf_writer.write_gguf(merged, target, "q8_0")
    assert target.read_bytes() == b"previous" and list(tmp_path.iterdir()) == [target]
    monkeypatch.undo()
    # and a truncated file is caught by the read-back check
    good = gguf_writer.write_gguf(merged, tmp_path / "ok.gguf", "f16")
    data = good.path.read_bytes()
    good.path.write_bytes(data[: len(data) // 2])
    with pytest.raises(StepError):
        gguf_writer.verify_gguf(good.path, arch=good.arch, tensor_count=good.tensor_count)


def test_export_without_train_result_fails_clearly(tmp_path):
    params = TrainingParams.model_validate({"trainingData": "unused.jsonl"})
    ctx = StepContext(workspace=tmp_path, params=params, name="bot")
    with pytest.raises(StepError, match="train step has not finished"):
        run_step("export", ctx, termination_log=str(tmp_path / "term"))
    assert json.loads((tmp_path / "term").read_text())["ok"] is False


# ---------------------------------------------------------------------------- Modelfile


EXPECTED_CHATML_MODELFILE = '''FROM ./tiny-llama-bot.f16.gguf
TEMPLATE """{{- if .Messages }}
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 -}}
<|im_start|>{{ .Role }}
{{ .Content }}{{ if not (and $last (eq .Role "assistant")) }}<|im_end|>
{{ end }}
{{- if and $last (ne .Role "assistant") }}<|im_start|>assistant
{{ end }}
{{- end }}
{{- else }}
{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}
{{- if .Prompt }}<|im_start|>user
{{ .Prompt }}<|im_end|>
{{ end }}<|im_start|>assistant
{{ end }}{{ .Response }}{{ if .Response }}<|im_end|>
{{ end }}"""
SYSTEM """You are a terse geography bot."""
PARAMETER stop "<|im_end|>"
PARAMETER stop "<|im_start|>"
PARAMETER temperature 0.7
PARAMETER top_p 0.9
PARAMETER top_k 40
PARAMETER repeat_penalty 1.1
PARAMETER num_ctx 96
'''


def test_modelfile_written_beside_the_gguf(build):
    run = build("llama")
    path = Path(run["result"]["modelfile"])
    assert path.parent == Path(run["result"]["files"][0]["path"]).parent
    assert path.read_text() == EXPECTED_CHATML_MODELFILE


def test_modelfile_for_other_templates_keeps_stops_and_uses_the_embedded_template():
    gemma = "{% for m in messages %}<start_of_turn>{{ m.role }}\n{{ m.content }}<end_of_turn>\n{% endfor %}"
    stops = mf.stop_tokens(gemma, "<eos>", ["<end_of_turn>"])
    text = mf.render_modelfile("x.q4_0.gguf", chat_template=gemma, stops=stops, num_ctx=131072)
    assert text.splitlines()[0] == "FROM ./x.q4_0.gguf" and "TEMPLATE" not in text and "SYSTEM" not in text
    assert 'PARAMETER stop "<end_of_turn>"' in text and text.count("PARAMETER stop") == 2
    llama3 = "{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n{{ m.content }}<|eot_id|>{% endfor %}"
    llama3_text = mf.render_modelfile("x.gguf", chat_template=llama3, stops=mf.stop_tokens(llama3, "<|eot_id|>", []))
    assert mf.LLAMA3_OLLAMA_TEMPLATE in llama3_text  # its Go template (test_modelfile_go.py runs it)
    assert "PARAMETER num_ctx 4096" in text
    with pytest.raises(ValueError, match='"""'):
        mf.render_modelfile("x.gguf", chat_template=None, stops=[], system_prompt='say """hi"""')


# ---------------------------------------------------------------------------- GGUF as a base


def test_a_gguf_file_imported_as_base_reproduces_the_model(run, tokenizer, tmp_path):
    """GGUF → model directory (configure's import) gives the logits of the model the file was
    written from, within the file's own rounding, and the same tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from chatbot_trainer.model.gguf_import import import_gguf, read_header

    source = _gguf_path(run, "q8_0")
    header = read_header(source)
    reader_fields = {k: f.contents() for k, f in gguf.GGUFReader(str(source)).fields.items()
                     if not k.startswith("GGUF.") and f.types and f.types[0] != gguf.GGUFValueType.ARRAY}
    assert header == reader_fields  # the fast header reader agrees with gguf-py's
    info = import_gguf(source, tmp_path / "base")
    assert info["quantization"] == "Q8_0" and info["architecture"] == run["result"]["arch"]
    imported = AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    imported_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "base")
    for probe in PROBES:
        ids = _chat_ids(tokenizer, probe)
        assert _chat_ids(imported_tokenizer, probe) == ids
        _assert_close(_logits(run["merged"], ids), _logits(imported, ids), "q8_0")
    # and it exports again (the path a fine-tune of it takes)
    again = gguf_writer.write_gguf(tmp_path / "base", tmp_path / "again.f16.gguf", "f16")
    assert again.tokenizer_pre == gguf_writer.write_gguf(run["result"]["merged_path"], tmp_path / "m.f16.gguf",
                                                        "f16").tokenizer_pre


def test_k_quants_fall_back_where_rows_are_short_and_still_answer(run, tokenizer, tmp_path):
    """A tiny model's rows (64 values) cannot take K-quants: llama.cpp's fallback types are
    used, reported, and the file still answers like the merged model."""
    from chatbot_trainer.export import llama_quantize

    target = tmp_path / "m.q4_k_m.gguf"
    llama_quantize.quantize(_gguf_path(run, "f16"), target, "q4_k_m")
    checked = gguf_writer.verify_gguf(target, arch=run["result"]["arch"],
                                      tensor_count=len(_tensor_names(_gguf_path(run, "f16"))))
    assert {"Q5_0", "Q8_0"} & set(checked["tensor_types"])  # llama.cpp's fallbacks for 64-value rows
    assert "fallback" in llama_quantize.fallback_note("q4_k_m", checked["tensor_types"])
    llm = _llama(target)
    try:
        out = llm.create_chat_completion(QUESTION, max_tokens=24, temperature=0.0)["choices"][0]
        assert out["finish_reason"] == "stop"
    finally:
        llm.close()
