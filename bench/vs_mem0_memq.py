"""memq's side of ``bench/vs_mem0.py``: adds through one worker process, and searches over stores of given sizes.

Adds: a fresh ``redis-server`` and data folder per run, one ``memq worker`` process (``--pool threads
--concurrency N``, every queue, log level WARNING as Mem0's side logs) that owns its Qdrant Edge store and
calls the simulator through litellm; the bench process is the producer: it enqueues the warm-up adds and
waits for them (untimed: the worker loads its embedder and stores), then enqueues every add at once
(`producer.Producer.add_many`) and polls every 0.1 s until each job is done. After the timed run it reads
the memories back through the worker (`memories.Memories`, as a web app does) and, when asked, searches
the recall questions dense-only and hybrid.

Search: in this process, a store of N synthetic memories (the same texts, users and vectors as Mem0's
side) written through memq's own vector store in batches, then ``Memories.search`` (embedding included),
dense-only and hybrid, each after the query's embedding alone.
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds so far of process `pid` (all its threads) and of every live process
    below it (the worker's embedding processes, `stores.embed_process`), from /proc."""
    total = 0
    for p in children(pid) | {pid}:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def children(pid: int) -> set[int]:
    """The live processes below `pid` (its embedding processes), from /proc."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
    tree, grew = {pid}, True
    while grew:
        below = {p for p, parent in parents.items() if parent in tree} - tree
        tree |= below
        grew = bool(below)
    return tree - {pid}


def _redis_cpu_s(url: str) -> float:
    import redis

    client = redis.Redis.from_url(url)
    try:
        info = client.info("cpu")
        return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])
    finally:
        client.close()


def _stop(proc: subprocess.Popen[bytes], timeout_s: float = 60.0) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout_s)


def run_adds(requests: list[dict[str, Any]], warmup: list[dict[str, Any]], threads: int, llm_url: str,
             questions: list[dict[str, Any]], limit: int, take_calls: Any, embed_processes: bool = True,
             model_workers: int = 0) -> dict[str, Any]:
    """Run `requests` through a fresh worker of `threads` threads, timed from enqueue to the last job's end.

    Args:
        requests: `Producer.add_many` keyword arguments, in enqueue order.
        warmup: adds run (and waited for) first, untimed, under their own user ids.
        threads: the worker's thread pool size.
        llm_url: the simulator's API base.
        questions: ``[{"user_id", "question"}]`` to search after the run (empty: none).
        limit: results per search.
        take_calls: called before and after the timed run (`Simulator.take`): its result after is the run's.
        embed_processes: the worker embeds in child processes (``MEMQ_EMBEDDER__PROCESSES``); its CPU
            figure includes theirs.
        model_workers: more worker processes beside that one, each of `threads` threads consuming only
            ``memq.light`` and ``memq.llm`` (start, caption, extract, decide), reading the store through
            the first one, which owns it (scale-out in embedded mode; their CPU counts in ``worker``).

    Returns:
        ``{"threads", "processes", "adds", "elapsed_s", "failed", "errors", "events", "cpu_s": {"worker", "redis"},
        "memories", "duplicates", "found": {"dense": [[{"memory", "source_message_ids"}]], "hybrid": ...},
        "search_ms": {"dense": [...], "hybrid": [...]}, "llm": take_calls()'s}``.
    """
    from cli.redis_server import RedisServer
    from memories import Memories
    from memq.config import Settings
    from producer import Producer

    saved = dict(os.environ)
    with RedisServer() as redis_server, tempfile.TemporaryDirectory(prefix="memq-vs-mem0-") as data_dir:
        os.environ.update({
            "MEMQ_REDIS__URL": redis_server.url, "MEMQ_DATA_DIR": data_dir, "MEMQ_LLM__MODEL": "openai/bench-model",
            "MEMQ_LLM__API_BASE": llm_url, "MEMQ_LLM__API_KEY": "bench", "MEMQ_LLM__TIMEOUT_S": "30",
            "MEMQ_METRICS__PORT": "0", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "MEMQ_EMBEDDER__PROCESSES": "true" if embed_processes else "false"})
        for name in ("MEMQ_NEO4J__URI", "MEMQ_NEO4J__PASSWORD", "MEMQ_QDRANT__URL", "MEMQ_LLM__RPM", "MEMQ_LLM__TPM"):
            os.environ.pop(name, None)
        settings = Settings()  # from the environment just set (load_settings() keeps the first run's)
        log = Path(data_dir) / "worker.log"
        procs = [subprocess.Popen([sys.executable, "-m", "cli", "worker", "--pool", "threads", "--concurrency",
                                   str(threads), "--loglevel", "WARNING",
                                   *(["--queues", "memq.light,memq.llm"] if i else [])],
                                  cwd=REPO_ROOT, env=dict(os.environ), stdout=open(log, "ab"),
                                  stderr=subprocess.STDOUT, start_new_session=True)
                 for i in range(1 + model_workers)]
        producer = Producer(settings)
        try:
            # warm-up rounds (each user id new) until every process has started its embedding processes
            # (on first use, one per pass slot) and a round starts no more: no model loads in the timed run
            seen: list[int] = []
            for round_ in range(8):
                warm_adds = [{**w, "user_id": f"{w['user_id']}-{round_}-{k}"}
                             for k in range(1 + 2 * model_workers) for w in warmup]
                warm = producer.wait(producer.add_many(warm_adds), timeout_s=600, poll_s=0.1)
                if not all(s.status.value == "succeeded" for s in warm):
                    raise RuntimeError(f"memq warm-up failed: {[s.error for s in warm]}; log {log.read_text()[-2000:]}")
                now = [len(children(p.pid)) for p in procs]
                if now == seen and min(now) > 0 or not embed_processes:
                    break
                seen = now
            take_calls()

            def cpu_now() -> float:
                return sum(proc_cpu_s(p.pid) for p in procs)

            cpu0, redis0, started = cpu_now(), _redis_cpu_s(redis_server.url), time.monotonic()
            receipts = producer.add_many(requests)
            statuses = producer.wait(receipts, timeout_s=3600, poll_s=0.1)
            elapsed_s = time.monotonic() - started
            cpu = {"worker": cpu_now() - cpu0, "redis": _redis_cpu_s(redis_server.url) - redis0}
            llm = take_calls()
            events: Counter[str] = Counter()
            for s in statuses:
                events.update(s.counts)
            readers = {"dense": Memories(settings.model_copy(update={"qdrant": settings.qdrant.model_copy(
                update={"hybrid": False})})), "hybrid": Memories(settings)}
            memories = duplicates = 0
            for user_id in sorted({r["user_id"] for r in requests}):
                texts, offset = Counter[str](), 0
                while True:
                    page = readers["dense"].get_all(user_id=user_id, limit=1000, offset=offset)["results"]
                    texts.update(m["memory"] for m in page)
                    offset += len(page)
                    if len(page) < 1000:
                        break
                memories += sum(texts.values())
                duplicates += sum(n - 1 for n in texts.values())
            found: dict[str, list[list[dict[str, Any]]]] = {mode: [] for mode in readers}
            search_ms: dict[str, list[float]] = {mode: [] for mode in readers}
            for q in questions:
                for mode, reader in readers.items():
                    t = time.perf_counter()
                    hits = reader.search(q["question"], user_id=q["user_id"], limit=limit)["results"]
                    search_ms[mode].append((time.perf_counter() - t) * 1000)
                    found[mode].append([{"memory": h["memory"], "source_message_ids": h["source_message_ids"]}
                                        for h in hits])
        finally:
            producer.close()
            for proc in procs:
                _stop(proc)
            os.environ.clear()
            os.environ.update(saved)
    return {"threads": threads, "processes": 1 + model_workers, "adds": len(requests), "elapsed_s": elapsed_s, "cpu_s": cpu,
            "failed": sum(s.status.value != "succeeded" for s in statuses),
            "errors": dict(Counter(f"{s.status.value}: {s.error_type}" for s in statuses
                                   if s.status.value != "succeeded")),
            "events": dict(events), "memories": memories, "duplicates": duplicates, "found": found,
            "search_ms": search_ms, "llm": llm}


def run_search(sizes: list[int], texts: list[str], users: list[str], queries: list[str], warmup: int,
               limit: int) -> dict[str, Any]:
    """Search latency of ``Memories.search`` over stores of `sizes` synthetic memories, in this process.

    Returns:
        ``{"rows": [{"n", "build_s", "embed_ms": [...], "dense_ms": [...], "hybrid_ms": [...]}]}``.
    """
    from cli.redis_server import RedisServer
    from mem0_runner import INSERT_BATCH, synthetic_vectors
    from memories import Memories
    from memq.config import QdrantSettings, RedisSettings, Settings
    from memq.models import Scope
    from stores.vector_open import close_vector_store
    from stores.vectors import MemoryPoint

    created = datetime(2026, 1, 1, tzinfo=timezone.utc)
    rows = []
    with RedisServer() as redis_server, tempfile.TemporaryDirectory(prefix="memq-vs-mem0-search-") as folder:
        for n in sizes:
            settings = Settings(data_dir=Path(folder) / f"search-{n}", redis=RedisSettings(url=redis_server.url))
            dense_settings = settings.model_copy(update={"qdrant": settings.qdrant.model_copy(update={"hybrid": False})})
            hybrid, dense = Memories(settings, open_embedded=True), Memories(dense_settings, open_embedded=True)
            store = hybrid.vectors
            vectors = synthetic_vectors(n)
            started = time.perf_counter()
            store.ensure_collection()
            for first in range(0, n, INSERT_BATCH):
                store.upsert([MemoryPoint(id=str(uuid.UUID(int=i + 1)), vector=vectors[i].tolist(),
                                          memory=texts[i % len(texts)], scope=Scope(user_id=users[i % len(users)]),
                                          created_at=created, updated_at=None, metadata={}, actor_id=None,
                                          role="user", source_message_ids=[], job_id="bench")
                              for i in range(first, min(n, first + INSERT_BATCH))])
            build_s = time.perf_counter() - started
            took: dict[str, list[float]] = {"embed_ms": [], "dense_ms": [], "hybrid_ms": []}
            for i in range(warmup + len(queries)):
                q, user = queries[i % len(queries)], users[i % len(users)]
                t0 = time.perf_counter()
                hybrid.embedder.embed([q])
                t1 = time.perf_counter()
                dense_hits = dense.search(q, user_id=user, limit=limit)["results"]
                t2 = time.perf_counter()
                hybrid_hits = hybrid.search(q, user_id=user, limit=limit)["results"]
                t3 = time.perf_counter()
                assert len(dense_hits) == len(hybrid_hits) == min(limit, n // len(users)), (len(dense_hits), n)
                if i >= warmup:
                    for name, ms in zip(took, ((t1 - t0) * 1000, (t2 - t1) * 1000, (t3 - t2) * 1000)):
                        took[name].append(ms)
            close_vector_store(store)
            rows.append({"n": n, "build_s": build_s, **took})
    return {"rows": rows}


def self_cpu_s() -> float:
    """This process's user + system CPU seconds so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime
