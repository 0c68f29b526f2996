"""Whether a deployment's reranker has earned the right to reorder results by default.

A second stage that ranks worse than the first one makes every search slower and worse, and
the user cannot see it happen. So under `rerank: "auto"` (the default) a reranker is applied
only when it is trusted for the deployment it serves:

1. its deployment record carries metrics from the retrain gate: trusted exactly when
   reranking beat the first stage there (nDCG@10 on the held-out dev set; hybrid recall
   where it was measured, else dense);
2. with no measurement, by what the model is: a purpose-trained reranker (a sequence-
   classification cross-encoder, or a yes/no model published as a reranker, such as
   Qwen3-Reranker) is trusted; a general chat model used zero-shot (the offline SmolLM2
   fallback) is not: zero-shot it ranks no better than chance.
"""

from collections.abc import Mapping
from dataclasses import dataclass

from twostage.retrieval.models.reranker import Reranker

PRIMARY = "nDCG@10"
# (reranked, first stage) mode pairs a record may hold, the served first stage first
COMPARISONS = (("hybrid+rerank", "hybrid"), ("two-stage", "dense"))


@dataclass(frozen=True)
class RerankTrust:
    trusted: bool
    why: str


def judge_reranker(
    reranker: Reranker | None, metrics: Mapping[str, Mapping[str, float]] | None = None
) -> RerankTrust:
    """Trust per the rules in the module doc; `metrics` are the deployment record's (mode -> metrics)."""
    if reranker is None:
        return RerankTrust(False, "no reranker is configured")
    measured = metrics or {}
    for two_stage, first in COMPARISONS:
        if PRIMARY in measured.get(two_stage, {}) and PRIMARY in measured.get(first, {}):
            reranked, base = measured[two_stage][PRIMARY], measured[first][PRIMARY]
            verdict = "beat" if reranked > base else "did not beat"
            return RerankTrust(
                reranked > base,
                f"on its dev set reranking {verdict} {first} recall (nDCG@10 {reranked:.4f} vs {base:.4f})",
            )
    name = reranker.model_id.rsplit("@", 1)[0]
    if reranker.family == "cross-encoder":
        return RerankTrust(True, f"{name} is a cross-encoder trained to rank (no dev-set measurement yet)")
    if "rerank" in name.rstrip("/").rsplit("/", 1)[-1].lower():
        return RerankTrust(True, f"{name} is published as a reranker (no dev-set measurement yet)")
    return RerankTrust(
        False,
        f"{name} is a general language model, not trained to rank, and no dev-set measurement shows it helps",
    )
