"""Sequence-classification rerankers through sentence-transformers' `CrossEncoder`.

For classic cross-encoders (BERT/XLM-R style, or a Qwen3 reranker converted to a
sequence-classification head). The instruction is passed as the CrossEncoder prompt, which
only models trained with one use.
"""

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sentence_transformers import CrossEncoder

from twostage.retrieval.core.errors import InputError, ModelLoadError
from twostage.retrieval.models.batching import MAX_PADDING, token_budget_batches, token_packs
from twostage.retrieval.models.numerics import numeric_path
from twostage.retrieval.models.packed_attention import PACK_TOKENS, PACKED_ATTENTION, pack_pairs, packed_sdpa
from twostage.retrieval.models.prompts import clip_for_tokens, require_text, require_texts
from twostage.retrieval.models.reranker import RerankMixin, RerankRequest
from twostage.retrieval.models.settings import RerankerSettings
from twostage.retrieval.models.source import ModelSource, model_identity
from twostage.retrieval.models.tokens import TokenCounter, split_markers_in_text

# Sequence-classification models whose head `CrossEncoderReranker._head` computes exactly as their
# forward does (pooler on the first token, dropout, classifier), read in transformers' BERT code
PACKED_HEADS = frozenset({"BertForSequenceClassification"})


def packs_pairs(model: CrossEncoder, device: torch.device) -> bool:
    """On a CPU, make a BERT cross-encoder's SDPA attention segment-aware; whether it now packs.

    Why: its pairs then go through one packed row per forward pass (`packed_attention`), so each
    matrix product sees all of the pass's tokens and no padding. MiniLM-L6 as a cross-encoder on
    100 debian-ir dev queries x hybrid top 10 (`bench/rerank_throughput.py --variants
    fp32,bf16,int8`, with and without `--padded`; Intel Xeon with AMX, cadd4f4): the same
    scores, fp32 44.70 -> 71.93 pairs/s, bf16 59.20 -> 158.27 (int8 on oneDNN's eager kernels
    42.29 -> 108.97; on the fused route, `fused_int8`, 81.26 -> 169.78 at 09f4bbf). Only for
    a one-logit sigmoid head of a class in `PACKED_HEADS`, and only on a CPU (where measured).
    """
    hf = model.model
    config = getattr(hf, "config", None)
    if (
        hf is None
        or device.type != "cpu"
        or config is None
        or type(hf).__name__ not in PACKED_HEADS
        or getattr(config, "num_labels", None) != 1
        or not isinstance(model.activation_fn, torch.nn.Sigmoid)
    ):
        return False
    if getattr(config, "_attn_implementation", None) == "sdpa":
        hf.set_attn_implementation(packed_sdpa())
    return getattr(config, "_attn_implementation", None) in PACKED_ATTENTION


