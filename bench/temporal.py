"""LoCoMo's temporal questions (category 2) on the memories corpus, with and without temporal grounding.

For each setting of ``MEMQ_PIPELINE__TEMPORAL_GROUNDING`` (true, false) the conversations are backfilled
through the whole pipeline (a ``celery worker`` process, the offline model, the default embedder, each
session's date as the job's timestamp), then every question is searched in its conversation's scope
through `memories.Memories.search` (hybrid, top 10). Reported per setting:

* **answer date found@k**, over the temporal questions whose gold answer names a date
  (``"7 May 2023"``, ``"The week before 9 June 2023"``, ``"June 2023"``, ``"2022"``; parsed by
  `pipeline.dates.resolve`, the resolver the pipeline uses; answers such as ``"4 years"`` or
  ``"10 years ago"`` name none and are left out): the share whose top k results hold the answer's date,
  either in a result's text (a date phrase resolved by the same resolver; the offline model writes
  ``"(7 May 2023)"`` after a relative date) or as its ``occurred_at``. A date matches at the gold's
  precision: the same day, within 7 days for a week, the same month, the same year;
* **evidence recall@k** of the temporal questions and of all 1-4 questions (as `bench/recall.py`);
* a **control**: found@k with grounding off when each result's ``created_at`` (the session's date in a
  backfill) stands for its date, which tells the resolved dates' share of the gain from the session
  date's.

    .venv/bin/python bench/temporal.py [--conversations conv-26,conv-30] [--json bench/results/temporal.json]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root

import argparse
import json
import os
import tempfile
import time
from datetime import datetime
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pipeline.dates import Resolved, resolve  # noqa: E402

KS = (1, 5, 10)
TEMPORAL = 2


def same_date(gold: Resolved, when: datetime, period: str = "day") -> bool:
    """Whether `when` (of precision `period`) is `gold`'s date at the coarser of the two precisions."""
    coarse = max((gold.period, period), key=("day", "week", "month", "year").index)
    if coarse == "day":
        return when.date() == gold.when.date()
    if coarse == "week":
        return abs((when.date() - gold.when.date()).days) <= 7
    if coarse == "month":
        return (when.year, when.month) == (gold.when.year, gold.when.month)
    return when.year == gold.when.year


def holds_date(result: dict[str, Any], gold: Resolved, *, session: bool = False) -> bool:
    """A result holds the gold date in its ``occurred_at`` (with `session`: its ``created_at``, the session's
    date in a backfill, as the control of grounding that only stamps the session date) or in a date its
    text names."""
    occurred = result.get("created_at" if session else "occurred_at")
    if occurred and same_date(gold, datetime.fromisoformat(occurred)):
        return True
    named = resolve(result["memory"], None)
    return named is not None and same_date(gold, named.when, named.period)


def run(data: Path, conversations: list[str], grounding: bool) -> dict[str, Any]:
    """Backfill `conversations` with grounding on or off and score the questions (module docstring)."""
    from cli.demo import evidence_ids, start_demo_worker, stop_demo_worker
    from cli.redis_server import RedisServer
    from memories import Memories
    from memq.config import PipelineSettings, RedisSettings, Settings
    from producer import Producer
    from producer.backfill import read_locomo

    samples = [s for s in json.loads(data.read_text()) if s["sample_id"] in conversations]
    date_found = {k: 0 for k in KS}
    session_found = {k: 0 for k in KS}
    evidence = {k: {"temporal": 0, "all": 0} for k in KS}
    asked = {"temporal": 0, "all": 0, "temporal_with_date": 0}
    with tempfile.TemporaryDirectory() as folder, RedisServer(data_dir=Path(folder) / "redis") as redis_server:
        workdir = Path(folder)
        env = {"MEMQ_REDIS__URL": redis_server.url, "MEMQ_DATA_DIR": str(workdir),
               "MEMQ_PIPELINE__TEMPORAL_GROUNDING": str(grounding).lower()}
        worker = start_demo_worker(env, workdir)
        try:
            settings = Settings(data_dir=workdir, redis=RedisSettings(url=redis_server.url),
                                pipeline=PipelineSettings(temporal_grounding=grounding))
            items = read_locomo(data, conversations=conversations)
            producer = Producer(settings)
            t0 = time.monotonic()
            statuses = producer.wait(producer.add_many([i.request for i in items]), timeout_s=3600)
            backfill = {"jobs": len(statuses), "succeeded": sum(s.status.value == "succeeded" for s in statuses),
                        "wall_s": round(time.monotonic() - t0, 1)}
            reader = Memories(settings)
            backfill["memories"] = reader.vectors.count()
            for sample in samples:
                user_id = next(i.request["user_id"] for i in items if i.request["user_id"].endswith(sample["sample_id"]))
                for q in sample["qa"]:
                    gold_turns = evidence_ids(q.get("evidence", []))
                    if q.get("category") not in (1, 2, 3, 4) or not gold_turns:
                        continue
                    found = reader.search(q["question"], user_id=user_id, limit=max(KS))["results"]
                    temporal = q["category"] == TEMPORAL
                    asked["all"] += 1
                    asked["temporal"] += temporal
                    for k in KS:
                        hit = any(gold_turns & set(r["source_message_ids"]) for r in found[:k])
                        evidence[k]["all"] += hit
                        evidence[k]["temporal"] += hit and temporal
                    gold = resolve(str(q.get("answer", "")), None) if temporal else None
                    if gold is None:
                        continue
                    asked["temporal_with_date"] += 1
                    for k in KS:
                        date_found[k] += any(holds_date(r, gold) for r in found[:k])
                        session_found[k] += any(holds_date(r, gold, session=True) for r in found[:k])
        finally:
            stop_demo_worker(worker)
    return {"grounding": grounding, "backfill": backfill, "questions": asked,
            "answer_date_found": {f"@{k}": round(date_found[k] / max(1, asked["temporal_with_date"]), 3) for k in KS},
            "answer_date_found_with_session_date": {
                f"@{k}": round(session_found[k] / max(1, asked["temporal_with_date"]), 3) for k in KS},
            "evidence_recall_temporal": {f"@{k}": round(evidence[k]["temporal"] / max(1, asked["temporal"]), 3)
                                         for k in KS},
            "evidence_recall_all": {f"@{k}": round(evidence[k]["all"] / max(1, asked["all"]), 3) for k in KS}}


def main() -> None:
    """Run both settings and print a table and one JSON object (also written to ``--json``)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/locomo10.json")
    parser.add_argument("--conversations", default="conv-26,conv-30", help="comma-separated sample ids")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    conversations = args.conversations.split(",")
    results = [run(args.data, conversations, grounding) for grounding in (False, True)]
    print(f"conversations {conversations}; questions {results[0]['questions']}")
    print("| grounding | date found@1 | @5 | @10 | temporal evidence recall@5 | @10 | all recall@10 | memories |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        d, e, a = r["answer_date_found"], r["evidence_recall_temporal"], r["evidence_recall_all"]
        print(f"| {'on' if r['grounding'] else 'off'} | {d['@1']:.3f} | {d['@5']:.3f} | {d['@10']:.3f} | "
              f"{e['@5']:.3f} | {e['@10']:.3f} | {a['@10']:.3f} | {r['backfill']['memories']} |")
    off = results[0]["answer_date_found_with_session_date"]
    print(f"control, grounding off with each result's session date (created_at) as its date: found@1 {off['@1']:.3f}, "
          f"@5 {off['@5']:.3f}, @10 {off['@10']:.3f}")
    out = {"conversations": conversations, "runs": results}
    print(json.dumps(out))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
