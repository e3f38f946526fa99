"""The history store: an audit trail of memory events in SQL, through SQLModel.

Columns are Mem0's (``memory_id``, ``old_memory``, ``new_memory``, ``event``, ``created_at``,
``updated_at``, ``is_deleted``, ``actor_id``, ``role``) plus ``job_id`` and the scope ids. Row ids are
deterministic (job id + decision position), so a retried finalize writes each row once.

The same code runs on SQLite and PostgreSQL: timestamps are stored as UTC instants (`UTCDateTime`),
writes are single-statement upserts (`upsert`) that two deliveries of the same task can run at once,
and tables are created so that many workers starting together on an empty database do not collide
(`create_tables`).
"""

from __future__ import annotations

import threading
from pathlib import Path
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import DateTime, Dialect, Engine, Table, insert, text, update
from sqlalchemy import select as sql_select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError, OperationalError, SQLAlchemyError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.pool import NullPool
from sqlalchemy.schema import CreateIndex, CreateTable
from sqlalchemy.types import TypeDecorator
from sqlmodel import Field, Session, SQLModel, col, create_engine, select

from memq.errors import StoreError, StoreUnavailable
from memq.models import HistoryItem, MemoryEvent


class UTCDateTime(TypeDecorator[datetime]):
    """An instant, stored in UTC and read back as an aware UTC datetime (a naive one is taken as UTC,
    as everywhere in memq).

    ``timestamp with time zone`` on PostgreSQL (so the server's or session's TimeZone never shifts it);
    on SQLite, which keeps no offset, the UTC wall clock (so text order is time order). Explicit rather
    than SQLModel's default, which stored naive timestamps before SQLModel 0.0.45.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=timezone.utc) if value.utcoffset() is None else value.astimezone(timezone.utc)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=timezone.utc) if value.utcoffset() is None else value.astimezone(timezone.utc)


class HistoryRecord(SQLModel, table=True):
    """One memory event (table ``history``)."""

    __tablename__ = "history"

    id: str = Field(primary_key=True)
    memory_id: str = Field(index=True)
    old_memory: str | None = None
    new_memory: str | None = None
    event: str
    created_at: datetime = Field(sa_type=UTCDateTime)
    updated_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    is_deleted: bool = False
    actor_id: str | None = None
    role: str | None = None
    job_id: str = Field(index=True)
    position: int = 0
    user_id: str | None = Field(default=None, index=True)
    agent_id: str | None = None
    run_id: str | None = None

    def item(self) -> HistoryItem:
        """This row as the public `HistoryItem`."""
        return HistoryItem(id=self.id, memory_id=self.memory_id, old_memory=self.old_memory,
                           new_memory=self.new_memory, event=MemoryEvent(self.event), created_at=self.created_at,
                           updated_at=self.updated_at, is_deleted=self.is_deleted, actor_id=self.actor_id,
                           role=self.role, job_id=self.job_id, user_id=self.user_id, agent_id=self.agent_id,
                           run_id=self.run_id)


@contextmanager
def mapped_sql_errors(what: str) -> Iterator[None]:
    """Translate SQLAlchemy errors: unreachable or locked database, a lost connection or no free connection
    in the pool -> `StoreUnavailable`, else `StoreError`."""
    try:
        yield
    except OperationalError as exc:
        raise StoreUnavailable(f"history {what}: {type(exc.orig).__name__}") from exc
    except DBAPIError as exc:
        if exc.connection_invalidated:
            raise StoreUnavailable(f"history {what}: {type(exc.orig).__name__} (connection lost)") from exc
        raise StoreError(f"history {what}: {type(exc).__name__}") from exc
    except PoolTimeout as exc:
        raise StoreUnavailable(f"history {what}: no free connection in the pool") from exc
    except SQLAlchemyError as exc:
        raise StoreError(f"history {what}: {type(exc).__name__}") from exc


def sql_table(model: type[SQLModel]) -> Table:
    """The `Table` of a SQLModel table class."""
    table = getattr(model, "__table__")  # noqa: B009 - SQLModel's classes do not declare it
    assert isinstance(table, Table)
    return table


_CREATE_TABLES_LOCK = 0x6D656D71_7461626C  # "memqtabl": the PostgreSQL advisory lock around creating tables


def create_tables(engine: Engine, names: Sequence[str]) -> None:
    """Create the named tables of SQLModel's metadata and their indexes, those that are missing.

    Safe when many processes do it at once on an empty database: ``CREATE ... IF NOT EXISTS`` (atomic on
    SQLite), and on PostgreSQL (where concurrent ``IF NOT EXISTS`` can still collide) inside one
    transaction holding an advisory lock.

    Raises:
        StoreUnavailable: the database is unreachable or locked.
        StoreError: any other database error.
    """
    with mapped_sql_errors("create tables"), engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _CREATE_TABLES_LOCK})
        for name in names:
            table = SQLModel.metadata.tables[name]
            conn.execute(CreateTable(table, if_not_exists=True))
            for index in sorted(table.indexes, key=lambda i: str(i.name)):
                conn.execute(CreateIndex(index, if_not_exists=True))


def upsert(session: Session, table: Table, rows: Sequence[Mapping[str, Any]], *, changes: Sequence[str]) -> None:
    """Insert rows; where a row's primary key exists, set only its `changes` columns from the new row.

    On PostgreSQL and SQLite this is ``INSERT ... ON CONFLICT DO UPDATE``: writers of the same rows at once
    (two deliveries of one task) never collide, and neither sees an integrity error. Rows repeating a key
    are written once (the last wins), in key order, so two writers lock rows in the same order. Other
    databases get an update-then-insert, which is not safe against a concurrent writer.

    Args:
        session: the open session (the caller commits).
        table: the table (every primary-key column must be in each row).
        rows: column name -> value, one mapping per row.
        changes: the columns an existing row takes from the new one (the primary key never changes).
    """
    keys = [c.name for c in table.primary_key.columns]
    unique = {tuple(r[k] for k in keys): r for r in rows}
    ordered = [unique[k] for k in sorted(unique)]
    if not ordered:
        return
    connection = session.connection()
    dialect = connection.dialect.name
    if dialect in ("postgresql", "sqlite"):
        stmt = postgresql.insert(table) if dialect == "postgresql" else sqlite.insert(table)
        if changes:
            stmt = stmt.on_conflict_do_update(index_elements=keys, set_={c: stmt.excluded[c] for c in changes})
        else:
            stmt = stmt.on_conflict_do_nothing(index_elements=keys)
        connection.execute(stmt, ordered)
        return
    for r in ordered:
        where = [table.c[k] == r[k] for k in keys]
        if connection.execute(sql_select(*table.primary_key.columns).where(*where)).first() is None:
            connection.execute(insert(table).values(dict(r)))
        elif changes:
            connection.execute(update(table).where(*where).values({c: r[c] for c in changes}))


class HistoryStore:
    """Reads and writes history rows.

    Args:
        engine: a SQLAlchemy engine (tables are created on construction).
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        create_tables(engine, ["history"])

    def add(self, rows: Sequence[HistoryRecord]) -> None:
        """Write rows; a row whose id exists is overwritten with the same values (idempotent, also when
        two writers add the same rows at once).

        Raises:
            StoreUnavailable: the database is unreachable or locked (retryable).
            StoreError: any other database error.
        """
        if not rows:
            return
        table = sql_table(HistoryRecord)
        columns = [c.name for c in table.columns]
        values = [{c: getattr(row, c) for c in columns} for row in rows]
        with mapped_sql_errors("write"), Session(self.engine) as session:
            upsert(session, table, values, changes=[c for c in columns if c != "id"])
            session.commit()

    def history(self, memory_id: str) -> list[HistoryItem]:
        """A memory's events, oldest first."""
        with mapped_sql_errors("read"), Session(self.engine) as session:
            rows = session.exec(select(HistoryRecord).where(HistoryRecord.memory_id == memory_id)
                                .order_by(col(HistoryRecord.created_at), col(HistoryRecord.position))).all()
            return [r.item() for r in rows]


