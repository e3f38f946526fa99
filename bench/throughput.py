"""Throughput under a provider rate limit: N adds over U users against the LLM test server.

The server answers after `--latency` seconds and refuses more than `--rpm` requests per sliding
minute with 429 (with ``Retry-After`` unless ``--no-retry-after``); a refused request takes no slot.
memq's shared limiter is set to the same RPM (``MEMQ_LLM__RPM``), or to `--memq-rpm N`, or left unset
with ``--memq-rpm none``: memq then starts unlimited and learns the provider's rate from its 429s
(`broker.adaptive`). Each add holds `--facts` first-person statements (1: the original one-fact adds;
2..5: distinct topics, so each is its own memory).

Reports jobs succeeded / failed / unfinished (target: all succeeded), memories stored, duplicate
memories (target 0), 429s received, adds/s, model calls answered, throughput as a fraction of the
limit over the whole run and over its second half (after adaptation; target >= 0.9), the calls the
provider accepted in each minute, and the rate memq learned (None: none).

    .venv/bin/python bench/throughput.py [--adds 1000] [--users 50] [--rpm 600] [--latency 0.3]
        [--no-retry-after] [--memq-rpm none|N] [--facts 1] [--out bench/results/FILE.json]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: the test rigs live in tests/rigs

import argparse
import json
import os
import tempfile
import threading
import time
from collections import Counter

TOPICS = (
    ("I adopted a {} last spring.", ("dog", "cat", "parrot", "rabbit", "hamster", "turtle", "goldfish", "horse",
                                     "ferret", "lizard")),
    ("I started taking {} lessons.", ("piano", "Japanese", "pottery", "chess", "salsa", "welding", "calligraphy",
                                      "astronomy", "sailing", "archery")),
    ("I moved to {} for my new job.", ("Lyon", "Osaka", "Denver", "Nairobi", "Oslo", "Lima", "Hanoi", "Perth",
                                       "Quebec", "Seville")),
    ("My favourite dish is {}.", ("ramen", "paella", "tacos", "pierogi", "falafel", "risotto", "dumplings",
                                  "ceviche", "goulash", "pho")),
    ("I work as a {} now.", ("nurse", "carpenter", "pilot", "librarian", "chemist", "baker", "architect",
                             "firefighter", "translator", "gardener")),
)
"""Five statements on five topics; an add's `n`-th session of a user takes the `n`-th filler of each."""


def _message(i: int, users: int, facts: int) -> str:
    if facts == 1:
        return f"I started learning hobby number {i // users} in city {i % 7}."
    session = i // users
    return " ".join(text.format(fillers[(session + k) % len(fillers)]) for k, (text, fillers) in
                    enumerate(TOPICS[:facts]))


def _memq_rpm(value: str) -> str:
    if value in ("provider", "none") or (value.isdigit() and int(value) > 0):
        return value
    raise argparse.ArgumentTypeError("'provider', 'none' or a positive integer")


