"""The main job, embedded: a local Redis and worker, a LoCoMo backfill, then search.

Nothing external is needed: Redis runs as a child ``redis-server`` on a free loopback port, the vector
store is Qdrant Edge under the scratch folder, history in SQLite, the model is the offline heuristic
baseline and the embedder all-MiniLM-L6-v2 from its PyPI package. The worker (a child process) owns the
vector store; the searches run in this process while the worker still runs, so they go through it
over Redis, as a web app's would.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from memq.config import Queues, RedisSettings, Settings
from cli.redis_server import RedisServer


def evidence_ids(evidence: list[Any]) -> set[str]:
    """Normalize LoCoMo evidence ids (``"D8:6; D9:17"``, ``"D30:05"``, ``"D:11:26"``) to ``{"D8:6", ...}``."""
    out: set[str] = set()
    for raw in evidence:
        for part in re.split(r"[;\s]+", str(raw)):
            m = re.fullmatch(r"D:?(\d+):0*(\d+)", part.strip())
            if m:
                out.add(f"D{int(m.group(1))}:{int(m.group(2))}")
    return out


def start_demo_worker(settings_env: dict[str, str], workdir: Path) -> subprocess.Popen[bytes]:
    """Start a ``celery worker`` process (2 threads, every queue) with `settings_env` over this
    process's environment; its log goes to ``workdir/worker.log``.

    Returns:
        The worker process (stop it with `stop_demo_worker`).
    """
    log = workdir / "worker.log"
    argv = [sys.executable, "-m", "celery", "-A", "workers.app", "worker", "-P", "threads", "-c", "2",
            "-Q", ",".join(Queues.ALL), "--loglevel", "INFO", "--logfile", str(log), "-n", "memq-demo@%h"]
    return subprocess.Popen(argv, env={**os.environ, **settings_env}, stdout=subprocess.DEVNULL,
                            stderr=open(workdir / "worker.stderr", "wb"))


def stop_demo_worker(proc: subprocess.Popen[bytes], timeout_s: float = 60.0) -> None:
    """Stop a worker warmly (SIGTERM: it finishes its tasks), killing it after `timeout_s` seconds."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_demo(data: Path, conversation: str, questions: int, workdir: Path, console: Console) -> int:
    """Backfill `conversation` of the LoCoMo file `data`, wait for every job, and search its QA questions.

    Args:
        data: ``locomo10.json``.
        conversation: a ``sample_id`` such as ``conv-26``.
        questions: how many QA questions to print with their top results.
        workdir: scratch folder for Redis, Qdrant, SQLite and logs (wiped first).
        console: where to print.

    Returns:
        Exit code: 0 when every job succeeded and memories were written, 1 otherwise.
    """
    from memories import Memories
    from producer import Producer
    from producer.backfill import read_locomo
    from stores.vector_open import close_vector_stores

    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    started = time.monotonic()
    with RedisServer(data_dir=workdir / "redis") as redis_server:
        env = {"MEMQ_REDIS__URL": redis_server.url, "MEMQ_DATA_DIR": str(workdir)}
        settings = Settings(data_dir=workdir, redis=RedisSettings(url=redis_server.url))
        console.print(f"redis-server on {redis_server.url}; data in {workdir}")
        worker = start_demo_worker(env, workdir)
        try:
            items = read_locomo(data, conversations=[conversation])
            producer = Producer(settings)
            t0 = time.monotonic()
            receipts = producer.add_many([i.request for i in items])
            enqueue_ms = (time.monotonic() - t0) * 1000
            console.print(f"enqueued {len(receipts)} sessions of {conversation} in {enqueue_ms:.1f} ms "
                          "(one round trip)")
            with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                          console=console) as progress:
                task = progress.add_task("jobs done", total=len(receipts))

                def on_progress(done: int, total: int) -> None:
                    progress.update(task, completed=done)
                    if worker.poll() is not None:
                        raise RuntimeError(f"the worker exited ({worker.returncode}); see {workdir}/worker.log")

                statuses = producer.wait(receipts, timeout_s=1800, on_progress=on_progress)
            backfill_s = time.monotonic() - t0
            events: dict[str, int] = {}
            for s in statuses:
                for k, v in s.counts.items():
                    events[k] = events.get(k, 0) + v
            images: dict[str, int] = {"supplied": 0, "model": 0, "cached": 0, "dropped": 0}
            for s in statuses:
                for k, v in s.images.items():
                    images[k] = images.get(k, 0) + v
            ok = sum(s.status.value == "succeeded" for s in statuses)
            console.print(f"jobs: {ok}/{len(statuses)} succeeded in {backfill_s:.1f} s; events: {events}")
            console.print(f"images: {sum(images.values())} described in text: {images['supplied']} by the caption "
                          f"sent with them, {images['model']} by the vision model, {images['cached']} from the "
                          f"caption cache; {images['dropped']} dropped"
                          + ("" if settings.vision.model else " (no vision model: MEMQ_VISION__MODEL unset)"))
            for s in statuses:
                if s.status.value != "succeeded":
                    console.print(f"[red]{s.job_id}: {s.status.value} {s.error_type}: {s.error}[/]")

            searcher = Memories(settings)
            user_id = items[0].request["user_id"]
            memories = searcher.vectors.count()
            qa = questions_of(data, conversation)
            hits, latencies, embed_ms = 0, [], []
            shown: list[tuple[dict[str, Any], list[dict[str, Any]], bool]] = []
            searcher.search("warm-up", user_id=user_id, limit=10)
            for q in qa:
                t = time.perf_counter()
                found = searcher.search(q["question"], user_id=user_id, limit=10)["results"]
                latencies.append((time.perf_counter() - t) * 1000)
                t = time.perf_counter()
                searcher.embedder.embed([q["question"]])
                embed_ms.append((time.perf_counter() - t) * 1000)
                gold = evidence_ids(q.get("evidence", []))
                hit = any(gold & set(r["source_message_ids"]) for r in found)
                hits += hit
                if len(shown) < questions:
                    shown.append((q, found[:3], hit))
        finally:
            stop_demo_worker(worker)
        for q, top, hit in shown:
            table = Table(title=f"Q: {q['question']}  (answer: {q.get('answer')}; evidence {q.get('evidence')})",
                          title_justify="left", show_lines=False)
            table.add_column("score", justify="right")
            table.add_column("memory")
            table.add_column("from")
            for r in top:
                table.add_row(f"{r['score']:.3f}", r["memory"], ",".join(r["source_message_ids"]))
            console.print(table)
        p50 = statistics.median(latencies)
        p95 = sorted(latencies)[int(0.95 * (len(latencies) - 1))]
        summary = {
            "conversation": conversation, "jobs": len(statuses), "succeeded": ok, "events": events,
            "memories": memories, "images": images, "caption_cache_hits": images["cached"],
            "image_warnings": sum(len(s.warnings) for s in statuses), "backfill_wall_s": round(backfill_s, 1),
            "total_wall_s": round(time.monotonic() - started, 1),
            "qa_questions": len(qa), "evidence_recall_at_10": round(hits / max(1, len(qa)), 3),
            "search_ms_p50": round(p50, 1), "search_ms_p95": round(p95, 1),
            "embed_only_ms_p50": round(statistics.median(embed_ms), 1),
        }
        console.print_json(json.dumps(summary))
        (workdir / "summary.json").write_text(json.dumps(summary, indent=1))
        close_vector_stores()
        return 0 if ok == len(statuses) and memories > 0 else 1


def questions_of(data: Path, conversation: str) -> list[dict[str, Any]]:
    """QA items of categories 1-4 (answerable) with evidence, in file order."""
    sample = next(s for s in json.loads(data.read_text()) if s.get("sample_id") == conversation)
    return [q for q in sample["qa"] if q.get("category") in (1, 2, 3, 4) and evidence_ids(q.get("evidence", []))]
