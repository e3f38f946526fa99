"""Operators' commands: ``memq jobs`` (list, end, restart), ``memq dlq`` (dead letters), ``memq poison``
(malformed broker messages moved aside), ``memq migrate-scope-keys`` and ``memq migrate-store``. They take job ids
without a scope: they are not for tenants."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

from memq.config import load_settings
from memq.errors import MemqError

if TYPE_CHECKING:
    from jobs.ledger import JobLedger

console = Console()
dlq = typer.Typer(help="Dead letters: jobs that failed for good, kept for replay.", no_args_is_help=True)
jobs = typer.Typer(help="Jobs by state and age; end or restart a stuck one.", no_args_is_help=True)


def _ledger() -> JobLedger:
    """A ledger on the configured Redis and SQL database (no model, no vector store)."""
    from jobs.ledger import JobLedger

    return JobLedger.open(load_settings())


def _fail(exc: MemqError) -> typer.Exit:
    console.print(f"[red]{type(exc).__name__}: {exc!s}[/]")
    return typer.Exit(1)


@dlq.command("list")
def dlq_list(as_json: Annotated[bool, typer.Option("--json", help="Print JSON lines.")] = False) -> None:
    """List dead letters: job, stage, error, attempts, time."""
    for letter in _ledger().records.dead_letters():
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
    from jobs.admin import replay_dead_letters

    if (job_id is None) == (not replay_all):
        console.print("[red]give a JOB_ID or --all[/]")
        raise typer.Exit(2)
    try:
        replayed = replay_dead_letters(_ledger(), None if replay_all else [str(job_id)])
    except MemqError as exc:
        raise _fail(exc) from exc
    console.print(f"replayed {len(replayed)} jobs")


UNFINISHED = ["queued", "running", "partial"]


@jobs.command("list")
def jobs_list(
    state: Annotated[list[str] | None, typer.Option(help="Only this state (repeatable): queued, running, "
                                                       "partial, succeeded, failed. Default: the unfinished ones.")] = None,
    every: Annotated[bool, typer.Option("--all", help="Every state, finished jobs included.")] = False,
    limit: Annotated[int, typer.Option(help="At most this many jobs.")] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON lines.")] = False,
) -> None:
    """Jobs by state and age, the longest idle first (from SQL, and Redis for live jobs)."""
    from jobs.admin import list_jobs

    try:
        rows = list_jobs(_ledger(), states=None if every else (state or UNFINISHED), limit=limit)
    except MemqError as exc:
        raise _fail(exc) from exc
    for r in rows:
        if as_json:
            print(json.dumps(r.__dict__))
        else:
            console.print(f"{r.job_id}  {r.status:<9} {r.stage or '-':<16} age {r.age_s:7.0f} s  idle {r.idle_s:7.0f} s"
                          + (f"  {r.error_type}" if r.error_type else "") + (f"  [dim]{r.waiting}[/]" if r.waiting else ""))


@jobs.command("fail")
def jobs_fail(job_id: Annotated[str, typer.Argument(help="The job to end.")]) -> None:
    """End a stuck job as failed (kept as a dead letter); its scope moves on."""
    from jobs.admin import end_job

    try:
        outcome = end_job(_ledger(), job_id)
    except MemqError as exc:
        raise _fail(exc) from exc
    console.print(f"job {job_id}: " + ("failed" if outcome == "ok" else f"unchanged ({outcome})"))


@jobs.command("retry")
def jobs_retry(job_id: Annotated[str, typer.Argument(help="The job to run again.")]) -> None:
    """Run a job again from its start, at the end of its scope's order; its scope moves on."""
    from jobs.admin import restart_job

    try:
        restart_job(_ledger(), job_id)
    except MemqError as exc:
        raise _fail(exc) from exc
    console.print(f"job {job_id}: queued again")


def migrate_scope_keys() -> None:
    """Re-key the graph's entities and relations written before scope keys became injective (run once,
    with workers stopped, after upgrading from a memq whose scope keys looked like ``u=a|a=|r=``)."""
    from stores.graph import open_graph_store

    graph = open_graph_store(load_settings(), role="reader", own_if_free=True)
    if graph is None:
        console.print("graph memory is off (no MEMQ_NEO4J__URI): nothing to migrate")
        return
    try:
        moved = graph.migrate_scope_keys()
    except MemqError as exc:
        raise _fail(exc) from exc
    finally:
        graph.close()
    console.print(f"re-keyed {moved} entities")


def migrate_store(
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Check and print what would be copied; change nothing.")]
    = False,
) -> None:
    """Copy the vector store of a memq before the Edge store (qdrant-client local mode in MEMQ_QDRANT__PATH)
    into the embedded Edge store; the old files move to a backup folder beside it (run once, workers stopped)."""
    from stores.edge import is_local_mode_folder

    settings = load_settings()
    root = settings.qdrant.path
    if settings.qdrant.url is not None or root is None:
        console.print("the vector store is a Qdrant server (MEMQ_QDRANT__URL): nothing to migrate")
        return
    if not is_local_mode_folder(root):
        console.print(f"{root} holds no vector store of an older memq (qdrant-client local mode): nothing to "
                      "migrate", soft_wrap=True)
        return
    from stores.migrate import default_backup, inspect_local_mode, migrate_local_mode

    dims = settings.embedder.dims
    try:
        if dry_run:
            found = inspect_local_mode(root, dims)
            for c in found:
                console.print(f"would copy collection {c.name!r}: {c.points} points of size {c.dims} into "
                              f"{root / c.name}", soft_wrap=True)
            console.print(f"would move the old files to {default_backup(root)}", soft_wrap=True)
            return
        report = migrate_local_mode(root, dims)
    except MemqError as exc:
        raise _fail(exc) from exc
    for name in report.collections:
        console.print(f"collection {name!r}: {report.points[name]} points copied into {root / name}", soft_wrap=True)
    console.print(f"old files kept in {report.backup} (delete it once memq runs on the new store)", soft_wrap=True)


poison = typer.Typer(help="Poison messages: broker messages no worker could run, moved aside.", no_args_is_help=True)


@poison.command("list")
def poison_list(
    limit: Annotated[int, typer.Option(help="At most this many messages.")] = 20,
    show: Annotated[bool, typer.Option("--show", help="Print their raw bytes (may hold user data).")] = False,
) -> None:
    """How many messages were moved aside, and the newest of them (sizes, or the bytes with --show)."""
    from broker.poison import poison_count, poison_messages

    client = _ledger().jobs.client
    console.print(f"{poison_count(client)} poison messages moved aside ever")
    for raw in poison_messages(client, limit):
        print(raw.decode(errors="replace") if show else f"{len(raw)} bytes")
