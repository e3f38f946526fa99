"""The embedded vector store: Qdrant Edge (`qdrant-edge-py`), Qdrant's own engine inside the process.

**One owner per folder.** An Edge shard is a folder (``<qdrant.path>/<collection>``) with a write-ahead
log that one process at a time can open (a second one gets ``WouldBlock``). `open_edge` opens it and
records the owner (pid, host, command, time) beside it, so a refused process is told who holds it. In
embedded mode the worker is the owner; other processes read through it (`stores.vector_rpc`).

**Index upkeep (measured in ``bench/search.py``).** Every read and every decide carries a scope filter,
and the scope ids have keyword payload indexes, so a search scores only the points of its scope. memq
therefore builds no HNSW graph in embedded mode (``indexing_threshold=0``): Edge's `optimize()` holds
the GIL for its whole run (27 s at 20k points with HNSW), which would stall every thread of the worker,
reads served to other processes included. Without HNSW, `optimize()` only merges segments and drops
deleted points (0.2-0.4 s at 1k-10k points, 0.7-2.6 s at 50k, a quarter deleted); the owner runs it
after a write once the points replaced or deleted since the last run reach `VACUUM_MIN_CHURN` and
`VACUUM_FRACTION` of the points stored. Cost of a search is then linear in the scope's size (~0.15 ms
at 100 memories, ~5 ms at 25k); a scope far beyond that belongs on a Qdrant server, which builds HNSW
in its own threads.

Source: the Edge API and its behaviour as documented in `qdrant_edge/__init__.pyi` (qdrant-edge-py 0.9)
and measured on this machine.
"""

from __future__ import annotations

import builtins
import json
import logging
import os
import re
import socket
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import qdrant_edge as qe

from memq.errors import StoreError, StoreNeedsMigration, StoreOwned, StoreUnavailable
from memq.models import MemoryItem, Scope
from memq.filters import Match, Node
from stores.sparse import RRF_K, SPARSE_NAME, document_terms, fusion_depth, query_terms
from stores.occurred import OCCURRED_TS, TimeRange
from stores.vectors import (KEYWORD_INDEXES, MemoryPoint, PagedVectorStore, Probe, Spelling, dense_of, fused_hits,
                            probes, python_only, searched, select, to_item, translate)

__all__ = ["EdgeStore", "open_edge", "edge_point", "has_sparse", "add_sparse", "owner_of", "is_local_mode_folder", "VACUUM_MIN_CHURN", "VACUUM_FRACTION"]

logger = logging.getLogger(__name__)

VACUUM_MIN_CHURN = 2000
"""Points replaced or deleted since the last vacuum before the next one may run."""
VACUUM_FRACTION = 0.2
"""... and at least this share of the points stored, dead versions included (Edge's own optimizer acts
on a segment whose dead share is over `DELETED_THRESHOLD`, set below this so a vacuum does work)."""
DELETED_THRESHOLD = 0.1
"""Edge's ``deleted_threshold``: the dead share of a segment above which its optimizer rewrites it."""


def edge_cannot(match: Match) -> bool:
    """Conditions Edge cannot apply: ``icontains``, and a boolean operand (Edge reads ``True`` as the
    integer 1, which matches no boolean payload)."""
    return python_only(match) or isinstance(match.value, bool) or (
        isinstance(match.value, tuple) and any(isinstance(v, bool) for v in match.value))


EDGE = Spelling(
    filter=lambda must, should, must_not: qe.Filter(must=must, should=should, must_not=must_not),
    match=lambda key, value: qe.FieldCondition(key=key, match=qe.MatchValue(value)),
    match_any=lambda key, values: qe.FieldCondition(key=key, match=qe.MatchAny(values)),
    number=lambda key, bounds: qe.FieldCondition(key=key, range=qe.RangeFloat(**bounds)),
    date=lambda key, bounds: qe.FieldCondition(key=key, range=qe.RangeDateTime(
        **{k: v.isoformat() for k, v in bounds.items()})),
    substring=lambda key, text: qe.FieldCondition(key=key, match=qe.MatchSubstring(text)),
    empty=lambda key: qe.IsEmptyCondition(key=key),
)
"""Qdrant Edge's conditions (``contains`` is its case-sensitive ``MatchSubstring``)."""


