"""A real ``redis-server`` process on a free loopback port, for tests, benchmarks and the demo."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

import redis


class RedisServerError(RuntimeError):
    """redis-server is missing or did not answer PING in time."""


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """Runs ``redis-server`` bound to 127.0.0.1 until stopped.

    Args:
        port: TCP port; a free one when None.
        appendonly: turn on AOF persistence (``appendfsync everysec``), as a production broker must.
        data_dir: folder for AOF/RDB files; a temporary one when None.
        start_timeout_s: how long to wait for PING (seconds).
        debug_command: allow ``DEBUG`` from loopback clients (tests use ``DEBUG SLEEP`` to make Redis slow).

    Raises:
        RedisServerError: ``redis-server`` is not on PATH or does not start.
    """

    def __init__(self, port: int | None = None, *, appendonly: bool = False, data_dir: Path | None = None,
                 start_timeout_s: float = 10.0, debug_command: bool = False) -> None:
        self.port = port or free_port()
        self.appendonly = appendonly
        self._tmp = None if data_dir else tempfile.TemporaryDirectory(prefix="memq-redis-")
        self.data_dir = data_dir or Path(self._tmp.name)  # type: ignore[union-attr]
        self.start_timeout_s = start_timeout_s
        self.debug_command = debug_command
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0``."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        """Start the server (same port and data folder on every start) and wait for PING."""
        binary = shutil.which("redis-server")
        if binary is None:
            raise RedisServerError("redis-server is not installed (Debian: apt-get install -y redis-server)")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.data_dir),
                "--save", "", "--appendonly", "yes" if self.appendonly else "no", "--appendfsync", "everysec",
                "--protected-mode", "yes", "--loglevel", "warning"]
        if self.debug_command:
            args += ["--enable-debug-command", "local"]
        self._proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            try:
                client.ping()
                client.close()
                return self
            except redis.ConnectionError:
                if self._proc.poll() is not None or time.monotonic() > deadline:
                    err = self._proc.stderr.read().decode() if self._proc.stderr else ""
                    self.stop()
                    raise RedisServerError(f"redis-server did not start on port {self.port}: {err[-500:]}") from None
                time.sleep(0.05)

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 5 s)."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None

    def close(self) -> None:
        """Stop the server and remove its temporary folder."""
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
