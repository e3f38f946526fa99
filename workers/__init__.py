"""The Celery app (`workers.app`) and one thin task per stage (`workers.tasks`). Nothing imports this
package; start it with ``memq worker``."""

__all__: list[str] = []
