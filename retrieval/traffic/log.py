"""The search log, feedback events and canary outcomes: one database for every replica.

The database is SQLite under the data directory by default and PostgreSQL where replicas share
it (`feedback.database_url`; the schema and both engines: `database.py`). What holds on both:

- an acknowledged event is durable: a batch is one transaction, committed before the answer
  (SQLite: WAL, `synchronous=NORMAL`, durable against a killed process; PostgreSQL: its WAL,
  `synchronous_commit` on);
- an event is stored once however often and to whichever replica it is sent: `event_id` is a
  unique constraint and the insert is `ON CONFLICT DO NOTHING` (no check-then-insert race);
- a canary is decided once: its outcome's key is the canary, a primary key;
- retention deletes in batches of `PURGE_BATCH` rows, each its own short transaction;
- an unreachable database is `DatabaseUnavailable` (the API: 503 + Retry-After on feedback,
  while searches are answered without a `search_id`, saying so in their notes).

Search ids are time-ordered (milliseconds since the epoch, then 80 random bits), so feedback on
a search can be checked against the retention window even when the search log is off.
"""

import hashlib
import json
import logging
import secrets
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from sqlalchemy import Connection, Row, Table, delete, func, select
from sqlalchemy.sql import Insert

from twostage.retrieval.access.caller import Caller
from twostage.retrieval.core.errors import DatabaseUnavailable, InputError, NotFound
from twostage.retrieval.search.two_stage import SearchResult
from twostage.retrieval.store.locks import Locks
from twostage.retrieval.traffic.coordination import coordination_locks
from twostage.retrieval.traffic.database import (
    LOG_FILE,
    canary_outcomes,
    database_url,
    events,
    insert_ignoring_duplicates,
    open_engine,
    reachable,
    searches,
    upgrade,
    writing,
)
from twostage.retrieval.traffic.settings import FeedbackSettings

log = logging.getLogger(__name__)
EventKind = Literal["click", "cited", "thumbs_up", "thumbs_down", "dwell"]
EVENT_KINDS: tuple[EventKind, ...] = ("click", "cited", "thumbs_up", "thumbs_down", "dwell")
POSITIVE_EVENTS: tuple[EventKind, ...] = ("click", "cited", "thumbs_up")  # dwell: from DWELL_S seconds
DWELL_S = 30.0  # a dwell this long counts as a positive (pairs, canaries)
_PURGE_EVERY_S = 3600.0
PURGE_BATCH = 1000  # rows one retention transaction deletes: short locks on a busy log


def new_search_id(now: float | None = None) -> str:
    """32 hex digits: 12 of milliseconds since the epoch, 20 random."""
    ms = int((time.time() if now is None else now) * 1000)
    return f"{ms:012x}{secrets.token_hex(10)}"


def search_id_time(search_id: str) -> float | None:
    """When a search id was issued (seconds since the epoch), or None when it is not one of ours."""
    if len(search_id) != 32 or any(c not in "0123456789abcdef" for c in search_id):
        return None
    return int(search_id[:12], 16) / 1000


def query_hash(query: str) -> str:
    return hashlib.sha256(query.encode()).hexdigest()


@dataclass(frozen=True)
class ShownHit:
    """A hit as the user saw it: its place and scores."""

    id: str
    doc_id: str
    rank: int
    recall_score: float
    rerank_score: float | None
    relevance: float | None
    team: str | None = None  # an interleaved search: the deployment that picked it (control, candidate)


@dataclass(frozen=True)
class LoggedSearch:
    search_id: str
    ts: float
    query: str | None  # None: the log keeps only the hash (feedback.store_query_text off)
    query_hash: str
    instruction: str | None
    filter: Any
    collection: str  # the version that answered (NAME__vN)
    deployment: int | None  # the registry deployment (None: not retrained yet)
    hits: tuple[ShownHit, ...]
    session: str | None = None
    arm: str | None = None  # while a canary runs: control, candidate or interleaved
    key: str | None = None  # the API key's name that searched (None: anonymous): the search's owner
    principals: tuple[str, ...] | None = None  # whose documents it saw (None: every document)
    on_behalf_of: str | None = None  # the end user a delegating key searched for

    @classmethod
    def of(cls, search_id: str, query: str, instruction: str | None, filter: Any, session: str | None,
           result: SearchResult, deployment: int | None, arm: str | None = None,
           teams: Sequence[str] | None = None, owner: Caller | None = None) -> "LoggedSearch":  # fmt: skip
        """What the log keeps of a search that was answered with `result` (`filter`: as sent)."""
        picked: Sequence[str | None] = teams or [None] * len(result.hits)
        hits = tuple(ShownHit(h.id, h.doc_id, h.rank, h.recall_score, h.rerank_score, h.relevance, team)
                     for h, team in zip(result.hits, picked, strict=True))  # fmt: skip
        principals = None if owner is None or owner.principals is None else tuple(sorted(owner.principals))
        return cls(search_id, time.time(), query, query_hash(query), instruction, filter, result.collection,
                   deployment, hits, session, arm, owner.key if owner else None, principals,
                   owner.on_behalf_of if owner else None)  # fmt: skip


