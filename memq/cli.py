"""The ``memq`` command line: worker, backfill, search, status, history, demo.

Commands import the layers they need when they run, so ``memq --help`` stays fast and light.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from memq.config import Queues, load_settings
from memq.errors import MemqError

app = typer.Typer(help="memq: long-term memory for AI assistants, as a Celery pipeline.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
console = Console()


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console)


@app.command()
def worker(
    queues: Annotated[str, typer.Option(help="Comma-separated queues to consume.")] = ",".join(Queues.ALL),
    concurrency: Annotated[int, typer.Option(help="Worker threads or processes.")] = 2,
    pool: Annotated[str, typer.Option(help="threads, solo or prefork (prefork needs a Qdrant server).")] = "threads",
    loglevel: Annotated[str, typer.Option(help="Celery log level.")] = "INFO",
) -> None:
    """Start a Celery worker for the pipeline (replaces this process).

    In embedded mode (no MEMQ_QDRANT__URL) the worker process owns the local Qdrant folder, so it runs
    one process with a thread pool.
    """
    settings = load_settings()
    if settings.embedded_qdrant and pool == "prefork" and concurrency != 1:
        console.print("[red]prefork with more than one child needs a Qdrant server (MEMQ_QDRANT__URL): "
                      "local mode allows one process per folder.[/]")
        raise typer.Exit(2)
    argv = [sys.executable, "-m", "celery", "-A", "workers.app", "worker", "-Q", queues, "-P", pool,
            "-c", str(concurrency), "--loglevel", loglevel, "-E"]
    os.execv(sys.executable, argv)


@app.command()
def backfill(
    path: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="LoCoMo JSON or JSONL chat log.")],
    fmt: Annotated[str, typer.Option("--format", help="auto, locomo or jsonl.")] = "auto",
    conversation: Annotated[list[str] | None, typer.Option(help="Only these conversations (repeatable).")] = None,
    source_id: Annotated[str | None, typer.Option(help="Idempotency source (default: the file name).")] = None,
    wait: Annotated[bool, typer.Option("--wait/--no-wait", help="Follow the jobs to the end.")] = False,
    timeout_s: Annotated[float, typer.Option("--timeout", help="Seconds to wait with --wait.")] = 3600.0,
    batch: Annotated[int, typer.Option(help="Requests per add_many round trip.")] = 100,
) -> None:
    """Enqueue a chat log, one add per session in chronological order; re-runs enqueue nothing twice.

    Sessions whose job already succeeded (per the SQL job records, which survive a Redis restart) are
    skipped, so a re-run after a crash resumes where the backfill stopped.
    """
    from producer import Producer
    from producer.backfill import read_backfill
    from producer.validate import job_id_for_key
    from stores.history import sql_engine
    from stores.records import RecordStore

    try:
        items = read_backfill(path, fmt=fmt, conversations=conversation, source=source_id)
        settings = load_settings()
        assert settings.history.url is not None
        done = RecordStore(sql_engine(settings.history.url)).states(
            [job_id_for_key(i.request["idempotency_key"]) for i in items])
        todo = [i for i in items if done.get(job_id_for_key(i.request["idempotency_key"])) != "succeeded"]
        producer = Producer(settings)
        receipts = []
        with _progress() as progress:
            task = progress.add_task("enqueue", total=len(todo))
            for i in range(0, len(todo), batch):
                chunk = todo[i:i + batch]
                receipts += producer.add_many([item.request for item in chunk])
                progress.advance(task, len(chunk))
        fresh = sum(not r.duplicate for r in receipts)
        console.print(f"{len(items)} sessions: {len(items) - len(todo)} done before, {fresh} enqueued, "
                      f"{len(receipts) - fresh} already enqueued before")
        if wait and receipts:
            _follow(producer, [r.job_id for r in receipts], timeout_s)
    except MemqError as exc:
        console.print(f"[red]{type(exc).__name__}: {exc}[/]")
        raise typer.Exit(1) from exc


def _follow(producer: object, job_ids: list[str], timeout_s: float) -> None:
    from producer import Producer

    assert isinstance(producer, Producer)
    with _progress() as progress:
        task = progress.add_task("jobs done", total=len(job_ids))
        statuses = producer.wait(job_ids, timeout_s=timeout_s,
                                 on_progress=lambda done, total: progress.update(task, completed=done))
    by_state: dict[str, int] = {}
    events: dict[str, int] = {}
    for s in statuses:
        by_state[s.status.value] = by_state.get(s.status.value, 0) + 1
        for event, n in s.counts.items():
            events[event] = events.get(event, 0) + n
    console.print("jobs: " + ", ".join(f"{k} {v}" for k, v in sorted(by_state.items())))
    console.print("events: " + ", ".join(f"{k} {v}" for k, v in events.items()))
    failed = [s for s in statuses if s.status.value == "failed"]
    for s in failed[:10]:
        console.print(f"[red]failed {s.job_id}: {s.error_type}: {s.error}[/]")
    if failed or by_state.get("succeeded", 0) != len(job_ids):
        raise typer.Exit(1)


@app.command()
def search(
    query: Annotated[str, typer.Argument(help="What to look for.")],
    user_id: Annotated[str | None, typer.Option(help="Scope: user id.")] = None,
    agent_id: Annotated[str | None, typer.Option(help="Scope: agent id.")] = None,
    run_id: Annotated[str | None, typer.Option(help="Scope: run id.")] = None,
    limit: Annotated[int, typer.Option(help="At most this many results.")] = 10,
    as_json: Annotated[bool, typer.Option("--json", help="Print Mem0's JSON shape.")] = False,
) -> None:
    """Search memories of a scope by meaning (in embedded mode, while no worker runs)."""
    from pipeline.search import MemorySearch
    from stores.qdrant import close_vector_stores

    try:
        found = MemorySearch.from_settings().search(query, user_id=user_id, agent_id=agent_id, run_id=run_id,
                                                    limit=limit)
    except MemqError as exc:
        console.print(f"[red]{type(exc).__name__}: {exc}[/]")
        raise typer.Exit(1) from exc
    finally:
        close_vector_stores()
    if as_json:
        print(json.dumps(found, indent=1))
        return
    for hit in found["results"]:
        console.print(f"{hit['score']:.3f}  {hit['memory']}  [dim]{','.join(hit['source_message_ids'])}[/]")


@app.command()
def status(job_id: Annotated[str, typer.Argument(help="The job id from add's receipt.")]) -> None:
    """Print a job's status and events as JSON."""
    from producer import Producer

    try:
        print(Producer().status(job_id).model_dump_json(indent=1))
    except MemqError as exc:
        console.print(f"[red]{type(exc).__name__}: {exc!s}[/]")
        raise typer.Exit(1) from exc


