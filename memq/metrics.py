"""memq's own Prometheus metrics, defined once: updated where things happen, served by each worker
(`workers.app`, ``MEMQ_METRICS__PORT``). Labels carry stage, model, queue and outcome names only:
never user text, scope ids or job ids (their number would be unbounded).

Counters and histograms (per worker process):

- ``memq_jobs_total{outcome}``: jobs ended here, once each: succeeded or failed (a job that went partial
  while a store write retried is counted when it ends).
- ``memq_dead_letters_total``: failed jobs whose request was kept for replay.
- ``memq_stage_seconds{stage}``: time a stage task took (histogram, seconds).
- ``memq_stage_cpu_seconds{stage}``: CPU time its thread spent (histogram, seconds; the wall time minus it
  is waiting: model calls, stores, Redis, the GIL).
- ``memq_stage_tasks_total{stage, kind}``: stage tasks by what they did: done, waiting (scope's turn,
  rate-limit budget, another delivery computing), retry, failed, skipped.
- ``memq_llm_calls_total{model, result}``: model calls: ok, rate_limited (the provider's 429), error.
- ``memq_llm_tokens_total{model, kind}``: prompt and completion tokens as the provider counted them.
- ``memq_limiter_waits_total{budget}`` and ``memq_limiter_wait_seconds_total{budget}``: calls the shared
  rate limiter held back, and for how long.
- ``memq_llm_learned_rpm{budget}`` (gauge): the requests per minute the shared limiter learned from the
  provider's 429s without ``Retry-After`` (`broker.adaptive`), as this worker last saw it; absent while
  none is learned (unlimited, or the configured ``rpm`` rules).

Gauges read from Redis at each scrape (`broker.queue_metrics`): queue depth per queue, unfinished jobs,
the oldest one's age, jobs waiting for their scope's turn.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

JOBS = Counter("memq_jobs_total", "Jobs ended in this worker, by outcome (succeeded, failed).", ["outcome"])
JOBS_RESCUED = Counter("memq_jobs_rescued_total", "Lost jobs (next task message gone with a killed worker) the "
                       "rescue sweep found, by outcome (rescued, failed, moved, finished, missing).", ["outcome"])
DEAD_LETTERS = Counter("memq_dead_letters_total", "Failed jobs kept as dead letters for replay.")
STAGE_SECONDS = Histogram("memq_stage_seconds", "Time a stage task took, in seconds.", ["stage"],
                          buckets=(0.005, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
STAGE_CPU_SECONDS = Histogram("memq_stage_cpu_seconds", "CPU time the task's own thread spent on a stage, in "
                              "seconds (model and store waits excluded).", ["stage"],
                              buckets=(0.001, 0.005, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
STAGE_TASKS = Counter("memq_stage_tasks_total", "Stage tasks by what they did.", ["stage", "kind"])
LLM_CALLS = Counter("memq_llm_calls_total", "Model calls by result (ok, rate_limited, error).", ["model", "result"])
LLM_TOKENS = Counter("memq_llm_tokens_total", "Tokens of model calls, as the provider counted them.",
                     ["model", "kind"])
EMBED_CACHE_TEXTS = Counter("memq_embed_cache_texts_total", "Texts the worker's embedding cache served (hit) "
                            "or had embedded (miss).", ["result"])
LIMITER_WAITS = Counter("memq_limiter_waits_total", "Calls the shared rate limiter held back.", ["budget"])
LIMITER_WAIT_SECONDS = Counter("memq_limiter_wait_seconds_total", "Seconds calls were told to wait by the shared "
                               "rate limiter.", ["budget"])
LLM_LEARNED_RPM = Gauge("memq_llm_learned_rpm", "Requests per minute the shared limiter learned from the provider's "
                        "429s without Retry-After (absent: none learned).", ["budget"])
