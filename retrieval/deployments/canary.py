"""The canary, in one home: who sees the candidate, how its ranking is shown, and what the
feedback says.

Who: a session (else the search) is in the canary's share by a hash of the canary's deployment
id and the session, so it keeps its arm for the whole canary, on every replica, and a new canary
draws its share afresh. How: in split mode that share is answered by the candidate alone;
interleaved, by both rankings merged by team draft (Radlinski, Kurup & Joachims 2008): the two
deployments take turns picking their best hit not yet taken, the one with fewer picks first, a
coin deciding ties, and each hit remembers whose pick it was, so a click credits the deployment
that put it there.

What the feedback says. Split: the share of searches with a positive event (a click, citation,
thumbs-up or long dwell) of each arm, compared by a two-proportion z-test (two-sided), once, when
the budget (events or time) is spent: a fixed-horizon test must not be looked at earlier.
Interleaved: each search with positive events credits the deployment whose picks got more of
them (Chapelle et al. 2012: wins against losses, ties left out), and the wins are tested
sequentially, so the canary may be looked at after every event and decided as soon as the
evidence is there: a mixture sequential probability ratio test (Robbins 1970; the mSPRT of
Johari, Koomen, Pekelis & Walsh 2017, "Peeking at A/B tests"). Its statistic is the likelihood
ratio of the wins under a win rate p against p = 1/2, mixed over p by a Beta(a, a) prior cut to
p > 1/2 (`evidence`); under any win rate <= 1/2 it is a nonnegative supermartingale, so by
Ville's inequality the chance it ever reaches 1/alpha is at most alpha, however often it is
looked at. Promoted when it reaches 1/alpha; rolled back as soon as the mirror statistic (p < 1/2)
does, or when the budget is spent first. `PRIOR_A` = 4 was chosen by simulation (1,000 canaries
of up to 1,000 decided searches, alpha 0.05): false promotions 0.033 at p = 1/2; promoted within
the budget at p = 0.55 / 0.6 / 0.7 in 70% / 100% / 100% of runs, after a median 616 / 153 / 37
searches (a = 1: 61%, 797 / 161 / 37; a = 16: 75%, 571 / 149 / 47).
Starting and settling it (under the registry lock) is `lifecycle.py`'s; serving it, `follower.py`'s.
"""

import hashlib
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.special import betainc, betaln

from twostage.retrieval.deployments.registry import Canary
from twostage.retrieval.search.two_stage import Deployment, SearchHit, SearchResult
from twostage.retrieval.traffic.log import TrafficLog, is_positive
from twostage.retrieval.traffic.stats import event_rank

PRIOR_A = 4.0  # the mixing prior Beta(a, a) on the win rate (the module docstring: why 4)
Arm = Literal["control", "candidate", "interleaved"]
Team = Literal["control", "candidate"]


