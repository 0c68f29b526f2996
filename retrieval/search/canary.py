"""Which deployment answers a search while a canary runs, and team-draft interleaving.

A session (else the search) is in the canary's share by a hash of the canary's deployment id and
the session, so it keeps its arm for the whole canary, on every replica, and a new canary draws
its share afresh. In split mode that share is answered by the candidate alone; interleaved, by
both rankings merged by team draft (Radlinski, Kurup & Joachims 2008): the two deployments take
turns picking their best hit not yet taken, the one with fewer picks first, a coin deciding ties,
and each hit remembers whose pick it was, so a click credits the deployment that put it there.
"""

import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal

from twostage.retrieval.search.two_stage import Deployment, SearchHit, SearchResult

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
