"""Redis and Celery plumbing, light enough for the producer: job records and their atomic
transitions (`broker.jobstore`), Celery task messages built without a connection
(`broker.messages`) and the shared rate limiter (`broker.ratelimit`). Import the submodules directly.

The worker side: memq's kombu Redis transport (`broker.transport`) and Celery consumer
(`broker.consumer`), which keep a worker consuming through a Redis restart and move malformed
messages to a poison list (`broker.poison`, with `poison_count` and `poison_messages` to read it),
and the exit deadline of a worker whose consumer died (`broker.watchdog`)."""

__all__: list[str] = []
