"""What the feedback says about a canary, and the decision it leads to.

Split (each session sees one deployment): the share of searches with a positive event (a click,
citation, thumbs-up or long dwell) of each arm, compared by a two-proportion z-test (two-sided).
Interleaved (one merged list): each search with positive events credits the deployment whose
picks got more of them; wins against losses by an exact sign test (two-sided), ties left out,
the usual analysis of team-draft interleaving (Chapelle et al. 2012). The candidate is promoted
when it is better with p < alpha; when the budget (events or time) is spent without that, the
canary is rolled back. The service's canary watcher runs `decide` (`api.canary_watch`).
"""

import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Literal

from twostage.retrieval.deployments import Canary, Registry, switch
from twostage.retrieval.settings import Settings
from twostage.retrieval.store.vector_store import StoreLockedError, VectorStore, now_iso
from twostage.retrieval.traffic.log import TrafficLog, is_positive
from twostage.retrieval.traffic.stats import event_rank

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
    p_value: float | None
    effect: float | None  # split: candidate rate - control rate; interleaved: wins/(wins+losses) - 0.5
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        p = "-" if self.p_value is None else f"{self.p_value:.4f}"
        if self.mode == "split":
            rates = ", ".join(
                f"{arm} {self.successes[arm]}/{self.searches[arm]}" for arm in ("control", "candidate")
            )
            return f"searches with a positive event: {rates}; two-proportion z-test p = {p}"
        return (f"interleaved: candidate won {self.wins}, lost {self.losses}, tied {self.ties} of "
                f"{self.searches.get('interleaved', 0)} searches; sign test p = {p}")  # fmt: skip


def two_proportions(x1: int, n1: int, x2: int, n2: int) -> float | None:
    """Two-sided p of a z-test that x1/n1 and x2/n2 differ (None: too little to test)."""
    if min(n1, n2) == 0:
        return None
    pooled = (x1 + x2) / (n1 + n2)
    if pooled in (0.0, 1.0):
        return 1.0
    z = (x2 / n2 - x1 / n1) / math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    return math.erfc(abs(z) / math.sqrt(2))


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
    searches = {s.search_id: s for s in log.searches(canary.started_ts) if s.arm is not None}
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
    if canary.interleave:
        p = sign_test(wins, losses)
        effect = None if wins + losses == 0 else wins / (wins + losses) - 0.5
        mode: Literal["split", "interleaved"] = "interleaved"
    else:
        n1, n2 = counts["control"], counts["candidate"]
        p = two_proportions(successes["control"], n1, successes["candidate"], n2)
        effect = None if min(n1, n2) == 0 else successes["candidate"] / n2 - successes["control"] / n1
        mode = "split"
    return Tallies(mode, counts, successes, wins, losses, ties, len(events), p, effect,
                   round(now - canary.started_ts, 1))  # fmt: skip


def decide(canary: Canary, counted: Tallies) -> tuple[Decision, str]:
    """Promote a candidate significantly better; roll back once the budget is spent without that."""
    better = counted.effect is not None and counted.effect > 0
    significant = counted.p_value is not None and counted.p_value < canary.alpha
    spent = counted.events >= canary.max_events or counted.seconds >= canary.max_seconds
    if not spent:
        return "wait", f"budget not spent: {counted.events}/{canary.max_events} events, " \
                       f"{counted.seconds:.0f}/{canary.max_seconds:.0f} s"  # fmt: skip
    if better and significant:
        return "promote", f"the candidate is better: {counted.summary()} < {canary.alpha}"
    why = "worse" if counted.effect is not None and counted.effect < 0 else "not better"
    return "rollback", f"the candidate is {why} at alpha {canary.alpha}: {counted.summary()}"


def settle(settings: Settings, store: VectorStore, log: TrafficLog, collection: str) -> str | None:
    """Decide `collection`'s canary if its budget is spent: switch to the candidate or stop serving
    it, and keep the tallies (`Registry.record_canary`). Under the registry's lock, so one replica
    decides; None when there is nothing to decide (no canary, budget left, a retrain running)."""
    registry = Registry(settings, collection, store)
    canary = registry.canary()
    if canary is None:
        return None
    lock = registry.lock()
    try:
        lock.acquire()
    except StoreLockedError:
        return None  # a retrain or rollback holds the registry: next time
    try:
        canary = registry.canary()  # another replica may have decided meanwhile
        if canary is None:
            return None
        elapsed = time.time() - canary.started_ts
        if elapsed < canary.max_seconds and log.canary_events(canary.started_ts) < canary.max_events:
            return None  # the budget is not spent: the tallies (every canary search read) wait for it
        counted = tallies(log, canary)
        decision, why = decide(canary, counted)
        if decision == "wait":
            return None
        outcome = {"decision": decision, "why": why, "tallies": counted.as_dict(), "decided_at": now_iso()}
        if decision == "promote":
            switch(registry, store, registry.get(canary.deployment))
        registry.record_canary(canary, outcome)
        return f"canary d{canary.deployment} of {collection}: {decision} ({why})"
    finally:
        lock.release()
