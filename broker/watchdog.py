"""A last resort for a worker whose consumer stopped: exit, non-zero, so a supervisor restarts it.

When Celery's consumer dies on an error it cannot recover from, the worker starts a warm shutdown,
which waits for every running task (the thread pool joins its threads): for that long the process
is up but consumes nothing. `exit_soon` bounds that wait. The idea is a supervisor's liveness probe
(systemd's ``WatchdogSec``, Kubernetes' ``livenessProbe``) turned inside out: the process ends itself.
"""

from __future__ import annotations

import logging
import os
import threading

EX_SOFTWARE = 70
"""Exit status of a forced exit (``EX_SOFTWARE`` of sysexits.h: an internal error)."""

logger = logging.getLogger(__name__)


def exit_soon(grace_s: float, reason: str, *, code: int = EX_SOFTWARE) -> threading.Timer:
    """End this process with `code` after `grace_s`, unless it has ended by then.

    The timer is a daemon thread: a process that exits on its own in time is not held up by it. The
    exit is ``os._exit`` (no clean-up): unacked messages stay in Redis and come back after the
    visibility timeout.

    Args:
        grace_s: seconds left for a clean shutdown.
        reason: why, for the CRITICAL log line.
        code: the exit status (non-zero).

    Returns:
        The started timer (``cancel()`` stops it).
    """
    def _exit() -> None:
        logger.critical("worker still up %.0f s after its consumer stopped (%s): exiting with status %d",
                        grace_s, reason, code)
        for handler in logging.getLogger().handlers:
            handler.flush()
        os._exit(code)

    timer = threading.Timer(grace_s, _exit)
    timer.daemon = True
    timer.name = "memq-exit-watchdog"
    timer.start()
    return timer
