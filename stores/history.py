"""The history store: an audit trail of memory events in SQL, through SQLModel.

Columns are Mem0's (``memory_id``, ``old_memory``, ``new_memory``, ``event``, ``created_at``,
``updated_at``, ``is_deleted``, ``actor_id``, ``role``) plus ``job_id`` and the scope ids. Row ids are
deterministic (job id + decision position), so a retried finalize writes each row once.
"""

from __future__ import annotations

import threading
from pathlib import Path
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime

from sqlalchemy import Engine
from sqlalchemy.exc import OperationalError, SQLAlchemyError
from sqlmodel import Field, Session, SQLModel, col, create_engine, select

from memq.errors import StoreError, StoreUnavailable
from memq.models import HistoryItem, MemoryEvent


class HistoryRecord(SQLModel, table=True):
    """One memory event (table ``history``)."""

    __tablename__ = "history"

    id: str = Field(primary_key=True)
    memory_id: str = Field(index=True)
    old_memory: str | None = None
    new_memory: str | None = None
    event: str
    created_at: datetime
    updated_at: datetime | None = None
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
    """Translate SQLAlchemy errors: unreachable or locked database -> `StoreUnavailable`, else `StoreError`."""
    try:
        yield
    except OperationalError as exc:
        raise StoreUnavailable(f"history {what}: {type(exc.orig).__name__}") from exc
    except SQLAlchemyError as exc:
        raise StoreError(f"history {what}: {type(exc).__name__}") from exc


class HistoryStore:
    """Reads and writes history rows.

    Args:
        engine: a SQLAlchemy engine (tables are created on construction).
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        with mapped_sql_errors("create tables"):
            SQLModel.metadata.create_all(engine, tables=[SQLModel.metadata.tables["history"]])

    def add(self, rows: Sequence[HistoryRecord]) -> None:
        """Write rows; a row whose id exists is overwritten with the same values (idempotent)."""
        if not rows:
            return
        with mapped_sql_errors("write"), Session(self.engine) as session:
            for row in rows:
                session.merge(row)
            session.commit()

    def history(self, memory_id: str) -> list[HistoryItem]:
        """A memory's events, oldest first."""
        with mapped_sql_errors("read"), Session(self.engine) as session:
            rows = session.exec(select(HistoryRecord).where(HistoryRecord.memory_id == memory_id)
                                .order_by(col(HistoryRecord.created_at), col(HistoryRecord.position))).all()
            return [r.item() for r in rows]


_stores: dict[str, HistoryStore] = {}
_lock = threading.Lock()


def sql_engine(url: str) -> Engine:
    """The process-wide engine of a database URL (one per URL).

    Raises:
        StoreUnavailable: the SQLite folder cannot be created.
    """
    return open_history_store(url).engine


def open_history_store(url: str) -> HistoryStore:
    """The process-wide `HistoryStore` for a SQLAlchemy URL (``sqlite:///path.db``, ``postgresql://...``).

    Raises:
        StoreUnavailable: the database cannot be reached or the file cannot be created.
    """
    with _lock:
        store = _stores.get(url)
        if store is None:
            kwargs: dict[str, object] = {"pool_pre_ping": True}
            if url.startswith("sqlite"):
                kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
                path = url.removeprefix("sqlite:///")
                if path and path != ":memory:":
                    Path(path).parent.mkdir(parents=True, exist_ok=True)
            store = HistoryStore(create_engine(url, **kwargs))
            _stores[url] = store
        return store
