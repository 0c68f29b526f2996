"""The log's database on both engines: schema versions and upgrades, idempotency across writers
by a unique constraint, retention in batches, `feedback migrate` (idempotent, resumable),
advisory locks that die with their holder, and a bad URL as one line."""

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import run_cli
from pydantic import ValidationError
from sqlalchemy import event as sql_event

from twostage.api.settings import Settings
from twostage.retrieval.core.errors import TwostageError
from twostage.retrieval.store.vector_store import StoreLockedError
from twostage.retrieval.traffic import log as log_module
from twostage.retrieval.traffic.coordination import DatabaseLocks
from twostage.retrieval.traffic.database import SCHEMA_VERSION, copy_log, open_engine
from twostage.retrieval.traffic.log import Event, LoggedSearch, ShownHit, TrafficLog, new_search_id
from twostage.retrieval.traffic.settings import FeedbackSettings

# the log as the first release wrote it: no version table, searches without owners
_FIRST_SCHEMA = """
CREATE TABLE searches (
    search_id TEXT PRIMARY KEY, ts REAL NOT NULL, session TEXT, query TEXT, query_hash TEXT NOT NULL,
    instruction TEXT, filter TEXT, collection TEXT NOT NULL, deployment INTEGER, hits TEXT NOT NULL, arm TEXT
);
CREATE INDEX searches_ts ON searches (ts);
CREATE TABLE events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, event_id TEXT NOT NULL UNIQUE, search_id TEXT NOT NULL,
    chunk_id TEXT, doc_id TEXT, event TEXT NOT NULL, value REAL, ts REAL NOT NULL, received REAL NOT NULL
);
"""


def _logged(search_id: str, ts: float, hits: int = 2) -> LoggedSearch:
    shown = tuple(ShownHit(f"c{i}", f"d{i}", i + 1, 0.5, None, None) for i in range(hits))
    return LoggedSearch(search_id, ts, "q", "h", None, None, "docs__v1", None, shown)


def _env(data: Path, url: str | None) -> dict[str, str]:
    return {**os.environ, "TWOSTAGE_DATA_DIR": str(data), "TWOSTAGE_FEEDBACK__DATABASE_URL": url or ""}


def test_an_old_log_is_upgraded_in_place_and_a_newer_one_refused(tmp_path: Path, postgres_url: str) -> None:
    old = sqlite3.connect(tmp_path / "traffic.sqlite3")
    old.executescript(_FIRST_SCHEMA)
    search_id = new_search_id()
    old.execute("INSERT INTO searches VALUES (?, ?, NULL, 'q', 'h', NULL, NULL, 'docs__v1', NULL, ?, NULL)",
                (search_id, time.time(), '[{"id": "c0", "doc_id": "d0", "rank": 1, "recall_score": 0.5, '
                 '"rerank_score": null, "relevance": null}]'))  # fmt: skip
    old.execute("INSERT INTO events VALUES (1, 'e0', ?, 'c0', NULL, 'click', NULL, ?, ?)",
                (search_id, time.time(), time.time()))  # fmt: skip
    old.commit()
    old.close()

    upgraded = run_cli(["db", "upgrade"], _env(tmp_path, None))
    assert upgraded.returncode == 0 and f"search log schema v0 -> v{SCHEMA_VERSION}" in upgraded.stdout
    assert f"v{SCHEMA_VERSION}, current" in run_cli(["db", "upgrade"], _env(tmp_path, None)).stdout
    log = TrafficLog(tmp_path, FeedbackSettings())
    (kept,) = log.searches()
    assert kept.search_id == search_id and kept.key is None and kept.principals is None  # nobody's
    assert log.record([Event("e1", search_id, "c0", None, "click", None, time.time())]).accepted == 1
    assert [e.event_id for e in log.events()] == ["e0", "e1"]
    with log.engine.begin() as db:
        db.exec_driver_sql("UPDATE schema_version SET version = 99")
    log.close()
    with pytest.raises(TwostageError, match="schema is v99, written by a newer twostage"):
        TrafficLog(tmp_path, FeedbackSettings())

    created = run_cli(["db", "upgrade"], _env(tmp_path / "pg", postgres_url))
    assert created.returncode == 0 and f"created at v{SCHEMA_VERSION}" in created.stdout
    assert "twostage@127.0.0.1" in created.stdout and "postgresql+psycopg" in created.stdout


def test_one_event_sent_to_two_replicas_at_once_is_stored_once(
    tmp_path: Path, database_url: str | None
) -> None:
    # two writers: two replicas' own logs on one database (SQLite: two connections to one file)
    replicas = [TrafficLog(tmp_path / ("a" if database_url else ""), FeedbackSettings(database_url=database_url)),
                TrafficLog(tmp_path / ("b" if database_url else ""), FeedbackSettings(database_url=database_url))]  # fmt: skip
    now = time.time()
    search_id = new_search_id(now)
    replicas[0].log_search(_logged(search_id, now))
    batch = [Event(f"e{i}", search_id, "c0", None, "click", None, now) for i in range(50)]
    accepted: list[int] = []
    start = threading.Barrier(8)

    failed: list[BaseException] = []

    def send(i: int) -> None:
        start.wait()
        try:
            accepted.append(replicas[i % 2].record(batch[i:] + batch[:i], now=now).accepted)
        except BaseException as exc:
            failed.append(exc)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failed and sum(accepted) == 50 and len(accepted) == 8
    assert sorted(e.event_id for e in replicas[1].events()) == sorted(e.event_id for e in batch)
    for replica in replicas:
        replica.close()


