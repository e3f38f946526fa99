"""The ``memq`` command line: worker, backfill, add, update, delete, delete-all (writes are jobs, run by a
worker), search, get, get-all, status, history, demo (operators' commands
``jobs``, ``dlq``, ``migrate-scope-keys`` and ``migrate-store`` are in `cli.ops`).

Commands import the layers they need when they run, so ``memq --help`` stays fast and light.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, TypeVar

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from cli import health, ops
from memq.config import Queues, load_settings
from memq.errors import InvalidSettings, MemqError
from memq.models import Receipt

if TYPE_CHECKING:
    from memories import Memories, Memory
    from producer import Producer

T = TypeVar("T")

app = typer.Typer(help="memq: long-term memory for AI assistants, as a Celery pipeline.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
console = Console()
err_console = Console(stderr=True)
app.add_typer(ops.dlq, name="dlq")
app.add_typer(ops.jobs, name="jobs")
app.add_typer(ops.poison, name="poison")
app.command(name="migrate-scope-keys")(ops.migrate_scope_keys)
app.command(name="doctor")(health.doctor)
app.command(name="stats")(health.stats)
app.command(name="migrate-store")(ops.migrate_store)


def _progress(out: Console = console, *, disable: bool = False) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=out, disable=disable)


@app.command()
def worker(
    queues: Annotated[str, typer.Option(help="Comma-separated queues to consume.")] = ",".join(Queues.ALL),
    concurrency: Annotated[int, typer.Option(help="Worker threads or processes.")] = 2,
    pool: Annotated[str, typer.Option(help="threads, solo or prefork (prefork needs a Qdrant server, or queues "
                                               "without memq.write).")] = "threads",
    loglevel: Annotated[str, typer.Option(help="Celery log level.")] = "INFO",
    name: Annotated[str | None, typer.Option(help="Celery node name (default memq-<pid>@<host>: unique even for "
                                                   "several workers on one host).")] = None,
) -> None:
    """Start a Celery worker for the pipeline (replaces this process).

    In embedded mode (no MEMQ_QDRANT__URL) the worker that consumes memq.write owns the embedded vector
    store's folder (and serves other processes' reads from it), so it runs one process with a thread pool;
    workers of the other queues only (--queues memq.llm) read through it, as many as you like, prefork too.
    """
    settings = load_settings()
    chosen = {q.strip() for q in queues.split(",") if q.strip()}
    unknown = sorted(chosen - set(Queues.ALL))
    if not chosen or unknown:
        console.print(f"[red]--queues: {', '.join(unknown) or 'none given'}: choose among {', '.join(Queues.ALL)}[/]")
        raise typer.Exit(2)
    if settings.embedded_qdrant and pool == "prefork" and concurrency != 1 and Queues.WRITE in chosen:
        console.print(f"[red]prefork with more than one child needs a Qdrant server (MEMQ_QDRANT__URL) when it "
                      f"consumes {Queues.WRITE}: the embedded store allows one owner process per folder (run the "
                      f"model stages in prefork workers of --queues {Queues.LLM} beside one thread-pool owner).[/]")
        raise typer.Exit(2)
    if pool == "prefork" and settings.metrics.port:
        console.print("[yellow]prefork: /metrics shows the backlog gauges, but each child counts its own tasks and "
                      "model calls where no scrape reaches them; use the thread pool to see those counters[/]")
    argv = [sys.executable, "-m", "celery", "-A", "workers.app", "worker", "-Q", ",".join(sorted(chosen)), "-P", pool,
            "-c", str(concurrency), "--loglevel", loglevel, "-E", "-n", name or f"memq-{os.getpid()}@%h"]
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
    as_json: Annotated[bool, typer.Option("--json", help="Print the jobs as JSON lines (no progress bar).")] = False,
) -> None:
    """Enqueue a chat log, one add per session in chronological order (sessions of different
    conversations queued in turn, `producer.order`); re-runs enqueue nothing twice.
    Prints each job's id (``--json``: one object per session: conversation, session, job_id, duplicate).

    Sessions whose job already succeeded (per the SQL job records, which survive a Redis restart) are
    skipped, so a re-run after a crash resumes where the backfill stopped.
    """
    from producer import Producer
    from producer.backfill import read_backfill
    from memq.models import Receipt
    from producer.order import round_robin
    from stores.history import sql_engine
    from stores.records import RecordStore

    try:
        items = read_backfill(path, fmt=fmt, conversations=conversation, source=source_id)
        settings = load_settings()
        producer = Producer(settings)
        jobs = [producer.build(**item.request) for item in items]
        assert settings.history.url is not None
        done = RecordStore(sql_engine(settings.history.url)).states_by_key(
            [(job.scope, str(job.idempotency_key)) for job in jobs])
        todo = [(item, job) for item, job in zip(items, jobs)
                if done.get((job.scope, str(job.idempotency_key))) != "succeeded"]
        # one conversation's sessions after another's would start the later ones' chains late: queue
        # one session of each scope in turn, each scope's in its order (each add_many batch does too)
        order = round_robin([job.scope.key() for _, job in todo])
        queued: dict[int, Receipt] = {}
        with _progress(disable=as_json) as progress:
            task = progress.add_task("enqueue", total=len(todo))
            for i in range(0, len(todo), batch):
                chunk = order[i:i + batch]
                queued.update(zip(chunk, producer.add_many([todo[k][0].request for k in chunk])))
                progress.advance(task, len(chunk))
        receipts = [queued[k] for k in range(len(todo))]
        fresh = sum(not r.duplicate for r in receipts)
        for (item, _), receipt in zip(todo, receipts):
            if as_json:
                print(json.dumps({"conversation": item.conversation_id, "session": item.session_id,
                                  "job_id": receipt.job_id, "duplicate": receipt.duplicate}))
            else:
                console.print(f"{item.conversation_id} {item.session_id}: {receipt.job_id}"
                              + (" (enqueued before)" if receipt.duplicate else ""), highlight=False)
        summary = (f"{len(items)} sessions: {len(items) - len(todo)} done before, {fresh} enqueued, "
                   f"{len(receipts) - fresh} already enqueued before")
        (err_console if as_json else console).print(summary)
        if wait and receipts:
            health.warn_if_unconsumed(producer.settings, err_console if as_json else console)
            _follow(producer, receipts, timeout_s, err_console if as_json else console)
    except MemqError as exc:
        console.print(f"[red]{type(exc).__name__}: {exc}[/]")
        raise typer.Exit(1) from exc


def _follow(producer: Producer, receipts: list[Receipt], timeout_s: float, out: Console) -> None:
    """Wait for the jobs with a progress bar on `out`, then print their states, events and images there;
    exit 1 unless all succeeded."""
    with _progress(out) as progress:
        task = progress.add_task("jobs done", total=len(receipts))
        statuses = producer.wait(receipts, timeout_s=timeout_s,
                                 on_progress=lambda done, total: progress.update(task, completed=done))
    by_state: dict[str, int] = {}
    events: dict[str, int] = {}
    images: dict[str, int] = {}
    for s in statuses:
        by_state[s.status.value] = by_state.get(s.status.value, 0) + 1
        for event, n in s.counts.items():
            events[event] = events.get(event, 0) + n
        for source, n in s.images.items():
            images[source] = images.get(source, 0) + n
    out.print("jobs: " + ", ".join(f"{k} {v}" for k, v in sorted(by_state.items())))
    out.print("events: " + ", ".join(f"{k} {v}" for k, v in events.items()))
    if any(images.values()):
        out.print("images: " + ", ".join(f"{k} {v}" for k, v in images.items())
                  + f" (warnings: {sum(len(s.warnings) for s in statuses)}; `memq status JOB_ID` shows them)")
    failed = [s for s in statuses if s.status.value == "failed"]
    for s in failed[:10]:
        out.print(f"[red]failed {s.job_id}: {s.error_type}: {s.error}[/]")
    if failed or by_state.get("succeeded", 0) != len(receipts):
        raise typer.Exit(1)


ScopeOption = Annotated[str | None, typer.Option(help="Scope: user id.")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON (Mem0's shapes) instead of a table.")]
FiltersOption = Annotated[str | None, typer.Option(help="Mem0-style filters as JSON, e.g. "
                                                        "'{\"topic\": \"food\", \"n\": {\"gte\": 2}}'.")]
AgentOption = Annotated[str | None, typer.Option(help="Scope: agent id.")]
RunOption = Annotated[str | None, typer.Option(help="Scope: run id.")]


def _fail(exc: MemqError) -> typer.Exit:
    console.print(f"[red]{type(exc).__name__}: {exc!s}[/]")
    return typer.Exit(1)


def _read(call: Callable[[Memories], T]) -> T:
    """Run one read on `Memories` (opening the embedded folder when no worker owns it), print a memq
    error as a one-line failure (exit 1), and release whatever the read opened."""
    from memories import Memories
    from stores.vector_open import close_vector_stores

    try:
        return call(Memories(open_embedded=True))
    except MemqError as exc:
        raise _fail(exc) from exc
    finally:
        close_vector_stores()


@app.command()
def search(
    query: Annotated[str, typer.Argument(help="What to look for.")],
    user_id: ScopeOption = None,
    agent_id: AgentOption = None,
    run_id: RunOption = None,
    limit: Annotated[int, typer.Option(help="At most this many results.")] = 10,
    filters: FiltersOption = None,
    after: Annotated[str | None, typer.Option(help="Only memories whose occurred_at is on or after this ISO "
                                              "date or datetime (UTC).")] = None,
    before: Annotated[str | None, typer.Option(help="... and before this one (exclusive).")] = None,
    as_json: JsonOption = False,
) -> None:
    """Search memories of a scope by meaning (in embedded mode through the worker when one runs)."""
    parsed = _filters(filters)
    found = _read(lambda m: m.search(query, user_id=user_id, agent_id=agent_id, run_id=run_id, limit=limit,
                                     filters=parsed, after=after, before=before))
    if as_json:
        print(json.dumps(found, indent=1))
        return
    _table(found["results"], score=True)


@app.command("get-all")
def get_all(
    user_id: ScopeOption = None,
    agent_id: AgentOption = None,
    run_id: RunOption = None,
    limit: Annotated[int, typer.Option(help="At most this many memories.")] = 100,
    offset: Annotated[int, typer.Option(help="Memories to skip (pages: 0, LIMIT, 2*LIMIT, ...).")] = 0,
    filters: FiltersOption = None,
    as_json: JsonOption = False,
) -> None:
    """A scope's memories, oldest first, a page at a time."""
    parsed = _filters(filters)
    found = _read(lambda m: m.get_all(user_id=user_id, agent_id=agent_id, run_id=run_id, limit=limit,
                                      offset=offset, filters=parsed))
    if as_json:
        print(json.dumps(found, indent=1))
        return
    _table(found["results"], score=False)


