"""The worker's Prometheus metrics, scraped over HTTP while a LoCoMo backfill runs through the session worker."""

from __future__ import annotations

import urllib.request
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import requires_locomo
from tests.helpers import locomo_sessions, until


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@requires_locomo
def test_metrics_count_jobs_stages_and_model_calls_during_a_backfill(producer: Any, settings: Any,
                                                                     user_id: str) -> None:
    port = settings.metrics.port
    before = _scrape(port)
    # When a backfill of 3 LoCoMo sessions runs
    receipts = producer.add_many(locomo_sessions(user_id, "conv-26", 3))
    # Then, while it runs, the backlog gauges are there for every queue
    during = _scrape(port)
    for queue in ("memq.light", "memq.llm", "memq.write"):
        assert ("memq_queue_depth", (("queue", queue),)) in during
        assert during[("memq_queue_oldest_job_seconds", (("queue", queue),))] >= 0
    assert ("memq_unfinished_jobs", ()) in during and ("memq_jobs_waiting_for_scope", ()) in during
    statuses = producer.wait(receipts, timeout_s=180, poll_s=0.2)
    assert all(s.status.value == "succeeded" for s in statuses)
    # And once done: every job is counted, every stage timed, the model's calls and tokens counted
    until(lambda: _value(_scrape(port), "memq_jobs_total", outcome="succeeded")
          - _value(before, "memq_jobs_total", outcome="succeeded") >= 3, 10, "the last job to be counted")
    after = _scrape(port)

    def grew(name: str, **labels: str) -> float:
        return _value(after, name, **labels) - _value(before, name, **labels)

    assert grew("memq_jobs_total", outcome="succeeded") >= 3
    for stage in ("start", "caption", "extract", "decide", "write_vectors", "write_graph", "finalize"):
        assert grew("memq_stage_seconds_count", stage=stage) >= 3, stage
    assert grew("memq_llm_calls_total", model="openai/test-model", result="ok") >= 3
    assert grew("memq_llm_tokens_total", model="openai/test-model", kind="prompt") > 0
    assert grew("memq_stage_tasks_total", stage="extract", kind="done") >= 3
    # And no label carries a scope id or a job id
    assert not any(user_id in str(key) or statuses[0].job_id in str(key) for key in after)


def test_a_job_is_counted_once_when_it_ends_not_at_each_partial_write_retry() -> None:
    from prometheus_client import REGISTRY

    from jobs.transitions import Finished
    from memq.errors import StoreUnavailable
    from memq.models import JobState
    from workers.tasks import _count

    def value(name: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    before = {o: value("memq_jobs_total", outcome=o) for o in ("succeeded", "partial", "failed")}
    retries = value("memq_stage_tasks_total", stage="write_graph", kind="retry")
    # When a job goes partial twice (its graph write retries) and then succeeds
    for _ in range(2):
        _count("write_graph", Finished(JobState.PARTIAL, None, error=StoreUnavailable("Neo4j down")), "ok", 0.01)
    _count("finalize", Finished(JobState.SUCCEEDED, None), "ok", 0.01)
    _count("finalize", Finished(JobState.SUCCEEDED, None), "finished", 0.01)  # a redelivery: nothing recorded
    # Then it is one succeeded job, no partial job, and two write retries
    assert value("memq_jobs_total", outcome="succeeded") - before["succeeded"] == 1
    assert value("memq_jobs_total", outcome="partial") == before["partial"]
    assert value("memq_stage_tasks_total", stage="write_graph", kind="retry") - retries == 2


def test_backlog_gauges_read_the_queue_a_job_waits_in(redis_server: Any) -> None:
    import time

    from broker.queue_metrics import QueueCollector
    from tests.helpers import quiet_producer

    with quiet_producer(redis_server.url) as (producer, client):
        # Given two jobs of one scope accepted where no worker reads (their start messages wait in memq.light)
        producer.add("I like tea.", user_id="gauges")
        time.sleep(1.1)
        producer.add("I like coffee.", user_id="gauges")
        url = redis_server.url.rsplit("/", 1)[0] + "/3"
        gauges = {(s.name, tuple(s.labels.values())): s.value
                  for family in QueueCollector(url).collect() for s in family.samples}
    # Then the light queue holds both, the next one out is the first job (over a second old), none waits
    assert gauges[("memq_queue_depth", ("memq.light",))] == 2 and gauges[("memq_queue_depth", ("memq.llm",))] == 0
    assert 1.0 <= gauges[("memq_queue_oldest_job_seconds", ("memq.light",))] < 60
    assert gauges[("memq_queue_oldest_job_seconds", ("memq.llm",))] == 0
    assert gauges[("memq_unfinished_jobs", ())] == 2 and gauges[("memq_jobs_waiting_for_scope", ())] == 0
