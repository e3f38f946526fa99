"""Where an add's time goes: per-stage wall and CPU over a LoCoMo backfill, with the model at a fixed latency.

One worker process (thread pool, in this process) runs N adds (the first sessions of LoCoMo's
conversations) against the LLM test server answering after ``--latency`` seconds with the offline
heuristic's answers, no rate limit. The stage figures come from the worker's own Prometheus histograms
(`memq.metrics`: ``memq_stage_seconds`` and ``memq_stage_cpu_seconds``), so the bench measures what
production measures. Reported: adds/s, and per stage the tasks run, mean wall ms, mean CPU ms, and the
share of all CPU; plus the process's total CPU (all threads) against the stages' sum (the rest is the
worker's own machinery: consumer, events, the store's RPC thread).

    .venv/bin/python bench/stage_profile.py [--sessions 10] [--threads 8] [--latency 0.3] [--replay] [--out FILE]

With ``--replay`` the simulator's own CPU leaves the timed run: the adds first run untimed under other
user ids (each scope's prompts are the same, since a job sees only its own scope), the simulator keeps
its answers by prompt hash, and the timed run is served from them (``simulator_answers`` says how many
were replayed), so the figures are memq's own, as with a remote model.

(first step of issue 13: find what is not the model's time before removing it)
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: the test rigs live in tests/rigs

import argparse
import hashlib
import json
import os
import resource
import tempfile
import time


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    """Run once and print one JSON object of figures (and write it to ``--out`` when given)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--sessions", type=int, default=10, help="sessions per LoCoMo conversation (10 conversations)")
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--latency", type=float, default=0.3, help="seconds the model takes per call")
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/locomo10.json")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--replay", action="store_true",
                        help="run the adds once untimed (other user ids) so the simulator replays recorded answers "
                             "in the timed run instead of computing the heuristic in this process")
    args = parser.parse_args()

    from cli.redis_server import RedisServer
    from pipeline.offline_model import answer
    from tests.rigs.llm_server import LLMTestServer

    replies: dict[str, str] = {}
    served = {"computed": 0, "replayed": 0}

    def reply(prompt: str) -> str:
        key = hashlib.sha256(prompt.encode()).hexdigest()
        if key in replies:
            served["replayed"] += 1
            return replies[key]
        served["computed"] += 1
        replies[key] = json.dumps(answer(prompt))
        return replies[key]

    server = LLMTestServer(default=reply, latency_s=args.latency).start()
    with RedisServer() as redis_server, tempfile.TemporaryDirectory() as data_dir:
        os.environ.update({
            "MEMQ_REDIS__URL": redis_server.url, "MEMQ_DATA_DIR": data_dir, "MEMQ_LLM__MODEL": "openai/bench-model",
            "MEMQ_LLM__API_BASE": server.url, "MEMQ_LLM__API_KEY": "bench", "MEMQ_LLM__TIMEOUT_S": "30",
            "MEMQ_METRICS__PORT": "0"})
        from celery.contrib.testing.worker import start_worker
        from prometheus_client import REGISTRY

        from memq.config import load_settings
        from producer import Producer
        from producer.backfill import read_locomo
        from workers.app import app, clients

        clients()
        items = read_locomo(args.data)
        by_conversation: dict[str, list[dict[str, object]]] = {}
        for item in items:
            by_conversation.setdefault(item.conversation_id, []).append(item.request)
        requests = [r for rs in by_conversation.values() for r in rs[:args.sessions]]
        stages = ("start", "caption", "extract", "decide", "write_vectors", "write_graph", "finalize")

        def sample(name: str, stage: str) -> float:
            return REGISTRY.get_sample_value(name, {"stage": stage}) or 0.0

        with start_worker(app, pool="threads", concurrency=args.threads, perform_ping_check=False,
                          loglevel="WARNING", shutdown_timeout=60):
            producer = Producer(load_settings())
            if args.replay:  # an untimed first pass under other user ids records the simulator's answers
                warm = producer.add_many([{**r, "user_id": f"warm-{r['user_id']}"} for r in requests])
                producer.wait(warm, timeout_s=3600, poll_s=0.2)
                served.update(computed=0, replayed=0)
                before = {stage: (sample("memq_stage_seconds_count", stage), sample("memq_stage_seconds_sum", stage),
                                  sample("memq_stage_cpu_seconds_sum", stage)) for stage in stages}
            else:
                before = {stage: (0.0, 0.0, 0.0) for stage in stages}
            cpu0, started = _cpu_s(), time.monotonic()
            receipts = producer.add_many(requests)
            statuses = producer.wait(receipts, timeout_s=3600, poll_s=0.2)
            elapsed_s, cpu_s = time.monotonic() - started, _cpu_s() - cpu0
        per_stage = {}
        for stage in stages:
            n = sample("memq_stage_seconds_count", stage) - before[stage][0]
            wall = sample("memq_stage_seconds_sum", stage) - before[stage][1]
            cpu = sample("memq_stage_cpu_seconds_sum", stage) - before[stage][2]
            per_stage[stage] = {"tasks": int(n), "wall_ms_mean": round(wall / n * 1000, 1) if n else None,
                                "cpu_ms_mean": round(cpu / n * 1000, 1) if n else None, "cpu_s": round(cpu, 2)}
        stage_cpu = sum(s["cpu_s"] for s in per_stage.values())
        for s in per_stage.values():
            s["cpu_share"] = round(s["cpu_s"] / stage_cpu, 3) if stage_cpu else None
        report = {
            "adds": len(requests), "threads": args.threads, "model_latency_s": args.latency,
            "succeeded": sum(s.status.value == "succeeded" for s in statuses), "elapsed_s": round(elapsed_s, 1),
            "adds_per_s": round(len(requests) / elapsed_s, 2), "model_calls": served["computed"] + served["replayed"],
            "simulator_answers": dict(served),
            "process_cpu_s": round(cpu_s, 1), "stages_cpu_s": round(stage_cpu, 1),
            "cpu_outside_stages_s": round(cpu_s - stage_cpu, 1), "stages": per_stage,
            "notes": "a stage's CPU is its task thread's own (time.thread_time): torch's intra-op threads "
                     "(embeddings) count outside, as do the LLM simulator serving in this process (the offline "
                     "heuristic computes every answer), the store's RPC thread and Celery's consumer; "
                     "decide tasks include the waits for the scope's turn (a few ms each)",
        }
    server.stop()
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
