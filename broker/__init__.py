"""Redis and Celery plumbing, light enough for the producer: job records and their atomic
transitions (`broker.jobstore`), Celery task messages built without a connection
(`broker.messages`) and the shared rate limiter (`broker.ratelimit`). Import the submodules directly."""

__all__: list[str] = []
