"""Tokenized examples → sequences → micro-batches, with attention that never crosses examples.

Packing puts several examples into one sequence of at most ``max_seq_length`` tokens
(best-fit decreasing: deterministic and nearly no padding). Each example keeps its own
``position_ids`` starting at 0, and attention is block-diagonal causal: a token sees the
earlier tokens of its own example only, so a packed example computes exactly what it would
alone.

How the block-diagonal attention is obtained (``attention_mode``, chosen per model by
:func:`choose_attention_mode`, each candidate verified by a probe that compares a packed
example with the same example alone):

- ``"segments"`` (preferred for sdpa models of known architectures): a registered attention
  function gathers the examples of all rows into padded (examples, width) layouts, one per
  group of examples of similar length, and runs sdpa with ``is_causal`` on each. Attention
  costs ~Σ len² per example instead of L² per row, no L×L mask is built, and sdpa keeps its
  mask-free kernels. Rows mean nothing to it, so training hands it a micro-batch's packed rows
  as one row with no padding between them (``collate(..., flat=True)``).
- ``"position_ids"``: transformers 5 (``masking_utils.find_packed_sequence_indices``) detects
  packed rows from position ids that restart at 0, but only when no 2D ``attention_mask`` and
  no cache are given (``use_cache=False``; with a cache or a mask of ones, examples attend to
  each other), and builds a dense block-diagonal causal mask (sdpa and eager; GPT-2 and
  Llama both go through ``create_causal_mask``).
- ``"4d"``: the collator's ``segment_ids`` become an explicit 4D mask, for models that do not
  detect packing.

Unpacked batches are right-padded and need no mask at all: under causal attention a real
token never sees the padding after it, so sdpa keeps its fast ``is_causal`` path. Padding
uses a token id different from the model's ``pad_token_id`` (never attended, never a label).

Every batch carries the flat indices of the positions whose next token is an assistant token
(``loss_index``) and those tokens (``loss_targets``), computed on the CPU: the loss is taken
on exactly those positions (sum / number of label tokens), and nothing needs a device sync.
"""

from __future__ import annotations

import bisect
from contextlib import nullcontext
from dataclasses import dataclass, fields, replace
from typing import Any, NamedTuple, Sequence

import numpy as np

from chatbot_trainer.data.tokenization import IGNORE_INDEX

ATTENTION_MODES = ("segments", "position_ids", "4d")


# ---------------------------------------------------------------------------- sequences


