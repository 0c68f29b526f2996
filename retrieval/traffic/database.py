"""The log's database: one schema in SQLAlchemy Core, on SQLite (embedded) or PostgreSQL (shared).

Why both: SQLite under the data directory needs nothing set up and is the default; replicas
behind a load balancer share one PostgreSQL (`feedback.database_url`), so feedback for a search
that replica A answered is taken by replica B, and stats, pairs and canaries see all traffic.
Every query is written once, in Core, and runs on both; the tests run on both.

The schema carries its version (`schema_version`, one row) and is moved forward by `upgrade`,
run by `twostage db upgrade`, by `serve` on start and by every opener: a list of numbered,
idempotent steps, taken under a lock (PostgreSQL: a transaction advisory lock; SQLite: the write
lock of `BEGIN IMMEDIATE`) so two replicas starting together upgrade once. A database written by
a newer twostage is refused, not downgraded. (Alembic would add an environment, a folder of
revision files and a second way to run them for what is here three additive steps.)

SQLite: WAL, `synchronous=NORMAL` (a killed process loses at most the transaction it was in),
and `BEGIN IMMEDIATE` for writes, so two writers queue on the busy timeout instead of failing
when a reader upgrades to a writer. PostgreSQL: psycopg 3, pre-ping (a connection dropped by a
restart is replaced, not handed out), a 5 s connect timeout (an outage is answered, not waited on).
"""

import hashlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    Engine,
    Float,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    Table,
    Text,
    create_engine,
    event,
    inspect,
    select,
    text,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, OperationalError
from sqlalchemy.sql import Insert

from twostage.retrieval.core.errors import DatabaseUnavailable, InputError, TwostageError

LOG_FILE = "traffic.sqlite3"
SCHEMA_VERSION = 3
_WRITE = "twostage_write"  # execution option: this transaction writes (SQLite: BEGIN IMMEDIATE)

