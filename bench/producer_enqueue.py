"""Producer benchmark: `add` latency and `add_many` throughput against Celery's plain `apply_async` loop.

Runs against a fresh local redis-server (no worker consumes), in one process, and reports ratios:

    .venv/bin/python bench/producer_enqueue.py [--n 2000]

Figures (DESIGN.md): add p99 <= 2 ms on local Redis; add_many >= 10x the apply_async loop.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from celery import Celery

from memq.config import RedisSettings, Settings
from cli.redis_server import RedisServer
from producer import Producer

MESSAGE = [{"role": "user", "content": "I moved to Lyon last month and started a job at a bakery."}]


def main() -> None:
    """Measure and print one JSON line of figures."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=2000, help="requests per measurement")
    n = parser.parse_args().n
    with RedisServer() as server:
        producer = Producer(Settings(redis=RedisSettings(url=server.url)))
        producer.add(MESSAGE, user_id="warm")
        latencies = []
        for i in range(n):
            t = time.perf_counter()
            producer.add(MESSAGE, user_id=f"u{i % 50}")
            latencies.append((time.perf_counter() - t) * 1000)
        latencies.sort()

        requests = [{"messages": MESSAGE, "user_id": f"u{i % 50}"} for i in range(n)]
        t = time.perf_counter()
        for i in range(0, n, 500):
            producer.add_many(requests[i:i + 500])
        add_many_s = time.perf_counter() - t

        celery = Celery("baseline", broker=server.url, set_as_current=False)
        celery.send_task("memq.baseline", args=["warm"], queue="baseline", ignore_result=True)
        t = time.perf_counter()
        for i in range(n):
            celery.send_task("memq.baseline", kwargs={"messages": MESSAGE, "user_id": f"u{i % 50}"},
                             queue="baseline", ignore_result=True)
        apply_async_s = time.perf_counter() - t
        producer.close()
    print(json.dumps({
        "n": n,
        "add_ms_p50": round(statistics.median(latencies), 3),
        "add_ms_p99": round(latencies[int(0.99 * (n - 1))], 3),
        "add_many_per_s": round(n / add_many_s),
        "apply_async_loop_per_s": round(n / apply_async_s),
        "add_many_vs_apply_async": round(apply_async_s / add_many_s, 1),
    }))


if __name__ == "__main__":
    main()