def edge_filter(node: Node | None) -> qe.Filter | None:
    """Edge's filter for a `memq.filters` tree (`stores.vectors.translate`; None selects everything)."""
    flt: qe.Filter | None = translate(node, EDGE)
    return flt


@contextmanager
def _mapped(what: str) -> Iterator[None]:
    """Edge raises plain `Exception`s; a closed shard is unavailable, anything else a store fault."""
    try:
        yield
    except (StoreError, StoreUnavailable):
        raise
    except Exception as exc:
        text = str(exc)
        if "not initialized" in text:
            raise StoreUnavailable(f"Qdrant Edge {what}: the store is closed") from None
        reason = "vector dimension" if "dimension" in text else type(exc).__name__
        raise StoreError(f"Qdrant Edge {what}: {reason}") from None  # the text may quote payloads


class EdgeStore(PagedVectorStore):
    """Memories in one Edge shard, owned by this process.

    Args:
        shard: the open shard.
        folder: the shard's folder.
        collection: the collection's name (the folder's name).
        dims: vector size.

    Thread-safe: calls are serialized by a lock (Edge holds the GIL during a call anyway).
    """

    def __init__(self, shard: qe.EdgeShard, folder: Path, collection: str, dims: int) -> None:
        self._shard: qe.EdgeShard | None = shard
        self.folder = folder
        self.collection = collection
        self.dims = dims
        self._lock = threading.RLock()
        self._churn = 0
        self._min_churn = VACUUM_MIN_CHURN
        self.vacuums: list[float] = []
        """Duration of each vacuum run by this process (ms), for benchmarks and logs."""

    @property
    def shard(self) -> qe.EdgeShard:
        """The open shard.

        Raises:
            StoreUnavailable: the store was closed.
        """
        if self._shard is None:
            raise StoreUnavailable(f"the embedded vector store {self.folder} is closed")
        return self._shard

    def ensure_collection(self) -> None:
        """Nothing to do: `open_edge` created the shard and its payload indexes."""

    def upsert(self, points: Sequence[MemoryPoint]) -> None:
        """Write points (insert or overwrite by id; idempotent).

        Raises:
            StoreError: a vector of the wrong size.
        """
        if not points:
            return
        edge_points = [edge_point(p.id, p.vector, p.payload()) for p in points]
        with self._lock, _mapped("upsert"):
            existing = len(self.shard.retrieve([p.id for p in points], with_payload=False, with_vector=False))
            self.shard.update(qe.UpdateOperation.upsert_points(edge_points))
            self._after_write(existing)

    def delete(self, ids: Sequence[str]) -> None:
        """Delete points by id (missing ids are ignored)."""
        if not ids:
            return
        with self._lock, _mapped("delete"):
            self.shard.update(qe.UpdateOperation.delete_points(list(ids)))
            self._after_write(len(ids))

    def _after_write(self, churn: int) -> None:
        self._churn += churn
        if self._churn < self._min_churn:
            return
        live = self.shard.count(qe.CountRequest(exact=True))
        if self._churn >= VACUUM_FRACTION * (live + self._churn):
            self.vacuum()

    def vacuum(self) -> float:
        """Merge segments and drop deleted points now (blocks this process's threads while it runs).

        Returns:
            The time it took (ms). When Edge found nothing to do, the next automatic vacuum waits for
            twice as much churn.
        """
        with self._lock, _mapped("optimize"):
            started = time.perf_counter()
            changed = self.shard.optimize()
            took_ms = (time.perf_counter() - started) * 1000
        if changed:
            self._churn, self._min_churn = 0, VACUUM_MIN_CHURN
        else:
            self._min_churn = self._churn * 2
        self.vacuums.append(took_ms)
        logger.info("vector store %s vacuumed in %.0f ms (%s)", self.folder, took_ms,
                    "segments rewritten" if changed else "nothing to do")
        return took_ms

    def retrieve(self, ids: Sequence[str]) -> list[MemoryItem]:
        """Memories by id (missing ids are skipped)."""
        if not ids:
            return []
        with self._lock, _mapped("retrieve"):
            records = self.shard.retrieve(list(ids), with_payload=True, with_vector=False)
        return [to_item(r.id, r.payload) for r in records]

    def search_batch(self, vectors: Sequence[Sequence[float]], scope: Scope, *, limit: int,
                     threshold: float | None = None, filters: Mapping[str, Any] | None = None,
                     exact: bool = False, texts: Sequence[str] | None = None,
                     during: TimeRange | None = None) -> list[list[MemoryItem]]:
        """`search` for several vectors in one planned batch; one list of hits per vector. With `texts`,
        each search fuses its dense and BM25 rankings (`stores.sparse`; `VectorStore.search`).

        Raises:
            InvalidFilter: filters that do not parse (`memq.filters`).
            StoreError: a vector of the wrong size, or not one text per vector.
        """
        if not vectors:
            return []
        selection = select(scope, filters, exact=exact, unsupported=self.unsupported, during=during)
        with _mapped("filter"):
            flt = edge_filter(selection.pushed)

        def run(batch: Sequence[Probe], n: int) -> list[list[MemoryItem]]:
            planned = [self._request(p, n, flt, threshold) for p in batch]
            requests = [request for request, _ in planned]
            with self._lock, _mapped("query"):
                if len(requests) == 1:
                    responses = [self.shard.query(requests[0])]
                else:
                    responses = self.shard.query_batch(qe.QueryBatchRequest(requests))
            return [fused_hits(p.vector, [(h.id, h.payload, dense_of(h.vector)) for h in hits], threshold) if fused
                    else [to_item(h.id, h.payload, h.score) for h in hits]
                    for p, (_, fused), hits in zip(batch, planned, responses)]

        return searched(run, probes(vectors, texts), selection, limit)

    @staticmethod
    def _request(probe: Probe, n: int, flt: qe.Filter | None,
                 threshold: float | None) -> tuple[qe.QueryRequest, bool]:
        """A dense query, or (with a text holding terms) dense and BM25 prefetches fused by RRF; and
        whether it is fused."""
        dense = qe.Query.Nearest([float(x) for x in probe.vector])
        indices, values = query_terms(probe.text) if probe.text is not None else ([], [])
        if not indices:
            return qe.QueryRequest(limit=n, query=dense, filter=flt, with_payload=True, with_vector=False,
                                   score_threshold=threshold), False
        depth = fusion_depth(n)
        keyword = qe.Query.Nearest(qe.SparseVector(indices, values), using=SPARSE_NAME)
        return qe.QueryRequest(
            limit=n, filter=flt, with_payload=True, with_vector=[""],
            query=qe.Fusion.Rrf(k=RRF_K),  # type: ignore[arg-type]  # the stub names Fusion, not its Rrf
            prefetches=[qe.Prefetch(limit=depth, query=dense, filter=flt, score_threshold=threshold),
                        qe.Prefetch(limit=depth, query=keyword, filter=flt)]), True

    def unsupported(self, match: Match) -> bool:
        """`edge_cannot`: ``icontains`` and boolean operands are evaluated in Python."""
        return edge_cannot(match)

    def count_of(self, node: Node | None) -> int:
        """How many points match `node` (at least 1)."""
        with self._lock, _mapped("count"):
            return max(1, int(self.shard.count(qe.CountRequest(exact=True, filter=edge_filter(node)))))

    def oldest(self, node: Node | None, n: int) -> builtins.list[MemoryItem]:
        """The `n` oldest points matching `node`, by ``created_at`` (Edge's order_by on its datetime index)."""
        with self._lock, _mapped("scroll"):
            records, _ = self.shard.scroll(qe.ScrollRequest(
                limit=max(1, n), filter=edge_filter(node), with_payload=True, with_vector=False,
                order_by=qe.OrderBy(key="created_at")))
        return [to_item(r.id, r.payload) for r in records]

    def count(self, scope: Scope | None = None) -> int:
        """Number of points (of `scope`, or all)."""
        with self._lock, _mapped("count"):
            return int(self.shard.count(qe.CountRequest(exact=True, filter=edge_filter(select(scope).pushed))))

    def close(self) -> None:
        """Flush and close the shard (the folder is free for another process afterwards)."""
        with self._lock:
            if self._shard is not None:
                try:
                    self._shard.flush()
                finally:
                    self._shard.close()
                    self._shard = None
                    _forget_owner(self.folder)