def _write(call: Callable[[Memory], T]) -> T:
    """Run one write (a job) through `memq.Memory`, waiting for it, and print a memq error as a one-line
    failure (exit 1). Writes need a running worker: in embedded mode with none, `NoStoreOwner` says so."""
    from memories import Memory

    client = Memory()
    try:
        return call(client)
    except MemqError as exc:
        raise _fail(exc) from exc
    finally:
        client.close()


WaitOption = Annotated[bool, typer.Option(help="Wait for the job and print its result (else its job id).")]
TimeoutOption = Annotated[float, typer.Option(help="Seconds to wait for the job.")]
MetadataOption = Annotated[str | None, typer.Option(help="Metadata as a JSON object, e.g. '{\"topic\": \"food\"}'.")]


def _done(result: object, as_json: bool, line: str) -> None:
    """Print a write's outcome: its receipt(s) or Mem0-shaped result as JSON, or one readable line."""
    from memq.models import Receipt as ReceiptModel

    if isinstance(result, ReceiptModel) or isinstance(result, list):
        receipts = result if isinstance(result, list) else [result]
        if as_json:
            print(json.dumps([r.model_dump(mode="json") for r in receipts] if isinstance(result, list)
                             else result.model_dump(mode="json")))
        else:
            console.print("queued: " + (", ".join(r.job_id for r in receipts) or "nothing to do"), highlight=False)
        return
    if as_json:
        print(json.dumps(result))
    else:
        console.print(line, highlight=False)


