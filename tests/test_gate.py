"""The promotion gate of `twostage retrain`: paired tests, embedder and reranker decided apart.

Per-query nDCG@10 values are synthetic here (the full retrain path runs in test_retrain.py):
what is tested is the decision a set of per-query scores leads to.
"""

import numpy as np

from twostage.api.settings import Settings
from twostage.training.gate import decide

E0, R0, E1, R1 = "e-deployed", "r-deployed", "e-candidate", "r-candidate"
RNG = np.random.default_rng(7)
BASE = np.clip(RNG.normal(0.6, 0.25, 200), 0, 1)


def scores(values: np.ndarray) -> dict[str, float]:
    return {f"q{i}": float(v) for i, v in enumerate(np.clip(values, 0, 1))}


def noise(scale: float = 0.15) -> np.ndarray:
    return RNG.normal(0, scale, len(BASE))


def table_for(
    e0_recall: np.ndarray, e1_recall: np.ndarray, rerank_gain: dict[tuple[str, str], float]
) -> dict[tuple[str, str, str], np.ndarray]:
    """Per-query scores of each (embedder, reranker, mode): recall depends on the embedder only."""
    table = {}
    for e, recall in ((E0, e0_recall), (E1, e1_recall)):
        for r in (R0, R1):
            table[e, r, "hybrid"] = recall
            table[e, r, "hybrid+rerank"] = recall + rerank_gain[e, r] + noise(0.05)
    return table


def run(table, queries: int = 200, settings: Settings | None = None):
    return decide(
        lambda e, r, mode: scores(table[e, r, mode]), queries, "hybrid", (E0, R0), (E1, R1),
        (settings or Settings()).retrain,
    )  # fmt: skip


def test_a_noise_level_gain_is_not_promoted_and_a_clear_one_is() -> None:
    same = {pair: 0.0 for pair in ((E0, R0), (E0, R1), (E1, R0), (E1, R1))}
    noisy = run(table_for(BASE, BASE + noise() + 0.004, same))
    assert not noisy.promote and noisy.pair == (E0, R0)
    assert "needs a gain >= +0.005 with p < 0.05" in noisy.embedder.reasons[-1]
    tests = noisy.embedder.tests["hybrid recall, candidate vs deployed embedder"]
    assert tests["queries"] == 200 and tests["ci_low"] < 0 < tests["ci_high"] and tests["p_value"] > 0.05

    clear = run(table_for(BASE, BASE + 0.05 + noise(0.05), same))
    assert clear.embedder.promote and clear.pair == (E1, R0), clear.reasons
    result = clear.embedder.tests["hybrid recall, candidate vs deployed embedder"]
    assert result["p_value"] < 0.001 and result["ci_low"] > 0.03
    assert clear.embedder.reasons[0] == "promoted" and not clear.reranker.promote  # R1 did not help


def test_a_reranker_must_beat_its_own_recall_and_the_deployed_two_stage() -> None:
    # the deployed reranker hurts (-0.2); the candidate's helps a little over its recall (+0.05)
    helps = {(E0, R0): -0.2, (E0, R1): 0.05, (E1, R0): -0.2, (E1, R1): 0.05}
    result = run(table_for(BASE, BASE, helps))
    assert not result.embedder.promote and result.reranker.promote and result.pair == (E0, R1), result.reasons
    assert set(result.reranker.tests) == {
        "hybrid+rerank vs hybrid recall alone", "hybrid+rerank vs the deployed hybrid+rerank"
    }  # fmt: skip
    # better than the deployed reranker, but worse than no reranker at all: not promoted
    hurts_less = {(E0, R0): -0.2, (E0, R1): -0.05, (E1, R0): -0.2, (E1, R1): -0.05}
    result = run(table_for(BASE, BASE, hurts_less))
    assert not result.reranker.promote and result.pair == (E0, R0)
    assert any("vs hybrid recall alone" in r and "needs a gain" in r for r in result.reranker.reasons)


def test_both_are_judged_on_the_embedder_that_will_serve() -> None:
    helps = {(E0, R0): 0.0, (E0, R1): 0.0, (E1, R0): 0.0, (E1, R1): 0.08}
    result = run(table_for(BASE, BASE + 0.05 + noise(0.05), helps))
    assert result.embedder.promote and result.reranker.promote and result.pair == (E1, R1), result.reasons


def test_too_few_dev_queries_promote_nothing_and_say_how_many_are_needed() -> None:
    clear = table_for(BASE, BASE + 0.2, {pair: 0.1 for pair in ((E0, R0), (E0, R1), (E1, R0), (E1, R1))})
    result = run(clear, queries=12)
    assert not result.promote and result.pair == (E0, R0)
    assert "12 queries" in result.reasons[0] and "at least 30 (retrain.min_dev_queries)" in result.reasons[0]
    assert run(clear, queries=12, settings=Settings(retrain={"min_dev_queries": 10})).promote
