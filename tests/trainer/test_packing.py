"""Packing, collation and attention that does not cross packed examples."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from chatbot_trainer.data.packing import (
    GROUP_ALLOWANCE,
    GROUP_SLACK,
    SEGMENTS_ATTENTION,
    attn_implementation,
    build_sequences,
    choose_attention_mode,
    collate,
    group_lengths,
    layout_args,
    model_inputs,
    pack_examples,
    packing_isolated,
    packing_stats,
    padding_token_id,
    register_segments_attention,
    restore_attention,
    segment_layout,
    segments_sdpa_attention,
    set_attn_implementation,
)
from chatbot_trainer.data.tokenization import IGNORE_INDEX
from chatbot_trainer.model.base_models import (
    TINY_GPT,
    TINY_LLAMA,
    build_scratch_model,
    build_scratch_tokenizer,
)
from chatbot_trainer.model.loss import token_loss_sums

ARCHS = {"gpt2": TINY_GPT, "llama": TINY_LLAMA}


def fake_examples(n: int, seed: int = 0, vocab: int = 250, max_len: int = 40):
    rng = np.random.default_rng(seed)
    examples = []
    for _ in range(n):
        length = int(rng.integers(4, max_len))
        ids = rng.integers(3, vocab, size=length).astype(np.int32)
        labels = np.full(length, IGNORE_INDEX, dtype=np.int32)
        start = int(rng.integers(1, length - 1))
        labels[start:] = ids[start:]
        examples.append({"input_ids": ids, "labels": labels})
    return examples


@pytest.fixture(scope="module")
def tokenizer():
    return build_scratch_tokenizer(["alpha beta gamma delta epsilon " * 20] * 10, vocab_size=320)


@pytest.fixture(scope="module", params=list(ARCHS))
def model(request, tokenizer):
    torch.manual_seed(0)
    return build_scratch_model(ARCHS[request.param], tokenizer, max_positions=128, seed=0).eval()


# ---------------------------------------------------------------------------- bins


def test_pack_examples_places_every_example_once_within_the_limit():
    lengths = [random.Random(i).randint(1, 100) for i in range(500)]
    bins = pack_examples(lengths, 128)
    placed = sorted(i for b in bins for i in b)
    assert placed == list(range(500))
    assert all(sum(lengths[i] for i in b) <= 128 for b in bins)
    lower_bound = -(-sum(lengths) // 128)
    assert len(bins) <= lower_bound * 1.05 + 1  # best-fit decreasing is near optimal here
    assert bins == pack_examples(lengths, 128)  # deterministic


def test_pack_examples_rejects_an_example_longer_than_the_limit():
    with pytest.raises(ValueError):
        pack_examples([10, 129], 128)


def test_packed_sequences_restart_positions_and_never_predict_across_examples():
    examples = fake_examples(30)
    for e in examples:
        e["labels"][0] = e["input_ids"][0]  # even a labelled first token must not be predicted
    sequences = build_sequences(examples, 64, packing=True)
    stats = packing_stats(sequences, 64)
    assert stats["examples"] == 30 and stats["tokens"] == sum(len(e["input_ids"]) for e in examples)
    assert stats["fill_ratio"] > 0.8
    for seq in sequences:
        assert len(seq["input_ids"]) <= 64
        starts = np.flatnonzero(seq["position_ids"] == 0)
        assert starts[0] == 0
        assert (seq["labels"][starts] == IGNORE_INDEX).all()
        for a, b in zip(starts, [*starts[1:], len(seq["input_ids"])]):
            assert seq["position_ids"][a:b].tolist() == list(range(b - a))
    unpacked = build_sequences(examples, 64, packing=False)
    assert len(unpacked) == 30
    assert all(s["position_ids"].tolist() == list(range(len(s["input_ids"]))) for s in unpacked)


# ---------------------------------------------------------------------------- batches


def test_collate_loss_positions_are_the_shifted_labels():
    sequences = build_sequences(fake_examples(9, seed=3), 80, packing=True)
    batch = collate(sequences[:3], pad_token_id=0)
    width = batch.input_ids.shape[1]
    labels = batch.labels
    expected = [(b, t) for b in range(labels.shape[0]) for t in range(width - 1) if labels[b, t + 1] != IGNORE_INDEX]
    assert batch.loss_index.tolist() == [b * width + t for b, t in expected]
    assert batch.loss_targets.tolist() == [int(labels[b, t + 1]) for b, t in expected]
    assert batch.num_label_tokens == len(expected)
    assert batch.num_tokens == sum(len(s["input_ids"]) for s in sequences[:3])
    # Padding uses an id that is not the model's pad token and forms its own segment.
    assert padding_token_id(0) == 1 and padding_token_id(5) == 0
    for row, seq in enumerate(sequences[:3]):
        n = len(seq["input_ids"])
        if n < width:
            assert (batch.input_ids[row, n:] == 1).all()
            assert batch.position_ids[row, n].item() == 0
            assert (batch.labels[row, n:] == IGNORE_INDEX).all()


def test_a_flat_batch_is_the_rows_one_after_another_without_padding():
    sequences = build_sequences(fake_examples(12, seed=4), 80, packing=True)[:3]
    rows = collate(sequences, pad_token_id=0)
    flat = collate(sequences, pad_token_id=0, flat=True)
    total = sum(len(s["input_ids"]) for s in sequences)
    assert total < rows.input_ids.numel()  # the rows carry padding
    assert flat.input_ids.shape == (1, total)
    assert flat.num_tokens == rows.num_tokens == total
    assert flat.num_label_tokens == rows.num_label_tokens
    assert flat.input_ids[0].tolist() == [t for s in sequences for t in s["input_ids"].tolist()]
    assert flat.position_ids[0].tolist() == [t for s in sequences for t in s["position_ids"].tolist()]
    # the same label tokens, and never a prediction across two sequences' examples
    assert sorted(flat.loss_targets.tolist()) == sorted(rows.loss_targets.tolist())
    assert int(flat.segment_ids.max()) + 1 == sum(int((s["position_ids"] == 0).sum()) for s in sequences)
    assert sum(count for count, _ in flat.segment_groups) == int(flat.segment_ids.max()) + 1


def test_unpacked_batches_need_no_position_ids():
    batch = collate(build_sequences(fake_examples(4), 64, packing=False), pad_token_id=0, packed=False)
    assert batch.position_ids is None and batch.segment_ids is None and batch.segment_gather is None


def test_segment_layout_round_trips():
    segment_ids = np.array([[0, 0, 0, 1, 1, 2], [0, 0, 0, 0, 0, 1]])
    layout = segment_layout(segment_ids)
    assert sum(count for count, _ in layout.groups) == 5
    assert len(layout.gather) == sum(count * width for count, width in layout.groups)
    flat = np.arange(12)
    assert (flat[layout.gather][layout.slot] == flat).all()


def test_segment_layout_groups_pieces_of_similar_length():
    """One padded group of pieces of 44-212 tokens would attend over 2.25x the work they need."""
    lengths = [212, 44, 135, 121, 3, 200]
    segment_ids = np.repeat(np.arange(len(lengths)), lengths)[None]
    layout = segment_layout(segment_ids)
    padded = sum(count * width * width for count, width in layout.groups)
    own = sum(n * n for n in lengths)
    assert padded <= (1 + GROUP_SLACK) * own + len(layout.groups) * GROUP_ALLOWANCE
    assert padded < 0.6 * len(lengths) * max(lengths) ** 2
    assert layout.groups == ((2, 212), (2, 135), (2, 44))  # the 3-token piece rides with the 44
    flat = np.arange(segment_ids.size)
    assert (flat[layout.gather][layout.slot] == flat).all()


def test_group_lengths_keeps_equal_pieces_together_and_splits_a_long_tail():
    assert group_lengths([100, 100, 100, 100]) == [[0, 1, 2, 3]]
    assert group_lengths([20, 10]) == [[0, 1]]  # short pieces ride along (fixed allowance)
    assert group_lengths([256, 10]) == [[0], [1]]
    groups = group_lengths([256, 128, 128, 128, 128])
    assert groups == [[0], [1, 2, 3, 4]]
    assert sorted(i for g in group_lengths(list(range(1, 300))) for i in g) == list(range(299))


# ---------------------------------------------------------------------------- attention


def _per_example_logits(model, examples, mode: str):
    sequences = build_sequences(examples, 64, packing=True)
    batch = collate(sequences, pad_token_id=model.config.pad_token_id, packed=True)
    with torch.no_grad():
        hidden = model.get_decoder()(**model_inputs(batch, mode)).last_hidden_state
    out = []
    for row, seq in enumerate(sequences):
        starts = [*np.flatnonzero(seq["position_ids"] == 0), len(seq["input_ids"])]
        for a, b in zip(starts[:-1], starts[1:]):
            out.append((seq["input_ids"][a:b].tolist(), hidden[row, a:b]))
    return out


@pytest.mark.parametrize("mode", ["segments", "position_ids", "4d"])
def test_packed_examples_compute_what_they_compute_alone(model, mode):
    original = attn_implementation(model)
    if mode == "segments":
        set_attn_implementation(model, register_segments_attention())
    try:
        examples = fake_examples(8, seed=1, max_len=30)
        packed = _per_example_logits(model, examples, mode)
        assert len(packed) == 8
        for ids, hidden in packed:
            with torch.no_grad():
                alone = model.get_decoder()(input_ids=torch.tensor([ids]), use_cache=False).last_hidden_state[0]
            torch.testing.assert_close(hidden, alone, atol=2e-5, rtol=1e-4)
    finally:
        set_attn_implementation(model, original)


@pytest.mark.parametrize("autocast", [False, True])
def test_bf16_segments_attend_in_fp32_on_a_cpu_and_return_bf16(autocast, monkeypatch):
    """sdpa's bf16 CPU kernels are slower on short segments: the segments attend in fp32."""
    sdpa = torch.nn.functional.scaled_dot_product_attention
    seen = []

    def spy(*args, **kwargs):
        out = sdpa(*args, **kwargs)
        seen.append((args[0].dtype, out.dtype))
        return out

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    segment_ids = np.array([[0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1]])
    gather, slot, groups = segment_layout(segment_ids)
    layout = layout_args(torch.as_tensor(gather), torch.as_tensor(slot), groups)
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, h, 12, 8) for h in (4, 2, 2))
    expected = []
    for a, b in ((0, 5), (5, 12)):  # each example alone, in fp32
        expected.append(torch.nn.functional.scaled_dot_product_attention(
            q[..., a:b, :], k[..., a:b, :].repeat_interleave(2, 1), v[..., a:b, :].repeat_interleave(2, 1),
            is_causal=True).transpose(1, 2))
    expected = torch.cat(expected, dim=1)
    half = [x.to(torch.bfloat16).requires_grad_() for x in (q, k, v)]
    seen.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out, _ = segments_sdpa_attention(None, *half, None, segments=layout)
    assert seen == [(torch.float32, torch.float32)]  # autocast did not turn it back to bf16
    assert out.dtype == torch.bfloat16 and out.shape == (1, 12, 4, 8)
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)
    out.float().sum().backward()
    assert all(x.grad is not None and x.grad.dtype == torch.bfloat16 for x in half)