def pack_examples(lengths: Sequence[int], max_seq_length: int) -> list[list[int]]:
    """Group example indices into bins of at most max_seq_length tokens (best-fit decreasing).

    Deterministic: longest first (ties by index), each into the fullest bin it fits.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i))
    bins: list[list[int]] = []
    free_values: list[int] = []  # sorted distinct free capacities of open bins
    by_free: dict[int, list[int]] = {}  # free capacity -> bins with it (stack)
    for index in order:
        size = int(lengths[index])
        if size > max_seq_length:
            raise ValueError(f"example {index} has {size} tokens, more than max_seq_length {max_seq_length}")
        slot = bisect.bisect_left(free_values, size)
        if slot < len(free_values):
            free = free_values[slot]
            stack = by_free[free]
            bin_id = stack.pop()
            if not stack:
                del by_free[free]
                free_values.pop(slot)
        else:
            bin_id, free = len(bins), max_seq_length
            bins.append([])
        bins[bin_id].append(index)
        left = free - size
        if left > 0:
            if left not in by_free:
                by_free[left] = []
                bisect.insort(free_values, left)
            by_free[left].append(bin_id)
    return bins


def build_sequences(
    examples: Sequence[dict[str, Any]], max_seq_length: int, packing: bool
) -> list[dict[str, np.ndarray]]:
    """Training sequences: packed bins of examples, or one example per sequence.

    Each sequence has ``input_ids``, ``labels`` and ``position_ids`` (int32 arrays of equal
    length); ``position_ids`` restart at 0 for every example.
    """
    if not packing:
        return [
            {
                "input_ids": np.asarray(e["input_ids"], dtype=np.int32),
                "labels": np.asarray(e["labels"], dtype=np.int32),
                "position_ids": np.arange(len(e["input_ids"]), dtype=np.int32),
            }
            for e in examples
        ]
    lengths = [len(e["input_ids"]) for e in examples]
    sequences = []
    for members in pack_examples(lengths, max_seq_length):
        labels = [np.asarray(examples[i]["labels"], dtype=np.int32).copy() for i in members]
        for lab in labels:
            lab[0] = IGNORE_INDEX  # the last token of the previous example must not predict it
        sequences.append(
            {
                "input_ids": np.concatenate([np.asarray(examples[i]["input_ids"], dtype=np.int32) for i in members]),
                "labels": np.concatenate(labels),
                "position_ids": np.concatenate([np.arange(lengths[i], dtype=np.int32) for i in members]),
            }
        )
    return sequences


def packing_stats(sequences: Sequence[dict[str, np.ndarray]], max_seq_length: int) -> dict[str, Any]:
    """How full the sequences are: tokens, sequences, examples and fill ratio."""
    tokens = sum(len(s["input_ids"]) for s in sequences)
    examples = sum(int((s["position_ids"] == 0).sum()) for s in sequences)
    return {
        "sequences": len(sequences),
        "examples": examples,
        "tokens": tokens,
        "label_tokens": sum(int((s["labels"] != IGNORE_INDEX).sum()) for s in sequences),
        "fill_ratio": round(tokens / (len(sequences) * max_seq_length), 4) if sequences else 0.0,
    }


# ---------------------------------------------------------------------------- batches


@dataclass
class Batch:
    """One micro-batch. Tensors live on one device; the counts are plain ints (no sync)."""

    input_ids: Any  # (B, L) long
    labels: Any  # (B, L) long, IGNORE_INDEX outside assistant tokens
    position_ids: Any | None  # (B, L) long; None for unpacked batches
    segment_ids: Any | None  # (B, L) long; example index within the row, for 4D masks
    loss_index: Any  # (N,) long: flat index b * L + t of positions predicting a label token
    loss_targets: Any  # (N,) long: the label token at b, t + 1
    num_label_tokens: int
    num_tokens: int  # real (non-padding) tokens
    # Segment layout for the "segments" attention: the (row, segment) pieces are grouped by
    # length, and every piece becomes one padded row of its group's width; segment_gather picks
    # the groups' tokens out of the flat (B * L) positions (group after group), segment_slot
    # maps each position back to its place in that layout.
    segment_gather: Any | None = None  # (Σ count * width,) long
    segment_slot: Any | None = None  # (B * L,) long
    segment_groups: tuple[tuple[int, int], ...] = ()  # (count, width) per group

    def to(self, device, non_blocking: bool = False) -> "Batch":
        moved = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if hasattr(value, "to"):
                value = value.to(device, non_blocking=non_blocking)
            moved[f.name] = value
        return replace(self, **moved)

    def pin_memory(self) -> "Batch":
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return replace(self, **{k: v.pin_memory() for k, v in values.items() if hasattr(v, "pin_memory")})


def padding_token_id(pad_token_id: int | None) -> int:
    """Filler id for padding: anything but the model's pad token (those trigger padding checks)."""
    return 1 if pad_token_id == 0 else 0


def collate(
    sequences: Sequence[dict[str, np.ndarray]], *, pad_token_id: int | None = None, packed: bool | None = None,
    flat: bool = False,
) -> Batch:
    """Right-pad sequences to the longest one and compute the loss positions.

    ``packed`` (default: whether any row holds more than one example) keeps position ids and
    segment ids; padding then forms its own segment (positions restart at 0), so it stays
    isolated from real tokens whatever the attention implementation.

    ``flat`` puts the sequences into one row, one after another (each example keeps its own
    positions and segment), with no padding at all: for the "segments" attention, whose cost is
    per example whatever the rows, the rows only added the padding between the shorter
    sequences and the longest (6% of the tokens of packed chat rows of 256, every one of them
    through every layer).
    """
    import torch

    if flat and len(sequences) > 1:
        sequences = [{key: np.concatenate([s[key] for s in sequences]) for key in ("input_ids", "labels", "position_ids")}]
        packed = True
    n = len(sequences)
    lengths = [len(s["input_ids"]) for s in sequences]
    width = max(lengths)
    if packed is None:
        packed = any(int((s["position_ids"] == 0).sum()) > 1 for s in sequences)
    input_ids = np.full((n, width), padding_token_id(pad_token_id), dtype=np.int64)
    labels = np.full((n, width), IGNORE_INDEX, dtype=np.int64)
    position_ids = np.zeros((n, width), dtype=np.int64) if packed else None
    for row, (seq, length) in enumerate(zip(sequences, lengths)):
        input_ids[row, :length] = seq["input_ids"]
        labels[row, :length] = seq["labels"]
        if packed:
            position_ids[row, :length] = seq["position_ids"]
            position_ids[row, length:] = np.arange(width - length)
    batch_idx, pos_idx = np.nonzero(labels[:, 1:] != IGNORE_INDEX)
    loss_index = batch_idx * width + pos_idx
    loss_targets = labels[batch_idx, pos_idx + 1]
    segment_ids = layout = None
    if packed:
        segment_ids = np.cumsum(position_ids == 0, axis=1) - 1
        layout = segment_layout(segment_ids)
    as_tensor = torch.from_numpy
    return Batch(
        input_ids=as_tensor(input_ids),
        labels=as_tensor(labels),
        position_ids=as_tensor(position_ids) if packed else None,
        segment_ids=as_tensor(segment_ids) if packed else None,
        loss_index=as_tensor(loss_index.astype(np.int64)),
        loss_targets=as_tensor(loss_targets.astype(np.int64)),
        num_label_tokens=int(len(loss_targets)),
        num_tokens=int(sum(lengths)),
        segment_gather=as_tensor(layout.gather) if packed else None,
        segment_slot=as_tensor(layout.slot) if packed else None,
        segment_groups=layout.groups if packed else (),
    )


