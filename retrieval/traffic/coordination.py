"""Coordination locks for replicas that share no data directory: PostgreSQL advisory locks.

With `feedback.database_url` on PostgreSQL, the retrain lock (which also guards rollback,
calibration and a canary's decision) is a session advisory lock on the shared database instead
of a lock file, so replicas on other machines exclude each other without a shared mount. Like
the file lock (`PidLock`) it is taken without waiting, names its holder when refused, and is
dropped by the server when its holder dies (the session ends with the connection), so there
are no stale locks. Each held lock keeps one connection of its own for as long as it is held.
With SQLite the log lives in the data directory, and so do the lock files (`FileLocks`).
"""

import os
import socket
import time
from pathlib import Path

from sqlalchemy import Connection, create_engine, select, text
from sqlalchemy.pool import NullPool

from twostage.retrieval.store.locks import FileLocks, Locks
from twostage.retrieval.store.vector_store import StoreLockedError
from twostage.retrieval.traffic.database import (
    check_url,
    lock_holders,
    lock_key,
    reachable,
    upgrade,
)
from twostage.retrieval.traffic.settings import FeedbackSettings


def holder() -> str:
    """This process, as a refusal names it: `pid N on HOST`."""
    return f"{os.getpid()} on {socket.gethostname()}"


class AdvisoryLock:
    """A session advisory lock on its own connection (`pg_try_advisory_lock`: never waits)."""

    def __init__(self, url: str, name: str, busy: str) -> None:
        self.url, self.name, self.busy = url, name, busy
        self._db: Connection | None = None

    def acquire(self) -> None:
        engine = create_engine(self.url, poolclass=NullPool, connect_args={"connect_timeout": 5})
        with reachable(self.url):
            upgrade(engine)  # the holders' table (a retrain may run before any replica started)
            db = engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        got = db.execute(text("SELECT pg_try_advisory_lock(:key)"), {"key": lock_key(self.name)}).scalar()
        if not got:
            who = db.execute(select(lock_holders.c.holder).where(lock_holders.c.name == self.name)).scalar()
            db.close()
            raise StoreLockedError(self.busy.format(pid=who or "another replica"))
        db.execute(lock_holders.delete().where(lock_holders.c.name == self.name))
        db.execute(lock_holders.insert().values(name=self.name, holder=holder(), since=time.time()))
        self._db = db

    def release(self) -> None:
        if self._db is not None:
            db, self._db = self._db, None
            try:
                db.execute(lock_holders.delete().where(lock_holders.c.name == self.name))
                db.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": lock_key(self.name)})
            finally:
                db.close()  # ends the session: the server drops the lock even if the unlock failed

    def __enter__(self) -> "AdvisoryLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class DatabaseLocks:
    """`Locks` on a PostgreSQL database."""

    def __init__(self, url: str) -> None:
        self.url = url

    def lock(self, name: str, busy: str) -> AdvisoryLock:
        return AdvisoryLock(self.url, name, busy)


def coordination_locks(settings: FeedbackSettings, data_dir: Path) -> Locks:
    """Where this deployment's locks live: the shared PostgreSQL database where one is
    configured, else lock files under the data directory's registry."""
    url = settings.database_url
    if url is not None and check_url(url).startswith("postgresql"):
        return DatabaseLocks(check_url(url))
    return FileLocks(Path(data_dir) / "registry")
