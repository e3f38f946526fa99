"""Graph memory benchmark: LoCoMo conversations through the pipeline with graph memory on (offline model).

Starts a local redis-server, Neo4j (test harness) and an in-process Celery worker (threads), warms Neo4j
up (`_warm_up`: the harness is a cold JVM, a production server is not) and the worker (5 sessions of
another conversation, untimed: its embedding processes load the model then), backfills three conversations one
after another (19 sessions each, each its own user: 57 jobs, so the p50s rest on three times the jobs
one conversation gives) and reports, per add: model calls (target <= 2; Mem0 1.0.x: 5), prompt tokens,
and the graph write time next to the vector write time of the same jobs, with a 95% bootstrap interval
of their ratio and the ratio of each conversation. Each job's two writes are then replayed one at a time
(``replay_*``), and again beside a thread running Python all along (``busy_*``): in the worker another
stage's thread does that, and the write waits for the GIL after each socket call.

    .venv/bin/python bench/graph_backfill.py [--conversations conv-26,conv-30,conv-41] [--sessions 19]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: the test rigs live in tests/rigs

import argparse
import json
import math
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path


def _warm_up(c: object, server_pid: int | None, *, block: int = 500, least: int = 2000,
             most: int = 8000) -> dict[str, float | None]:
    """Run graph writes in throwaway scopes until the Neo4j server's CPU per write stops falling, then
    forget the scopes: the test-harness Neo4j is a fresh JVM whose queries are first interpreted, then
    compiled, while a production server is warm (and Qdrant Edge has no JIT).

    Measured here in a process of its own (11 entities and 3 relations per write, none deleted or
    invalidated): the JVM used 25 ms of CPU per write over the first 500 writes, 10 ms at 1,000, 5-6 ms at
    2,500 and 2.6-2.9 ms from 4,000 on (this warm-up's writes, half of them invalidating a relation and
    forgetting a memory, end at 3-6 ms), while the write's own
    wall time looked settled (4-6 ms) from about 1,000 on; a warm-up that stopped when the wall time
    settled left the JIT compiling during the pipeline, on the same two cores as the worker. Writes run
    in blocks of `block`; after `least` writes, warm-up ends when the lower of the last two blocks' server
    CPU per write is not 10% below the lowest of the blocks before them (at most `most` writes). Without
    the server's CPU (no pid, not Linux) the blocks' median wall times stand in for it. Each write has
    the shape of a job's: names the scope knows and new ones (all with their embeddings), relations, and
    every other write a contradicted relation and a deleted memory, so every path of the query is
    compiled.

    Args:
        c: the worker's clients (graph store, embedder).
        server_pid: the Neo4j server's process id (the JVM's), or None.

    Returns:
        ``warm_up_writes``, ``warm_up_last_block_ms_p50`` (the last block's write time, ms) and
        ``warm_up_server_cpu_ms_per_write`` (the server's CPU per write over the last block, ms; None
        without the server's CPU).
    """
    import uuid
    from datetime import datetime, timezone

    from memq.models import Relation, Scope
    from stores.graph import EntityWrite, GraphWrite, entity_key
    from vs_mem0_memq import proc_cpu_s  # bench/: the /proc reading the throughput runs use

    graph, embedder = c.graph, c.embedder  # type: ignore[attr-defined]
    known = ["Ana", "Ben", "Lisbon", "Porto"]
    fresh = ["the lake", "a bakery", "chess club", "the marathon", "a red kite", "grandma's recipe", "Sweden"]
    vectors = embedder.embed(known + fresh)
    scope = Scope(user_id=f"bench-warm-up-{uuid.uuid4().hex[:8]}")
    previous: list[Relation] = []
    scoped = 20  # writes per throwaway scope: forgetting looks through every relation of the scope
    times: list[float] = []
    costs: list[float] = []  # per block: the server's CPU per write (ms), else the block's median wall (ms)
    measured = server_pid is not None and Path(f"/proc/{server_pid}/stat").exists()
    cpu_before = proc_cpu_s(server_pid) if server_pid is not None and measured else 0.0
    for i in range(most):
        names = known + [f"{n} {i}" for n in fresh]
        # every name carries its embedding: forgetting deletes entities left bare, and a known name the
        # write had to embed again would time the embedder, not Neo4j
        entities = [EntityWrite(key=entity_key(n), name=n, entity_type="thing", embedding=v)
                    for n, v in zip(names, vectors)]
        relations = [Relation(rid=str(uuid.uuid4()), source=entity_key(names[j]), relationship=("KNOWS", "VISITS", "MAKES")[j],
                              destination=entity_key(names[j + 4]), memory_ids=[str(uuid.uuid4())]) for j in range(3)]
        odd = i % 2 == 1 and previous
        change = GraphWrite(job_id=str(uuid.uuid4()), scope=scope, when=datetime.now(timezone.utc),
                            entities=entities, relations=relations,
                            invalidated=[previous[0]] if odd else (),
                            deleted_memory_ids=list(previous[1].memory_ids) if odd else ())
        started = time.perf_counter()
        graph.write(change, embed=embedder.embed)
        times.append((time.perf_counter() - started) * 1000)
        previous = relations
        if (i + 1) % scoped == 0:
            graph.delete_scope(scope)
            scope, previous = Scope(user_id=f"bench-warm-up-{uuid.uuid4().hex[:8]}"), []
        if len(times) % block == 0:
            if measured:
                cpu_now = proc_cpu_s(server_pid or 0)
                costs.append((cpu_now - cpu_before) * 1000 / block)
                cpu_before = cpu_now
            else:
                costs.append(statistics.median(times[-block:]))
            if len(times) >= least and len(costs) >= 3 and min(costs[-2:]) > 0.9 * min(costs[:-2]):
                break
    graph.delete_scope(scope)
    return {"warm_up_writes": len(times), "warm_up_last_block_ms_p50": round(statistics.median(times[-block:]), 2),
            "warm_up_server_cpu_ms_per_write": round(costs[-1], 2) if costs and measured else None}


def _spin(stop: threading.Event) -> None:
    """Run Python bytecode until `stop` is set: a stand-in for another stage's Python work in the worker."""
    x = 0
    while not stop.is_set():
        for k in range(1000):
            x ^= k * k


def _replay(c: object, job_ids: list[str], folder: Path, *, rounds: int = 5, busy: bool = False) -> dict[str, float]:
    """Each job's two writes again, one at a time with nothing else running: the vector write (memories
    into a fresh Edge store, entity-name points into the real collection under a fresh scope), the graph
    write into a fresh scope of the same Neo4j (so both start from what the job found), in alternating
    order; `rounds` times over the jobs, each round in new scopes and a new store (a p50 of 19 writes
    moved by a millisecond from one run to the next). In the pipeline the two writes are queued at once
    beside other jobs' stages, in threads of one process, so there a write's time includes waits for the
    GIL that the other threads hold; this is the cost of each write itself.

    With `busy`, one more thread of this process runs Python bytecode all along (`_spin`), as another
    stage's thread does in the worker: a write then waits for the interpreter's lock (the GIL) each
    time it takes it back after a socket call, up to the switch interval (5 ms) each time.

    Returns:
        ``replay_graph_write_ms_p50``, ``replay_vector_write_ms_p50`` (ms) and their ratio.
    """
    from memq.models import Scope
    from pipeline.apply import write_graph, write_vectors
    from pipeline.types import Plan
    from stores.edge import open_edge

    graph_ms: list[float] = []
    vector_ms: list[float] = []
    stop = threading.Event()
    spinner = threading.Thread(target=_spin, args=(stop,), daemon=True)
    if busy:
        spinner.start()
    for n in range(rounds):
        vectors = open_edge(folder / f"round-{n}", "replay", 384)
        scope = Scope(user_id=f"bench-replay-{time.time_ns()}")
        try:
            for i, job_id in enumerate(job_ids):
                job = c.ledger.job(job_id).model_copy(update={"scope": scope})  # type: ignore[attr-defined]
                plan = c.ledger.output(job_id, "decide", Plan)  # type: ignore[attr-defined]
                for name in ("graph", "vector") if i % 2 else ("vector", "graph"):
                    started = time.perf_counter()
                    if name == "graph":
                        write_graph(job, plan, c.graph)  # type: ignore[attr-defined]
                    else:
                        write_vectors(job, plan, vectors, c.graph, c.embedder)  # type: ignore[attr-defined]
                    (graph_ms if name == "graph" else vector_ms).append((time.perf_counter() - started) * 1000)
        finally:
            c.graph.delete_scope(scope)  # type: ignore[attr-defined]
            vectors.close()
    stop.set()
    if busy:
        spinner.join()
    return {"replay_graph_write_ms_p50": round(statistics.median(graph_ms), 1),
            "replay_vector_write_ms_p50": round(statistics.median(vector_ms), 1),
            "replay_graph_vs_vector_write": round(statistics.median(graph_ms) / statistics.median(vector_ms), 2),
            "replay_writes": len(graph_ms)}


def _ratio_interval(graph_ms: list[float], vector_ms: list[float], groups: list[list[int]], *,
                    resamples: int = 2000, seed: int = 7) -> tuple[float, float]:
    """95% interval of p50(graph) / p50(vector) by a two-stage bootstrap: the conversations (`groups`,
    the indices of their jobs) resampled with replacement, then the jobs within each (each job keeps its
    two writes); `resamples` times, with a fixed seed so a rerun on the same figures prints the same. The
    conversations ran in their own windows of time, so their jobs are not independent samples: resampling
    the jobs alone gave a narrower interval (1.14-1.57x on the page of a9965f7, whose conversations
    alone were 1.19-1.60x). With three conversations and both stages resampled the interval errs wide
    (on made-up independent samples: 1.20-1.83x against 1.38-1.67x resampling the jobs alone), the side
    to err on for a pass/fail figure. Idea: the two-stage (cluster) bootstrap of Davison & Hinkley,
    Bootstrap Methods and their Application (1997), section 3.8.

    Returns:
        The 2.5th and 97.5th percentiles of the resampled ratios.
    """
    import random

    rng = random.Random(seed)
    ratios = []
    for _ in range(resamples):
        pick = [j for g in (rng.choice(groups) for _ in groups) for j in (rng.choice(g) for _ in g)]
        ratios.append(statistics.median(graph_ms[j] for j in pick) / statistics.median(vector_ms[j] for j in pick))
    ratios.sort()
    return round(ratios[int(0.025 * resamples)], 2), round(ratios[math.ceil(0.975 * resamples) - 1], 2)


def main() -> None:
    """Run the backfill and print one JSON object of figures."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/locomo10.json")
    parser.add_argument("--conversations", default="conv-26,conv-30,conv-41",
                        help="LoCoMo conversations, backfilled one after another (each its own user)")
    parser.add_argument("--sessions", type=int, default=19, help="first sessions of each conversation (>= 1)")
    parser.add_argument("--warm-up-conversation", default="conv-42",
                        help="5 sessions of it run first, untimed, under another user")
    args = parser.parse_args()
    conversations = [name.strip() for name in args.conversations.split(",") if name.strip()]
    if not conversations or args.sessions < 1:
        parser.error("give at least one conversation and --sessions >= 1")

    from tests.rigs.neo4j_server import Neo4jServer
    from cli.redis_server import RedisServer

    with RedisServer() as redis_server, Neo4jServer(password="bench-password") as neo4j_server, \
            tempfile.TemporaryDirectory() as data_dir:
        os.environ.update({"MEMQ_REDIS__URL": redis_server.url, "MEMQ_DATA_DIR": data_dir,
                           "MEMQ_NEO4J__URI": neo4j_server.uri, "MEMQ_NEO4J__PASSWORD": neo4j_server.password})
        from celery.contrib.testing.worker import start_worker

        from memq.config import load_settings
        from pipeline.types import ExtractedFacts, Plan, WriteResult
        from producer import Producer
        from producer.backfill import read_locomo
        from workers.app import app, clients

        settings = load_settings()
        c = clients()
        warm = _warm_up(c, neo4j_server.pid)
        receipts, statuses, wall_s, users = [], [], 0.0, []
        with start_worker(app, pool="threads", concurrency=2, perform_ping_check=False, loglevel="WARNING"):
            producer = Producer(settings)
            # untimed: a few sessions of another conversation under a throwaway user, so the worker has
            # started its embedding processes (model loads on two cores) and run every stage once before
            # the measured jobs; its jobs are not counted
            warm_items = read_locomo(args.data, conversations=[args.warm_up_conversation])[:5]
            warmed = producer.wait(producer.add_many([{**i.request, "user_id": "bench-warm-up-pipeline"}
                                                      for i in warm_items]), timeout_s=1800)
            if any(s.status.value != "succeeded" for s in warmed):
                raise SystemExit(f"the worker's warm-up jobs did not all succeed: {[s.status.value for s in warmed]}")
            for name in conversations:  # one at a time: the writes meet the same traffic as with one
                items = read_locomo(args.data, conversations=[name])[: args.sessions]
                users.append(items[0].request["user_id"])
                started = time.monotonic()
                done = producer.add_many([i.request for i in items])
                statuses += producer.wait(done, timeout_s=1800)
                wall_s += time.monotonic() - started
                receipts.append(done)
        calls, tokens, graph_ms, vector_ms = [], [], [], []
        groups: list[list[int]] = []  # per conversation: the indices of its jobs with both writes landed
        job_ids: list[str] = []
        for done in receipts:
            groups.append([])
            for r in done:
                extracted = c.ledger.output(r.job_id, "extract", ExtractedFacts)
                plan = c.ledger.output(r.job_id, "decide", Plan)
                graph = c.ledger.output(r.job_id, "write_graph", WriteResult)
                vectors = c.ledger.output(r.job_id, "write_vectors", WriteResult)
                if not (extracted and plan and graph and vectors):  # a failed job: counted in "succeeded"
                    continue
                groups[-1].append(len(job_ids))
                job_ids.append(r.job_id)
                calls.append(extracted.usage.calls + plan.usage.calls)
                tokens.append(extracted.usage.prompt_tokens + plan.usage.prompt_tokens)
                graph_ms.append(graph.duration_ms)
                vector_ms.append(vectors.duration_ms)
        groups = [g for g in groups if g]
        if not job_ids:
            raise SystemExit(f"no job landed both writes: {[s.status.value for s in statuses]}")
        per_conversation = [round(statistics.median(graph_ms[j] for j in g) / statistics.median(vector_ms[j] for j in g), 2)
                            for g in groups]
        replay = _replay(c, job_ids, Path(data_dir) / "replay", rounds=2)
        busy = {k.replace("replay_", "busy_"): v for k, v in _replay(
            c, job_ids, Path(data_dir) / "busy", rounds=1, busy=True).items()}
        from memq.models import Scope

        graph_store = c.graph
        assert graph_store is not None
        print(json.dumps({
            "conversation": ", ".join(conversations), "adds": sum(len(done) for done in receipts),
            "worker_warm_up_sessions": len(warm_items), "writes_measured": len(job_ids),
            "succeeded": sum(s.status.value == "succeeded" for s in statuses), "wall_s": round(wall_s, 1),
            "llm_calls_per_add_max": max(calls), "llm_calls_per_add_mean": round(statistics.mean(calls), 2),
            "llm_calls_per_add_vs_mem0_5": round(statistics.mean(calls) / 5, 2),
            "prompt_tokens_per_add_mean": round(statistics.mean(tokens)),
            "graph_write_ms_p50": round(statistics.median(graph_ms), 1), "graph_write_ms_max": round(max(graph_ms), 1),
            "vector_write_ms_p50": round(statistics.median(vector_ms), 1),
            "graph_vs_vector_write": round(statistics.median(graph_ms) / statistics.median(vector_ms), 2),
            "graph_vs_vector_write_95": _ratio_interval(graph_ms, vector_ms, groups),
            "graph_vs_vector_write_per_conversation": per_conversation,
            **replay, **busy, **warm,
            "entities": sum(len(graph_store.entities(Scope(user_id=u))) for u in users),
            "valid_relations": sum(len(graph_store.all_relations(Scope(user_id=u))) for u in users),
            "all_relations": sum(len(graph_store.all_relations(Scope(user_id=u), include_invalid=True)) for u in users),
        }))


if __name__ == "__main__":
    main()