class SegmentLayout(NamedTuple):
    gather: np.ndarray  # (Σ count * width,) flat positions, group after group
    slot: np.ndarray  # (B * L,) each position's index in that layout
    groups: tuple[tuple[int, int], ...]  # (count, width) per group


# A group may attend over this much more than its pieces need (padding to the group's width),
# relative to Σ len², plus a fixed allowance that keeps short pieces out of groups of their own.
GROUP_SLACK = 0.25
GROUP_ALLOWANCE = 64 * 64


def group_lengths(lengths: Sequence[int]) -> list[list[int]]:
    """Piece indices grouped for attention, longest first: each group pads its pieces to its
    longest, and a piece joins the current group while the padded work stays within
    GROUP_SLACK of the pieces' own Σ len² (plus GROUP_ALLOWANCE).

    Attention costs ~len² per piece; one padded group of all pieces costs count × max², which
    was 1.7-2.25x the work on packed chat rows (pieces of 44-212 tokens in rows of 256).
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    width = own = 0
    for i in order:
        n = lengths[i]
        if groups and (len(groups[-1]) + 1) * width * width <= (1 + GROUP_SLACK) * (own + n * n) + GROUP_ALLOWANCE:
            groups[-1].append(i)
            own += n * n
        else:
            groups.append([i])
            width, own = n, n * n
    return groups


def segment_layout(segment_ids: np.ndarray) -> SegmentLayout:
    """The rows' segments (trailing padding included) grouped by length into padded layouts.

    Group g holds its pieces one after another, each padded to the group's width; the unused
    slots gather position 0 (their outputs are never read).
    """
    rows, length = segment_ids.shape
    flat_segments = (segment_ids + (np.arange(rows)[:, None] * length)).reshape(-1)
    starts = np.flatnonzero(np.r_[True, flat_segments[1:] != flat_segments[:-1]])
    seg_lengths = np.diff(np.r_[starts, flat_segments.size])
    groups = group_lengths(seg_lengths.tolist())
    # each piece's first slot in the concatenated layout
    piece_base = np.zeros(len(starts), dtype=np.int64)
    layout_groups = []
    offset = 0
    for members in groups:
        width = int(seg_lengths[members[0]])
        piece_base[members] = offset + width * np.arange(len(members))
        layout_groups.append((len(members), width))
        offset += len(members) * width
    seg_of_token = np.repeat(np.arange(len(starts)), seg_lengths)
    offset_in_seg = np.arange(flat_segments.size) - np.repeat(starts, seg_lengths)
    slot = piece_base[seg_of_token] + offset_in_seg
    gather = np.zeros(offset, dtype=np.int64)
    gather[slot] = np.arange(flat_segments.size)
    return SegmentLayout(gather, slot.astype(np.int64), tuple(layout_groups))


def layout_args(gather, slot, groups: Sequence[tuple[int, int]]) -> "SegmentLayoutArgs":
    """The attention's view of a layout: the flat gather split into (count, width) tensors."""
    sizes = [count * width for count, width in groups]
    pieces = gather.split(sizes)
    return SegmentLayoutArgs(tuple(p.view(c, w) for p, (c, w) in zip(pieces, groups)), slot)


