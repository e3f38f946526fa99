"""Celery configuration for memq workers, read from the same `memq.config.Settings` as everything else.

Queues by kind of work (`memq.config.Queues`): ``memq.light`` (job start-up), ``memq.llm`` (caption,
extract, decide: the stages that call a model) and ``memq.write`` (store writes, finalize). A worker
consumes all three unless started with ``-Q``.
"""

from kombu import Queue

from memq.config import Queues, load_settings

_settings = load_settings()

broker_url = _settings.redis.url
# Celery's consumer on memq's Redis transport (broker/): a lost connection never leaves a worker up and
# idle, a malformed message goes to the memq:poison list instead of ending the worker.
worker_consumer = "broker.consumer:Consumer"
result_backend = _settings.redis.backend_url
broker_connection_retry_on_startup = True
# s: a killed worker's unacked tasks come back after this; longer than the longest stage and its countdowns
broker_transport_options = {
    "visibility_timeout": _settings.redis.visibility_timeout_s,
    "unacked_restore_interval": 5,  # s between sweeps for messages of dead workers (kombu's default: ~100 s)
    "unacked_restore_throttle": 1,
}
result_expires = 24 * 3600  # s

task_serializer = "json"
result_serializer = "json"
accept_content = ["json"]
timezone = "UTC"
enable_utc = True

task_ignore_result = True  # job results live in the job record (broker.jobstore)
task_acks_late = True
task_reject_on_worker_lost = True
worker_prefetch_multiplier = 1
task_track_started = False
worker_send_task_events = True  # Flower
task_send_sent_event = True

task_default_queue = Queues.LIGHT
task_queues = [Queue(name) for name in Queues.ALL]
task_routes = {name: {"queue": queue} for name, queue in Queues.ROUTES.items()}
