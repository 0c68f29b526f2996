"""What the traffic says: searches, events by type, click-through by rank, zero-hit and
low-score queries (`twostage feedback stats`, `GET /v1/feedback/stats`, the quality page)."""

import time
from collections import Counter
from dataclasses import dataclass

from twostage.retrieval.traffic.log import EVENT_KINDS, Event, LoggedSearch, ShownHit, TrafficLog

RANKS_SHOWN = 10


@dataclass(frozen=True)
class RankRate:
    rank: int
    shown: int  # searches that showed a hit at this rank
    clicked: int  # of them, those whose hit at this rank was clicked
    rate: float


@dataclass(frozen=True)
class QueryCount:
    query: str  # the text, or "sha256:<first 16 hex>" where the log keeps only hashes
    searches: int


@dataclass(frozen=True)
class TrafficStats:
    days: float
    searches: int
    sessions: int
    searches_with_feedback: int
    events: dict[str, int]
    click_through: list[RankRate]
    zero_hit: list[QueryCount]
    low_score: list[QueryCount]
    low_relevance: float  # a search whose best hit's calibrated relevance is below this is low-score
    uncalibrated: int  # searches whose hits had no relevance (not counted as low-score)


def event_hit(search: LoggedSearch, event: Event) -> ShownHit | None:
    """The hit an event is about (a document: its best-ranked chunk), None if the search did not show it."""
    for hit in search.hits:
        if hit.id == event.chunk_id or (event.chunk_id is None and hit.doc_id == event.doc_id):
            return hit
    return None


def event_rank(search: LoggedSearch, event: Event) -> int | None:
    hit = event_hit(search, event)
    return None if hit is None else hit.rank


def _label(search: LoggedSearch) -> str:
    return search.query if search.query is not None else f"sha256:{search.query_hash[:16]}"


def traffic_stats(log: TrafficLog, days: float = 7.0, low_relevance: float = 0.5, top: int = 10,
                  now: float | None = None, key: str | None = None) -> TrafficStats:  # fmt: skip
    """The last `days` of the log; only key `key`'s searches where given (a non-admin's own)."""
    since = (time.time() if now is None else now) - days * 86400
    searches = {s.search_id: s for s in log.searches(since, key=key)}
    events = [e for e in log.events(since) if e.search_id in searches]
    clicked: set[tuple[str, int]] = set()
    for event in events:
        rank = event_rank(searches[event.search_id], event) if event.event == "click" else None
        if rank is not None:
            clicked.add((event.search_id, rank))
    shown = Counter(h.rank for s in searches.values() for h in s.hits if h.rank <= RANKS_SHOWN)
    clicks = Counter(rank for _, rank in clicked if rank <= RANKS_SHOWN)
    zero = Counter(_label(s) for s in searches.values() if not s.hits)
    scored = [s for s in searches.values() if s.hits and s.hits[0].relevance is not None]
    low = Counter(_label(s) for s in scored if max(h.relevance or 0.0 for h in s.hits) < low_relevance)
    return TrafficStats(
        days=days,
        searches=len(searches),
        sessions=len({s.session for s in searches.values() if s.session}),
        searches_with_feedback=len({e.search_id for e in events}),
        events={kind: sum(1 for e in events if e.event == kind) for kind in EVENT_KINDS},
        click_through=[
            RankRate(r, shown[r], clicks[r], clicks[r] / shown[r] if shown[r] else 0.0)
            for r in range(1, RANKS_SHOWN + 1)
            if shown[r]
        ],
        zero_hit=[QueryCount(q, n) for q, n in zero.most_common(top)],
        low_score=[QueryCount(q, n) for q, n in low.most_common(top)],
        low_relevance=low_relevance,
        uncalibrated=sum(1 for s in searches.values() if s.hits and s.hits[0].relevance is None),
    )


def stats_text(stats: TrafficStats) -> str:
    """The stats as `twostage feedback stats` prints them."""
    lines = [
        f"last {stats.days:g} days: {stats.searches} searches ({stats.sessions} sessions), "
        f"{stats.searches_with_feedback} with feedback",
        "events: " + ", ".join(f"{kind} {n}" for kind, n in stats.events.items()),
        "click-through by rank:",
        *(f"  {r.rank:>2}  {r.rate:6.1%}  ({r.clicked} of {r.shown})" for r in stats.click_through),
        f"zero-hit queries ({sum(q.searches for q in stats.zero_hit)} searches):",
        *(f"  {q.searches:>5}  {q.query[:100]}" for q in stats.zero_hit),
        f"low-score queries (best relevance < {stats.low_relevance:g}):",
        *(f"  {q.searches:>5}  {q.query[:100]}" for q in stats.low_score),
    ]
    if not stats.click_through:
        lines.insert(3, "  (no hits shown)")
    if stats.uncalibrated:
        lines.append(f"({stats.uncalibrated} searches answered without calibrated relevance are not judged "
                     "low-score: twostage calibrate)")  # fmt: skip
    return "\n".join(lines)
