"""``memq doctor`` and ``memq stats``: is every configured service reachable, and what is the queue doing.

Each doctor check names the service and its address, says what is wrong in one line and how to fix
it; the command exits 1 when any check fails. Checks never print a password or a key.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from memq.config import OFFLINE_MODEL, Settings, load_settings
from memq.errors import MemqError

console = Console()


@dataclass(frozen=True)
class Check:
    """One doctor check's outcome.

    Attributes:
        service: what was checked (``"Redis"``, ``"Neo4j"``, ...).
        ok: whether it works.
        detail: what was found (an address, a count), or what is wrong.
        fix: how to fix it (empty when `ok`).
    """

    service: str
    ok: bool
    detail: str
    fix: str = ""


def _safe(service: str, fix: str, probe: Callable[[], str], *, where: str = "") -> Check:
    """Run `probe` (returns a detail line); any exception becomes a failed check naming its class (and
    `where`, the address tried)."""
    prefix = f"{where}: " if where else ""
    try:
        return Check(service, True, probe())
    except MemqError as exc:
        return Check(service, False, f"{prefix}{type(exc).__name__}: {exc}", fix)
    except Exception as exc:  # noqa: BLE001  (a third-party error: its class only, the message may hold secrets)
        return Check(service, False, f"{prefix}{type(exc).__name__}", fix)


_SECRET_PARAMS = ("pass", "secret", "token", "key", "auth", "credential")


def _redact(url: str) -> str:
    """A URL with its password and any secret-looking query parameter masked (``***``): what doctor and stats
    may print. ``redis://:pw@h/0``, ``postgresql://u:pw@h/db?sslpassword=x``, ``bolt://u:pw@h``."""
    from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

    try:
        parts = urlsplit(url)
    except ValueError:
        return "(an address that does not parse)"
    netloc = parts.netloc
    if "@" in netloc:
        creds, host = netloc.rsplit("@", 1)
        user = creds.split(":", 1)[0]
        netloc = f"{user}:***@{host}" if ":" in creds else f"***@{host}"
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    masked = [(k, "***" if any(s in k.lower() for s in _SECRET_PARAMS) else v) for k, v in pairs]
    if netloc == parts.netloc and masked == pairs:
        return url  # nothing secret (and `sqlite:///...` keeps its slashes)
    return urlunsplit((parts.scheme, netloc, parts.path, urlencode(masked, safe="*"), parts.fragment))


def run_checks(settings: Settings) -> list[Check]:
    """Every check `memq doctor` makes, in order: Redis, workers per queue, vector store, SQL, Neo4j, LLM.

    Returns:
        One `Check` per service (per queue for the workers).
    """
    import redis

    checks: list[Check] = []

    def ping_redis() -> str:
        client = redis.Redis.from_url(settings.redis.url, socket_timeout=2, socket_connect_timeout=2)
        try:
            client.ping()
            return f"{_redact(settings.redis.url)} answers"
        finally:
            client.close()

    checks.append(_safe("Redis", f"start Redis at {_redact(settings.redis.url)} or set MEMQ_REDIS__URL", ping_redis,
                        where=_redact(settings.redis.url)))
    if not checks[-1].ok:
        checks.append(Check("workers", False, "not checked: Redis is unreachable", "start Redis first"))
    else:
        from broker.inspect import consumers

        try:
            by_queue = consumers(settings)
            for queue, nodes in by_queue.items():
                checks.append(Check(f"queue {queue}", bool(nodes), ", ".join(nodes) if nodes else "no worker consumes it",
                                    "" if nodes else f"start one: memq worker --queues {queue} (or all queues)"))
        except MemqError as exc:
            checks.append(Check("workers", False, f"{type(exc).__name__}: {exc}", "check Redis"))
    checks.append(_safe("vector store", _vector_fix(settings), lambda: _vectors(settings)))
    checks.append(_safe("SQL history", "check MEMQ_HISTORY__URL (database up, user allowed)", lambda: _sql(settings),
                        where=_redact(settings.history.url or "")))
    if settings.neo4j.uri:
        neo4j = _redact(settings.neo4j.uri)
        checks.append(_safe("Neo4j", f"start Neo4j at {neo4j}, or unset MEMQ_NEO4J__URI for no graph memory",
                            lambda: _neo4j(settings), where=neo4j))
    else:
        checks.append(Check("Neo4j", True, "graph memory off (MEMQ_NEO4J__URI unset)"))
    checks.append(_safe("LLM", "check MEMQ_LLM__API_BASE / __API_KEY, or the provider's status", lambda: _llm(settings),
                        where=_redact(settings.llm.api_base) if settings.llm.api_base else settings.llm.model))
    return checks


