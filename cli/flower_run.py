"""``python -m cli.flower_run ARGS``: Flower (``celery flower``) with its ``/metrics`` page behind the same
basic auth as the rest (Flower 2.2 serves /metrics to anyone). `cli.main.flower` starts it this way.

The worker app is named by string (``-A workers.app``), so nothing here imports the workers.
"""

from __future__ import annotations

import sys

from celery.bin.celery import main as celery_main
from flower.views import monitor
from tornado import web


def protect_metrics() -> None:
    """Make Flower's /metrics handler require the configured authentication, like its other pages."""
    get = monitor.Metrics.get
    if not getattr(get, "memq_protected", False):
        guarded = web.authenticated(get)
        guarded.memq_protected = True  # type: ignore[attr-defined]
        monitor.Metrics.get = guarded


if __name__ == "__main__":
    protect_metrics()
    sys.argv = ["celery", "-A", "workers.app", "flower", *sys.argv[1:]]
    sys.exit(celery_main())