def test_transformers_isolates_packed_rows_only_without_a_cache(model):
    """What transformers 5 does with packed position ids (checked here so an upgrade shows)."""
    a, b = torch.arange(3, 10)[None], torch.arange(20, 26)[None]
    ids = torch.cat([a, b], dim=1)
    positions = torch.cat([torch.arange(7), torch.arange(6)])[None]
    with torch.no_grad():
        alone = model(input_ids=b, use_cache=False).logits[0]
        isolated = model(input_ids=ids, position_ids=positions, use_cache=False).logits[0, 7:]
        with_cache = model(input_ids=ids, position_ids=positions, use_cache=True).logits[0, 7:]
        with_mask = model(
            input_ids=ids, position_ids=positions, attention_mask=torch.ones_like(ids), use_cache=False
        ).logits[0, 7:]
    torch.testing.assert_close(isolated, alone, atol=1e-5, rtol=1e-4)
    assert (with_cache - alone).abs().max() > 1e-3
    assert (with_mask - alone).abs().max() > 1e-3


def test_choose_attention_mode_prefers_segments_and_restores(model):
    assert attn_implementation(model) == "sdpa"
    assert choose_attention_mode(model) == "segments"
    assert attn_implementation(model) == SEGMENTS_ATTENTION
    restore_attention(model)
    assert attn_implementation(model) == "sdpa"
    assert packing_isolated(model, "position_ids")


