"""Conversations → input ids and assistant-only labels."""

from __future__ import annotations

import numpy as np
import pytest

from chatbot_trainer.data import tokenization as T
from chatbot_trainer.data.chat_templates import CHATML_TEMPLATE
from chatbot_trainer.data.tokenization import (
    IGNORE_INDEX,
    tokenize_conversation,
    tokenize_dataset,
)
from chatbot_trainer.model.base_models import (
    build_scratch_tokenizer,
    conversation_texts,
)

PLAIN_CHATML = CHATML_TEMPLATE.replace("{% generation %}", "").replace("{% endgeneration %}", "")
# Same output as CHATML_TEMPLATE, but not the same string: exercises the Jinja renderer.
JINJA_CHATML = "{#- ChatML -#}" + CHATML_TEMPLATE
# A template of another family (Llama-3 style headers, no generation markers, no trailing newline).
HEADER_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + ' says: ' + message['content'] | trim + '<|im_end|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant says: ' }}{%- endif %}"
)
STRICT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' %}{{ raise_exception('system messages are not supported') }}{%- endif %}"
    "{{- message['role'] + ': ' + message['content'] + '\\n' }}"
    "{%- endfor %}"
)


def msg(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


CONVERSATIONS = [
    {"messages": [msg("user", "count from 3"), msg("assistant", "3 4 5 6 7")]},
    {
        "messages": [
            msg("system", "You answer briefly."),
            msg("user", "what is alpha?"),
            msg("assistant", "The first letter."),
            msg("user", "and omega?"),
            msg("assistant", "The last one."),
        ]
    },
    {"messages": [msg("user", "hello there"), msg("assistant", "General Kenobi!")]},
]


@pytest.fixture(scope="module")
def tokenizer():
    texts = list(conversation_texts(CONVERSATIONS * 5)) + ["the quick brown fox jumps over the lazy dog"] * 5
    return build_scratch_tokenizer(texts, vocab_size=400)


def with_template(tokenizer, template: str):
    from transformers import PreTrainedTokenizerFast

    clone = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer.backend_tokenizer,
        bos_token=tokenizer.bos_token,
        eos_token=tokenizer.eos_token,
        pad_token=tokenizer.pad_token,
    )
    clone.chat_template = template
    return clone


def labelled_text(tokenizer, example) -> str:
    ids = [t for t, lab in zip(example["input_ids"], example["labels"]) if lab != IGNORE_INDEX]
    return tokenizer.decode(ids)


