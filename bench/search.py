"""Vector store benchmark: the embedded Edge store against qdrant-client's local mode, in one run.

For each size N (default 1k, 10k, 50k memories over 100 users, u0..u99) the script builds a collection
of 384-dim unit vectors (numpy, fixed seed) with memq's payloads (`stores.vectors.MemoryPoint`), writing
64 points per `upsert` (one add job's write), and measures, all in this one run:

* upsert time per batch (ms, p50);
* top-10 search with a user_id filter (`store.search(v, Scope(user_id=...), limit=10)`), p50/p95 ms,
  in the owner process, each right after the query embedding of one LoCoMo question (all-MiniLM-L6-v2,
  memq's settings; ``--embed-threads`` sets torch's threads), timed too: the two alternate, so both see
  the same machine load (a busy 2-core machine slows the embedder far more than a search);
* Edge only: the same (embedding, then search) from another process through the owner over Redis (a
  `VectorServer` in this process, a `RemoteVectorStore` in a child process that loads its own embedder
  and reports its timings as JSON on stdout), and the bare round trip to the owner (a ``ping``:
  `RemoteVectorStore.ensure_collection`);
* Edge only: vacuum time after deleting every 4th point (the owner's automatic vacuum when the delete
  triggered it, else an explicit `EdgeStore.vacuum()`). Edge's vacuum optimizer runs only when more
  than 20% of a segment is deleted: deleting exactly 20% times a vacuum that does nothing;
* Edge only: the owner's RSS (VmRSS) before opening and after building the largest collection, and its
  size on disk.

qdrant-client's local mode (memq's embedded store before Edge, the "before" rows) is slow to build and
to search, so it runs only up to ``--local-mode-max`` points, with ``--local-queries`` queries.
Searches are reported as ratios to the query embedding timed in the same loop; the targets are
(embed p95 + search p95) / embed p95 <= 1.3 in the owner and <= 1.5 from another process.

    .venv/bin/python bench/search.py [--sizes 1000,10000,50000] [--queries 200] [--local-mode-max 10000]
                                     [--delete-every 4] [--embed-threads N] [--json out.json]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root

import argparse
import json
import os
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np

from memq.models import Scope
from stores.vectors import MemoryPoint, VectorStore

DIMS, USERS, BATCH, LIMIT = 384, 100, 64, 10
LOCOMO = Path(__file__).resolve().parents[2] / "shared/data/locomo10.json"
CREATED = datetime(2026, 1, 1, tzinfo=timezone.utc)
Row = dict[str, Any]


def pct(values: list[float], q: float) -> float:
    """The `q` quantile of `values` (nearest rank), rounded to 0.01."""
    ordered = sorted(values)
    return round(ordered[round(q * (len(ordered) - 1))], 2)


def unit_vectors(n: int, seed: int) -> np.ndarray:
    """`n` random unit vectors of `DIMS` floats (float32), reproducible from `seed`."""
    v = np.random.default_rng(seed).standard_normal((n, DIMS)).astype(np.float32)
    unit: np.ndarray = v / np.linalg.norm(v, axis=1, keepdims=True)
    return unit


def point_id(i: int) -> str:
    """The id of the `i`-th point (a UUID)."""
    return str(uuid.UUID(int=i + 1))


def point_batches(n: int) -> Iterator[list[MemoryPoint]]:
    """`n` memories with memq's payloads (user ``u{i % 100}``), `BATCH` at a time, deterministic.

    Generated batch by batch so the points do not sit in the process while its RSS is measured.
    """
    vectors = unit_vectors(n, seed=n)
    for start in range(0, n, BATCH):
        yield [MemoryPoint(id=point_id(i), vector=vectors[i].tolist(),
                           memory=f"memory {i}: u{i % USERS} mentioned something worth keeping",
                           scope=Scope(user_id=f"u{i % USERS}"), created_at=CREATED, updated_at=None,
                           metadata={"channel": "bench"}, actor_id=f"u{i % USERS}", role="user",
                           source_message_ids=[str(i)], job_id=f"job-{i // BATCH}")
               for i in range(start, min(n, start + BATCH))]


def build(store: VectorStore, n: int) -> list[float]:
    """Write `n` points in batches of `BATCH`; the time of each `upsert` call (ms)."""
    store.ensure_collection()
    took = []
    for batch in point_batches(n):
        t = time.perf_counter()
        store.upsert(batch)
        took.append((time.perf_counter() - t) * 1000)
    return took


def questions(n: int) -> list[str]:
    """`n` LoCoMo questions (repeated if needed; fixed sentences without the data)."""
    if LOCOMO.exists():
        found = [q["question"] for c in json.loads(LOCOMO.read_text()) for q in c["qa"] if "question" in q]
    else:
        found = [f"What did user {i} say about the trip to Lyon last month?" for i in range(50)]
    return [found[i % len(found)] for i in range(n)]


def time_searches(store: VectorStore, queries: int, threads: int | None, warmup: int = 5) -> dict[str, list[float]]:
    """Per query: embed one LoCoMo question, then a top-10 user-filtered search, then a ping (ms each).

    Embedding and search alternate so both are timed under the same machine load. The search vector is
    random (the points are too); users go round-robin. The ping (`ensure_collection`) is a round trip
    to the owner for a `RemoteVectorStore`, nothing for the owner's own store. `threads`: torch's.
    """
    from memq.config import EmbedderSettings
    from stores.embedder import get_embedder

    embedder = get_embedder(EmbedderSettings(threads=threads))
    texts, vectors = questions(queries + warmup), unit_vectors(queries + warmup, seed=7).tolist()
    took: dict[str, list[float]] = {"embed_ms": [], "search_ms": [], "ping_ms": []}
    for i, v in enumerate(vectors):
        t0 = time.perf_counter()
        embedder.embed([texts[i]])
        t1 = time.perf_counter()
        hits = store.search(v, Scope(user_id=f"u{i % USERS}"), limit=LIMIT)
        t2 = time.perf_counter()
        store.ensure_collection()
        t3 = time.perf_counter()
        assert hits and all(h.user_id == f"u{i % USERS}" for h in hits)
        if i >= warmup:
            for name, ms in zip(took, ((t1 - t0) * 1000, (t2 - t1) * 1000, (t3 - t2) * 1000)):
                took[name].append(ms)
    return took


def reader(spec: Row) -> None:
    """The child process: search through the owner over Redis and print the timings as JSON."""
    from stores.vector_rpc import RemoteVectorStore

    store = RemoteVectorStore(spec["redis_url"], spec["key"], Path(spec["folder"]), "bench", DIMS)
    took = time_searches(store, spec["queries"], spec["threads"])
    store.close()
    print(json.dumps(took))


def rss_mb() -> float:
    """This process's resident set size (MB), from /proc/self/status."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def bench_edge(root: Path, n: int, queries: int, threads: int | None, redis_url: str, largest: bool,
               every: int) -> Row:
    """Build, search (owner and another process), delete every `every`-th point and vacuum an Edge store."""
    from stores.edge import open_edge
    from stores.vector_rpc import VectorServer, store_key

    rss_before = rss_mb()
    store = open_edge(root, "bench", DIMS)
    row: Row = {"backend": "edge", "n": n, "upsert_ms": build(store, n)}
    if largest:
        row["rss_mb_before_build"], row["rss_mb"] = rss_before, rss_mb()
        row["disk_mb"] = round(sum(f.stat().st_blocks * 512 for f in root.rglob("*") if f.is_file()) / 2**20, 1)
    assert store.count() == n
    row.update(time_searches(store, queries, threads))
    key = store_key(root, "bench")
    server = VectorServer(store, redis_url, key)
    server.start()
    try:
        spec = {"redis_url": redis_url, "key": key, "folder": str(root), "queries": queries,
                "threads": threads}
        child = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--reader", json.dumps(spec)],
                               capture_output=True, text=True, timeout=600)
        if child.returncode != 0:
            raise RuntimeError(f"reader failed: {child.stderr[-2000:]}")
        remote = json.loads(child.stdout.strip().splitlines()[-1])
    finally:
        server.stop()
    row.update({f"remote_{name}": values for name, values in remote.items()})
    doomed = [point_id(i) for i in range(0, n, every)]
    vacuums, segments = len(store.vacuums), store.shard.info().segments_count
    t = time.perf_counter()
    store.delete(doomed)
    row["delete_ms"] = round((time.perf_counter() - t) * 1000, 1)
    row["vacuum_auto"] = len(store.vacuums) > vacuums
    row["vacuum_ms"] = round(store.vacuums[-1] if row["vacuum_auto"] else store.vacuum(), 1)
    row["segments_before_after"] = [segments, store.shard.info().segments_count]
    assert store.count() == n - len(doomed)
    store.close()
    return row


def bench_local(root: Path, n: int, queries: int, threads: int | None) -> Row:
    """Build and search a qdrant-client local-mode store of `n` points (memq's embedded store before Edge)."""
    from qdrant_client import QdrantClient

    from stores.qdrant import QdrantClientStore

    store = QdrantClientStore(QdrantClient(path=str(root)), "bench", DIMS, threading.RLock())
    row: Row = {"backend": "local mode", "n": n, "upsert_ms": build(store, n)}
    row.update(time_searches(store, queries, threads))
    store.close()
    return row


def table(rows: list[Row], deleted_pct: float) -> str:
    """The markdown table of the run: figures, and search ratios against the query embedding's p95
    measured in the same loop (the owner's for the owner's search, the other process's for its own)."""
    lines = ["| backend | N | upsert ms/batch p50 | search p50 / p95 ms | other process p50 / p95 ms (ping p50) "
             "| embed p50 / p95 ms: owner; other | search/embed p95: owner / other "
             f"| (embed+search)/embed p95: owner / other | vacuum ms ({deleted_pct:g}% deleted) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        s95, e95, remote, vacuum = pct(r["search_ms"], 0.95), pct(r["embed_ms"], 0.95), "–", "–"
        embed, ratios, sums = f"{pct(r['embed_ms'], 0.5)} / {e95}", f"{s95 / e95:.3f}", f"{(e95 + s95) / e95:.2f}"
        if "remote_search_ms" in r:
            r95, re95 = pct(r["remote_search_ms"], 0.95), pct(r["remote_embed_ms"], 0.95)
            remote = f"{pct(r['remote_search_ms'], 0.5)} / {r95} ({pct(r['remote_ping_ms'], 0.5)})"
            embed += f"; {pct(r['remote_embed_ms'], 0.5)} / {re95}"
            ratios, sums = f"{ratios} / {r95 / re95:.3f}", f"{sums} / {(re95 + r95) / re95:.2f}"
            vacuum = f"{r['vacuum_ms']}" + (" (auto)" if r["vacuum_auto"] else "")
        lines.append(f"| {r['backend']} | {r['n']:,} | {pct(r['upsert_ms'], 0.5)} | {pct(r['search_ms'], 0.5)} / "
                     f"{s95} | {remote} | {embed} | {ratios} | {sums} | {vacuum} |")
    embed_ms = [ms for r in rows for ms in r["embed_ms"] + r.get("remote_embed_ms", [])]
    lines.append(f"\nquery embedding (1 LoCoMo question, all-MiniLM-L6-v2), all rows: p50 {pct(embed_ms, 0.5)} ms, "
                 f"p95 {pct(embed_ms, 0.95)} ms")
    for r in (r for r in rows if "rss_mb" in r):
        lines.append(f"owner RSS after building {r['n']:,} Edge points: {r['rss_mb']} MB ({r['rss_mb_before_build']} "
                     f"MB before opening the store, embedder loaded); {r['disk_mb']} MB allocated on disk")
    return "\n".join(lines)


def main() -> None:
    """Run every measurement and print the table (and write every sample with ``--json``)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="1000,10000,50000", help="collection sizes, comma-separated")
    parser.add_argument("--queries", type=int, default=200, help="searches and embeddings per measurement")
    parser.add_argument("--local-mode-max", type=int, default=10_000, help="largest size run on local mode")
    parser.add_argument("--local-queries", type=int, default=30, help="searches per local-mode size")
    parser.add_argument("--delete-every", type=int, default=4, help="delete every k-th point, then vacuum")
    parser.add_argument("--embed-threads", type=int, help="torch threads of the embedder (memq's default: torch's)")
    parser.add_argument("--json", type=Path, help="write every sample here")
    parser.add_argument("--reader", help=argparse.SUPPRESS)  # the child process's spec
    args = parser.parse_args()
    if args.reader:
        return reader(json.loads(args.reader))
    sizes, load = [int(s) for s in args.sizes.split(",")], os.getloadavg()

    from cli.redis_server import RedisServer
    from memq.config import EmbedderSettings
    from stores.embedder import get_embedder

    get_embedder(EmbedderSettings(threads=args.embed_threads))  # held by the owner, as by a worker (RSS counts it)
    rows = []
    with RedisServer() as redis_server, tempfile.TemporaryDirectory(prefix="memq-bench-search-") as tmp:
        for n in sizes:
            print(f"edge {n:,} ...", file=sys.stderr, flush=True)
            rows.append(bench_edge(Path(tmp) / f"edge-{n}", n, args.queries, args.embed_threads, redis_server.url,
                                   n == max(sizes), args.delete_every))
        for n in (n for n in sizes if n <= args.local_mode_max):
            print(f"local mode {n:,} ...", file=sys.stderr, flush=True)
            rows.append(bench_local(Path(tmp) / f"local-{n}", n, args.local_queries, args.embed_threads))
    print(table(rows, 100 / args.delete_every))
    print(f"load average {load[0]:.1f} at start, {os.getloadavg()[0]:.1f} at end ({os.cpu_count()} CPUs)")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "cpus": os.cpu_count(),
                                         "load_start_end": [load, os.getloadavg()],
                                         "embed_threads": args.embed_threads}, indent=1))


if __name__ == "__main__":
    main()
