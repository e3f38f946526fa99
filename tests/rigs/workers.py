"""``memq worker`` as a real process, for tests that kill, restart or starve it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def worker_env(redis_url: str, data_dir: Path, **extra: str) -> dict[str, str]:
    """Environment of a worker process with the offline model on its own Redis and data folder.

    Args:
        redis_url: the broker.
        data_dir: ``MEMQ_DATA_DIR`` (embedded Qdrant and SQLite).
        extra: more ``MEMQ_*`` variables (they win over the defaults here).
    """
    env = {k: v for k, v in os.environ.items() if k not in (
        "MEMQ_LLM__API_BASE", "MEMQ_LLM__API_KEY", "MEMQ_NEO4J__URI", "MEMQ_NEO4J__PASSWORD")}
    return {**env, "MEMQ_REDIS__URL": redis_url, "MEMQ_DATA_DIR": str(data_dir),
            "MEMQ_LLM__MODEL": "memq-offline/heuristic-v1", "MEMQ_REDIS__VISIBILITY_TIMEOUT_S": "4",
            "MEMQ_JOBS__RETRY_BACKOFF_MAX_S": "4", **extra}


def start_worker(env: dict[str, str], log: Path, *, pool: str = "threads", queues: str | None = None,
                 concurrency: int | None = None) -> subprocess.Popen[bytes]:
    """Start ``memq worker`` (its own process group) appending its output to `log`.

    Args:
        queues: ``--queues`` (default: every queue).
        concurrency: ``--concurrency`` (default: 1 for prefork, else 2).
    """
    if concurrency is None:
        concurrency = 1 if pool == "prefork" else 2
    return subprocess.Popen([sys.executable, "-m", "cli", "worker", "--pool", pool, "--concurrency", str(concurrency),
                             "--loglevel", "INFO", *(["--queues", queues] if queues else [])],
                            env=env, stdout=open(log, "ab"), stderr=subprocess.STDOUT, start_new_session=True)


def wait_ready(proc: subprocess.Popen[bytes], log: Path, *, timeout_s: float = 90.0) -> None:
    """Wait until the worker logs that it is ready to consume (fails if it exits first)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if " ready." in log.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            raise AssertionError(f"worker exited with {proc.returncode}: {log.read_text()[-2000:]}")
        time.sleep(0.1)
    raise AssertionError(f"worker not ready after {timeout_s} s: {log.read_text()[-2000:]}")


def stop_worker(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout_s: float = 60.0) -> None:
    """Signal the worker's process group and wait for it (SIGKILL if it does not stop in time)."""
    if proc.poll() is None:
        os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout_s)
