"""Paired comparison of two retrieval systems on the same queries.

A difference of two averages over a few hundred queries is mostly noise unless it is tested
per query: each query's nDCG@10 under system A and under B is a pair, and the question is
whether the mean of the per-query differences is away from zero. Two standard tools
(Smucker, Allan & Carterette 2007, "A comparison of statistical significance tests for
information retrieval evaluation"): a paired randomization test for the p-value (under the
null hypothesis each pair's sign is a coin flip) and a paired bootstrap for the 95%
interval of the mean gain. Both are exact functions of the per-query scores and a seed.
"""

from dataclasses import asdict, dataclass

import numpy as np

PRIMARY = "nDCG@10"


@dataclass(frozen=True)
class PairedComparison:
    """Candidate minus baseline, per query, summarised."""

    queries: int
    baseline: float
    candidate: float
    gain: float
    ci_low: float
    ci_high: float
    p_value: float

    def as_dict(self) -> dict[str, float | int]:
        return {k: round(v, 6) if isinstance(v, float) else v for k, v in asdict(self).items()}

    def summary(self, measure: str = PRIMARY) -> str:
        return (
            f"{measure} {self.baseline:.4f} -> {self.candidate:.4f} ({self.gain:+.4f}, 95% CI "
            f"[{self.ci_low:+.4f}, {self.ci_high:+.4f}], p = {self.p_value:.4f}, {self.queries} queries)"
        )


def per_query(
    qrels: dict[str, dict[str, int]], run: dict[str, dict[str, float]], measure: str = PRIMARY
) -> dict[str, float]:
    """`measure` for every query in `qrels` (a query the run did not answer scores 0)."""
    import ir_measures

    parsed = ir_measures.parse_measure(measure)
    scores = {q: 0.0 for q in qrels}
    for metric in ir_measures.iter_calc([parsed], qrels, run):
        scores[metric.query_id] = float(metric.value)
    return scores


def paired_test(
    baseline: dict[str, float], candidate: dict[str, float], *, samples: int = 10_000, seed: int = 0
) -> PairedComparison:
    """Randomization p-value (two-sided) and bootstrap 95% interval of mean(candidate - baseline)."""
    queries = sorted(set(baseline) & set(candidate))
    if not queries:
        raise ValueError("the two systems share no queries")
    a = np.array([baseline[q] for q in queries])
    b = np.array([candidate[q] for q in queries])
    diff = b - a
    observed = float(diff.mean())
    rng = np.random.default_rng(seed)
    signs = rng.choice((-1.0, 1.0), size=(samples, len(diff)))
    null = (signs * diff).mean(axis=1)
    # the observed assignment is one of the permutations (Phipson & Smyth 2010): p is never 0
    p_value = (1 + int(np.sum(np.abs(null) >= abs(observed) - 1e-12))) / (samples + 1)
    picks = rng.integers(0, len(diff), size=(samples, len(diff)))
    boot = diff[picks].mean(axis=1)
    low, high = np.percentile(boot, [2.5, 97.5])
    return PairedComparison(
        queries=len(queries),
        baseline=float(a.mean()),
        candidate=float(b.mean()),
        gain=observed,
        ci_low=float(low),
        ci_high=float(high),
        p_value=float(p_value),
    )
