"""Packed rows for the rerankers on a CPU: the inputs of a forward pass back to back in one row.

Why: on a CPU a matrix product's speed depends on its row count, and padded batches are small.
Padding costs as much as real tokens, so batches close at 10% padding (`batching.MAX_PADDING`),
and 100 debian-ir dev queries x 10 candidates made 476 forward passes of 44-1,108 rows (median
about 250). At 256 rows SmolLM2's Linear shapes run at 34-59% of their 2,048-row rate in bf16
and 78-91% in fp32 (`bench/matmul_ceiling.py --rows`, Intel Xeon with AMX, 2 threads). In one
packed row every product sees all the documents' tokens and no padding. The figures are in the
docs/models.md (Numeric paths) and docs/benchmarks.md.

How: each document attends to its own query's prompt prefix and causally to itself, as in a
padded batch. The key/value cache holds the prefixes of the queries in the pass, then the
packed documents. `PackedRow.attention_mask` is the exact dense mask of that layout, so any
attention implementation computes the right scores from it. The segment-aware implementations
(`segmented`: `PACKED_SDPA`, and numerics' bf16 one) compute the same attention without the
blocks the mask rules out: one SDPA call per document, over its prefix and itself. Dense
attention would compute far more scores: for ten 150-token documents after a 72-token prefix,
1,500 x 1,572 against 10 x 150 x 222, about 7x (counted, not timed).

A BERT-style cross-encoder packs its (query, document) pairs the same way (`pack_pairs`): no
prefixes, each pair attending to itself both ways, positions restarting at each pair.
"""

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

PACKED_SDPA = "twostage_packed_sdpa"  # transformers' SDPA attention, segment-aware
PACKED_ATTENTION: set[str] = {PACKED_SDPA}  # implementations that read `packed_segments`
# tokens per packed row: SmolLM2-135M on 30 debian-ir dev queries x 10 candidates (Intel Xeon with
# AMX, 2 threads) ran fastest at 2,048 of 1,024, 2,048 and 4,096, in fp32 and in bf16
PACK_TOKENS = 2048

AttentionOutput = tuple[torch.Tensor, torch.Tensor | None]
Attention = Callable[..., AttentionOutput]


@dataclass(frozen=True)
class Segment:
    """One document of a packed row: where its query's prefix sits among the cached prefixes,
    and which tokens of the row are its own; a causal one sees its own tokens causally, a
    bidirectional one (an encoder's pair, with no prefix) all of them."""

    prefix_start: int
    prefix_end: int
    start: int
    end: int
    causal: bool = True


@dataclass(frozen=True)
class PackedRow:
    """One forward pass's inputs: a batch of one row, positions restarting after each prefix."""

    input_ids: torch.Tensor  # (1, T)
    position_ids: torch.Tensor  # (1, T)
    attention_mask: torch.Tensor  # (1, 1, T, prefixes + T), boolean: True where a token may look
    segments: tuple[Segment, ...]
    last: torch.Tensor  # (documents,): each document's last token in the row


def pack_row(
    prefix_lengths: Sequence[int], rows: Sequence[tuple[int, Sequence[int]]], device: torch.device
) -> PackedRow:
    """`rows` (prefix index, token ids) back to back, after the prefixes of `prefix_lengths` as
    they lie in the key/value cache."""
    starts = [sum(prefix_lengths[:i]) for i in range(len(prefix_lengths))]
    cached = sum(prefix_lengths)
    total = sum(len(tokens) for _, tokens in rows)
    mask = torch.zeros((total, cached + total), dtype=torch.bool)
    segments: list[Segment] = []
    positions: list[torch.Tensor] = []
    offset = 0
    for owner, tokens in rows:
        n, prefix = len(tokens), prefix_lengths[owner]
        segment = Segment(starts[owner], starts[owner] + prefix, offset, offset + n)
        here = slice(offset, offset + n)
        mask[here, segment.prefix_start : segment.prefix_end] = True
        mask[here, cached + offset : cached + offset + n] = torch.ones(n, n, dtype=torch.bool).tril()
        positions.append(torch.arange(prefix, prefix + n))
        segments.append(segment)
        offset += n
    return PackedRow(
        input_ids=torch.tensor([[t for _, tokens in rows for t in tokens]], dtype=torch.long, device=device),
        position_ids=torch.cat(positions)[None].to(device),
        attention_mask=mask[None, None].to(device),
        segments=tuple(segments),
        last=torch.tensor([s.end - 1 for s in segments], device=device),
    )