def micro_batches(sequences: Sequence[dict[str, np.ndarray]], micro_batch_size: int, **collate_kwargs) -> list[Batch]:
    """The sequences in order, collated micro_batch_size at a time (for evaluation)."""
    return [
        collate(sequences[i : i + micro_batch_size], **collate_kwargs)
        for i in range(0, len(sequences), micro_batch_size)
    ]


# ---------------------------------------------------------------------------- attention


SEGMENTS_ATTENTION = "chatbot_segments_sdpa"
# Architectures whose attention modules call the attention interface with (B, H, L, D)
# query/key/value and no extra inputs (sinks, soft-capping, sliding windows).
SEGMENTS_ARCHITECTURES = frozenset({"gpt2", "llama", "qwen2", "qwen3", "smollm3"})


@dataclass(frozen=True)
class SegmentLayoutArgs:
    """The batch's segment layout as the attention function receives it (a forward kwarg).

    ``gather`` holds one (count, width) tensor per group of pieces of similar length: the sizes
    travel as tensor shapes rather than Python ints, so a compiled decoder layer sees them as
    dynamic sizes instead of recompiling for every new (count, width) pair.
    """

    gather: tuple[Any, ...]  # (count, width) long per group
    slot: Any  # (B * L,) long: index into the groups' padded layouts, one after another


def segments_sdpa_attention(
    module,
    query,
    key,
    value,
    attention_mask,
    dropout: float = 0.0,
    scaling=None,
    segments: SegmentLayoutArgs | None = None,
    **kwargs,
):
    """sdpa over each packed example on its own: the rows' segments are gathered into a padded
    (segments, width) layout, attended with ``is_causal`` and scattered back.

    Attention cost is Σ width² per segment instead of L² per row, and sdpa keeps its fastest
    (causal, mask-free) kernels. Without ``segments`` this is plain sdpa.
    """
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if segments is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    batch, q_heads, length, head_dim = query.shape
    kv_heads = key.shape[1]
    flat = [x.transpose(1, 2).reshape(batch * length, x.shape[1], x.shape[-1]) for x in (query, key, value)]
    extra = {"enable_gqa": True} if kv_heads != q_heads else {}
    dtype = query.dtype
    # On a CPU sdpa's bf16 kernels are slower than its fp32 ones on short segments (1.4-2.5x
    # forward + backward, measured): attend in fp32 there, outside autocast.
    upcast = query.device.type == "cpu" and dtype == torch.bfloat16
    outs = []
    for gather in segments.gather:
        count, width = gather.shape
        q, k, v = (
            x.index_select(0, gather.reshape(-1)).view(count, width, x.shape[1], x.shape[2]).transpose(1, 2)
            for x in flat
        )
        with torch.autocast("cpu", enabled=False) if upcast else nullcontext():
            out = torch.nn.functional.scaled_dot_product_attention(
                *((x.float() for x in (q, k, v)) if upcast else (q, k, v)),
                dropout_p=dropout, scale=scaling, is_causal=True, **extra
            ).to(dtype)
        outs.append(out.transpose(1, 2).reshape(count * width, q_heads, out.shape[-1]))
    out = outs[0] if len(outs) == 1 else torch.cat(outs)
    out = out.index_select(0, segments.slot).view(batch, length, q_heads, out.shape[-1])
    return out, None


def register_segments_attention() -> str:
    from transformers import AttentionInterface

    AttentionInterface.register(SEGMENTS_ATTENTION, segments_sdpa_attention)
    return SEGMENTS_ATTENTION


def block_causal_mask(segment_ids, attn_implementation: str, dtype):
    """Explicit (B, 1, L, L) block-diagonal causal mask from segment ids, on their device.

    sdpa takes a boolean mask (True = attend); eager adds a float mask (0 or dtype min).
    """
    import torch

    length = segment_ids.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=segment_ids.device).tril_()
    allowed = (segment_ids[:, :, None] == segment_ids[:, None, :]) & causal
    allowed = allowed[:, None, :, :]
    if attn_implementation == "sdpa":
        return allowed
    mask = torch.zeros(allowed.shape, dtype=dtype, device=segment_ids.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)