@app.command()
def flower() -> None:
    """Start Flower against the configured broker (replaces this process): MEMQ_FLOWER__PORT (5555),
    MEMQ_FLOWER__ADDRESS (127.0.0.1) and MEMQ_FLOWER__BASIC_AUTH (user:password), which also guards
    /metrics. Binding beyond loopback without basic auth is refused."""
    settings = load_settings()
    f = settings.flower
    if f.basic_auth is None and f.address not in ("127.0.0.1", "localhost", "::1"):
        console.print(f"[red]Flower on {f.address} would be open to anyone: set MEMQ_FLOWER__BASIC_AUTH=user:password "
                      "or bind 127.0.0.1[/]")
        raise typer.Exit(2)
    if f.basic_auth is not None and ("," in f.basic_auth.get_secret_value()
                                     or ":" not in f.basic_auth.get_secret_value()):
        console.print("[red]MEMQ_FLOWER__BASIC_AUTH must be one user:password without a comma (Flower would read "
                      "each comma-separated part as another valid login)[/]")
        raise typer.Exit(2)
    inherited = sorted(k for k in os.environ if k.startswith("FLOWER_"))
    for key in inherited:  # Flower's own variables would bypass these checks (FLOWER_UNAUTHENTICATED_API ...)
        del os.environ[key]
    if inherited:
        console.print(f"[yellow]ignored {', '.join(inherited)}: memq flower is configured by MEMQ_FLOWER__*[/]")
    if f.basic_auth is not None:  # through the environment: an argument would show in `ps`
        os.environ["FLOWER_BASIC_AUTH"] = f.basic_auth.get_secret_value()
    # the broker comes from celeryconfig (memq's settings), as for the workers
    os.execv(sys.executable, [sys.executable, "-m", "cli.flower_run", f"--port={f.port}", f"--address={f.address}"])


