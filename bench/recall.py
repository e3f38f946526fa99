"""Evidence recall on LoCoMo: dense-only retrieval against hybrid (dense + BM25, fused by RRF), in one run.

A question is *found at k* when one of its top-k results cites a turn of its evidence (a memory's
``source_message_ids``; a turn's own ``dia_id``). Recall@k is the share of questions found, reported for
k = 5 and 10, by LoCoMo category (1 multi-hop, 2 temporal, 3 open-domain, 4 single-hop; the 1,540
questions with evidence that papers on LoCoMo report) and over all of them. Two corpora, both searched
through memq's own vector store code (`stores.edge.EdgeStore.search`, ``text=`` for hybrid):

* ``memories``: the conversations backfilled through the whole pipeline (a ``celery worker`` process,
  the offline model, the default embedder), then each question searched in its conversation's scope
  through `memories.Memories.search` with ``MEMQ_QDRANT__HYBRID`` false and true;
* ``turns``: every dialogue turn (``"speaker: text"``) stored as it is, one scope per conversation: the
  retrieval alone, with no extraction in between.

Also reported per mode: search latency p50 (ms) over the memories' questions, in the reading process.

    .venv/bin/python bench/recall.py [--conversations all|conv-26,conv-30] [--skip-memories]
                                     [--json bench/results/recall.json]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root

import argparse
import json
import os
import statistics
import tempfile
import time
import uuid
from collections import Counter
from datetime import datetime, timezone
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CATEGORIES = {1: "multi-hop", 2: "temporal", 3: "open-domain", 4: "single-hop"}
KS = (5, 10)


class Tally:
    """Questions found at each k, by category, for one retrieval mode."""

    def __init__(self) -> None:
        self.found: dict[int, Counter[str]] = {k: Counter() for k in KS}
        self.asked: Counter[str] = Counter()
        self.search_ms: list[float] = []

    def add(self, category: int, gold: set[str], ranked: list[set[str]], ms: float) -> None:
        """Count one question: `ranked` holds the cited turns of each result, best first."""
        name = CATEGORIES[category]
        self.asked[name] += 1
        self.asked["all"] += 1
        self.search_ms.append(ms)
        for k in KS:
            if any(gold & cited for cited in ranked[:k]):
                self.found[k][name] += 1
                self.found[k]["all"] += 1

    def report(self) -> dict[str, Any]:
        """``{"recall@5": {category: share}, "recall@10": {...}, "questions": {...}, "search_ms_p50": ms}``."""
        out: dict[str, Any] = {f"recall@{k}": {c: round(self.found[k][c] / n, 3) for c, n in self.asked.items()}
                               for k in KS}
        out["questions"] = dict(self.asked)
        out["search_ms_p50"] = round(statistics.median(self.search_ms), 2) if self.search_ms else None
        return out


def _samples(data: Path, wanted: list[str] | None) -> list[dict[str, Any]]:
    samples = json.loads(data.read_text())
    return [s for s in samples if wanted is None or s["sample_id"] in wanted]


def turns_recall(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Recall with every turn stored as a memory (no extraction): ``{"dense": report, "hybrid": report}``."""
    from cli.demo import evidence_ids
    from memq.config import load_settings
    from memq.models import Scope
    from stores.edge import open_edge
    from stores.embedder import get_embedder
    from stores.vectors import MemoryPoint

    embedder = get_embedder(load_settings().embedder)
    tallies = {"dense": Tally(), "hybrid": Tally()}
    now = datetime.now(timezone.utc)
    with tempfile.TemporaryDirectory() as folder:
        store = open_edge(Path(folder), "turns", embedder.dims)
        try:
            for sample in samples:
                scope = Scope(user_id=sample["sample_id"])
                conversation = sample["conversation"]
                turns = [t for key, value in conversation.items() if key.startswith("session_")
                         and not key.endswith("date_time") for t in value]
                texts = [f"{t['speaker']}: {t['text']}" for t in turns]
                vectors = embedder.embed(texts)
                store.upsert([MemoryPoint(id=str(uuid.uuid4()), vector=v, memory=text, scope=scope, created_at=now,
                                          updated_at=None, metadata={}, actor_id=None, role="user",
                                          source_message_ids=[t["dia_id"]], job_id="bench")
                              for t, text, v in zip(turns, texts, vectors)])
                qa = [q for q in sample["qa"] if q.get("category") in CATEGORIES and evidence_ids(q.get("evidence", []))]
                for q, v in zip(qa, embedder.embed([q["question"] for q in qa])):
                    gold = evidence_ids(q["evidence"])
                    for mode, tally in tallies.items():
                        t0 = time.perf_counter()
                        hits = store.search(v, scope, limit=max(KS), text=q["question"] if mode == "hybrid" else None)
                        ms = (time.perf_counter() - t0) * 1000
                        tally.add(q["category"], gold, [set(h.source_message_ids) for h in hits], ms)
        finally:
            store.close()
    return {mode: t.report() for mode, t in tallies.items()}


