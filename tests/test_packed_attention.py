"""Packed rows (`packed_attention`): the layout, its exact mask, and segment-aware attention.

Parity of packed scoring with the official recipe is in `test_qwen3_parity.py` (both layouts),
and a packed cross-encoder's with `CrossEncoder.predict` in `test_truncation.py`."""

from pathlib import Path

import pytest
import torch
from sentence_transformers import CrossEncoder
from transformers import AutoModelForCausalLM, DynamicCache

from twostage.api.settings import Settings
from twostage.retrieval.models.batching import token_packs
from twostage.retrieval.models.cross_encoder_reranker import packs_pairs
from twostage.retrieval.models.loading import load_reranker
from twostage.retrieval.models.packed_attention import (
    PACKED_SDPA,
    Segment,
    pack_pairs,
    pack_row,
    packs_documents,
)
from twostage.retrieval.models.tiny import TinyModelPaths
from twostage.retrieval.models.yes_no_reranker import YesNoReranker


def test_token_packs_fill_rows_in_order_up_to_the_budget() -> None:
    assert token_packs([5, 3, 9, 2, 1, 6], 8) == [[0, 1], [2], [3, 4], [5]]  # 9 alone: over the budget
    assert token_packs([], 8) == []
    assert token_packs([1, 1, 1], 100) == [[0, 1, 2]]
    with pytest.raises(ValueError):
        token_packs([1], 0)


def test_pack_row_lays_documents_after_the_prefixes() -> None:
    """Two cached prefixes (3 and 2 tokens), three documents: each sees its own query's prefix and,
    causally, itself; positions restart after its prefix."""
    row = pack_row([3, 2], [(0, [11, 12]), (1, [21, 22, 23]), (0, [31])], torch.device("cpu"))
    assert row.input_ids.tolist() == [[11, 12, 21, 22, 23, 31]]
    assert row.position_ids.tolist() == [[3, 4, 2, 3, 4, 3]]
    assert row.last.tolist() == [1, 4, 5]
    expected = [
        # prefix 0 | prefix 1 | 11 12 21 22 23 31
        [1, 1, 1, 0, 0, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 1, 1, 0, 0, 0, 0],
        [0, 0, 0, 1, 1, 0, 0, 1, 0, 0, 0],
        [0, 0, 0, 1, 1, 0, 0, 1, 1, 0, 0],
        [0, 0, 0, 1, 1, 0, 0, 1, 1, 1, 0],
        [1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 1],
    ]
    assert row.attention_mask.shape == (1, 1, 6, 11)
    assert row.attention_mask[0, 0].int().tolist() == expected
    assert [(s.prefix_start, s.prefix_end, s.start, s.end) for s in row.segments] == [
        (0, 3, 0, 2),
        (3, 5, 2, 5),
        (0, 3, 5, 6),
    ]


def test_segment_attention_equals_the_dense_mask(tiny_models: TinyModelPaths) -> None:
    """One packed row through the tiny Qwen3 decoder: the segment-aware attention (one SDPA call
    per document) gives the hidden states that plain SDPA gives with the dense block mask."""
    model = AutoModelForCausalLM.from_pretrained(tiny_models.reranker, attn_implementation="sdpa").eval()
    decoder = model.get_decoder()
    prefixes = [[5, 6, 7, 8], [9, 10, 11]]
    rows = [(0, [20, 21, 22]), (1, [30]), (0, [40, 41]), (1, [50, 51, 52, 53, 54])]
    row = pack_row([len(p) for p in prefixes], rows, torch.device("cpu"))

    def hidden(segments: object) -> torch.Tensor:
        with torch.inference_mode():
            caches = [decoder(input_ids=torch.tensor([p]), use_cache=True).cache for p in prefixes]
            layers = zip(*([(k, v) for k, v, *_ in c] for c in caches), strict=True)
            cache = DynamicCache(
                [tuple(torch.cat(parts, 2) for parts in zip(*kv, strict=True)) for kv in layers]
            )
            extra = {} if segments is None else {"packed_segments": segments}
            return decoder(
                input_ids=row.input_ids,
                attention_mask=row.attention_mask,
                position_ids=row.position_ids,
                cache=cache,
                use_cache=True,
                **extra,
            ).last_hidden_state

    dense = hidden(None)
    assert packs_documents(model, torch.device("cpu"))
    assert model.config._attn_implementation == PACKED_SDPA
    torch.testing.assert_close(hidden(row.segments), dense, atol=1e-5, rtol=0)
    # each document alone after its own prefix, as a padded batch would score it
    with torch.inference_mode():
        for segment, (owner, tokens) in zip(row.segments, rows, strict=True):
            alone = decoder(input_ids=torch.tensor([prefixes[owner] + tokens])).last_hidden_state
            torch.testing.assert_close(
                dense[0, segment.start : segment.end], alone[0, len(prefixes[owner]) :], atol=1e-5, rtol=0
            )


def test_only_a_cpu_reranker_packs(tiny_settings: Settings, tiny_models: TinyModelPaths) -> None:
    """Packed rows were measured on a CPU; CUDA keeps padded batches (checked without a GPU: the
    decision is made from the device)."""
    reranker = load_reranker(tiny_settings)
    assert isinstance(reranker, YesNoReranker)
    assert reranker.packed and reranker.model.config._attn_implementation == PACKED_SDPA
    model = AutoModelForCausalLM.from_pretrained(tiny_models.reranker, attn_implementation="sdpa")
    assert not packs_documents(model, torch.device("cuda"))
    assert model.config._attn_implementation == "sdpa"


CPU = torch.device("cpu")


def test_pack_pairs_lays_pairs_back_to_back() -> None:
    """Each pair a bidirectional segment of its own; positions restart at each pair's [CLS]."""
    row = pack_pairs([[101, 5, 102, 7, 102], [101, 6, 102]], [[0, 0, 0, 1, 1], [0, 0, 0]], CPU)
    assert row.input_ids.tolist() == [[101, 5, 102, 7, 102, 101, 6, 102]]
    assert row.token_type_ids is not None and row.token_type_ids.tolist() == [[0, 0, 0, 1, 1, 0, 0, 0]]
    assert row.position_ids.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2]]
    assert row.first.tolist() == [0, 5]
    assert row.segments == (Segment(0, 0, 0, 5, causal=False), Segment(0, 0, 5, 8, causal=False))
    assert pack_pairs([[1, 2]], None, CPU).token_type_ids is None


def test_packed_pairs_attend_only_to_themselves(cross_encoder_dir: Path) -> None:
    """A BERT cross-encoder's packed row: each pair's hidden states equal its forward pass alone."""
    ce = CrossEncoder(str(cross_encoder_dir), device="cpu")
    assert packs_pairs(ce, CPU) and ce.model.config._attn_implementation == PACKED_SDPA
    encoded = ce.tokenizer(["chess", "go", "apt"], ["a chess engine", "pawn " * 40, "installs packages"])
    ids, types = encoded["input_ids"], encoded["token_type_ids"]
    row = pack_pairs(ids, types, CPU)
    bert = ce.model.base_model
    with torch.inference_mode():
        packed = bert(
            input_ids=row.input_ids, token_type_ids=row.token_type_ids, position_ids=row.position_ids,
            packed_segments=row.segments,
        ).last_hidden_state[0]  # fmt: skip
        for segment, tokens, kinds in zip(row.segments, ids, types, strict=True):
            alone = bert(
                input_ids=torch.tensor([tokens]), token_type_ids=torch.tensor([kinds])
            ).last_hidden_state
            torch.testing.assert_close(packed[segment.start : segment.end], alone[0], atol=1e-5, rtol=1e-5)


def test_only_a_cpu_bert_cross_encoder_packs(cross_encoder_dir: Path) -> None:
    """Packed pairs were measured on a CPU; on CUDA the model keeps its SDPA and padded batches."""
    ce = CrossEncoder(str(cross_encoder_dir), device="cpu")
    assert not packs_pairs(ce, torch.device("cuda"))
    assert ce.model.config._attn_implementation == "sdpa"
