"""Calibrated relevance: what a deployment's served score means as a probability of relevance.

Raw scores are not answers a chatbot can threshold: an RRF recall score is a sum of reciprocal
ranks (about 0.016-0.033 whatever the query), a reranker's probability has a scale its
training gave it. A `Calibration` is a monotone map, fitted per deployment on judged dev
queries (`training.calibration`), from the score its served order is made of to P(relevant):

- by the score a hit was served by: a reranked hit's reranker score, a hit past `rerank_k` (or
  any hit of a search that does not rerank) its recall score;
- by rank group: one map for the top hit, one for ranks 2-3, one for the rest (`RANK_GROUPS`),
  since the same score means more at rank 1, where nothing beat it, than at rank 6;
- interpolated linearly between the fitted steps, as isotonic regression predicts, and
  clipped at the ends; and for the reranker alone (`reranker`), its score pooled over ranks,
  which is all the compatible rerank routes have (a query and documents, no recall).

A map holds only for the search it was fitted on: the same first stage, the reranker applied
or not, the same fusion. A search planned otherwise (a request's `recall=dense` on a hybrid
deployment, say) gets `relevance: null` and a note, never a number fitted for other scores.
"""

import numpy as np
from pydantic import BaseModel, Field

RANK_GROUPS = (1, 2, 4)  # the first rank of each group: 1, 2-3, 4 on


class ScoreMap(BaseModel):
    """Isotonic steps `(x, y)`: P(relevant) at score `x[i]` is `y[i]`, linear in between."""

    first_rank: int = Field(1, ge=1, description="the map holds from this rank to the next map's")
    x: list[float]
    y: list[float]

    def __call__(self, score: float) -> float:
        return float(np.clip(np.interp(score, self.x, self.y), 0.0, 1.0))


class ReliabilityBin(BaseModel):
    """Held-out judgements whose predicted relevance fell in [low, high)."""

    low: float
    high: float
    count: int
    predicted: float | None = Field(description="their mean predicted relevance (null: empty bin)")
    observed: float | None = Field(description="the share of them that were relevant")


class Reliability(BaseModel):
    """How well the map predicts judgements it was not fitted on (k-fold by query)."""

    ece: float = Field(description="expected calibration error over equal-width bins")
    brier: float = Field(description="mean squared error of the predicted probability")
    judgements: int
    queries: int
    positives: int
    folds: int
    bins: list[ReliabilityBin]


class Calibration(BaseModel):
    """A deployment's map from served score to P(relevant), and the search it holds for."""

    recall: str = Field(description="the first stage it was fitted on: dense, sparse or hybrid")
    rerank: bool = Field(description="whether the fitted searches were reranked")
    fusion: str | None = Field(None, description="how reranked hits were ordered: rrf or none")
    depth: int = Field(description="hits per query judged (the top of each search)")
    reranked: list[ScoreMap] = Field(
        default_factory=list, description="maps of the reranker score by rank group, first_rank ascending"
    )
    recalled: list[ScoreMap] = Field(
        default_factory=list, description="maps of the recall score of hits not reranked, by rank group"
    )
    reranker: ScoreMap | None = Field(None, description="the reranker's score alone (rerank routes)")
    reliability: Reliability
    source: str = Field(description="the judgements it was fitted on")
    fitted_at: str

    def mismatch(self, recall: str, rerank: bool, fusion: str | None) -> str | None:
        """Why this map does not hold for a search planned as (recall, rerank, fusion); None if it does."""
        if (recall, rerank) == (self.recall, self.rerank) and (not rerank or fusion == self.fusion):
            return None

        def plan(r: str, reranked: bool, f: str | None) -> str:
            return f"{r} recall" + (f", reranked (fusion {f})" if reranked else ", not reranked")

        return (
            f"the deployment's calibration was fitted on {plan(self.recall, self.rerank, self.fusion)}, "
            f"this search ran {plan(recall, rerank, fusion)}"
        )

    def relevance(self, rank: int, recall_score: float, rerank_score: float | None) -> float | None:
        """P(relevant) of a hit served at `rank` with these scores (None: a kind of hit the fitted
        searches never served, e.g. an unreranked one when every judged hit was reranked)."""
        maps, score = (
            (self.reranked, rerank_score) if rerank_score is not None else (self.recalled, recall_score)
        )
        if not maps:
            return None
        group = next((m for m in reversed(maps) if m.first_rank <= rank), maps[0])
        return round(group(score), 6)

    def rerank_relevance(self, score: float) -> float | None:
        """P(relevant) of a document the reranker alone scored (the compatible rerank routes)."""
        return None if self.reranker is None else round(self.reranker(score), 6)