@app.command()
def add(
    text: Annotated[str | None, typer.Argument(help="A user message to remember.")] = None,
    messages: Annotated[Path | None, typer.Option(help="A JSON file holding a list of chat messages.")] = None,
    user_id: ScopeOption = None,
    agent_id: AgentOption = None,
    run_id: RunOption = None,
    metadata: MetadataOption = None,
    infer: Annotated[bool, typer.Option(help="Extract facts (--no-infer stores each message as it is).")] = True,
    prompt: Annotated[str | None, typer.Option(help="Custom fact-extraction instructions.")] = None,
    wait: WaitOption = True,
    timeout: TimeoutOption = 60.0,
    as_json: JsonOption = False,
) -> None:
    """Remember a message (or a file of chat messages) for a scope, through the queue."""
    if (text is None) == (messages is None):
        console.print("[red]give a TEXT or --messages FILE (one of them)[/]")
        raise typer.Exit(2)
    payload: object = text
    if messages is not None:
        try:
            payload = json.loads(messages.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            console.print(f"[red]--messages: {type(exc).__name__}: {exc}[/]")
            raise typer.Exit(2) from exc
    meta = _json_object(metadata, "--metadata")
    result = _write(lambda m: m.add(payload, user_id=user_id, agent_id=agent_id, run_id=run_id, metadata=meta,
                                    infer=infer, prompt=prompt, wait=wait, timeout=timeout))
    if isinstance(result, dict) and not as_json:
        from rich.table import Table

        table = Table()
        for column in ("event", "memory", "id"):
            table.add_column(column, overflow="fold")
        for r in result["results"]:
            table.add_row(r["event"], r["memory"], r["id"])
        console.print(table if result["results"] else "no new memory (nothing worth remembering, or known already)")
        return
    _done(result, as_json, "")


@app.command()
def update(
    memory_id: Annotated[str, typer.Argument(help="A memory id.")],
    text: Annotated[str | None, typer.Argument(help="The memory's new text.")] = None,
    metadata: MetadataOption = None,
    user_id: ScopeOption = None,
    agent_id: AgentOption = None,
    run_id: RunOption = None,
    wait: WaitOption = True,
    timeout: TimeoutOption = 60.0,
    as_json: JsonOption = False,
) -> None:
    """Change a memory's text and/or metadata, through the queue (an UPDATE history row is kept). Exit 1
    when the scope holds no such memory."""
    meta = _json_object(metadata, "--metadata")
    result = _write(lambda m: m.update(memory_id, text, meta, user_id=user_id, agent_id=agent_id, run_id=run_id,
                                       wait=wait, timeout=timeout))
    _done(result, as_json, f"updated {memory_id}")


@app.command()
def delete(
    memory_id: Annotated[str, typer.Argument(help="A memory id.")],
    user_id: ScopeOption = None,
    agent_id: AgentOption = None,
    run_id: RunOption = None,
    wait: WaitOption = True,
    timeout: TimeoutOption = 60.0,
    as_json: JsonOption = False,
) -> None:
    """Delete one memory of the scope, through the queue (its relations too; a DELETE history row is kept).
    Exit 1 when the scope holds no such memory."""
    result = _write(lambda m: m.delete(memory_id, user_id=user_id, agent_id=agent_id, run_id=run_id, wait=wait,
                                       timeout=timeout))
    _done(result, as_json, f"deleted {memory_id}")


@app.command("delete-all")
def delete_all(
    user_id: ScopeOption = None,
    agent_id: AgentOption = None,
    run_id: RunOption = None,
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")] = False,
    wait: WaitOption = True,
    timeout: TimeoutOption = 120.0,
    as_json: JsonOption = False,
) -> None:
    """Delete every memory, entity and relation the scope covers, through the queue (DELETE history rows
    are kept)."""
    if not yes and not typer.confirm(f"Delete every memory of user_id={user_id} agent_id={agent_id} "
                                     f"run_id={run_id}?"):
        raise typer.Exit(1)
    result = _write(lambda m: m.delete_all(user_id=user_id, agent_id=agent_id, run_id=run_id, wait=wait,
                                           timeout=timeout))
    _done(result, as_json, "deleted every memory of the scope")


def _json_object(text: str | None, option: str) -> dict[str, object] | None:
    """An option's JSON object, or a one-line error (exit 2)."""
    if text is None:
        return None
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as exc:
        console.print(f"[red]{option} is not JSON: {exc.msg} at position {exc.pos}[/]")
        raise typer.Exit(2) from exc
    if not isinstance(parsed, dict):
        console.print(f"[red]{option} must be a JSON object[/]")
        raise typer.Exit(2)
    return parsed


def _filters(text: str | None) -> dict[str, object] | None:
    """``--filters`` as a dict (JSON text), or a one-line error (exit 2)."""
    return _json_object(text, "--filters")


def _table(items: list[dict[str, object]], *, score: bool) -> None:
    """Memories as a readable table."""
    from rich.table import Table

    table = Table(show_lines=False)
    for column in (["score"] if score else []) + ["memory", "id", "created", "from"]:
        table.add_column(column, overflow="fold")
    for m in items:
        row = [f"{m['score']:.3f}"] if score else []
        sources = m.get("source_message_ids") or []
        table.add_row(*row, str(m["memory"]), str(m["id"]), str(m.get("created_at") or "")[:19],
                      ",".join(map(str, sources if isinstance(sources, list) else [])))
    console.print(table)


@app.command()
def get(
    memory_id: Annotated[str, typer.Argument(help="A memory id.")],
    user_id: ScopeOption = None,
    agent_id: AgentOption = None,
    run_id: RunOption = None,
    as_json: JsonOption = False,
) -> None:
    """Show one memory (JSON: null for an unknown id or a memory outside the scope given; exit 1 then)."""
    item = _read(lambda m: m.get(memory_id, user_id=user_id, agent_id=agent_id, run_id=run_id))
    if as_json:
        print(json.dumps(item, indent=1))
    elif item is not None:
        _table([item], score=False)
        if item.get("metadata"):
            console.print("metadata: " + json.dumps(item["metadata"]), highlight=False)
    else:
        console.print(f"no memory {memory_id} in this scope", highlight=False)
    if item is None:
        raise typer.Exit(1)


@app.command()
def status(
    job_id: Annotated[str, typer.Argument(help="The job id from add's receipt.")],
    user_id: ScopeOption = None,
    agent_id: AgentOption = None,
    run_id: RunOption = None,
    as_json: JsonOption = False,
) -> None:
    """Show a job's status and events (the job must belong to the scope given)."""
    from producer import Producer

    try:
        found = Producer().status(job_id, user_id=user_id, agent_id=agent_id, run_id=run_id)
    except MemqError as exc:
        raise _fail(exc) from exc
    if as_json:
        print(found.model_dump_json(indent=1))
        return
    console.print(f"{found.job_id}: {found.status.value}" + (f" in {found.stage}" if found.stage else "")
                  + (f", waiting for {found.waiting}" if found.waiting else ""), highlight=False)
    if found.error_type:
        console.print(f"[red]{found.error_type}: {found.error}[/]", highlight=False)
    for r in found.results:
        console.print(f"{r.event.value:6} {r.id}  {r.memory}", highlight=False)
    for line in found.warnings:
        console.print(f"warning: {line}", highlight=False)


@app.command()
def history(
    memory_id: Annotated[str, typer.Argument(help="A memory id.")],
    user_id: ScopeOption = None,
    agent_id: AgentOption = None,
    run_id: RunOption = None,
    as_json: JsonOption = False,
) -> None:
    """Show a memory's history rows, oldest first (none for a memory outside the scope given). Reads SQL only."""
    rows = _read(lambda m: m.history(memory_id, user_id=user_id, agent_id=agent_id, run_id=run_id))
    if as_json:
        print(json.dumps(rows, indent=1))
        return
    from rich.table import Table

    table = Table()
    for column in ("when", "event", "old memory", "new memory", "job"):
        table.add_column(column, overflow="fold")
    for r in rows:
        table.add_row(str(r["created_at"])[:19], r["event"], r["old_memory"] or "", r["new_memory"] or "", r["job_id"])
    console.print(table if rows else f"no history for {memory_id} in this scope")


@app.command()
def demo(
    data: Annotated[Path, typer.Option(help="LoCoMo file.")] = Path("../shared/data/locomo10.json"),
    conversation: Annotated[str, typer.Option(help="LoCoMo conversation to backfill.")] = "conv-26",
    questions: Annotated[int, typer.Option(help="QA questions to show.")] = 5,
    workdir: Annotated[Path, typer.Option(help="Scratch folder (wiped first).")] = Path(".memq/demo"),
) -> None:
    """The main job, embedded: local Redis + worker, backfill a LoCoMo conversation, wait, search."""
    from cli.demo import run_demo

    raise typer.Exit(run_demo(data, conversation, questions, workdir, console))


def main() -> None:
    """Entry point of the ``memq`` script: a configuration error is one line per bad variable (exit 2)."""
    try:
        app()
    except InvalidSettings as exc:
        for line in exc.problems:
            err_console.print(f"[red]configuration error: {line}[/]", highlight=False)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