def in_share(candidate: int, key: str, share: float) -> bool:
    """Whether `key` (a session, else a search id) is in the canary of deployment `candidate`."""
    digest = hashlib.sha256(f"canary d{candidate}\x1f{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < share


def team_draft(
    control: list[SearchHit], candidate: list[SearchHit], n: int, seed: str
) -> list[tuple[SearchHit, Team]]:
    """Up to `n` hits merged from the two rankings, each with the team that picked it (by chunk id;
    a hit both rankings hold goes to whoever picks it first)."""
    rng = random.Random(seed)
    lists: dict[Team, list[SearchHit]] = {"control": control, "candidate": candidate}
    picks: dict[Team, int] = {"control": 0, "candidate": 0}
    next_at: dict[Team, int] = {"control": 0, "candidate": 0}
    taken: set[str] = set()
    merged: list[tuple[SearchHit, Team]] = []

    def remaining(team: Team) -> bool:
        hits = lists[team]
        while next_at[team] < len(hits) and hits[next_at[team]].id in taken:
            next_at[team] += 1
        return next_at[team] < len(hits)

    while len(merged) < n and (remaining("control") or remaining("candidate")):
        first: Team = "control" if rng.random() < 0.5 else "candidate"
        if picks["control"] != picks["candidate"]:
            first = "control" if picks["control"] < picks["candidate"] else "candidate"
        team: Team = first if remaining(first) else ("candidate" if first == "control" else "control")
        hit = lists[team][next_at[team]]
        taken.add(hit.id)
        picks[team] += 1
        merged.append((replace(hit, rank=len(merged) + 1), team))
    return merged


@dataclass(frozen=True)
class Answered:
    result: SearchResult
    arm: Arm | None  # None: no canary
    deployment: Deployment  # the one recorded as answering (the candidate for its arm, else the control)
    teams: list[Team] | None = None  # interleaved: whose pick each hit was


def answer(
    control: Deployment, canary: tuple[float, bool, Deployment] | None, key: str, search_id: str, top_n: int,
    run: Callable[[Deployment], SearchResult],
) -> Answered:  # fmt: skip
    """The search as the canary (share, interleave, candidate) says it is answered for `key`."""
    if canary is None:
        return Answered(run(control), None, control)
    share, interleave, candidate = canary
    assert candidate.record is not None
    if not in_share(candidate.record, key, share):
        return Answered(run(control), "control", control)
    if not interleave:
        return Answered(run(candidate), "candidate", candidate)
    ours, theirs = run(control), run(candidate)
    merged = team_draft(ours.hits, theirs.hits, top_n, seed=search_id)
    result = replace(
        ours, hits=[hit for hit, _ in merged], stages=[*ours.stages, "interleave"],
        notes=[*ours.notes, f"interleaved with the canary deployment d{candidate.record}"],
        timings_ms={**ours.timings_ms, **{f"canary_{k}": v for k, v in theirs.timings_ms.items()}},
    )  # fmt: skip
    return Answered(result, "interleaved", candidate, [team for _, team in merged])


Decision = Literal["promote", "rollback", "wait"]


@dataclass(frozen=True)
class Tallies:
    mode: Literal["split", "interleaved"]
    searches: dict[str, int]  # by arm
    successes: dict[str, int]  # split: searches with a positive event, by arm
    wins: int  # interleaved: searches whose positives went more to the candidate's picks
    losses: int
    ties: int
    events: int  # positive events on canary-period searches
    p_value: float | None  # split: the z-test's; interleaved: always valid, min(1, 1/evidence better)
    effect: float | None  # split: candidate rate - control rate; interleaved: wins/(wins+losses) - 0.5
    seconds: float
    evidence: dict[str, float] | None = None  # interleaved: the sequential statistics, "better", "worse"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        p = "-" if self.p_value is None else f"{self.p_value:.4f}"
        if self.mode == "split":
            rates = ", ".join(
                f"{arm} {self.successes[arm]}/{self.searches[arm]}" for arm in ("control", "candidate")
            )
            return f"searches with a positive event: {rates}; two-proportion z-test p = {p}"
        better = "-" if self.evidence is None else f"{self.evidence['better']:.3g}"
        return (f"interleaved: candidate won {self.wins}, lost {self.losses}, tied {self.ties} of "
                f"{self.searches.get('interleaved', 0)} searches; sequential test: evidence {better}, "
                f"always-valid p = {p}")  # fmt: skip


def two_proportions(x1: int, n1: int, x2: int, n2: int) -> float | None:
    """Two-sided p of a z-test that x1/n1 and x2/n2 differ (None: too little to test)."""
    if min(n1, n2) == 0:
        return None
    pooled = (x1 + x2) / (n1 + n2)
    if pooled in (0.0, 1.0):
        return 1.0
    z = (x2 / n2 - x1 / n1) / math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    return math.erfc(abs(z) / math.sqrt(2))


def log_evidence(wins: ArrayLike, losses: ArrayLike, prior_a: float = PRIOR_A) -> NDArray[np.float64]:
    """log of the mixture likelihood ratio that the win rate exceeds 1/2: the mean over p ~ Beta(a, a)
    cut to p > 1/2 (density doubled) of p^w (1-p)^l / (1/2)^(w+l), in closed form:
    2 * B(w+a, l+a) / B(a, a) * P(Beta(w+a, l+a) > 1/2) * 2^(w+l). Elementwise on arrays."""
    won = np.asarray(wins, dtype=np.float64) + prior_a
    lost = np.asarray(losses, dtype=np.float64) + prior_a
    upper = np.maximum(betainc(lost, won, 0.5), 1e-300)  # P(Beta(w+a, l+a) > 1/2)
    decided = won + lost - 2 * prior_a
    return np.asarray(
        (decided + 1) * math.log(2) + betaln(won, lost) - betaln(prior_a, prior_a) + np.log(upper)
    )


def evidence(wins: int, losses: int) -> dict[str, float]:
    """The sequential statistics of an interleaved canary: that the candidate is better, and worse."""
    return {"better": float(np.exp(log_evidence(wins, losses))),
            "worse": float(np.exp(log_evidence(losses, wins)))}  # fmt: skip


def sign_test(wins: int, losses: int) -> float | None:
    """Two-sided exact binomial p of wins against losses at 1/2 (None: no decided search)."""
    n = wins + losses
    if n == 0:
        return None
    tail = sum(math.comb(n, k) for k in range(min(wins, losses) + 1)) / 2**n
    return min(1.0, 2 * tail)


def tallies(log: TrafficLog, canary: Canary, now: float | None = None) -> Tallies:
    """The canary's searches (since it began) and their feedback."""
    now = time.time() if now is None else now
    searches = {s.search_id: s for s in log.searches(canary.started_ts, armed=True)}
    events = [e for e in log.events(canary.started_ts) if e.search_id in searches and is_positive(e)]
    counts = {"control": 0, "candidate": 0, "interleaved": 0}
    for search in searches.values():
        counts[search.arm or "control"] = counts.get(search.arm or "control", 0) + 1
    positive = {e.search_id for e in events}
    successes = {arm: sum(1 for s in searches.values() if s.arm == arm and s.search_id in positive)
                 for arm in ("control", "candidate")}  # fmt: skip
    wins = losses = ties = 0
    credit: dict[str, dict[str, int]] = {}
    for event in events:
        search = searches[event.search_id]
        rank = event_rank(search, event)
        team = search.hits[rank - 1].team if search.arm == "interleaved" and rank is not None else None
        if team is not None:
            credit.setdefault(event.search_id, {"control": 0, "candidate": 0})[team] += 1
    for got in credit.values():
        wins += got["candidate"] > got["control"]
        losses += got["candidate"] < got["control"]
        ties += got["candidate"] == got["control"]
    seen: dict[str, float] | None = None
    if canary.interleave:
        seen = evidence(wins, losses)
        p: float | None = min(1.0, 1.0 / seen["better"])
        effect = None if wins + losses == 0 else wins / (wins + losses) - 0.5
        mode: Literal["split", "interleaved"] = "interleaved"
    else:
        n1, n2 = counts["control"], counts["candidate"]
        p = two_proportions(successes["control"], n1, successes["candidate"], n2)
        effect = None if min(n1, n2) == 0 else successes["candidate"] / n2 - successes["control"] / n1
        mode = "split"
    return Tallies(mode, counts, successes, wins, losses, ties, len(events), p, effect,
                   round(now - canary.started_ts, 1), seen)  # fmt: skip


def decide(canary: Canary, counted: Tallies) -> tuple[Decision, str]:
    """Promote a candidate significantly better; roll back once the budget is spent without that.
    Interleaved: at any look, as soon as the sequential test says better (or worse)."""
    better = counted.effect is not None and counted.effect > 0
    significant = counted.p_value is not None and counted.p_value < canary.alpha
    spent = counted.events >= canary.max_events or counted.seconds >= canary.max_seconds
    if counted.evidence is not None:
        threshold = 1 / canary.alpha
        if counted.evidence["better"] >= threshold:
            return (
                "promote",
                f"the candidate is better: {counted.summary()}; evidence >= 1/alpha = {threshold:g}",
            )
        if counted.evidence["worse"] >= threshold:
            return (
                "rollback",
                f"the candidate is worse: {counted.summary()}; evidence of worse >= {threshold:g}",
            )
        if spent:
            return "rollback", f"the candidate is not shown better within the budget: {counted.summary()}"
    if not spent:
        return "wait", f"budget not spent: {counted.events}/{canary.max_events} events, " \
                       f"{counted.seconds:.0f}/{canary.max_seconds:.0f} s"  # fmt: skip
    if better and significant:
        return "promote", f"the candidate is better: {counted.summary()} < {canary.alpha}"
    why = "worse" if counted.effect is not None and counted.effect < 0 else "not better"
    return "rollback", f"the candidate is {why} at alpha {canary.alpha}: {counted.summary()}"