def test_retention_deletes_in_short_batches(
    tmp_path: Path, database_url: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(log_module, "PURGE_BATCH", 7)
    log = TrafficLog(tmp_path, FeedbackSettings(retention_days=1, database_url=database_url))
    now = time.time()
    old = [new_search_id(now - 3 * 86400) for _ in range(30)]
    for search_id in old:
        log.log_search(_logged(search_id, now - 3 * 86400))
    log.record([Event(f"old{i}", s, "c0", None, "click", None, now - 3 * 86400) for i, s in enumerate(old)],
               now=now - 3 * 86400)  # fmt: skip
    commits: list[int] = []
    sql_event.listen(log.engine, "commit", lambda _db: commits.append(1))
    assert log.purge(now) == 60
    assert len(commits) >= 2 * (30 // 7 + 1)  # no transaction deleted more than a batch
    fresh = new_search_id(now)
    log.log_search(_logged(fresh, now))
    log.record([Event("new", fresh, "c0", None, "click", None, now)], now=now)
    assert [s.search_id for s in log.searches()] == [fresh] and [e.event_id for e in log.events()] == ["new"]
    log.close()


def test_migrate_copies_a_sqlite_log_once_and_resumes_where_it_stopped(
    tmp_path: Path, postgres_url: str
) -> None:
    source = TrafficLog(tmp_path, FeedbackSettings())
    now = time.time()
    ids = [new_search_id(now - 60) for _ in range(1200)]  # over one copy batch (1,000)
    for search_id in ids:
        source.log_search(_logged(search_id, now - 60, hits=1))
    source.record(
        [Event(f"e{i}", s, "c0", None, "click", None, now - 30) for i, s in enumerate(ids)], now=now
    )
    expected = (sorted(s.search_id for s in source.searches()), [e.event_id for e in source.events()])
    source.close()

    def stop_after_the_first_batch(line: str) -> None:
        raise KeyboardInterrupt(line)  # as a user's Ctrl-C after the first committed batch

    engines = [open_engine(f"sqlite:///{tmp_path / 'traffic.sqlite3'}"), open_engine(postgres_url)]
    with pytest.raises(KeyboardInterrupt, match="searches: 1000 read, 1000 copied"):
        copy_log(*engines, say=stop_after_the_first_batch)
    for engine in engines:
        engine.dispose()
    resumed = run_cli(["feedback", "migrate", "--to", postgres_url], _env(tmp_path, None))
    assert resumed.returncode == 0, resumed.stderr
    assert "searches 200 copied (1000 already there), events 1200 copied (0 already there)" in resumed.stdout
    again = run_cli(["feedback", "migrate", "--to", postgres_url], _env(tmp_path, None))
    assert "searches 0 copied (1200 already there), events 0 copied (1200 already there)" in again.stdout
    target = TrafficLog(tmp_path / "replica", FeedbackSettings(database_url=postgres_url))
    assert (sorted(s.search_id for s in target.searches()), [e.event_id for e in target.events()]) == expected
    target.close()
    nowhere = run_cli(["feedback", "migrate", "--to", postgres_url], _env(tmp_path / "empty", None))
    assert nowhere.returncode == 2 and "no SQLite search log at traffic.sqlite3" in nowhere.stderr


_HOLDER = """
import sys, time
from twostage.retrieval.traffic.coordination import DatabaseLocks
lock = DatabaseLocks(sys.argv[1]).lock("kb/retrain", "busy")
lock.acquire()
print("held", flush=True)
time.sleep(600)
"""


def test_a_database_lock_names_its_holder_and_dies_with_it(postgres_url: str) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, postgres_url], stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    locks = DatabaseLocks(postgres_url)
    with pytest.raises(StoreLockedError, match=f"a retrain of kb is running \\(pid {holder.pid} on "):
        locks.lock("kb/retrain", "a retrain of kb is running (pid {pid})").acquire()
    with locks.lock("other/retrain", "busy"):  # another collection's lock is another lock
        pass
    os.kill(holder.pid, signal.SIGKILL)  # no release: the server ends its session, and the lock with it
    holder.wait()
    deadline = time.monotonic() + 10
    while True:
        try:
            with locks.lock("kb/retrain", "busy"):
                break
        except StoreLockedError:
            assert time.monotonic() < deadline, "the dead holder's lock was not released"
            time.sleep(0.1)


def test_a_bad_database_url_is_one_line(tmp_path: Path) -> None:
    for url, words in [("mysql://u@h/db", "'mysql' is not supported"), ("nonsense", "not a database URL"),
                       ("postgresql+psycopg2://u@h/db", "use the psycopg 3 driver")]:  # fmt: skip
        with pytest.raises(ValidationError, match=words):
            Settings(feedback={"database_url": url})
    assert Settings(feedback={"database_url": "postgresql://u@h/db"}).feedback.database_url == (
        "postgresql+psycopg://u@h/db"
    )
    result = run_cli(["feedback", "stats"], _env(tmp_path, "mysql://u@h/db"))
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "'mysql' is not supported" in result.stderr and "Traceback" not in result.stderr
    down = run_cli(["db", "upgrade"], _env(tmp_path, "postgresql://u:secret@127.0.0.1:1/db"))
    assert down.returncode == 2 and "is unavailable" in down.stderr and "secret" not in down.stderr