@dataclass(frozen=True)
class Event:
    """One feedback event as stored. `event_id`: the client's, else a hash of its content."""

    event_id: str
    search_id: str
    chunk_id: str | None
    doc_id: str | None
    event: EventKind
    value: float | None
    ts: float


@dataclass(frozen=True)
class Recorded:
    accepted: int
    duplicates: int


def content_id(search_id: str, chunk_id: str | None, doc_id: str | None, event: str, value: float | None,
               ts: float | None) -> str:  # fmt: skip
    """The id of an event sent without one: the same event sent twice is stored once."""
    key = json.dumps([search_id, chunk_id, doc_id, event, value, ts])
    return "h:" + hashlib.sha256(key.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class CanaryOutcome:
    """How a canary ended, as the log keeps it for every replica (the registry keeps its own copy)."""

    collection: str
    deployment: int
    started_ts: float
    decision: str
    why: str
    tallies: dict[str, Any]
    decided_ts: float
    decided_by: str


class TrafficLog:
    """The one owner of the log's engine (a thread-safe connection pool); every use is a
    transaction of its own, and a database error that means "unreachable" is `DatabaseUnavailable`."""

    def __init__(self, data_dir: Path, settings: FeedbackSettings) -> None:
        self.settings = settings
        self.data_dir = Path(data_dir)
        self.url = database_url(settings.database_url, self.data_dir)
        self.engine = open_engine(self.url)
        self._lock = threading.Lock()  # guards `_purged` and `_ready`
        self._purged = 0.0
        self._ready = False
        try:
            self.ensure_schema()
        except DatabaseUnavailable:  # a replica starts while the database is down: searches go on
            log.warning("the search log's database is unreachable; retrying on the next use", exc_info=True)

    @property
    def locks(self) -> Locks:
        """Where coordination locks live for this log's deployment (`coordination.py`)."""
        return coordination_locks(self.settings, self.data_dir)

    def close(self) -> None:
        self.engine.dispose()

    def ensure_schema(self) -> tuple[int | None, int]:
        """Create or upgrade the schema (`database.upgrade`): (version before, now)."""
        with reachable(self.url):
            versions = upgrade(self.engine)
        with self._lock:
            self._ready = True
        return versions

    @contextmanager
    def _connection(self, write: bool = False) -> Iterator[Connection]:
        """A transaction (committed when the block ends), with the schema in place."""
        if not self._ready:
            self.ensure_schema()
        with reachable(self.url), writing(self.engine) if write else self.engine.connect() as db:
            yield db

    def _insert_ignoring_duplicates(self, table: Table) -> Insert:
        return insert_ignoring_duplicates(self.engine, table)

    @property
    def retention_s(self) -> float:
        return self.settings.retention_days * 86400

    # -- writes ----------------------------------------------------------------------------

    def log_search(self, search: LoggedSearch) -> None:
        """Record a search (a no-op with the search log off); purges expired rows once an hour."""
        if not self.settings.search_log:
            return
        row = _search_row(search, self.settings.store_query_text)
        with self._connection(write=True) as db:
            db.execute(self._insert_ignoring_duplicates(searches).values(**row))
        self._purge_if_due(search.ts)

    def record(
        self, events_: Sequence[Event], now: float | None = None, caller: Caller | None = None
    ) -> Recorded:
        """Store a batch of events, all or none: each is checked against its search (known, in the
        retention window, `caller`'s own, the chunk or document shown, its time plausible) before any
        is written, so a rejected batch can be fixed and resent whole; events already stored (by any
        replica) count as duplicates. Another key's search is answered as an unknown one: its id is
        not confirmed. Returns once the batch is committed."""
        now = time.time() if now is None else now
        # in event_id order: two replicas inserting overlapping batches take the unique index's
        # locks in one order, so they wait for each other instead of deadlocking
        rows = [dict(event_id=e.event_id, search_id=e.search_id, chunk_id=e.chunk_id, doc_id=e.doc_id,
                     event=e.event, value=e.value, ts=e.ts, received=now)
                for e in sorted(events_, key=lambda e: e.event_id)]  # fmt: skip
        with self._connection(write=True) as db:
            found = self._searches(db, {e.search_id for e in events_}, now, caller)
            for i, event in enumerate(events_):
                self._check(i, event, found.get(event.search_id), now)
            inserted = self._insert_ignoring_duplicates(events).values(rows).returning(events.c.event_id)
            accepted = len(db.execute(inserted).all()) if rows else 0
        return Recorded(accepted, len(events_) - accepted)

    def record_canary_outcome(self, outcome: CanaryOutcome) -> bool:
        """Keep how a canary ended; False when it was already kept (by this or another replica)."""
        row = {**asdict(outcome), "tallies": json.dumps(outcome.tallies)}
        inserted = self._insert_ignoring_duplicates(canary_outcomes).values(**row)
        with self._connection(write=True) as db:
            return len(db.execute(inserted.returning(canary_outcomes.c.decision)).all()) == 1

    def _searches(
        self, db: Connection, ids: set[str], now: float, caller: Caller | None = None
    ) -> dict[str, LoggedSearch | None]:
        """The logged searches the events name; None for an id of the retention window the log lacks
        (accepted only with the search log off). An unknown, expired or not `caller`'s id is `NotFound`."""
        found = {s.search_id: s for s in _read_searches(db, sorted(ids))
                 if caller is None or caller.owns(s.key)}  # fmt: skip
        cutoff = now - self.retention_s
        missing = []
        out: dict[str, LoggedSearch | None] = {}
        for search_id in sorted(ids):
            issued = search_id_time(search_id)
            search = found.get(search_id)
            if search is not None and search.ts >= cutoff:
                out[search_id] = search
            elif search is None and not self.settings.search_log and issued is not None and cutoff <= issued:
                out[search_id] = None
            else:
                missing.append(search_id)
        if missing:
            shown = ", ".join(repr(m[:64]) for m in missing[:5]) + (f" and {len(missing) - 5} more"
                                                                    if len(missing) > 5 else "")  # fmt: skip
            days = self.settings.retention_days
            raise NotFound(f"unknown or expired search id {shown} (the log keeps searches for {days:g} "
                           "days): nothing of this batch was stored")  # fmt: skip
        return out

    def _check(self, i: int, event: Event, search: LoggedSearch | None, now: float) -> None:
        skew = self.settings.clock_skew_s
        where = f"event {i} ({event.event} on search {event.search_id})"
        if event.ts > now + skew:
            raise InputError(f"{where}: ts is in the future; nothing of this batch was stored")
        issued = search.ts if search is not None else search_id_time(event.search_id)
        if issued is not None and event.ts < issued - skew:
            raise InputError(f"{where}: ts is before the search; nothing of this batch was stored")
        if search is None:
            return
        if event.chunk_id is not None and all(h.id != event.chunk_id for h in search.hits):
            raise InputError(f"{where}: chunk {event.chunk_id!r} was not among the hits shown; "
                             "nothing of this batch was stored")  # fmt: skip
        if event.doc_id is not None and all(h.doc_id != event.doc_id for h in search.hits):
            raise InputError(f"{where}: document {event.doc_id!r} was not among the hits shown; "
                             "nothing of this batch was stored")  # fmt: skip

    def _purge_if_due(self, now: float) -> None:
        with self._lock:
            if now - self._purged < _PURGE_EVERY_S:
                return
        try:
            self.purge(now)
        except DatabaseUnavailable:  # the search was logged; retention waits for the next hour
            log.warning("could not purge the search log", exc_info=True)

    def purge(self, now: float | None = None) -> int:
        """Delete what is older than the retention window, `PURGE_BATCH` rows a transaction (no
        long lock on a log that replicas are writing); the rows deleted."""
        now = time.time() if now is None else now
        with self._lock:
            self._purged = max(self._purged, now)  # the next hourly purge counts from this one
        cutoff = now - self.retention_s
        deleted = 0
        for table, key in ((searches, searches.c.search_id), (events, events.c.seq)):
            batch = select(key).where(table.c.ts < cutoff).limit(PURGE_BATCH).scalar_subquery()
            done = PURGE_BATCH
            while done == PURGE_BATCH:
                with self._connection(write=True) as db:
                    done = int(db.execute(delete(table).where(key.in_(batch))).rowcount)
                deleted += done
        return deleted

    # -- reads -----------------------------------------------------------------------------

    def search(self, search_id: str) -> LoggedSearch | None:
        with self._connection() as db:
            found = _read_searches(db, [search_id])
        return found[0] if found else None

    def searches(
        self,
        since: float = 0.0,
        *,
        key: str | None = None,
        collection: str | None = None,
        armed: bool = False,
    ) -> list[LoggedSearch]:
        """Every logged search since `since`, oldest first; only key `key`'s (a non-admin reader's
        own), only those on collection `collection` (any of its versions), where given; `armed`: only
        those a canary answered (a canary's tallies, read at every look, read no other search)."""
        query = select(searches).where(searches.c.ts >= since).order_by(searches.c.ts)
        if armed:
            query = query.where(searches.c.arm.is_not(None))
        if key is not None:
            query = query.where(searches.c.key == key)
        if collection is not None:
            prefix = f"{collection}__v"
            query = query.where(func.substr(searches.c.collection, 1, len(prefix)) == prefix)
        with self._connection() as db:
            return [_search(row) for row in db.execute(query)]

    def events(self, since: float = 0.0) -> list[Event]:
        """Every stored event since `since`, in arrival order (batch by batch; in a batch, by event_id)."""
        query = select(events.c.event_id, events.c.search_id, events.c.chunk_id, events.c.doc_id,
                       events.c.event, events.c.value, events.c.ts).where(events.c.ts >= since)  # fmt: skip
        with self._connection() as db:
            return [Event(*row) for row in db.execute(query.order_by(events.c.seq))]

    def canary_events(self, since: float, dwell_s: float = DWELL_S) -> int:
        """Positive events (`is_positive`'s rule) on searches a canary answered since `since`: one
        count in SQL, so a canary's watcher checks its budget without reading the period's searches."""
        dwelled = (events.c.event == "dwell") & (events.c.value >= dwell_s)
        positive = events.c.event.in_(POSITIVE_EVENTS) | dwelled
        query = (
            select(func.count())
            .select_from(events.join(searches, searches.c.search_id == events.c.search_id))
            .where(events.c.ts >= since, searches.c.ts >= since, searches.c.arm.is_not(None), positive)
        )
        with self._connection() as db:
            return int(db.execute(query).scalar_one())

    def canary_outcomes(self, collection: str | None = None) -> list[CanaryOutcome]:
        """The canaries decided, oldest first (of `collection`, where given)."""
        query = select(canary_outcomes).order_by(canary_outcomes.c.decided_ts)
        if collection is not None:
            query = query.where(canary_outcomes.c.collection == collection)
        with self._connection() as db:
            return [CanaryOutcome(**{**row._asdict(), "tallies": json.loads(row.tallies)})
                    for row in db.execute(query)]  # fmt: skip


def _search_row(search: LoggedSearch, store_query_text: bool) -> dict[str, Any]:
    return dict(
        search_id=search.search_id, ts=search.ts, session=search.session,
        query=search.query if store_query_text else None, query_hash=search.query_hash,
        instruction=search.instruction, filter=None if search.filter is None else json.dumps(search.filter),
        collection=search.collection, deployment=search.deployment,
        hits=json.dumps([asdict(h) for h in search.hits], separators=(",", ":")), arm=search.arm,
        key=search.key, principals=None if search.principals is None else json.dumps(search.principals),
        on_behalf_of=search.on_behalf_of,
    )  # fmt: skip


def _read_searches(db: Connection, ids: list[str]) -> list[LoggedSearch]:
    found: list[LoggedSearch] = []
    for start in range(0, len(ids), 500):
        part = ids[start : start + 500]
        found += [_search(row) for row in db.execute(select(searches).where(searches.c.search_id.in_(part)))]
    return found


def _search(row: Row[Any]) -> LoggedSearch:
    r = row._mapping
    return LoggedSearch(
        r["search_id"], r["ts"], r["query"], r["query_hash"], r["instruction"],
        None if r["filter"] is None else json.loads(r["filter"]), r["collection"], r["deployment"],
        tuple(ShownHit(**h) for h in json.loads(r["hits"])), r["session"], r["arm"], r["key"],
        None if r["principals"] is None else tuple(json.loads(r["principals"])), r["on_behalf_of"],
    )  # fmt: skip


def open_log(data_dir: Path, settings: FeedbackSettings) -> "TrafficLog | None":
    """The log a CLI command reads: None where there is none yet (SQLite: no file in the data
    directory; a configured database always answers, or says why it cannot)."""
    if settings.database_url is None and not (Path(data_dir) / LOG_FILE).is_file():
        return None
    return TrafficLog(data_dir, settings)


def is_positive(event: Event, dwell_s: float = DWELL_S) -> bool:
    """A click, a citation, a thumbs-up, or a dwell of at least `dwell_s` seconds."""
    if event.event == "dwell":
        return (event.value or 0.0) >= dwell_s
    return event.event in POSITIVE_EVENTS
