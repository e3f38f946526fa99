"""Throughput under a provider rate limit: N adds over U users against the LLM test server.

The server answers after `--latency` seconds and refuses more than `--rpm` requests per sliding
minute with 429 (with ``Retry-After`` unless ``--no-retry-after``). memq's shared limiter is set to
the same RPM. Reports throughput as a fraction of the limit (target >= 0.9), 429s received, jobs lost
(target 0) and duplicate memories (target 0).

    .venv/bin/python bench/throughput.py [--adds 1000] [--users 50] [--rpm 600] [--latency 0.3]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: the test rigs live in tests/rigs

import argparse
import json
import os
import tempfile
import time
from collections import Counter


def main() -> None:
    """Run and print one JSON object of figures."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--adds", type=int, default=1000)
    parser.add_argument("--users", type=int, default=50)
    parser.add_argument("--rpm", type=int, default=600)
    parser.add_argument("--latency", type=float, default=0.3)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--no-retry-after", action="store_true")
    args = parser.parse_args()

    from tests.rigs.llm_server import LLMTestServer
    from cli.redis_server import RedisServer
    from pipeline.offline_model import answer

    server = LLMTestServer(default=lambda prompt: json.dumps(answer(prompt)), latency_s=args.latency,
                           rpm_limit=args.rpm, with_retry_after=not args.no_retry_after).start()
    with RedisServer() as redis_server, tempfile.TemporaryDirectory() as data_dir:
        os.environ.update({
            "MEMQ_REDIS__URL": redis_server.url, "MEMQ_DATA_DIR": data_dir, "MEMQ_LLM__MODEL": "openai/bench-model",
            "MEMQ_LLM__API_BASE": server.url, "MEMQ_LLM__API_KEY": "bench", "MEMQ_LLM__RPM": str(args.rpm),
            "MEMQ_LLM__BURST_S": "2", "MEMQ_LLM__TIMEOUT_S": "30"})
        from celery.contrib.testing.worker import start_worker

        from memq.config import load_settings
        from memq.models import Scope
        from producer import Producer
        from workers.app import app, clients

        c = clients()
        requests = [{"messages": f"I started learning hobby number {i // args.users} in city {i % 7}.",
                     "user_id": f"user-{i % args.users}"} for i in range(args.adds)]
        with start_worker(app, pool="threads", concurrency=args.threads, perform_ping_check=False,
                          loglevel="WARNING", shutdown_timeout=60):
            producer = Producer(load_settings())
            started = time.monotonic()
            receipts = producer.add_many(requests)
            statuses = producer.wait(receipts, timeout_s=3600, poll_s=1.0)
            elapsed_s = time.monotonic() - started
        answered = server.calls - server.rate_limited
        duplicates = 0
        for u in range(args.users):
            texts = Counter(m.memory for m in c.vectors.list(Scope(user_id=f"user-{u}"), limit=10_000))
            duplicates += sum(n - 1 for n in texts.values() if n > 1)
        print(json.dumps({
            "adds": args.adds, "users": args.users, "rpm_limit": args.rpm, "latency_s": args.latency,
            "retry_after": not args.no_retry_after, "elapsed_s": round(elapsed_s, 1),
            "llm_calls_answered": answered,
            "throughput_fraction_of_limit": round(answered / (elapsed_s / 60 * args.rpm), 3),
            "http_429_received": server.rate_limited,
            "jobs_lost": sum(s.status.value != "succeeded" for s in statuses),
            "duplicate_memories": duplicates,
        }))
    server.stop()


if __name__ == "__main__":
    main()
