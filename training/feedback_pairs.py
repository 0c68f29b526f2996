"""Training pairs from traffic: the search log and its feedback events (`twostage pairs from-feedback`).

Positives are the hits users cited, clicked, gave a thumbs-up or read for a while (`dwell`);
negatives the hits they gave a thumbs-down, and the hits shown
*above* a positive that got no positive event ("skip-above", Joachims 2002): a user who clicked
rank 3 looked at ranks 1 and 2 and passed them by, which holds whatever the position bias, while
a hit below the click says nothing (it may not have been seen). Labels are graded by the
strongest event: a thumbs-up or a citation 1.0, a long dwell 0.75, a click 0.5.

Searches of the same query (and instruction) pool their evidence, and pooled clicks are noisy:
users click a wrong hit now and then, and a query asked 8 times collects its stray clicks 8 times
(on the bench's log of 5,000 searches, 180 of the 688 positives that every clicked chunk made were
wrong). So a chunk is a positive only when its positive events outnumber the evidence against it,
its thumbs-downs and the times it was passed over above another click: users preferred it more
often than they skipped it (a tie is neither, unless a thumbs-down breaks it). That leaves 106
wrong of 613 on that log. A second filter is there but off by default: `min_rate`
(`feedback.pairs_min_rate`) asks a positive to have a positive event in at least that share of
its query's searches. At 0.2 it left 23 wrong of 514, yet the embedder trained on those pairs
scored lower on unseen queries (nDCG@10 0.7600 against 0.7641, paired p = 0.15): the rate is
position-biased, and the right positives it drops are the ones ranked low, which teach the most.
`min_events` asks for that many positive events.

Pairs name chunks by id (`{query, id, negative_ids, label}`) and are resolved against the
collection when retrain reads them, so this needs the log only (the store may be held by the
running server). Queries are split into train/dev by the same hash as
every pairs file (`training.data.split_by_query`), so retrain's own split agrees with `split`.
"""

import json
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from twostage.retrieval.core.errors import InputError
from twostage.retrieval.traffic.log import DWELL_S, Event, LoggedSearch, TrafficLog, is_positive
from twostage.retrieval.traffic.settings import FeedbackSettings
from twostage.retrieval.traffic.stats import event_hit
from twostage.training.data import Judgement, pair_row, split_by_query

GRADES = {"thumbs_up": 1.0, "cited": 1.0, "dwell": 0.75, "click": 0.5}
MAX_NEGATIVES = 10


@dataclass
class _Evidence:
    """What one query's searches say about one chunk."""

    positive: int = 0  # positive events
    in_searches: int = 0  # searches with a positive event for it
    thumbs_down: int = 0
    skipped: int = 0  # times passed over above a positive of the same search
    grade: float = 0.0

    def is_positive(self) -> bool:
        """Preferred more often than passed over or disliked."""
        return self.positive > self.thumbs_down + self.skipped

    def is_negative(self) -> bool:
        """Disliked or passed over more often than preferred; a thumbs-down breaks a tie."""
        against = self.thumbs_down + self.skipped
        return against > self.positive or (self.thumbs_down > 0 and against == self.positive)


@dataclass
class FeedbackPairs:
    pairs: list[Judgement] = field(default_factory=list)
    searches: int = 0  # logged searches read
    with_feedback: int = 0  # of them, those with a usable event
    hashed: int = 0  # searches whose text the log did not keep (feedback.store_query_text off)
    below_min: int = 0  # positives with fewer than min_events positive events
    contested: int = 0  # chunks with positive events and as much evidence against them (or more)
    rare: int = 0  # positives in fewer than min_rate of their query's searches (stray clicks)
    unlogged: int = 0  # events on a search the log does not hold (the search log was off)
    unmatched: int = 0  # events on a hit their search did not show (accepted while the log was off)
    queries: int = 0
    negatives: int = 0
    dev_queries: set[str] = field(default_factory=set)  # queries of the dev split


def _hit_id(search: LoggedSearch, event: Event) -> str | None:
    hit = event_hit(search, event)
    return None if hit is None else hit.id