CONNECT_TIMEOUT_S = 10
"""How long opening a PostgreSQL connection may take (seconds) when the URL sets no ``connect_timeout``:
libpq waits forever by default, so a server that vanished from the network would hang a worker."""

_stores: dict[str, HistoryStore] = {}
_lock = threading.Lock()


def sql_engine(url: str) -> Engine:
    """The process-wide engine of a database URL (one per URL).

    Raises:
        StoreUnavailable: the SQLite folder cannot be created.
    """
    return open_history_store(url).engine


def open_history_store(url: str) -> HistoryStore:
    """The process-wide `HistoryStore` for a SQLAlchemy URL (``sqlite:///path.db``, or
    ``postgresql+psycopg://user:password@host/db``; plain ``postgresql://`` picks psycopg on SQLAlchemy 2.1+
    only). A PostgreSQL connection attempt gives up after `CONNECT_TIMEOUT_S` unless the URL says otherwise.

    Raises:
        StoreUnavailable: the database cannot be reached or the file cannot be created.
    """
    with _lock:
        store = _stores.get(url)
        if store is None:
            store = HistoryStore(new_sql_engine(url))
            _stores[url] = store
        return store


def new_sql_engine(url: str, *, pooled: bool = True) -> Engine:
    """A new engine for a SQLAlchemy URL, outside the process-wide cache (see `open_history_store`).

    Args:
        url: the database URL.
        pooled: keep connections open for reuse; False (``NullPool``): every use opens and closes its
            own, so the process holds no connection between uses (a prefork worker's parent, whose
            later-forked children must not inherit one).

    Raises:
        OSError: the SQLite folder cannot be created.
    """
    kwargs: dict[str, object] = {"pool_pre_ping": True} if pooled else {"poolclass": NullPool}
    if url.startswith("sqlite"):
        kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
        path = url.removeprefix("sqlite:///")
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
    elif url.startswith("postgresql") and "connect_timeout=" not in url:
        kwargs["connect_args"] = {"connect_timeout": CONNECT_TIMEOUT_S}
    return create_engine(url, **kwargs)
