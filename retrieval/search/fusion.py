"""How a reranked head is ordered: by the reranker alone, or by its rank fused with the recall rank.

A small reranker and the first stage make different mistakes. Fusing their ranks by reciprocal
rank fusion keeps what each gets right, as BM25 + dense fusion does one stage earlier; ordering
by the reranker alone throws the first stage's evidence away. Measured with `bench/quality.py`
(debian-ir dev, 300 queries, 20,000 corpus distractors, a MiniLM cross-encoder trained here
reranking the fine-tuned hybrid top 10): ordered by the reranker alone 0.8041 nDCG@10, +0.0009
over recall (p = 0.94); fused with the recall rank (k 60, equal weights, untuned) 0.8213,
+0.0181 (95% CI [+0.006, +0.031], p = 0.004). So `rrf` is the default, and the gate measures
a reranker the way it is served.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

FusionName = Literal["rrf", "none"]


@dataclass(frozen=True)
class RerankFusion:
    """score = weight / (k + reranker rank) + 1 / (k + recall rank), ranks from 1 (the RRF paper's
    form); ties keep recall order. `weight` is the reranker's, the recall rank's is 1."""

    k: int = 60
    weight: float = 1.0


def rerank_order(scores: Sequence[float], fusion: RerankFusion | None) -> list[int]:
    """Indices of a reranked head, best first. `scores[i]` is the reranker's score of the i-th
    recalled item (the head arrives in recall order); `fusion` None orders by the reranker alone."""
    by_reranker = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    if fusion is None:
        return by_reranker
    fused = [0.0] * len(scores)
    for rank, i in enumerate(by_reranker, start=1):
        fused[i] = fusion.weight / (fusion.k + rank) + 1.0 / (fusion.k + i + 1)
    return sorted(range(len(scores)), key=lambda i: (-fused[i], i))


def choose_fusion(
    requested: FusionName | None, default: FusionName, k: int, weight: float
) -> RerankFusion | None:
    """The request's fusion, else the settings'; None means the reranker's order alone."""
    return RerankFusion(k, weight) if (requested or default) == "rrf" else None
