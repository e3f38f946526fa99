"""Celery app and thin tasks (one per stage). Nothing imports this package; start it with ``memq worker``."""

__all__: list[str] = []
