"""Pure stage logic (pydantic in, pydantic out) and the synchronous read helpers.

Stages, in order: `caption` -> `extract` -> `retrieve` + `decide` -> `apply` (vector and graph writes)
-> `finalize`. `workers.tasks` wraps each in a Celery task; `search.MemorySearch` serves reads.
"""

__all__: list[str] = []
