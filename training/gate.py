"""The promotion gate of `twostage retrain`: paired tests, and one decision per model.

A gain in the average nDCG@10 of a few dozen dev queries is often noise. Every comparison
here is paired over the same dev queries (`training.paired`: randomization p-value, bootstrap
95% interval over per-query nDCG@10, relevance judged by document id) and needs both a gain of
at least `retrain.min_gain` and p < `retrain.alpha`; with fewer than `retrain.min_dev_queries`
dev queries nothing is promoted, because no such test can tell.

The embedder and the reranker are decided separately, so a better embedder is not held back
by a reranker that did not learn, and vice versa:

- embedder: the candidate's first stage (the recall the service runs; dense where that is
  BM25 alone) against the deployed embedder's, the deployed reranker not involved;
- reranker: the candidate reranker over the chosen embedder's recall must beat both that
  recall alone (a second stage must earn its cost) and the deployed two-stage.
"""

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from twostage.retrieval.store.sparse import RecallMode
from twostage.training.evaluation import reranked_mode
from twostage.training.paired import paired_test
from twostage.training.settings import RetrainSettings

PerQuery = Callable[[str, str, str], dict[str, float]]  # (embedder, reranker, mode) -> qid -> score


@dataclass
class Decision:
    """Whether one model of the candidate pair is promoted, and the evidence."""

    promote: bool
    reasons: list[str]
    tests: dict[str, dict[str, float | int]] = field(default_factory=dict)


@dataclass
class GateResult:
    embedder: Decision
    reranker: Decision
    pair: tuple[str, str]  # (embedder, reranker) to deploy: each the candidate's where promoted

    @property
    def promote(self) -> bool:
        return self.embedder.promote or self.reranker.promote

    @property
    def reasons(self) -> list[str]:
        return [
            *(f"embedder: {r}" for r in self.embedder.reasons),
            *(f"reranker: {r}" for r in self.reranker.reasons),
        ]

    def as_dict(self) -> dict[str, Any]:
        return {
            "promote": self.promote,
            "embedder": asdict(self.embedder),
            "reranker": asdict(self.reranker),
            "pair": {"embedder": self.pair[0], "reranker": self.pair[1]},
            "reasons": self.reasons,
        }


def decide(
    score: PerQuery,
    queries: int,
    served: RecallMode,
    deployed: tuple[str, str],
    candidate: tuple[str, str],
    cfg: RetrainSettings,
) -> GateResult:
    """Both decisions for `candidate` against `deployed`; `score` gives per-query `cfg.gate_metric`."""
    if queries < cfg.min_dev_queries:
        why = (
            f"not promoted: the dev set has {queries} queries and a paired test needs at least "
            f"{cfg.min_dev_queries} (retrain.min_dev_queries); add dev pairs (--dev)"
        )
        return GateResult(Decision(False, [why]), Decision(False, [why]), deployed)
    (e0, r0), (e1, r1) = deployed, candidate
    second = reranked_mode(served)

    def test(label: str, base: dict[str, float], new: dict[str, float], decision: Decision) -> bool:
        result = paired_test(base, new)
        ok = result.gain >= cfg.min_gain and result.p_value < cfg.alpha
        needs = f"; needs a gain >= +{cfg.min_gain} with p < {cfg.alpha}" if not ok else ""
        decision.reasons.append(f"{label}: {result.summary(cfg.gate_metric)}{needs}")
        decision.tests[label] = result.as_dict()
        return ok

    embedder = Decision(False, [])
    if e1 == e0:
        embedder.reasons.append("not retrained")
    else:
        recall: RecallMode = "dense" if served == "sparse" else served  # BM25 does not see the embedder
        label = f"{recall} recall, candidate vs deployed embedder"
        embedder.promote = test(label, score(e0, r0, recall), score(e1, r1, recall), embedder)
    chosen = e1 if embedder.promote else e0
    reranker = Decision(False, [])
    if r1 == r0:
        reranker.reasons.append("not retrained")
    else:
        two_stage = score(chosen, r1, second)
        over_recall = test(
            f"{second} vs {served} recall alone", score(chosen, r1, served), two_stage, reranker
        )
        over_deployed = test(f"{second} vs the deployed {second}", score(e0, r0, second), two_stage, reranker)
        reranker.promote = over_recall and over_deployed
    for decision in (embedder, reranker):
        if decision.reasons and decision.reasons[0] != "not retrained":
            decision.reasons.insert(0, "promoted" if decision.promote else "kept the deployed one")
    return GateResult(embedder, reranker, (chosen, r1 if reranker.promote else r0))
