"""The search log and feedback events: one SQLite database under the data directory.

Why SQLite: every write is a transaction in a write-ahead log, so a process killed mid-write
(`kill -9`) loses at most the transaction it was in and never damages an earlier one; the
unique index on `event_id` makes a resent batch a no-op; and the CLI (`twostage feedback stats`,
`twostage pairs from-feedback`) reads the file while the server writes it. Commits are
`synchronous=NORMAL`: durable against a crashed or killed process; a power cut may lose the
last commits, never the file.

Search ids are time-ordered (milliseconds since the epoch, then 80 random bits), so feedback on
a search can be checked against the retention window even when the search log is off.
"""

import hashlib
import json
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from twostage.retrieval.access.caller import Caller
from twostage.retrieval.core.errors import InputError, NotFound
from twostage.retrieval.search.two_stage import SearchResult
from twostage.retrieval.traffic.settings import FeedbackSettings

EventKind = Literal["click", "cited", "thumbs_up", "thumbs_down", "dwell"]
EVENT_KINDS: tuple[EventKind, ...] = ("click", "cited", "thumbs_up", "thumbs_down", "dwell")
POSITIVE_EVENTS: tuple[EventKind, ...] = ("click", "cited", "thumbs_up")  # dwell: from DWELL_S seconds
DWELL_S = 30.0  # a dwell this long counts as a positive (pairs, canaries)
LOG_FILE = "traffic.sqlite3"
_PURGE_EVERY_S = 3600.0
_SCHEMA = """
CREATE TABLE IF NOT EXISTS searches (
    search_id TEXT PRIMARY KEY, ts REAL NOT NULL, session TEXT, query TEXT, query_hash TEXT NOT NULL,
    instruction TEXT, filter TEXT, collection TEXT NOT NULL, deployment INTEGER, hits TEXT NOT NULL, arm TEXT,
    key TEXT, principals TEXT, on_behalf_of TEXT
);
CREATE INDEX IF NOT EXISTS searches_ts ON searches (ts);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, event_id TEXT NOT NULL UNIQUE, search_id TEXT NOT NULL,
    chunk_id TEXT, doc_id TEXT, event TEXT NOT NULL, value REAL, ts REAL NOT NULL, received REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS events_search ON events (search_id);
CREATE INDEX IF NOT EXISTS events_ts ON events (ts);
"""
# columns added since the first schema: (name, type), added to an older log when it is opened
_ADDED_COLUMNS = {"searches": [("key", "TEXT"), ("principals", "TEXT"), ("on_behalf_of", "TEXT")]}


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


