"""A real embedded Neo4j 5.26 (community) with auth on a loopback Bolt port, for tests and benchmarks.

The server is the Java launcher in ``neo4j-launcher/`` (``org.neo4j.test:neo4j-harness``), built by Maven
and started through ``scripts/neo4j.sh``; no Docker and no network at run time. Typical use::

    with Neo4jServer() as server:
        driver = neo4j.GraphDatabase.driver(server.uri, auth=server.auth)
        ...
        server.stop()   # Neo4j goes away mid-job
        server.start()  # back on the same port with the same data

The launcher stops cleanly when its stdin closes, so a test process that dies never leaves Neo4j behind.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import IO
from tests.rigs.managed import Managed

__all__ = ["DEFAULT_PASSWORD", "NEO4J_SCRIPT", "Neo4jLauncherError", "Neo4jServer", "build_launcher"]

NEO4J_SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "neo4j.sh"
"""``scripts/neo4j.sh`` of this checkout (``build`` / ``run [PORT] [DATA_DIR]``)."""

DEFAULT_PASSWORD = "memq-test-password"
"""Password of user ``neo4j`` when neither the argument nor ``NEO4J_PASSWORD`` gives one."""

_READY_PREFIX = "NEO4J_READY "
_STDERR_LOG = "launcher-stderr.log"
_TAIL_BYTES = 4000

_build_lock = threading.Lock()
_built = False


class Neo4jLauncherError(RuntimeError):
    """The Neo4j launcher could not be built, or Neo4j did not start (the message ends with the stderr tail)."""


def _tail(text: str | bytes | None, limit: int = _TAIL_BYTES) -> str:
    if text is None:
        return ""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    return text[-limit:].strip()


def build_launcher(timeout_s: float = 900.0) -> None:
    """Build the Java launcher with ``scripts/neo4j.sh build`` unless this process already did.

    The script itself is a no-op (about 10 ms) when the launcher is built and unchanged. A cold build
    downloads about 190 MB from Maven Central into the Maven repository (``~/.m2`` unless ``MAVEN_OPTS``
    sets ``-Dmaven.repo.local``) and takes about a minute; a warm one takes a few seconds.

    Args:
        timeout_s: how long the build may take (seconds).

    Raises:
        Neo4jLauncherError: the script is missing, Maven failed, or the build timed out.
    """
    global _built
    with _build_lock:
        if _built:
            return
        if not NEO4J_SCRIPT.is_file():
            raise Neo4jLauncherError(f"launcher script not found: {NEO4J_SCRIPT}")
        try:
            result = subprocess.run(
                ["bash", str(NEO4J_SCRIPT), "build"],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=timeout_s,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise Neo4jLauncherError(
                f"`{NEO4J_SCRIPT} build` did not finish in {timeout_s:.0f} s:\n{_tail(exc.stderr)}"
            ) from None
        if result.returncode != 0:
            output = _tail(result.stderr) or _tail(result.stdout)
            raise Neo4jLauncherError(f"`{NEO4J_SCRIPT} build` failed (exit {result.returncode}):\n{output}")
        _built = True


class Neo4jServer(Managed):
    """Runs embedded Neo4j (auth on, Bolt on 127.0.0.1 only, no HTTP) until stopped.

    Every `start` uses the same port (the free one picked by the first start when ``port`` is 0) and the
    same data folder, so data written before `stop` or `kill` is there after the next `start`.

    Args:
        password: password of user ``neo4j``; None takes ``NEO4J_PASSWORD`` from the environment, else
            `DEFAULT_PASSWORD`. On a reused data folder the stored password is replaced by this one.
        data_dir: Neo4j home (databases, transaction logs, ``logs/debug.log``, and the launcher's stderr in
            ``launcher-stderr.log``); a temporary folder, removed by `close`, when None.
        port: Bolt TCP port; 0 lets the first start pick a free one.
        start_timeout_s: how long `start` waits for Bolt to be ready (seconds), build time excluded.
        stop_timeout_s: how long `stop` waits for a clean shutdown before SIGTERM, then SIGKILL (seconds).
        build_timeout_s: how long the first `start` may spend building the launcher (seconds).
        heap: max Java heap, e.g. ``"512m"`` (the script's default) or ``"1g"``.

    Attributes:
        user: always ``"neo4j"``.
        password: the password in use.
        data_dir: the Neo4j home folder.
        port: the Bolt port; 0 until the first start when it was 0.

    Raises:
        ValueError: ``port`` is out of range or ``password`` is empty.
    """

    user: str = "neo4j"

    def __init__(
        self,
        password: str | None = None,
        data_dir: Path | str | None = None,
        *,
        port: int = 0,
        start_timeout_s: float = 180.0,
        stop_timeout_s: float = 60.0,
        build_timeout_s: float = 900.0,
        heap: str | None = None,
    ) -> None:
        if not 0 <= port <= 65535:
            raise ValueError(f"port must be 0..65535, got {port}")
        self.password = password if password is not None else os.environ.get("NEO4J_PASSWORD", DEFAULT_PASSWORD)
        if not self.password:
            raise ValueError("password must not be empty")
        self._tmp = None if data_dir else tempfile.TemporaryDirectory(prefix="memq-neo4j-")
        self.data_dir = Path(data_dir) if data_dir else Path(self._tmp.name)  # type: ignore[union-attr]
        self.port = port
        self.start_timeout_s = start_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.build_timeout_s = build_timeout_s
        self.heap = heap
        self.last_exit_code: int | None = None
        """Exit status of the previous run (0 after a clean `stop`), None before any stop."""
        self._proc: subprocess.Popen[bytes] | None = None
        self._stderr: IO[bytes] | None = None
        self._reader: threading.Thread | None = None
        self._ready = threading.Event()
        self._ready_uri: str | None = None

    # -- addresses -------------------------------------------------------------------------------------

    @property
    def uri(self) -> str:
        """``bolt://127.0.0.1:PORT``.

        Raises:
            Neo4jLauncherError: the server was never started, so its port is not known yet.
        """
        if self.port == 0:
            raise Neo4jLauncherError("Neo4jServer has not been started yet, so its port is unknown")
        return f"bolt://127.0.0.1:{self.port}"

    @property
    def auth(self) -> tuple[str, str]:
        """``(user, password)`` for ``neo4j.GraphDatabase.driver(uri, auth=...)``."""
        return (self.user, self.password)

    @property
    def running(self) -> bool:
        """True while the launcher process is alive."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        """PID of the Java process (the script ``exec``\\ s Java), None when stopped."""
        return self._proc.pid if self._proc is not None else None

    @property
    def stderr_log(self) -> Path:
        """File that collects the launcher's stderr across starts (Neo4j's own log is ``logs/debug.log``)."""
        return self.data_dir / _STDERR_LOG

    # -- lifecycle -------------------------------------------------------------------------------------

    def start(self) -> Neo4jServer:
        """Build the launcher if needed, start Neo4j and wait until Bolt accepts the credentials.

        Does nothing when the server is already running.

        Returns:
            self, so ``server = Neo4jServer().start()`` works.

        Raises:
            Neo4jLauncherError: the build failed, the launcher exited, or it was not ready within
                ``start_timeout_s`` seconds (e.g. the fixed port is taken); the message has the stderr tail.
        """
        if self.running:
            return self
        if self._proc is not None:  # exited on its own since the last start
            self._reap()
        build_launcher(self.build_timeout_s)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        env["NEO4J_PASSWORD"] = self.password
        if self.heap:
            env["MEMQ_NEO4J_HEAP"] = self.heap
        self._ready.clear()
        self._ready_uri = None
        self._stderr = open(self.stderr_log, "ab")  # noqa: SIM115 - closed in _reap
        log_start = self._stderr.tell()
        try:
            self._proc = subprocess.Popen(
                ["bash", str(NEO4J_SCRIPT), "run", str(self.port), str(self.data_dir)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=self._stderr,
                env=env,
            )
        except OSError as exc:
            self._close_stderr()
            raise Neo4jLauncherError(f"cannot run {NEO4J_SCRIPT}: {exc}") from exc
        self._reader = threading.Thread(target=self._read_stdout, args=(self._proc,), daemon=True,
                                        name=f"neo4j-stdout-{self._proc.pid}")
        self._reader.start()

        deadline = time.monotonic() + self.start_timeout_s
        while not self._ready.wait(0.1):
            if self._proc.poll() is not None:
                self._reap()
                raise Neo4jLauncherError(
                    f"Neo4j exited with status {self.last_exit_code} before it was ready "
                    f"(port {self.port or 'auto'}, data {self.data_dir}):\n{self._log_tail(log_start)}"
                )
            if time.monotonic() > deadline:
                self._terminate(grace_s=10.0)
                raise Neo4jLauncherError(
                    f"Neo4j was not ready within {self.start_timeout_s:.0f} s "
                    f"(port {self.port or 'auto'}, data {self.data_dir}):\n{self._log_tail(log_start)}"
                )

        ready_port = int(str(self._ready_uri).rsplit(":", 1)[1])
        if self.port not in (0, ready_port):  # cannot happen unless the launcher misbehaves
            self._terminate(grace_s=10.0)
            raise Neo4jLauncherError(f"asked for port {self.port}, Neo4j reported {self._ready_uri}")
        self.port = ready_port
        return self

    def stop(self) -> None:
        """Shut Neo4j down cleanly: close its stdin, wait, then SIGTERM and finally SIGKILL.

        Waits up to ``stop_timeout_s`` seconds for the clean shutdown (normally well under a second). Safe
        to call when not running. The port and data folder stay the same for the next `start`.
        """
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            try:
                if proc.stdin is not None:
                    proc.stdin.close()
            except OSError:
                pass
            try:
                proc.wait(self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                self._terminate(grace_s=15.0)
                return
        self._reap()

    def kill(self) -> None:
        """Kill Neo4j with SIGKILL (a crash: no checkpoint; the next `start` runs recovery). Safe when stopped."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
        self._reap()

    def close(self) -> None:
        """Stop the server and remove the data folder if it is a temporary one."""
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    # -- internals -------------------------------------------------------------------------------------

    def _read_stdout(self, proc: subprocess.Popen[bytes]) -> None:
        """Find the READY line, then keep draining stdout so the launcher never blocks on it."""
        assert proc.stdout is not None
        with proc.stdout:
            for raw in proc.stdout:
                line = raw.decode("utf-8", "replace").strip()
                if not self._ready.is_set() and line.startswith(_READY_PREFIX):
                    self._ready_uri = line[len(_READY_PREFIX):].strip()
                    self._ready.set()

    def _terminate(self, grace_s: float) -> None:
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                proc.kill()
        self._reap()

    def _reap(self) -> None:
        proc = self._proc
        if proc is not None:
            self.last_exit_code = proc.wait()
            if proc.stdin is not None:
                try:
                    proc.stdin.close()
                except OSError:
                    pass
        if self._reader is not None:
            self._reader.join(5.0)
            self._reader = None
        self._close_stderr()
        self._proc = None

    def _close_stderr(self) -> None:
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None

    def _log_tail(self, offset: int) -> str:
        try:
            with open(self.stderr_log, "rb") as f:
                f.seek(offset)
                return _tail(f.read())
        except OSError as exc:
            return f"(cannot read {self.stderr_log}: {exc})"
