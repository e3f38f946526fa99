"""The light producer: validate add requests and enqueue them on Redis by task name.

Importing it loads pydantic, redis and celery only: no LLM, vector, graph or ML library.
"""

from producer.client import Producer, add, add_many, status
from producer.validate import build_job

__all__ = [
    # enqueue and follow jobs
    "Producer",
    "add",
    "add_many",
    "status",
    # validation only
    "build_job",
]
