"""The SQL history store against SQLite (the vector stores' contract is in test_vector_contract.py)."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

from stores.history import HistoryRecord, open_history_store

NOW = datetime(2024, 1, 2, 3, 4, 5, tzinfo=timezone.utc)


def test_history_rows_are_written_once_per_id(tmp_path: Path) -> None:
    history = open_history_store(f"sqlite:///{tmp_path / 'h.db'}")
    row = HistoryRecord(id="r1", memory_id="m1", new_memory="x", event="ADD", created_at=NOW, job_id="j")
    history.add([row])
    history.add([HistoryRecord(**row.model_dump())])
    assert [(h.event.value, h.new_memory) for h in history.history("m1")] == [("ADD", "x")]