def memories_recall(data: Path, samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Recall over memories the pipeline extracted: backfill, then ``{"dense": report, "hybrid": report,
    "backfill": {...}}``."""
    from cli.demo import evidence_ids, start_demo_worker, stop_demo_worker
    from cli.redis_server import RedisServer
    from memories import Memories
    from memq.config import RedisSettings, Settings
    from producer import Producer
    from producer.backfill import read_locomo

    with tempfile.TemporaryDirectory() as folder, RedisServer(data_dir=Path(folder) / "redis") as redis_server:
        workdir = Path(folder)
        worker = start_demo_worker({"MEMQ_REDIS__URL": redis_server.url, "MEMQ_DATA_DIR": str(workdir)}, workdir)
        try:
            settings = Settings(data_dir=workdir, redis=RedisSettings(url=redis_server.url))
            items = read_locomo(data, conversations=[s["sample_id"] for s in samples])
            producer = Producer(settings)
            t0 = time.monotonic()
            statuses = producer.wait(producer.add_many([i.request for i in items]), timeout_s=3600)
            backfill = {"jobs": len(statuses), "succeeded": sum(s.status.value == "succeeded" for s in statuses),
                        "wall_s": round(time.monotonic() - t0, 1)}
            readers = {"dense": Memories(settings.model_copy(update={"qdrant": settings.qdrant.model_copy(
                update={"hybrid": False})})), "hybrid": Memories(settings)}
            backfill["memories"] = readers["hybrid"].vectors.count()
            tallies = {mode: Tally() for mode in readers}
            for sample in samples:
                user_id = next(i.request["user_id"] for i in items if i.request["user_id"].endswith(sample["sample_id"]))
                for reader in readers.values():
                    reader.search("warm-up", user_id=user_id, limit=max(KS))
                for q in sample["qa"]:
                    gold = evidence_ids(q.get("evidence", []))
                    if q.get("category") not in CATEGORIES or not gold:
                        continue
                    for mode, reader in readers.items():
                        t_search = time.perf_counter()
                        found = reader.search(q["question"], user_id=user_id, limit=max(KS))["results"]
                        ms = (time.perf_counter() - t_search) * 1000
                        tallies[mode].add(q["category"], gold, [set(r["source_message_ids"]) for r in found], ms)
        finally:
            stop_demo_worker(worker)
    return {"backfill": backfill, **{mode: t.report() for mode, t in tallies.items()}}


def _table(title: str, result: dict[str, Any]) -> str:
    columns = [*CATEGORIES.values(), "all"]
    lines = [f"{title}", "| mode | k | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    for mode in ("dense", "hybrid"):
        for k in KS:
            row = result[mode][f"recall@{k}"]
            lines.append(f"| {mode} | {k} | " + " | ".join(f"{row.get(c, 0):.3f}" for c in columns) + " |")
    return "\n".join(lines)


def main() -> None:
    """Run and print tables, and one JSON object (also written to ``--json``)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/locomo10.json")
    parser.add_argument("--conversations", default="all", help="'all' or comma-separated sample ids")
    parser.add_argument("--skip-memories", action="store_true", help="only the turns corpus (no pipeline run)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    wanted = None if args.conversations == "all" else args.conversations.split(",")
    samples = _samples(args.data, wanted)
    out: dict[str, Any] = {"conversations": [s["sample_id"] for s in samples]}
    out["turns"] = turns_recall(samples)
    print(_table("turns (no extraction)", out["turns"]), flush=True)
    if not args.skip_memories:
        out["memories"] = memories_recall(args.data, samples)
        print(_table(f"memories (pipeline, offline model): {out['memories']['backfill']}", out["memories"]))
    print(json.dumps(out))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