def test_labels_match_transformers_assistant_mask(tokenizer):
    for conv in CONVERSATIONS:
        example = tokenize_conversation(tokenizer, conv["messages"], 512)
        ref = tokenizer.apply_chat_template(
            conv["messages"], tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        assert example["input_ids"].tolist() == ref["input_ids"]
        mask = np.asarray(ref["assistant_masks"], dtype=bool)
        mask[0] = False
        assert ((example["labels"] != IGNORE_INDEX) == mask).all()
        assert (example["labels"][mask] == example["input_ids"][mask]).all()


def test_only_assistant_text_and_end_of_turn_are_labelled(tokenizer):
    example = tokenize_conversation(tokenizer, CONVERSATIONS[1]["messages"], 512)
    assert labelled_text(tokenizer, example) == "The first letter.<|im_end|>The last one.<|im_end|>"
    assert example["labels"][0] == IGNORE_INDEX
    assert example["input_ids"].dtype == np.int32 and example["labels"].dtype == np.int32


@pytest.mark.parametrize("template", [JINJA_CHATML, PLAIN_CHATML], ids=["jinja-markers", "no-markers"])
def test_every_rendering_path_gives_the_same_labels(tokenizer, template):
    other = with_template(tokenizer, template)
    fast, _ = tokenize_dataset(tokenizer, CONVERSATIONS, 512)
    slow, counts = tokenize_dataset(other, CONVERSATIONS, 512)
    assert counts["kept"] == len(CONVERSATIONS)
    for a, b in zip(fast, slow):
        assert a["input_ids"].tolist() == b["input_ids"].tolist()
        assert a["labels"].tolist() == b["labels"].tolist()


def test_chatml_fast_renderer_matches_the_template(tokenizer):
    for conv in CONVERSATIONS:
        assert T._render_chatml(conv["messages"]) == T._render_marked(tokenizer, conv["messages"])


def test_fallback_works_for_another_template_family(tokenizer):
    other = with_template(tokenizer, HEADER_TEMPLATE)
    assert not T.has_generation_markers(other)
    example = tokenize_conversation(other, CONVERSATIONS[1]["messages"], 512)
    assert labelled_text(other, example) == "The first letter.<|im_end|>The last one.<|im_end|>"


class SlowTokenizer:
    """A tokenizer without offsets (is_fast False): labels come from per-span tokenization."""

    def __init__(self, inner):
        self._inner = inner
        self.is_fast = False

    def __getattr__(self, name):
        return getattr(self._inner, name)


def test_tokenizers_without_offsets_label_the_same_text(tokenizer):
    example = tokenize_conversation(SlowTokenizer(tokenizer), CONVERSATIONS[1]["messages"], 512)
    assert labelled_text(tokenizer, example) == "The first letter.<|im_end|>The last one.<|im_end|>"


def test_drops_are_counted_not_truncated(tokenizer):
    strict = with_template(tokenizer, STRICT_TEMPLATE)
    long_conv = {"messages": [msg("user", "go " * 200), msg("assistant", "ok")]}
    no_answer = {"messages": [msg("user", "anyone?")]}
    examples, counts = tokenize_dataset(tokenizer, [CONVERSATIONS[0], long_conv, no_answer], 64)
    assert len(examples) == 1
    assert counts["total"] == 3 and counts["kept"] == 1
    assert counts["too_many_tokens"] == 1 and counts["no_assistant_tokens"] == 1
    assert counts["tokens"] == len(examples[0]["input_ids"])
    assert counts["label_tokens"] == int((examples[0]["labels"] != IGNORE_INDEX).sum())
    assert tokenize_conversation(tokenizer, long_conv["messages"], 64) is None

    _, strict_counts = tokenize_dataset(strict, CONVERSATIONS, 512)
    assert strict_counts["template_error"] == 1 and strict_counts["kept"] == 2


def test_exact_limit_is_kept(tokenizer):
    example = tokenize_conversation(tokenizer, CONVERSATIONS[0]["messages"], 512)
    n = len(example["input_ids"])
    assert tokenize_conversation(tokenizer, CONVERSATIONS[0]["messages"], n) is not None
    assert tokenize_conversation(tokenizer, CONVERSATIONS[0]["messages"], n - 1) is None


def test_batches_large_inputs_in_order(tokenizer, monkeypatch):
    monkeypatch.setattr(T, "TOKENIZE_CHUNK", 2)
    many = [CONVERSATIONS[i % 3] for i in range(7)]
    examples, counts = tokenize_dataset(tokenizer, many, 512)
    assert counts["kept"] == 7
    singles = [tokenize_conversation(tokenizer, c["messages"], 512) for c in many]
    assert [e["input_ids"].tolist() for e in examples] == [s["input_ids"].tolist() for s in singles]


def test_offsets_and_span_edges_label_the_same_tokens(tokenizer):
    for conv in CONVERSATIONS:
        text, spans = T.render_conversation(tokenizer, conv["messages"])
        (direct,) = T._encode_batch(tokenizer, [text])
        (public,) = tokenizer([text], add_special_tokens=False, return_offsets_mapping=True).encodings
        assert direct.ids == public.ids
        ids, labels = T._label_encoding(direct, spans)
        assert labels.tolist() == T._labels_from_offsets(ids, direct.offsets, spans).tolist()