@dataclass(frozen=True)
class PairRow:
    """An encoder's forward pass over packed pairs: a batch of one row, positions restarting at
    each pair."""

    input_ids: torch.Tensor  # (1, T)
    token_type_ids: torch.Tensor | None  # (1, T), where the tokenizer gives them
    position_ids: torch.Tensor  # (1, T)
    segments: tuple[Segment, ...]
    first: torch.Tensor  # (pairs,): each pair's first token ([CLS]) in the row


def pack_pairs(
    input_ids: Sequence[Sequence[int]], token_type_ids: Sequence[Sequence[int]] | None, device: torch.device
) -> PairRow:
    """Tokenized pairs back to back in one row, each a bidirectional segment of its own."""
    segments: list[Segment] = []
    offset = 0
    for tokens in input_ids:
        segments.append(Segment(0, 0, offset, offset + len(tokens), causal=False))
        offset += len(tokens)

    def row(values: Sequence[Sequence[int]]) -> torch.Tensor:
        return torch.tensor([[v for tokens in values for v in tokens]], dtype=torch.long, device=device)

    return PairRow(
        input_ids=row(input_ids),
        token_type_ids=None if token_type_ids is None else row(token_type_ids),
        position_ids=torch.cat([torch.arange(len(tokens)) for tokens in input_ids])[None].to(device),
        segments=tuple(segments),
        first=torch.tensor([s.start for s in segments], device=device),
    )


def attend_segments(
    attend: Attention,
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    segments: Sequence[Segment],
    **kwargs: Any,
) -> AttentionOutput:
    """`attend` once per segment, over its prefix and its own tokens: the dense mask's result
    without the blocks it rules out. Answers like transformers' attention functions, (1, T, heads, dim)."""
    cached = key.shape[2] - query.shape[2]  # the prefixes, then the packed tokens
    outputs = []
    for s in segments:
        own = slice(cached + s.start, cached + s.end)
        if s.causal:
            n, prefix = s.end - s.start, s.prefix_end - s.prefix_start
            mask = torch.ones((1, 1, n, prefix + n), dtype=torch.bool, device=query.device).tril(prefix)
            its_prefix = slice(s.prefix_start, s.prefix_end)
            seen = [torch.cat((t[:, :, its_prefix], t[:, :, own]), 2) for t in (key, value)]
        else:  # all of its own tokens, no mask
            mask, seen = None, [key[:, :, own], value[:, :, own]]
        outputs.append(attend(module, query[:, :, s.start : s.end], *seen, mask, **kwargs)[0])
    return torch.cat(outputs, dim=1), None


def segmented(attend: Attention) -> Attention:
    """`attend`, which a packed row's forward pass (`packed_segments=...`) runs per segment."""

    @functools.wraps(attend)
    def run(
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        packed_segments: Sequence[Segment] | None = None,
        **kwargs: Any,
    ) -> AttentionOutput:
        if packed_segments is None:
            return attend(module, query, key, value, attention_mask, **kwargs)
        return attend_segments(attend, module, query, key, value, packed_segments, **kwargs)

    return run


def register_packed(name: str, attend: Attention) -> str:
    """`segmented(attend)` registered with transformers under `name`, with SDPA's masks."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(name, segmented(attend))
    AttentionMaskInterface.register(name, sdpa_mask)
    PACKED_ATTENTION.add(name)
    return name


@functools.cache
def packed_sdpa() -> str:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return register_packed(PACKED_SDPA, sdpa_attention_forward)


def packs_documents(model: torch.nn.Module, device: torch.device) -> bool:
    """On a CPU, make `model`'s SDPA attention segment-aware; whether its attention now is.

    Only where measured: on a CPU (Intel Xeon with AMX, SmolLM2-135M, `bench/rerank_throughput.py
    --variants fp32,bf16` with and without `--padded`) packed rows ran 5.18 against 4.29 pairs/s in
    fp32 and 11.13 against 8.18 in bf16; on CUDA padded batches stay. Not for sliding-window
    attention, which the packed mask does not express."""
    config = getattr(model, "config", None)
    if device.type != "cpu" or config is None or getattr(config, "sliding_window", None) is not None:
        return False
    if getattr(config, "_attn_implementation", None) == "sdpa":
        model.set_attn_implementation(packed_sdpa())  # type: ignore[operator]
    return getattr(config, "_attn_implementation", None) in PACKED_ATTENTION