def edge_point(point_id: str | int, vector: Sequence[float], payload: dict[str, Any]) -> qe.Point:
    """An Edge point: the dense `vector` and the BM25 terms of the payload's memory text (``data``)."""
    return qe.Point(point_id, {"": [float(x) for x in vector], SPARSE_NAME: _sparse(str(payload.get("data") or ""))},
                    payload)


def _sparse(text: str) -> qe.SparseVector:
    indices, values = document_terms(text)
    return qe.SparseVector(indices, values)


def owner_file(folder: Path) -> Path:
    """Where the owner of the shard at `folder` is recorded (beside the folder)."""
    return folder.parent / f"{folder.name}.owner.json"


def _record_owner(folder: Path) -> None:
    info = {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv)[:300],
            "since": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    owner_file(folder).write_text(json.dumps(info))


def _forget_owner(folder: Path) -> None:
    try:
        info = json.loads(owner_file(folder).read_text())
        if info.get("pid") == os.getpid():
            owner_file(folder).unlink()
    except (OSError, ValueError, AttributeError):
        pass


def owner_of(folder: Path) -> str:
    """Who owns the shard at `folder`, as recorded: ``process <pid> on <host> (<command>, since <time>)``."""
    try:
        info = json.loads(owner_file(folder).read_text())
        return f"process {info['pid']} on {info['host']} ({info['command']}, since {info['since']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