class CrossEncoderReranker(RerankMixin):
    """Wraps `CrossEncoder.predict`; scores are the model's activation output (sigmoid for 1 label).

    A sigmoid head is applied here in float64 rather than by the library in float32, so that
    the logit can be read back from the score (TEI's `raw_scores`) instead of saturating at 1.
    """

    family = "cross-encoder"

    def __init__(
        self,
        model: CrossEncoder,
        *,
        model_id: str,
        batch_tokens: int = 16384,
        use_instruction: bool = False,
        packed: bool = False,
    ) -> None:
        self.model = model
        self._model_id = model_id
        self.max_length = int(model.max_length or 512)
        self.batch_tokens = batch_tokens
        self.max_padding = MAX_PADDING  # a batch closes before its padding passes this fraction
        self.batch_size = max(1, batch_tokens // self.max_length)
        self.use_instruction = use_instruction
        self.probabilities = isinstance(model.activation_fn, torch.nn.Sigmoid)  # a sigmoid head: taken here
        self._counter = TokenCounter(model.tokenizer)  # lengths for callers in other threads
        self.packed = packed  # pairs scored in packed rows (`packs_pairs`), else in padded batches
        self.pack_tokens = PACK_TOKENS

    @classmethod
    def load(
        cls,
        source: ModelSource,
        cfg: RerankerSettings,
        *,
        device: torch.device,
        dtype: torch.dtype,
        cache_dir: Path,
    ) -> "CrossEncoderReranker":
        """Load a CrossEncoder model directory."""
        try:
            model = CrossEncoder(
                str(source.path),
                device=str(device),
                model_kwargs={"dtype": dtype},
                local_files_only=True,
                max_length=cfg.max_length,
            )
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"cannot load reranker {source.name!r} from {source.path}: {exc}") from exc
        # a BERT-style encoder reads at most its position embeddings (512): longer input would not
        # be cut at the configured max_length but fail inside the model
        positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        if positions and (model.max_length or 0) > positions:
            model.max_length = int(positions)
        # A causal-LM CrossEncoder renders the prompt through its chat template (the instruction);
        # a classic sequence-classification model would only see it glued to the query.
        generative = getattr(model[0], "transformer_task", "") == "text-generation"
        if not generative:  # a generative one renders its chat template as text: its markers must parse
            split_markers_in_text(model.tokenizer, by_default=True)  # untrusted text is text
        return cls(
            model,
            model_id=model_identity(source, cache_dir),
            batch_tokens=cfg.batch_tokens,
            use_instruction=generative,
            packed=packs_pairs(model, device),  # never a generative one: not a `PACKED_HEADS` class
        )

    @property
    def model_id(self) -> str:
        return self._model_id

    @property
    def numerics(self) -> str:
        return numeric_path(self.model)

    def score(self, query: str, documents: Sequence[str], instruction: str | None = None) -> list[float]:
        return self.score_many([(query, documents, instruction)])[0]

    def score_many(self, requests: Sequence[RerankRequest]) -> list[list[float]]:
        """Scores for several requests; a classic cross-encoder scores all their pairs together.

        The pairs of concurrent requests (the micro-batcher's) share packed rows (on a CPU,
        `packs_pairs`) or padded batches grouped by length. A
        generative one takes its instruction as the library's per-call prompt, so it scores
        request by request.
        """
        calls: list[tuple[list[tuple[str, str]], str | None]] = []
        for query, documents, instruction in requests:
            require_text(query, "query")
            docs = require_texts(documents, "documents", allow_empty_items=True)
            if instruction is not None:
                require_text(instruction, "instruction")
            calls.append(([(query, d) for d in docs], instruction if self.use_instruction else None))
        if self.use_instruction:
            return [self._score_pairs(pairs, prompt) for pairs, prompt in calls]
        scores = self._score_pairs([pair for pairs, _ in calls for pair in pairs], None)
        ends = np.cumsum([len(pairs) for pairs, _ in calls]).tolist()
        return [scores[start:end] for start, end in zip([0, *ends[:-1]], ends, strict=True)]

    def _score_pairs(self, pairs: list[tuple[str, str]], prompt: str | None) -> list[float]:
        if self.packed:
            return self._score_packed(pairs)
        scores = np.empty(len(pairs), dtype=np.float64)
        for batch in self.length_batches(pairs):
            scores[batch] = self.model.predict(
                [pairs[i] for i in batch], batch_size=len(batch), show_progress_bar=False, prompt=prompt,
                activation_fn=torch.nn.Identity() if self.probabilities else None,
            )  # fmt: skip
        if self.probabilities:
            scores = 1.0 / (1.0 + np.exp(-scores))
        return [float(s) for s in scores]

    def _score_packed(self, pairs: list[tuple[str, str]]) -> list[float]:
        """Sigmoid scores of `pairs` through packed rows of at most `pack_tokens` (and
        `batch_tokens`) tokens: tokenized as `CrossEncoder.predict` does (pairs truncated
        longest-first to `max_length`), without padding."""
        if not pairs:
            return []
        encoded = self.model.tokenizer(
            [q for q, _ in pairs],
            [clip_for_tokens(d, self.max_length) for _, d in pairs],
            truncation="longest_first",
            max_length=self.max_length,
        )
        ids, types = encoded["input_ids"], encoded.get("token_type_ids")
        logits = np.empty(len(pairs), dtype=np.float64)
        hf: Any = self.model.model  # a `PACKED_HEADS` class (`packs_pairs`)
        hf.eval()
        with torch.inference_mode():
            for pack in token_packs([len(t) for t in ids], min(self.pack_tokens, self.batch_tokens)):
                row = pack_pairs([ids[i] for i in pack], None if types is None else [types[i] for i in pack],
                                 hf.device)  # fmt: skip
                hidden = hf.base_model(
                    input_ids=row.input_ids,
                    token_type_ids=row.token_type_ids,
                    position_ids=row.position_ids,
                    packed_segments=row.segments,
                ).last_hidden_state
                first = hidden[0, row.first][:, None]  # each pair's [CLS], as a batch of one-token rows
                logits[pack] = self._head(hf, first).double().cpu().numpy()
        return [float(s) for s in 1.0 / (1.0 + np.exp(-logits))]

    @staticmethod
    def _head(hf: Any, first: torch.Tensor) -> torch.Tensor:
        """One logit per pair from its first token's hidden state, (pairs, 1, hidden), as
        `BertForSequenceClassification.forward` computes it."""
        logits: torch.Tensor = hf.classifier(hf.dropout(hf.base_model.pooler(first)))
        return logits[:, 0]

    def length_batches(self, pairs: list[tuple[str, str]]) -> list[list[int]]:
        """Pairs grouped by length into padded batches within the token budget.

        `CrossEncoder.predict` pads each batch to its longest pair, in the given order. On 100
        debian-ir dev queries x hybrid top 10 that computed 2.17x the real tokens, and 3.73x the
        real attention (quadratic in the padded length); grouped here (`token_budget_batches`,
        padding within 10%), the padding is gone and the budget still bounds memory. A
        generative cross-encoder renders its chat template inside the library, so its lengths
        are unknown here and it keeps the library's fixed batches.
        """
        if self.use_instruction:
            size = self.batch_size
            return [list(range(i, min(i + size, len(pairs)))) for i in range(0, len(pairs), size)]
        clipped = [(q, clip_for_tokens(d, self.max_length)) for q, d in pairs]
        lengths = [min(n, self.max_length) for n in self._counter.count(clipped)]
        return token_budget_batches(lengths, self.batch_tokens, self.max_padding)

    def input_lengths(
        self, query: str, documents: Sequence[str], instruction: str | None = None
    ) -> list[int]:
        if self.use_instruction:  # the chat template is rendered inside the library
            raise InputError(
                "this reranker renders a chat template, so its input lengths cannot be counted here: "
                "send truncate=true with truncation_direction=right"
            )
        return self._counter.count([(query, clip_for_tokens(d, self.max_length)) for d in documents])