def model_inputs(
    batch: Batch, attention_mode: str = "position_ids", *, attn_implementation: str = "sdpa", dtype=None
) -> dict[str, Any]:
    """Keyword arguments for a decoder forward over this batch."""
    import torch

    inputs: dict[str, Any] = {"input_ids": batch.input_ids, "use_cache": False}
    if batch.position_ids is not None:
        inputs["position_ids"] = batch.position_ids
        if attention_mode == "segments":
            inputs["segments"] = layout_args(batch.segment_gather, batch.segment_slot, batch.segment_groups)
        elif attention_mode == "4d":
            inputs["attention_mask"] = block_causal_mask(
                batch.segment_ids, attn_implementation, dtype or torch.float32
            )
    return inputs


def _probe_hidden(model, batch: Batch, attention_mode: str):
    import torch

    decoder = _decoder_of(model)
    param = next(model.parameters())
    batch = batch.to(param.device)
    with torch.no_grad():
        out = decoder(
            **model_inputs(
                batch,
                attention_mode,
                attn_implementation=getattr(model.config, "_attn_implementation", "sdpa") or "sdpa",
                dtype=param.dtype if param.is_floating_point() else None,
            )
        )
    return out[0] if isinstance(out, tuple) else out.last_hidden_state


def _decoder_of(model):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder()


def packing_isolated(model, attention_mode: str, tolerance: float | None = None) -> bool:
    """Probe: does a packed row give the second example the same states as running it alone?"""
    import torch

    vocab = int(model.config.vocab_size) if hasattr(model.config, "vocab_size") else 16
    first = np.arange(2, 9, dtype=np.int32) % vocab
    second = np.arange(11, 16, dtype=np.int32) % vocab
    packed_row = {
        "input_ids": np.concatenate([first, second]),
        "labels": np.full(len(first) + len(second), IGNORE_INDEX, dtype=np.int32),
        "position_ids": np.concatenate([np.arange(len(first)), np.arange(len(second))]).astype(np.int32),
    }
    alone = {
        "input_ids": second,
        "labels": np.full(len(second), IGNORE_INDEX, dtype=np.int32),
        "position_ids": np.arange(len(second), dtype=np.int32),
    }
    was_training = model.training
    model.eval()
    try:
        packed_h = _probe_hidden(model, collate([packed_row], packed=True), attention_mode)[0, len(first) :]
        alone_h = _probe_hidden(model, collate([alone], packed=False), attention_mode)[0]
    finally:
        model.train(was_training)
    packed_h, alone_h = packed_h.float(), alone_h.float()
    if tolerance is None:
        # Half precision drifts between a 12-token and a 5-token run through many layers:
        # SmolLM2-135M in bf16 (30 layers) differs by 0.08 of the largest state, on a CPU
        # without native bf16; an example that attends to another differs by more than 1.1.
        tolerance = 1e-3 if next(model.parameters()).dtype == torch.float32 else 0.25
    scale = alone_h.abs().max().clamp_min(1.0)
    return bool(((packed_h - alone_h).abs().max() / scale) < tolerance)


def attn_implementation(model) -> str:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(base.config, "_attn_implementation", None) or "eager"


def set_attn_implementation(model, name: str) -> None:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.set_attn_implementation(name)


def _full_attention_only(config) -> bool:
    """No sliding-window layers (the segment-wise attention does not apply windows)."""
    layer_types = getattr(config, "layer_types", None) or []
    return not getattr(config, "use_sliding_window", False) and all(t == "full_attention" for t in layer_types)


def choose_attention_mode(model) -> str:
    """How this model gets block-diagonal attention for packed rows (see module docstring).

    Prefers "segments" (switching an sdpa model to the segment-wise sdpa attention; undo with
    :func:`restore_attention`), then "position_ids", then "4d", each verified by a probe.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if (
        attn_implementation(model) == "sdpa"
        and base.config.model_type in SEGMENTS_ARCHITECTURES
        and _full_attention_only(base.config)
    ):
        try:
            set_attn_implementation(model, register_segments_attention())
            if packing_isolated(model, "segments"):
                return "segments"
        except Exception:  # not switchable: use what transformers offers
            pass
        set_attn_implementation(model, "sdpa")
    for mode in ("position_ids", "4d"):
        try:
            if packing_isolated(model, mode):
                return mode
        except Exception:  # a model that rejects 4D masks or position ids
            continue
    raise ValueError(
        f"{type(base).__name__} does not keep packed examples apart with position ids or a 4D "
        "attention mask: set packing: false"
    )


def restore_attention(model) -> None:
    """Give the model back its sdpa attention (before saving it or using it for generation)."""
    if attn_implementation(model) == SEGMENTS_ATTENTION:
        set_attn_implementation(model, "sdpa")