def _vector_fix(settings: Settings) -> str:
    if settings.embedded_qdrant:
        return ("start a worker that consumes memq.write (memq worker, every queue by default): it owns the "
                "embedded store and serves other processes' reads")
    return f"start the Qdrant server at {_redact(settings.qdrant.url or '')} or fix MEMQ_QDRANT__URL"


def _vectors(settings: Settings) -> str:
    from stores.vector_open import open_vector_store

    store = open_vector_store(settings.qdrant, settings.embedder.dims, role="reader", redis_url=settings.redis.url)
    where = "embedded, through its owner" if settings.embedded_qdrant else _redact(settings.qdrant.url or "")
    return f"{store.count()} memories in '{settings.qdrant.collection}' ({where})"


def _sql(settings: Settings) -> str:
    from stores.history import open_history_store

    assert settings.history.url is not None
    open_history_store(settings.history.url).history("00000000-0000-0000-0000-000000000000")
    return _redact(settings.history.url)


def _neo4j(settings: Settings) -> str:
    from stores.graph import open_graph_store

    graph = open_graph_store(settings, role="reader")
    assert graph is not None
    graph.ensure_schema()
    return f"{_redact(settings.neo4j.uri or '')} answers"


def _llm(settings: Settings) -> str:
    if settings.llm.model == OFFLINE_MODEL:
        return f"{OFFLINE_MODEL}: the offline heuristic baseline (no endpoint; set MEMQ_LLM__MODEL for a real model)"
    if not settings.llm.api_base:
        key = "MEMQ_LLM__API_KEY set" if settings.llm.api_key else \
            "no MEMQ_LLM__API_KEY: litellm reads the provider's own variable, e.g. OPENAI_API_KEY"
        return f"{settings.llm.model} at the provider's own endpoint (not probed: a call would cost; {key})"
    import httpx

    reply = httpx.get(settings.llm.api_base.rstrip("/") + "/models", timeout=5.0,
                      headers={"Authorization": f"Bearer {settings.llm.api_key.get_secret_value()}"}
                      if settings.llm.api_key else {})
    if reply.status_code >= 500 or reply.status_code in (401, 403):
        raise MemqError(f"{_redact(settings.llm.api_base)} answered HTTP {reply.status_code}")
    return f"{settings.llm.model} at {_redact(settings.llm.api_base)} answers (HTTP {reply.status_code})"


def doctor() -> None:
    """Check every configured service (Redis, workers on each queue, vector store, SQL, Neo4j, LLM) and say
    what is wrong and how to fix it. Exit 1 when a check fails."""
    checks = run_checks(load_settings())
    table = Table()
    for column in ("", "service", "found", "fix"):
        table.add_column(column, overflow="fold")
    for c in checks:
        table.add_row("[green]ok[/]" if c.ok else "[red]FAIL[/]", c.service, c.detail, c.fix)
    console.print(table)
    if not all(c.ok for c in checks):
        raise typer.Exit(1)


