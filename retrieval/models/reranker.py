"""The `Reranker` protocol, its result type, and the factory that picks an implementation.

Implementations: `YesNoReranker` (Qwen3-Reranker and any causal LM judged by
logit(yes) - logit(no)) and `CrossEncoderReranker` (sentence-transformers CrossEncoder,
for sequence-classification rerankers).
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

from twostage.retrieval.core.errors import InputError
from twostage.retrieval.models.numerics import RERANK_PROBES

if TYPE_CHECKING:
    pass

RerankRequest = tuple[str, Sequence[str], str | None]


@dataclass(frozen=True)
class RankedDocument:
    """One document's place after reranking: its index in the input and its score in [0, 1]."""

    index: int
    score: float


@runtime_checkable
class Reranker(Protocol):
    """Scores (query, document) pairs; higher means more relevant."""

    family: str  # "yes-no" (a causal LM's yes/no logits) or "cross-encoder" (a classification head)
    max_length: int  # tokens of one (instruction, query, document) input; the document is cut to fit
    probabilities: bool  # scores are sigmoid probabilities of a logit (TEI's raw_scores reads it back)

    @property
    def model_id(self) -> str:
        """`name@content-hash` of the loaded model."""
        ...

    @property
    def numerics(self) -> str:
        """The numeric path that computes the scores: float32, bfloat16, float16, int8-dynamic,
        int8-fused, remote."""
        ...

    def score(self, query: str, documents: Sequence[str], instruction: str | None = None) -> list[float]:
        """Relevance of each document to the query, in input order."""
        ...

    def score_many(self, requests: Sequence[RerankRequest]) -> list[list[float]]:
        """`score` for several (query, documents, instruction) requests, in order."""
        ...

    def input_lengths(
        self, query: str, documents: Sequence[str], instruction: str | None = None
    ) -> list[int]:
        """Tokens of each document's whole input (template, instruction, query, document), untruncated.

        Safe to call from any thread while the model scores (it counts on a private tokenizer).
        """
        ...

    def rerank(
        self, query: str, documents: Sequence[str], instruction: str | None = None, top_n: int | None = None
    ) -> list[RankedDocument]:
        """Documents sorted by descending score (ties keep input order), cut to `top_n`."""
        ...


class RerankMixin:
    """`rerank` and `score_many` in terms of `score`, shared by every implementation."""

    def score(self, query: str, documents: Sequence[str], instruction: str | None = None) -> list[float]:
        raise NotImplementedError

    def score_many(self, requests: Sequence[RerankRequest]) -> list[list[float]]:
        """Several (query, documents, instruction) calls; implementations may batch across them."""
        return [self.score(q, docs, instruction) for q, docs, instruction in requests]

    def rerank(
        self, query: str, documents: Sequence[str], instruction: str | None = None, top_n: int | None = None
    ) -> list[RankedDocument]:
        if top_n is not None and top_n < 1:
            raise InputError(f"top_n must be at least 1, got {top_n}")
        scores = self.score(query, documents, instruction)
        order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
        return [RankedDocument(i, scores[i]) for i in order[:top_n]]


def probe_scores(reranker: Reranker) -> np.ndarray:
    """The reranker's scores of `RERANK_PROBES`, as probabilities (a raw head's logits squashed), so
    one tolerance reads the same for every head."""
    scores = np.asarray([s for q, docs in RERANK_PROBES for s in reranker.score(q, docs)], dtype=np.float64)
    return scores if reranker.probabilities else 1.0 / (1.0 + np.exp(-scores))