def pairs_from_feedback(
    searches: Iterable[LoggedSearch], events: Iterable[Event], min_events: int = 1, dwell_s: float = DWELL_S,
    dev_fraction: float = 0.2, min_rate: float | None = None,
) -> FeedbackPairs:  # fmt: skip
    """Pairs by chunk id from logged searches and their events (see the module doc); `min_rate`
    None: the setting's default."""
    if min_rate is None:
        min_rate = FeedbackSettings().pairs_min_rate
    if min_events < 1:
        raise InputError(f"--min-events must be at least 1, got {min_events}")
    if not 0 <= min_rate <= 1:
        raise InputError(f"--min-rate must be between 0 and 1, got {min_rate}")
    by_search: dict[str, list[Event]] = defaultdict(list)
    for event in events:
        by_search[event.search_id].append(event)
    out = FeedbackPairs()
    logged: set[str] = set()
    evidence: dict[tuple[str, str | None], dict[str, _Evidence]] = defaultdict(dict)
    asked: dict[tuple[str, str | None], int] = defaultdict(int)  # searches of each query
    for search in searches:
        out.searches += 1
        logged.add(search.search_id)
        if search.query is not None:
            asked[(search.query, search.instruction)] += 1
        mine = by_search.get(search.search_id, [])
        if not mine:
            continue
        if search.query is None:
            out.hashed += 1
            continue
        chunks = evidence[(search.query, search.instruction)]
        ranks = {h.id: h.rank for h in search.hits}
        positive_here: set[str] = set()  # chunks with a positive event in this search
        usable = False
        for event in mine:
            chunk = _hit_id(search, event)
            if chunk is None:
                out.unmatched += 1
                continue
            usable = True
            seen = chunks.setdefault(chunk, _Evidence())
            if event.event == "thumbs_down":
                seen.thumbs_down += 1
            elif is_positive(event, dwell_s):
                seen.positive += 1
                seen.grade = max(seen.grade, GRADES[event.event])
                positive_here.add(chunk)
        out.with_feedback += usable
        for chunk in positive_here:
            chunks[chunk].in_searches += 1
        lowest = max((ranks[c] for c in positive_here), default=0)
        for hit in search.hits:  # skip-above: shown above the lowest positive, no positive event of its own
            if hit.rank < lowest and hit.id not in positive_here:
                chunks.setdefault(hit.id, _Evidence()).skipped += 1
    out.unlogged = sum(len(found) for search_id, found in by_search.items() if search_id not in logged)
    for key, chunks in evidence.items():
        query, instruction = key
        positives = [c for c, e in chunks.items() if e.is_positive()]
        negatives = sorted(c for c, e in chunks.items() if e.is_negative())
        out.contested += sum(1 for e in chunks.values() if e.positive and not e.is_positive())
        rare = [c for c in positives if chunks[c].in_searches < min_rate * asked[key]]
        weak = [c for c in positives if chunks[c].positive < min_events and c not in rare]
        out.rare += len(rare)
        out.below_min += len(weak)
        kept = [c for c in positives if c not in weak and c not in rare]
        if kept:
            out.queries += 1
        for chunk in sorted(kept, key=lambda c: -chunks[c].grade):
            shown = tuple(negatives[:MAX_NEGATIVES])
            out.pairs.append(Judgement(query, chunk_id=chunk, instruction=instruction, negative_ids=shown,
                                       label=chunks[chunk].grade))  # fmt: skip
            out.negatives += min(len(negatives), MAX_NEGATIVES)
    _, dev = split_by_query(out.pairs, dev_fraction)
    out.dev_queries = {j.query for j in dev}
    return out


def collection_traffic(
    log: TrafficLog, collection: str, since: float = 0.0
) -> tuple[list[LoggedSearch], list[Event]]:
    """The searches on `collection` (any of its versions) since `since`, and their events (plus
    events on searches the log does not hold, which cannot be told apart): another collection's
    traffic never teaches or calibrates this one's models."""
    searches = log.searches(since, collection=collection)
    others = {s.search_id for s in log.searches(since)} - {s.search_id for s in searches}
    return searches, [e for e in log.events(since) if e.search_id not in others]


def write_feedback_pairs(
    log: TrafficLog, collection: str, out: Path, min_events: int, dwell_s: float, days: float | None,
    dev_fraction: float, min_rate: float,
) -> FeedbackPairs:  # fmt: skip
    """`twostage pairs from-feedback`: the pairs of `collection`'s traffic, one JSON line each with its
    `split`, written to `out`."""
    import time

    since = 0.0 if days is None else time.time() - days * 86400
    made = pairs_from_feedback(*collection_traffic(log, collection, since), min_events, dwell_s, dev_fraction,
                               min_rate)  # fmt: skip
    if not made.pairs:
        reason = (f"{made.hashed} of them kept only the query's hash (feedback.store_query_text is off)"
                  if made.hashed else "none had a positive event with enough evidence")  # fmt: skip
        raise InputError(
            f"no pairs: {made.searches} logged searches, {made.with_feedback} with feedback; {reason}"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as handle:
        for pair in made.pairs:
            row = {**pair_row(pair), "split": "dev" if pair.query in made.dev_queries else "train"}
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    return made
