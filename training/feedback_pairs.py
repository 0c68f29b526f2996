"""Training pairs from traffic: the search log and its feedback events (`twostage pairs from-feedback`).

Positives are the hits users cited, clicked, gave a thumbs-up or read for a while (`dwell`); a
thumbs-down makes a hit a negative whatever else it got. Negatives are also the hits shown
*above* a positive that got no positive event ("skip-above", Joachims 2002): a user who clicked
rank 3 looked at ranks 1 and 2 and passed them by, which holds whatever the position bias, while
a hit below the click says nothing (it may not have been seen). Labels are graded by the
strongest event: a thumbs-up or a citation 1.0, a long dwell 0.75, a click 0.5.

Searches of the same query (and instruction) pool their evidence; a positive needs
`min_events` positive events. Pairs name chunks by id (`{query, id, negative_ids, label}`) and
are resolved against the collection when retrain reads them, so this needs the log only (the
store may be held by the running server). Queries are split into train/dev by the same hash as
every pairs file (`training.data.split_by_query`), so retrain's own split agrees with `split`.
"""

import json
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from twostage.retrieval.errors import InputError
from twostage.retrieval.traffic.log import DWELL_S, Event, LoggedSearch, TrafficLog, is_positive
from twostage.retrieval.traffic.stats import event_hit
from twostage.training.data import Judgement, pair_row, split_by_query

GRADES = {"thumbs_up": 1.0, "cited": 1.0, "dwell": 0.75, "click": 0.5}
MAX_NEGATIVES = 10


@dataclass
class _Evidence:
    """What one query's searches say about one chunk."""

    positive: int = 0
    thumbs_down: int = 0
    skipped: int = 0
    grade: float = 0.0


@dataclass
class FeedbackPairs:
    pairs: list[Judgement] = field(default_factory=list)
    searches: int = 0  # logged searches read
    with_feedback: int = 0  # of them, those with a usable event
    hashed: int = 0  # searches whose text the log did not keep (feedback.store_query_text off)
    below_min: int = 0  # positives with fewer than min_events positive events
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
    dev_fraction: float = 0.2,
) -> FeedbackPairs:  # fmt: skip
    """Pairs by chunk id from logged searches and their events (see the module doc)."""
    if min_events < 1:
        raise InputError(f"--min-events must be at least 1, got {min_events}")
    by_search: dict[str, list[Event]] = defaultdict(list)
    for event in events:
        by_search[event.search_id].append(event)
    out = FeedbackPairs()
    logged: set[str] = set()
    evidence: dict[tuple[str, str | None], dict[str, _Evidence]] = defaultdict(dict)
    for search in searches:
        out.searches += 1
        logged.add(search.search_id)
        mine = by_search.get(search.search_id, [])
        if not mine:
            continue
        if search.query is None:
            out.hashed += 1
            continue
        chunks = evidence[(search.query, search.instruction)]
        ranks = {h.id: h.rank for h in search.hits}
        positive_ranks: list[int] = []
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
                positive_ranks.append(ranks[chunk])
        out.with_feedback += usable
        if positive_ranks:  # skip-above: shown above the lowest positive, no positive event of its own
            positive_here = {_hit_id(search, e) for e in mine if is_positive(e, dwell_s)}
            for hit in search.hits:
                if hit.rank < max(positive_ranks) and hit.id not in positive_here:
                    chunks.setdefault(hit.id, _Evidence()).skipped += 1
    out.unlogged = sum(len(found) for search_id, found in by_search.items() if search_id not in logged)
    for (query, instruction), chunks in evidence.items():
        positives = [c for c, e in chunks.items() if e.positive > e.thumbs_down]
        negatives = sorted(
            c for c, e in chunks.items() if e.positive <= e.thumbs_down and (e.thumbs_down or e.skipped)
        )
        weak = [c for c in positives if chunks[c].positive < min_events]
        out.below_min += len(weak)
        kept = [c for c in positives if c not in weak]
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


def write_feedback_pairs(log: TrafficLog, out: Path, min_events: int, dwell_s: float, days: float | None,
                         dev_fraction: float) -> FeedbackPairs:  # fmt: skip
    """`twostage pairs from-feedback`: the pairs, one JSON line each with its `split`, written to `out`."""
    import time

    since = 0.0 if days is None else time.time() - days * 86400
    made = pairs_from_feedback(log.searches(since), log.events(since), min_events, dwell_s, dev_fraction)
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