@app.command()
def history(memory_id: Annotated[str, typer.Argument(help="A memory id.")]) -> None:
    """Print a memory's history rows as JSON."""
    from pipeline.search import MemorySearch
    from stores.qdrant import close_vector_stores

    try:
        print(json.dumps(MemorySearch.from_settings().history(memory_id), indent=1))
    finally:
        close_vector_stores()


dlq = typer.Typer(help="Dead letters: jobs that failed for good, kept for replay.", no_args_is_help=True)
app.add_typer(dlq, name="dlq")


def _dead_letter_stores() -> tuple[object, object]:
    from memq.errors import StoreUnavailable
    from memq.jobstore import JobStore
    from stores.history import sql_engine
    from stores.records import RecordStore

    settings = load_settings()
    assert settings.history.url is not None
    jobs = JobStore.from_url(settings.redis.url, ttl_s=settings.jobs.ttl_s, unavailable=StoreUnavailable)
    return RecordStore(sql_engine(settings.history.url)), jobs


@dlq.command("list")
def dlq_list(as_json: Annotated[bool, typer.Option("--json", help="Print JSON lines.")] = False) -> None:
    """List dead letters: job, stage, error, attempts, time."""
    from stores.records import RecordStore

    records, _ = _dead_letter_stores()
    assert isinstance(records, RecordStore)
    for letter in records.dead_letters():
        row = {"job_id": letter.job_id, "stage": letter.stage, "error_type": letter.error_type,
               "error": letter.error, "attempts": letter.attempts, "failed_at": letter.failed_at.isoformat()}
        if as_json:
            print(json.dumps(row))
        else:
            console.print(f"{letter.job_id}  {letter.stage}  {letter.error_type}: {letter.error}  "
                          f"(attempts {letter.attempts}, {row['failed_at']})")


@dlq.command("replay")
def dlq_replay(
    job_id: Annotated[str | None, typer.Argument(help="The job to run again.")] = None,
    replay_all: Annotated[bool, typer.Option("--all", help="Replay every dead letter.")] = False,
) -> None:
    """Run dead-lettered jobs again (one, or --all)."""
    from memq.jobstore import JobStore
    from pipeline.manage import replay_dead_letters
    from stores.records import RecordStore

    if (job_id is None) == (not replay_all):
        console.print("[red]give a JOB_ID or --all[/]")
        raise typer.Exit(2)
    records, jobs = _dead_letter_stores()
    assert isinstance(records, RecordStore) and isinstance(jobs, JobStore)
    try:
        replayed = replay_dead_letters(records, jobs, None if replay_all else [str(job_id)])
    except MemqError as exc:
        console.print(f"[red]{type(exc).__name__}: {exc!s}[/]")
        raise typer.Exit(1) from exc
    console.print(f"replayed {len(replayed)} jobs")


@app.command()
def demo(
    data: Annotated[Path, typer.Option(help="LoCoMo file.")] = Path("../shared/data/locomo10.json"),
    conversation: Annotated[str, typer.Option(help="LoCoMo conversation to backfill.")] = "conv-26",
    questions: Annotated[int, typer.Option(help="QA questions to show.")] = 5,
    workdir: Annotated[Path, typer.Option(help="Scratch folder (wiped first).")] = Path(".memq/demo"),
) -> None:
    """The main job, embedded: local Redis + worker, backfill a LoCoMo conversation, wait, search."""
    from memq.demo import run_demo

    raise typer.Exit(run_demo(data, conversation, questions, workdir, console))


def main() -> None:
    """Entry point of the ``memq`` script."""
    app()


if __name__ == "__main__":
    main()