metadata = MetaData()
searches = Table(
    "searches", metadata,
    Column("search_id", Text, primary_key=True),
    Column("ts", Float, nullable=False),
    Column("session", Text),
    Column("query", Text),
    Column("query_hash", Text, nullable=False),
    Column("instruction", Text),
    Column("filter", Text),  # JSON text on both engines: one code path
    Column("collection", Text, nullable=False),
    Column("deployment", Integer),
    Column("hits", Text, nullable=False),
    Column("arm", Text),
    Column("key", Text),
    Column("principals", Text),
    Column("on_behalf_of", Text),
    Index("searches_ts", "ts"),
)  # fmt: skip
events = Table(
    "events", metadata,
    # arrival order; SQLite keeps its AUTOINCREMENT rowid (never reused after a purge)
    Column("seq", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("event_id", Text, nullable=False, unique=True),  # idempotency: a constraint, not a lookup
    Column("search_id", Text, nullable=False),
    Column("chunk_id", Text),
    Column("doc_id", Text),
    Column("event", Text, nullable=False),
    Column("value", Float),
    Column("ts", Float, nullable=False),
    Column("received", Float, nullable=False),
    Index("events_search", "search_id"),
    Index("events_ts", "ts"),
    sqlite_autoincrement=True,
)  # fmt: skip
canary_outcomes = Table(
    "canary_outcomes", metadata,
    Column("collection", Text, nullable=False),
    Column("deployment", Integer, nullable=False),
    Column("started_ts", Float, nullable=False),
    Column("decision", Text, nullable=False),
    Column("why", Text, nullable=False),
    Column("tallies", Text, nullable=False),  # JSON
    Column("decided_ts", Float, nullable=False),
    Column("decided_by", Text, nullable=False),  # host and pid of the replica that decided
    PrimaryKeyConstraint("collection", "deployment", "started_ts"),  # one decision per canary
)  # fmt: skip
# who holds which coordination lock, for a refusal's message (`coordination.py`): the lock is the truth
lock_holders = Table(
    "lock_holders", metadata,
    Column("name", Text, primary_key=True), Column("holder", Text, nullable=False), Column("since", Float),
)  # fmt: skip
schema_version = Table("schema_version", metadata, Column("version", Integer, nullable=False))


def _add_owner_columns(db: Connection) -> None:
    """v2: searches have owners (a log from before permissions: its searches are nobody's)."""
    have = {c["name"] for c in inspect(db).get_columns("searches")}
    for name in ("key", "principals", "on_behalf_of"):
        if name not in have:
            db.exec_driver_sql(f"ALTER TABLE searches ADD COLUMN {name} TEXT")


def _nothing(db: Connection) -> None:
    """v1 (the first tables) and v3 (`canary_outcomes`, `lock_holders`): `create_all` makes them."""


_STEPS = {1: _nothing, 2: _add_owner_columns, 3: _nothing}
assert sorted(_STEPS) == list(range(1, SCHEMA_VERSION + 1))


@contextmanager
def reachable(url: str) -> Iterator[None]:
    """Turn a lost or refused connection to `url` into `DatabaseUnavailable` (one line, no
    password; a SQLite path is shown as the HTTP layer shows paths); any other database error
    stays what it is."""
    try:
        yield
    except DBAPIError as exc:
        if not (isinstance(exc, OperationalError) or exc.connection_invalidated):
            raise
        first = str(exc.orig).strip().splitlines()[0] if exc.orig else type(exc).__name__
        raise DatabaseUnavailable(f"the database {shown_url(url)} is unavailable: {first}") from None


def database_url(configured: str | None, data_dir: Path) -> str:
    """The configured URL, else SQLite in the data directory."""
    return configured or f"sqlite:///{(Path(data_dir) / LOG_FILE).absolute()}"


def check_url(url: str) -> str:
    """A URL this project can use, normalised (`postgresql://` → psycopg 3); else `InputError`."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise InputError("feedback.database_url: not a database URL (sqlite:///PATH or "
                         "postgresql+psycopg://USER:PASSWORD@HOST:PORT/DB)") from None  # fmt: skip
    if parsed.get_backend_name() == "postgresql":
        if parsed.drivername == "postgresql":  # no driver named: the one installed
            parsed = parsed.set(drivername="postgresql+psycopg")
        elif parsed.get_driver_name() != "psycopg":
            raise InputError("feedback.database_url: use the psycopg 3 driver (postgresql+psycopg://...)")
        return parsed.render_as_string(hide_password=False)
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        return url
    raise InputError(f"feedback.database_url: {parsed.get_backend_name()!r} is not supported: "
                     "sqlite:///PATH or postgresql+psycopg://...")  # fmt: skip


def shown_url(url: str) -> str:
    """The URL without its password, for messages and logs."""
    return make_url(url).render_as_string(hide_password=True)


def is_postgres(engine: Engine) -> bool:
    return engine.dialect.name == "postgresql"


def open_engine(url: str, pool_size: int = 8) -> Engine:
    """An engine for `url` with the settings in the module docstring."""
    if make_url(url).get_backend_name() == "sqlite":
        Path(make_url(url).database or "").parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _connect(dbapi: Any, _record: Any) -> None:
            dbapi.isolation_level = None  # SQLAlchemy, not pysqlite, says when a transaction begins
            dbapi.execute("PRAGMA journal_mode=WAL")
            dbapi.execute("PRAGMA synchronous=NORMAL")

        @event.listens_for(engine, "begin")
        def _begin(db: Connection) -> None:
            db.exec_driver_sql("BEGIN IMMEDIATE" if db.get_execution_options().get(_WRITE) else "BEGIN")

        return engine
    return create_engine(
        url, pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True, pool_timeout=10,
        connect_args={"connect_timeout": 5, "application_name": "twostage"},
    )  # fmt: skip


@contextmanager
def writing(engine: Engine) -> Iterator[Connection]:
    """One write transaction, committed when the block ends (before anything is acknowledged)."""
    with engine.connect() as db:
        db.execution_options(**{_WRITE: True})
        with db.begin():
            yield db


def upgrade(engine: Engine) -> tuple[int | None, int]:
    """Create or move the schema to `SCHEMA_VERSION`: (version before, None for a new database;
    version now). A log from before versions is v0. Refuses a database from a newer twostage."""
    with writing(engine) as db:
        if is_postgres(engine):  # replicas starting together: one upgrades, the others wait and see it done
            db.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": lock_key("schema")})
        new = not inspect(db).has_table("searches")
        metadata.create_all(db, checkfirst=True)
        found = db.execute(select(schema_version.c.version)).scalar()
        before = 0 if found is None else int(found)
        if before > SCHEMA_VERSION:
            raise TwostageError(f"the search log's schema is v{before}, written by a newer twostage; this "
                                f"one knows v{SCHEMA_VERSION}: upgrade twostage")  # fmt: skip
        for step in range(before + 1, SCHEMA_VERSION + 1):
            _STEPS[step](db)
        if found is None:
            db.execute(schema_version.insert().values(version=SCHEMA_VERSION))
        elif before < SCHEMA_VERSION:
            db.execute(schema_version.update().values(version=SCHEMA_VERSION))
    return None if new else before, SCHEMA_VERSION


def lock_key(name: str) -> int:
    """A PostgreSQL advisory lock's 64-bit key for `name` (stable across processes and versions)."""
    return int.from_bytes(hashlib.sha256(f"twostage:{name}".encode()).digest()[:8], "big", signed=True)


def insert_ignoring_duplicates(engine: Engine, table: Table) -> Insert:
    """`INSERT ... ON CONFLICT DO NOTHING`: a row whose key is already there is skipped, in one
    statement (the database decides, so two replicas inserting the same key store it once)."""
    return (postgresql if is_postgres(engine) else sqlite).insert(table).on_conflict_do_nothing()


COPY_BATCH = 1000


def copy_log(source: Engine, target: Engine, say: Callable[[str], None]) -> dict[str, tuple[int, int]]:
    """Copy every search, event and canary outcome of `source` into `target` (schema upgraded
    first): per table (rows copied, rows already there). A batch a transaction, each row inserted
    unless its key is there, so a copy stopped at any point is finished by running it again, and
    running it twice copies nothing twice. Events keep their arrival order."""
    with reachable(str(source.url)):
        upgrade(source)
    with reachable(target.url.render_as_string(hide_password=False)):
        upgrade(target)
        return _copy_tables(source, target, say)


def _copy_tables(source: Engine, target: Engine, say: Callable[[str], None]) -> dict[str, tuple[int, int]]:
    done: dict[str, tuple[int, int]] = {}
    for table, order, key in (
        (searches, searches.c.search_id, searches.c.search_id),
        (events, events.c.seq, events.c.event_id),
        (canary_outcomes, canary_outcomes.c.decided_ts, canary_outcomes.c.collection),
    ):
        copied = present = 0
        last: Any = None
        while True:
            query = select(table).order_by(order).limit(COPY_BATCH)
            if last is not None:
                query = query.where(order > last)
            with source.connect() as db:
                rows = [dict(row._mapping) for row in db.execute(query)]
            if not rows:
                break
            last = rows[-1][order.name]
            values = [{k: v for k, v in row.items() if k != "seq"} for row in rows]  # the target numbers them
            with writing(target) as db:
                inserted = len(db.execute(insert_ignoring_duplicates(target, table).values(values)
                                          .returning(key)).all())  # fmt: skip
            copied += inserted
            present += len(rows) - inserted
            say(f"{table.name}: {copied + present} read, {copied} copied")
        done[table.name] = (copied, present)
    return done