def test_the_probe_notices_attention_across_examples(model, monkeypatch):
    import chatbot_trainer.data.packing as packing

    original = packing.model_inputs

    def leaky_inputs(batch, *args, **kwargs):
        inputs = original(batch, *args, **kwargs)
        inputs["attention_mask"] = torch.ones_like(batch.input_ids)  # disables packed detection
        return inputs

    monkeypatch.setattr(packing, "model_inputs", leaky_inputs)
    assert not packing.packing_isolated(model, "position_ids")


def test_training_loss_and_gradients_match_unpacked(model):
    """Packed or padded, the summed token loss and its gradients are the same."""
    examples = fake_examples(6, seed=5, max_len=30)
    results = []
    for packing in (True, False):
        if packing:
            choose_attention_mode(model)
        model.zero_grad(set_to_none=True)
        batch = collate(build_sequences(examples, 64, packing), pad_token_id=model.config.pad_token_id, packed=packing)
        loss = token_loss_sums(model, batch, attention_mode="segments" if packing else "position_ids")
        (loss / batch.num_label_tokens).backward()
        grad = model.get_input_embeddings().weight.grad.clone()
        results.append((loss.item(), batch.num_label_tokens, grad))
        restore_attention(model)
    (loss_p, n_p, grad_p), (loss_u, n_u, grad_u) = results
    assert n_p == n_u
    assert loss_p == pytest.approx(loss_u, rel=1e-5)
    torch.testing.assert_close(grad_p, grad_u, atol=1e-6, rtol=1e-4)
    model.zero_grad(set_to_none=True)


def test_flat_batches_train_exactly_as_padded_rows(model):
    """The segments attention on one flat row: the same summed loss and gradients as the rows."""
    examples = fake_examples(10, seed=6, max_len=40)
    sequences = build_sequences(examples, 64, packing=True)
    assert len({len(s["input_ids"]) for s in sequences}) > 1  # the rows carry padding
    choose_attention_mode(model)
    results = []
    try:
        for flat in (False, True):
            model.zero_grad(set_to_none=True)
            batch = collate(sequences, pad_token_id=model.config.pad_token_id, packed=True, flat=flat)
            loss = token_loss_sums(model, batch, attention_mode="segments")
            (loss / batch.num_label_tokens).backward()
            results.append((loss.item(), model.get_input_embeddings().weight.grad.clone()))
    finally:
        restore_attention(model)
        model.zero_grad(set_to_none=True)
    (loss_rows, grad_rows), (loss_flat, grad_flat) = results
    assert loss_flat == pytest.approx(loss_rows, rel=1e-5)
    torch.testing.assert_close(grad_flat, grad_rows, atol=1e-6, rtol=1e-4)