class TrafficLog:
    """The one owner of the log's connection; every use goes through `_lock`."""

    def __init__(self, data_dir: Path, settings: FeedbackSettings) -> None:
        self.settings = settings
        self.path = data_dir / LOG_FILE
        data_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, timeout=30, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        for table, columns in _ADDED_COLUMNS.items():
            have = {row[1] for row in self._db.execute(f"PRAGMA table_info({table})")}
            for name, kind in columns:
                if name not in have:  # a log written before searches had owners: theirs is nobody's
                    self._db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {kind}")
        self._purged = 0.0

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    @property
    def retention_s(self) -> float:
        return self.settings.retention_days * 86400

    # -- writes ----------------------------------------------------------------------------

    def log_search(self, search: LoggedSearch) -> None:
        """Record a search (a no-op with the search log off); purges expired rows once an hour."""
        if not self.settings.search_log:
            return
        hits = json.dumps([asdict(h) for h in search.hits], separators=(",", ":"))
        query = search.query if self.settings.store_query_text else None
        with self._transaction() as db:
            db.execute(
                f"INSERT OR IGNORE INTO searches ({_COLUMNS}) VALUES ({', '.join('?' * 14)})",
                (search.search_id, search.ts, search.session, query, search.query_hash, search.instruction,
                 None if search.filter is None else json.dumps(search.filter), search.collection,
                 search.deployment, hits, search.arm, search.key,
                 None if search.principals is None else json.dumps(search.principals), search.on_behalf_of),
            )  # fmt: skip
            self._purge_if_due(db, search.ts)

    def record(
        self, events: Sequence[Event], now: float | None = None, caller: Caller | None = None
    ) -> Recorded:
        """Store a batch of events, all or none: each is checked against its search (known, in the
        retention window, `caller`'s own, the chunk or document shown, its time plausible) before any
        is written, so a rejected batch can be fixed and resent whole; events already stored count as
        duplicates. Another key's search is answered as an unknown one: its id is not confirmed."""
        now = time.time() if now is None else now
        with self._transaction() as db:
            searches = self._searches(db, {e.search_id for e in events}, now, caller)
            for i, event in enumerate(events):
                self._check(i, event, searches.get(event.search_id), now)
            before = db.total_changes
            rows = [
                (e.event_id, e.search_id, e.chunk_id, e.doc_id, e.event, e.value, e.ts, now) for e in events
            ]
            db.executemany(
                "INSERT OR IGNORE INTO events (event_id, search_id, chunk_id, doc_id, event, value, ts, "
                "received) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows,
            )  # fmt: skip
            accepted = db.total_changes - before
        return Recorded(accepted, len(events) - accepted)

    def _searches(
        self, db: sqlite3.Connection, ids: set[str], now: float, caller: Caller | None = None
    ) -> dict[str, LoggedSearch | None]:
        """The logged searches the events name; None for an id of the retention window the log lacks
        (accepted only with the search log off). An unknown, expired or not `caller`'s id is `NotFound`."""
        found = {s.search_id: s for s in self._read_searches(db, sorted(ids))
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

    def _purge_if_due(self, db: sqlite3.Connection, now: float) -> None:
        if now - self._purged >= _PURGE_EVERY_S:
            self._purged = now
            cutoff = now - self.retention_s
            db.execute("DELETE FROM searches WHERE ts < ?", (cutoff,))
            db.execute("DELETE FROM events WHERE ts < ?", (cutoff,))

    def purge(self, now: float | None = None) -> None:
        """Delete what is older than the retention window now."""
        with self._transaction() as db:
            self._purged = 0.0
            self._purge_if_due(db, time.time() if now is None else now)

    # -- reads -----------------------------------------------------------------------------

    def search(self, search_id: str) -> LoggedSearch | None:
        with self._lock:
            found = self._read_searches(self._db, [search_id])
        return found[0] if found else None

    def searches(
        self, since: float = 0.0, *, key: str | None = None, collection: str | None = None
    ) -> list[LoggedSearch]:
        """Every logged search since `since`, oldest first; only key `key`'s (a non-admin reader's
        own), only those on collection `collection` (any of its versions), where given."""
        where: list[str] = ["ts >= ?"]
        args: list[Any] = [since]
        if key is not None:
            where.append("key = ?")
            args.append(key)
        if collection is not None:
            where.append("substr(collection, 1, ?) = ?")
            args += [len(collection) + 3, f"{collection}__v"]
        sql = f"SELECT {_COLUMNS} FROM searches WHERE {' AND '.join(where)} ORDER BY ts"
        with self._lock:
            rows = self._db.execute(sql, args).fetchall()
        return [_search(row) for row in rows]

    def events(self, since: float = 0.0) -> list[Event]:
        """Every stored event since `since`, in arrival order."""
        with self._lock:
            rows = self._db.execute(
                "SELECT event_id, search_id, chunk_id, doc_id, event, value, ts FROM events WHERE ts >= ? "
                "ORDER BY seq", (since,),
            ).fetchall()  # fmt: skip
        return [Event(*row) for row in rows]

    def canary_events(self, since: float, dwell_s: float = DWELL_S) -> int:
        """Positive events (`is_positive`'s rule) on searches a canary answered since `since`: one
        count in SQL, so a canary's watcher checks its budget without reading the period's searches."""
        kinds = ", ".join("?" for _ in POSITIVE_EVENTS)
        with self._lock:
            (count,) = self._db.execute(
                "SELECT COUNT(*) FROM events e JOIN searches s ON s.search_id = e.search_id WHERE e.ts >= ? "
                f"AND s.ts >= ? AND s.arm IS NOT NULL AND (e.event IN ({kinds}) OR "
                "(e.event = 'dwell' AND e.value >= ?))", (since, since, *POSITIVE_EVENTS, dwell_s),
            ).fetchone()  # fmt: skip
        return int(count)

    @staticmethod
    def _read_searches(db: sqlite3.Connection, ids: list[str]) -> list[LoggedSearch]:
        found: list[LoggedSearch] = []
        for start in range(0, len(ids), 500):
            part = ids[start : start + 500]
            marks = ",".join("?" * len(part))
            rows = db.execute(
                f"SELECT {_COLUMNS} FROM searches WHERE search_id IN ({marks})", part
            ).fetchall()
            found += [_search(row) for row in rows]
        return found


_COLUMNS = (
    "search_id, ts, session, query, query_hash, instruction, filter, collection, deployment, hits, arm, "
    "key, principals, on_behalf_of"
)


def _search(row: tuple[Any, ...]) -> LoggedSearch:
    (search_id, ts, session, query, digest, instruction, filter_, collection, deployment, hits, arm, key,
     principals, on_behalf_of) = row  # fmt: skip
    return LoggedSearch(
        search_id, ts, query, digest, instruction, None if filter_ is None else json.loads(filter_),
        collection, deployment, tuple(ShownHit(**h) for h in json.loads(hits)), session, arm, key,
        None if principals is None else tuple(json.loads(principals)), on_behalf_of,
    )  # fmt: skip


def is_positive(event: Event, dwell_s: float = DWELL_S) -> bool:
    """A click, a citation, a thumbs-up, or a dwell of at least `dwell_s` seconds."""
    if event.event == "dwell":
        return (event.value or 0.0) >= dwell_s
    return event.event in POSITIVE_EVENTS