def is_local_mode_folder(folder: Path) -> bool:
    """True when `folder` holds a `qdrant-client` local-mode store (memq before the Edge store)."""
    return (folder / "meta.json").is_file() and (folder / "collection").is_dir()


def _config(dims: int | None, *, sparse: bool = True) -> qe.EdgeConfig:
    vectors = qe.EdgeVectorParams(size=dims, distance=qe.Distance.Cosine) if dims is not None else None
    return qe.EdgeConfig(
        vectors=vectors, optimizers=qe.EdgeOptimizersConfig(indexing_threshold=0, deleted_threshold=DELETED_THRESHOLD),
        sparse_vectors={SPARSE_NAME: qe.EdgeSparseVectorParams(modifier=qe.Modifier.Idf)} if sparse else None)


def has_sparse(folder: Path) -> bool:
    """True when the shard at `folder` was created with (or given) the BM25 sparse vector, as its
    persisted ``edge_config.json`` says; False for a shard written by memq before hybrid retrieval."""
    try:
        config = json.loads((folder / "edge_config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and SPARSE_NAME in (config.get("sparse_vectors") or {})


SPARSE_PENDING = ".bm25-pending"
"""A marker in a shard's folder while its points are being given BM25 vectors (removed when done)."""


def add_sparse(shard: qe.EdgeShard, folder: Path, page: int = 1000) -> int:
    """Give a shard written before hybrid retrieval its BM25 sparse vector, and every point its terms.

    Idempotent and resumable: a marker (`SPARSE_PENDING`) in the folder says the work is unfinished,
    so a process killed midway finishes it at the next open; redoing a point writes the same vector.

    Args:
        shard: the open shard (owned by this process).
        folder: its folder.
        page: points read and updated per round.

    Returns:
        The number of points given terms.
    """
    marker = folder / SPARSE_PENDING
    marker.touch()
    shard.update(qe.UpdateOperation.create_sparse_vector(SPARSE_NAME, qe.Modifier.Idf))
    done, offset = 0, None
    while True:
        records, offset = shard.scroll(qe.ScrollRequest(limit=page, offset=offset, with_payload=True,
                                                        with_vector=False))
        updates = [qe.PointVectors(r.id, {SPARSE_NAME: _sparse(str((r.payload or {}).get("data") or ""))})
                   for r in records]
        if updates:
            shard.update(qe.UpdateOperation.update_vectors(updates))
        done += len(updates)
        if offset is None or not records:
            break
    shard.flush()
    marker.unlink()
    logger.info("vector store %s: BM25 terms added to %d points (hybrid retrieval)", folder, done)
    return done


def open_edge(root: Path, collection: str, dims: int) -> EdgeStore:
    """Open (or create) the Edge shard of `collection` under `root` and own it.

    Args:
        root: the embedded store's folder (``qdrant.path``); the shard is ``root/collection``.
        collection: the collection's name.
        dims: vector size.

    Returns:
        The store; this process owns the folder until `EdgeStore.close`.

    Raises:
        StoreOwned: another process (or another store in this one) owns the folder; the message
            names the folder and the owner.
        StoreNeedsMigration: `root` holds a `qdrant-client` local-mode store (run ``memq migrate-store``).
        StoreError: the shard holds vectors of another size, or cannot be opened.
    """
    if is_local_mode_folder(root):
        raise StoreNeedsMigration(
            f"{root} holds a vector store in qdrant-client's local mode (written by an earlier memq); run "
            "`memq migrate-store` to copy it into the embedded Edge store (the old files are kept)")
    folder = root / collection
    folder.parent.mkdir(parents=True, exist_ok=True)
    try:
        if (folder / "edge_config.json").exists():
            upgrade = not has_sparse(folder) or (folder / SPARSE_PENDING).exists()
            shard = qe.EdgeShard.load(str(folder), _config(dims, sparse=not upgrade))
        else:
            upgrade = False
            shard = qe.EdgeShard.create(str(folder), _config(dims))
    except Exception as exc:
        text = str(exc)
        if "WouldBlock" in text:
            raise StoreOwned(
                f"the embedded vector store {folder} is owned by {owner_of(folder)}: one process owns it "
                "(in embedded mode, the worker). Read through that process (memq does this when it runs), "
                "stop it, use another MEMQ_DATA_DIR, or run a Qdrant server (MEMQ_QDRANT__URL)") from None
        if "incompatible" in text.lower():
            found = re.search(r"but got (\d+)", text)
            raise StoreError(f"the vector store {folder} holds vectors of size {found.group(1) if found else '?'}, "
                             f"the embedder makes {dims}") from None
        raise StoreError(f"cannot open the vector store {folder}: {type(exc).__name__}") from None
    try:
        for key in KEYWORD_INDEXES:
            shard.update(qe.UpdateOperation.create_field_index(key, qe.PayloadSchemaType.Keyword))
        shard.update(qe.UpdateOperation.create_field_index("created_at", qe.PayloadSchemaType.Datetime))
        shard.update(qe.UpdateOperation.create_field_index(OCCURRED_TS, qe.PayloadSchemaType.Float))
        if upgrade:
            add_sparse(shard, folder)
    except Exception:
        shard.close()
        raise
    _record_owner(folder)
    return EdgeStore(shard, folder, collection, dims)