def main() -> None:
    """Run and print one JSON object of figures (and write it to ``--out`` when given)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--adds", type=int, default=1000)
    parser.add_argument("--users", type=int, default=50)
    parser.add_argument("--rpm", type=int, default=600, help="the provider's limit (requests per sliding minute)")
    parser.add_argument("--latency", type=float, default=0.3)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--no-retry-after", action="store_true")
    parser.add_argument("--memq-rpm", type=_memq_rpm, default="provider",
                        help="MEMQ_LLM__RPM: 'provider' (= --rpm), 'none' (unset: memq learns the limit), or N")
    parser.add_argument("--facts", type=int, default=1, choices=range(1, len(TOPICS) + 1),
                        help="statements per add (1: the original one-fact adds)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.facts > 1 and args.adds // args.users > len(TOPICS[0][1]):
        parser.error(f"--facts > 1 holds {len(TOPICS[0][1])} distinct sessions per user: raise --users")

    from tests.rigs.llm_server import LLMTestServer
    from cli.redis_server import RedisServer
    from pipeline.offline_model import answer

    memq_rpm = {"provider": str(args.rpm), "none": None}.get(args.memq_rpm, args.memq_rpm)
    server = LLMTestServer(default=lambda prompt: json.dumps(answer(prompt)), latency_s=args.latency,
                           rpm_limit=args.rpm, with_retry_after=not args.no_retry_after).start()
    with RedisServer() as redis_server, tempfile.TemporaryDirectory() as data_dir:
        os.environ.update({
            "MEMQ_REDIS__URL": redis_server.url, "MEMQ_DATA_DIR": data_dir, "MEMQ_LLM__MODEL": "openai/bench-model",
            "MEMQ_LLM__API_BASE": server.url, "MEMQ_LLM__API_KEY": "bench", "MEMQ_LLM__BURST_S": "2",
            "MEMQ_LLM__TIMEOUT_S": "30", "MEMQ_METRICS__PORT": "0"})
        if memq_rpm is None:
            os.environ.pop("MEMQ_LLM__RPM", None)
        else:
            os.environ["MEMQ_LLM__RPM"] = memq_rpm
        from celery.contrib.testing.worker import start_worker
        from prometheus_client import REGISTRY

        from broker.ratelimit import RateLimiter
        from memq.config import load_settings
        from memq.models import JobState, Scope
        from producer import Producer
        from workers.app import app, clients

        c = clients()
        requests = [{"messages": _message(i, args.users, args.facts), "user_id": f"user-{i % args.users}"}
                    for i in range(args.adds)]
        limiter = RateLimiter(c.ledger.jobs.client)
        learned_seen: list[tuple[float, float | None]] = []
        sampling = threading.Event()

        def sample() -> None:  # the learned rate every second, as the workers share it
            while not sampling.wait(1.0):
                learned_seen.append((time.monotonic(), limiter.learned_rpm("openai/bench-model")))

        with start_worker(app, pool="threads", concurrency=args.threads, perform_ping_check=False,
                          loglevel="WARNING", shutdown_timeout=60):
            producer = Producer(load_settings())
            started = time.monotonic()
            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            receipts = producer.add_many(requests)
            statuses = producer.wait(receipts, timeout_s=3600, poll_s=1.0)
            ended = time.monotonic()
            sampling.set()
            sampler.join()
        elapsed_s = ended - started
        answered = server.calls - server.rate_limited
        half = started + elapsed_s / 2
        second_half = sum(half <= t <= ended for t in server.accepted_at)
        per_minute = Counter(int((t - started) // 60) for t in server.accepted_at if t >= started)
        memories, duplicates = 0, 0
        for u in range(args.users):
            texts = Counter(m.memory for m in c.vectors.list(Scope(user_id=f"user-{u}"), limit=10_000))
            memories += sum(texts.values())
            duplicates += sum(n - 1 for n in texts.values() if n > 1)
        learned = limiter.learned_rpm("openai/bench-model")
        states = Counter(s.status for s in statuses)
        by_minute: dict[int, list[float]] = {}
        for t, rpm in learned_seen:
            if rpm is not None:
                by_minute.setdefault(int((t - started) // 60), []).append(rpm)
        waits = REGISTRY.get_sample_value("memq_limiter_waits_total", {"budget": "openai/bench-model"}) or 0
        figures = {
            "adds": args.adds, "users": args.users, "facts_per_add": args.facts, "rpm_limit": args.rpm,
            "memq_rpm": None if memq_rpm is None else int(memq_rpm), "latency_s": args.latency,
            "retry_after": not args.no_retry_after, "threads": args.threads, "elapsed_s": round(elapsed_s, 1),
            "jobs_succeeded": states[JobState.SUCCEEDED], "jobs_failed": states[JobState.FAILED],
            "jobs_unfinished": args.adds - states[JobState.SUCCEEDED] - states[JobState.FAILED],
            "memories_stored": memories, "duplicate_memories": duplicates,
            "http_429_received": server.rate_limited, "adds_per_s": round(args.adds / elapsed_s, 3),
            "llm_calls_answered": answered,
            "throughput_fraction_of_limit": round(answered / (elapsed_s / 60 * args.rpm), 3),
            "throughput_fraction_of_limit_second_half": round(second_half / (elapsed_s / 2 / 60 * args.rpm), 3),
            "calls_accepted_per_minute": [per_minute[m] for m in range(int(elapsed_s // 60) + 1)],
            "learned_rpm_mean_per_minute": [round(sum(v) / len(v), 1) if (v := by_minute.get(m)) else None
                                            for m in range(int(elapsed_s // 60) + 1)],
            "learned_rpm_at_end": None if learned is None else round(learned, 2),
            "limiter_waits": int(waits),
        }
        print(json.dumps(figures))
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(figures, indent=2) + "\n")
    server.stop()


if __name__ == "__main__":
    main()