def stats(as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
          metrics_url: Annotated[str | None, typer.Option(help="A worker's /metrics for the model usage "
                                                                "(default: this host's MEMQ_METRICS__PORT).")] = None,
          ) -> None:
    """Queue depths, unfinished jobs and the oldest one's age, jobs by state, dead letters, and model usage
    (calls and tokens per model since the worker started, read from its /metrics)."""
    import json

    import redis

    from broker.inspect import depths
    from broker.jobstore import LIVE_KEY

    settings = load_settings()
    client = redis.Redis.from_url(settings.redis.url, socket_timeout=5)
    try:
        queued = depths(client)
        live = client.zcard(LIVE_KEY)
        oldest = client.zrange(LIVE_KEY, 0, 0, withscores=True)
    except (redis.RedisError, MemqError) as exc:
        console.print(f"[red]Redis at {_redact(settings.redis.url)}: {type(exc).__name__}[/]")
        raise typer.Exit(1) from exc
    finally:
        client.close()
    states, letters = _job_counts(settings)
    age = round(time.time() - float(oldest[0][1]), 1) if oldest else None
    url = metrics_url or (f"http://127.0.0.1:{settings.metrics.port}/metrics" if settings.metrics.port else None)
    # (the worker on this host that holds the port; with several, pass each one's --metrics-url)
    usage = llm_usage(url) if url else None
    report = {"queues": queued, "unfinished_jobs": int(live), "oldest_unfinished_s": age,
              "jobs_by_state": states, "dead_letters": letters, "llm_usage": usage}
    if as_json:
        print(json.dumps(report))
        return
    console.print("queues: " + ", ".join(f"{q} {n}" for q, n in queued.items()), highlight=False)
    console.print(f"unfinished jobs: {live}" + (f" (oldest {age:.0f} s)" if age is not None else ""), highlight=False)
    console.print("jobs by state: " + (", ".join(f"{k} {v}" for k, v in states.items()) or "none"), highlight=False)
    console.print(f"dead letters: {letters}", highlight=False)
    if usage is None:
        console.print(f"model usage: no worker metrics at {url or '(MEMQ_METRICS__PORT=0)'}", highlight=False)
    elif not usage:
        console.print("model usage: none yet (this worker has made no model call)", highlight=False)
    for model, used in (usage or {}).items():
        console.print(f"model {model}: " + ", ".join(f"{k} {v:.0f}" for k, v in used.items()), highlight=False)


def llm_usage(url: str) -> dict[str, dict[str, float]] | None:
    """Model calls and tokens per model from a worker's Prometheus page (`memq.metrics`), or None when it
    does not answer: ``{model: {"calls_ok", "calls_rate_limited", "calls_error", "prompt_tokens",
    "completion_tokens"}}`` since that worker started."""
    import urllib.error
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(url, timeout=3) as reply:
            text = reply.read().decode()
    except (urllib.error.URLError, OSError, ValueError):
        return None
    usage: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            model = sample.labels.get("model")
            if model is None:
                continue
            if sample.name == "memq_llm_calls_total":
                key = f"calls_{sample.labels.get('result')}"
            elif sample.name == "memq_llm_tokens_total":
                key = f"{sample.labels.get('kind')}_tokens"
            else:
                continue
            usage.setdefault(model, {})[key] = usage.get(model, {}).get(key, 0.0) + sample.value
    return usage


def _job_counts(settings: Settings) -> tuple[dict[str, int], int]:
    """Jobs by their last recorded state, and dead letters, from SQL (durable: finished jobs included)."""
    from sqlalchemy import func
    from sqlmodel import Session, select

    from stores.history import mapped_sql_errors, sql_engine
    from stores.records import DeadLetter, JobRecord

    assert settings.history.url is not None
    with mapped_sql_errors("stats"), Session(sql_engine(settings.history.url)) as session:
        rows = session.exec(select(JobRecord.status, func.count()).group_by(JobRecord.status)).all()
        letters = session.exec(select(func.count()).select_from(DeadLetter)).one()
    return {str(status): int(n) for status, n in sorted(rows)}, int(letters)


def warn_if_unconsumed(settings: Settings, out: Console) -> None:
    """Before waiting for jobs: say which queues no worker consumes (the jobs would wait there until the
    timeout), and how to start one. Silent when every queue has a worker or Redis cannot be asked."""
    from broker.inspect import consumers

    try:
        idle = [q for q, nodes in consumers(settings).items() if not nodes]
    except MemqError:
        return
    if idle:
        out.print(f"[yellow]no worker consumes {', '.join(idle)}: the jobs wait there until one starts "
                  "(memq worker); `memq doctor` checks every service[/]", highlight=False)
