"""The promotion gate of `twostage retrain`: primary gain, secondary tolerance, the reranker note."""

from twostage.retrieval.settings import Settings
from twostage.training.retrain import gate


def _metrics(
    dense: float, two_stage: float, recall: float = 0.9, rr: float = 0.8
) -> dict[str, dict[str, float]]:
    return {
        "dense": {"nDCG@10": dense, "RR@10": rr, "R@10": recall},
        "two-stage": {"nDCG@10": two_stage, "RR@10": rr, "R@10": recall},
    }


def test_promotes_only_a_large_enough_gain() -> None:
    settings = Settings()  # min_gain 0.005 on two-stage/nDCG@10
    assert gate(_metrics(0.6, 0.70), _metrics(0.6, 0.71), settings)[0]
    promote, reasons = gate(_metrics(0.6, 0.70), _metrics(0.6, 0.703), settings)
    assert not promote and "needs >= +0.0050" in reasons[0]
    assert not gate(_metrics(0.6, 0.70), _metrics(0.6, 0.69), settings)[0]


def test_a_secondary_regression_beyond_the_tolerance_refuses() -> None:
    settings = Settings()  # tolerance 0.02
    promote, reasons = gate(_metrics(0.60, 0.70), _metrics(0.57, 0.75), settings)
    assert not promote and any(r.startswith("dense/nDCG@10 regressed 0.6000 -> 0.5700") for r in reasons)
    assert gate(_metrics(0.60, 0.70), _metrics(0.59, 0.75), settings)[0]  # within the tolerance
    strict = Settings(retrain={"tolerance": 0.0})
    assert not gate(_metrics(0.60, 0.70), _metrics(0.59, 0.75), strict)[0]


def test_a_reranker_worse_than_dense_is_promoted_with_a_note() -> None:
    promote, reasons = gate(_metrics(0.86, 0.44), _metrics(0.88, 0.48), Settings())
    assert promote
    assert reasons[-1].startswith("note: the candidate's reranker ranks worse than its embedder alone")
    assert not any(r.startswith("note:") for r in gate(_metrics(0.6, 0.7), _metrics(0.6, 0.8), Settings())[1])
