"""A throwaway PostgreSQL server from the machine's binaries, on a free loopback port, for tests.

``initdb`` makes a fresh cluster in a temporary folder (superuser ``memq`` with a password, checked on
TCP; the unix socket lives inside the folder), ``postgres`` runs as a child process listening on
127.0.0.1 only, and one database is created. Durability is off (``fsync``, ``synchronous_commit``,
``full_page_writes``): the cluster is thrown away. Typical use::

    with PostgresServer() as server:
        engine = sqlalchemy.create_engine(server.url)   # postgresql+psycopg://memq:...@127.0.0.1:PORT/memq
        other = server.create_database("scratch")       # the URL of another, empty database
        server.stop()    # PostgreSQL goes away (clients get connection errors)
        server.start()   # back on the same port with the same data

PostgreSQL refuses to run as root: as root, ``initdb`` and ``postgres`` run as user ``postgres``
(created by Debian's package; ``nobody`` otherwise) through ``setpriv`` (``runuser`` when missing), and
the folder is handed to that user. The binaries are found on ``PATH`` or in Debian's
``/usr/lib/postgresql/<version>/bin`` (the newest version). Startup takes about one to two seconds.

Where ``setpriv`` exists the server gets SIGINT (fast shutdown) when the thread that started it exits, so
a test process that dies never leaves PostgreSQL behind: start it from a long-lived thread.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

from cli.redis_server import free_port
from tests.rigs.managed import Managed

__all__ = ["PostgresServerError", "PostgresServer", "postgres_bin_dir"]

_DEBIAN_ROOT = Path("/usr/lib/postgresql")
_TAIL_CHARS = 3000
_SOCKET_PATH_MAX = 100  # sun_path holds 108 bytes; ".s.PGSQL.65535" is appended to the folder


class PostgresServerError(RuntimeError):
    """PostgreSQL is missing, or did not start or stop in time (the message ends with its log's tail)."""


def postgres_bin_dir() -> Path | None:
    """The folder holding ``initdb``, ``postgres`` and ``pg_ctl`` of one PostgreSQL version, or None.

    ``initdb`` on ``PATH`` wins (symlinks resolved, so a wrapper in ``/usr/local/bin`` leads to its real
    folder); else the newest ``/usr/lib/postgresql/<version>/bin`` (Debian's ``postgresql`` package puts
    none of them on ``PATH``).
    """
    candidates: list[Path] = []
    on_path = shutil.which("initdb")
    if on_path is not None:
        candidates.append(Path(on_path).resolve().parent)
    if _DEBIAN_ROOT.is_dir():
        versions = [p for p in _DEBIAN_ROOT.iterdir() if re.fullmatch(r"\d+(\.\d+)?", p.name)]
        versions.sort(key=lambda p: tuple(int(n) for n in p.name.split(".")), reverse=True)
        candidates += [p / "bin" for p in versions]
    for folder in candidates:
        if all(os.access(folder / name, os.X_OK) for name in ("initdb", "postgres")):
            return folder
    return None


def _traversable_by_all(folder: Path) -> bool:
    """True when every folder on the way to `folder` lets any user through (``o+x``)."""
    path = folder.resolve()
    return all(p.stat().st_mode & 0o001 for p in (path, *path.parents))


class PostgresServer(Managed):
    """Runs a fresh PostgreSQL cluster (``postgres`` on 127.0.0.1) until stopped.

    Every `start` uses the same port and data folder, so data written before `stop` is there after the
    next `start`; the cluster is made (``initdb``) by the first start only.

    Args:
        database: the database created on the first start, named by `url`.
        user: the superuser's name.
        password: the superuser's password (``scram-sha-256`` on TCP; trust on the unix socket).
        port: TCP port; a free one when None.
        timezone: the server's ``TimeZone`` (the session default of every client), e.g. ``"Asia/Kolkata"``;
            None keeps what ``initdb`` picked from the environment.
        max_connections: most client connections at once (each pooled SQLAlchemy engine keeps a few).
        base_dir: folder for the cluster (``data/``), the socket (``sock/``) and ``postgres.log`` (as root,
            handed to the unprivileged user); a temporary one, removed by `close`, when None.
        start_timeout_s: how long `start` may take, ``initdb`` included (seconds).
        stop_timeout_s: how long `stop` waits for a fast shutdown before an immediate one, then SIGKILL.

    Attributes:
        bin_dir: where the binaries were found (None when PostgreSQL is not installed).
        port, database, user, password, base_dir: as given (port resolved).

    Raises:
        ValueError: `database` or `user` is not a plain identifier.
    """

    def __init__(self, database: str = "memq", *, user: str = "memq", password: str = "memq-test-password",
                 port: int | None = None, timezone: str | None = None, max_connections: int = 200,
                 base_dir: Path | None = None, start_timeout_s: float = 60.0, stop_timeout_s: float = 10.0) -> None:
        for name in (database, user):
            if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", name):
                raise ValueError(f"not a plain lowercase identifier: {name!r}")
        self.database = database
        self.user = user
        self.password = password
        self.port = port or free_port()
        self.timezone = timezone
        self.max_connections = max_connections
        self.start_timeout_s = start_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.bin_dir = postgres_bin_dir()
        self._runner = _runner()
        self._tmp: str | None = None
        if base_dir is None:
            parent = Path(tempfile.gettempdir())
            if self._runner is not None and not _traversable_by_all(parent):
                parent = Path("/tmp")  # the unprivileged runner must reach the folder
            self._tmp = tempfile.mkdtemp(prefix="memq-pg-", dir=parent)
        self.base_dir = Path(base_dir or self._tmp)  # type: ignore[arg-type]
        self._proc: subprocess.Popen[bytes] | None = None

    # -- addresses -------------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """SQLAlchemy URL of `database`: ``postgresql+psycopg://USER:PASSWORD@127.0.0.1:PORT/DATABASE``."""
        return self.url_of(self.database)

    def url_of(self, database: str) -> str:
        """SQLAlchemy URL (psycopg 3 driver) of another database of this server."""
        return f"postgresql+psycopg://{self.user}:{self.password}@127.0.0.1:{self.port}/{database}"

    @property
    def data_dir(self) -> Path:
        """The cluster's folder (``PGDATA``)."""
        return self.base_dir / "data"

    @property
    def log_file(self) -> Path:
        """The server's stderr, across starts."""
        return self.base_dir / "postgres.log"

    @property
    def running(self) -> bool:
        """True while the postmaster process is alive."""
        return self._proc is not None and self._proc.poll() is None

    # -- databases -------------------------------------------------------------------------------------

    def create_database(self, name: str | None = None) -> str:
        """Create an empty database (a fresh ``test_<hex>`` name when None) and return its URL.

        Raises:
            ValueError: `name` is not a plain identifier.
            psycopg.Error: the server refused (e.g. the name exists, or it is not running).
        """
        name = name or f"test_{uuid.uuid4().hex[:16]}"
        if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", name):
            raise ValueError(f"not a plain lowercase identifier: {name!r}")
        import psycopg

        with psycopg.connect(self._conninfo("postgres"), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')  # a checked identifier
        return self.url_of(name)

    # -- lifecycle -------------------------------------------------------------------------------------

    def start(self) -> PostgresServer:
        """Make the cluster on the first start, run ``postgres`` and wait until it accepts the password;
        create `database` when missing. Does nothing when already running.

        Returns:
            self.

        Raises:
            PostgresServerError: the binaries or psycopg are missing, ``initdb`` failed, or the server
                exited or did not accept connections within ``start_timeout_s``.
        """
        if self.running:
            return self
        if self.bin_dir is None:
            raise PostgresServerError("PostgreSQL is not installed (Debian: apt-get install -y postgresql; "
                                      "looked for initdb on PATH and in /usr/lib/postgresql/*/bin)")
        try:
            import psycopg
        except ImportError as exc:
            raise PostgresServerError("the psycopg driver is missing (pip install 'psycopg[binary]')") from exc
        deadline = time.monotonic() + self.start_timeout_s
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self._hand_over(self.base_dir)
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb(deadline)
        sock = self.base_dir / "sock"
        sock.mkdir(exist_ok=True)
        self._hand_over(sock)
        # TCP only when the folder's path is too long for a unix socket address
        sockets = str(sock) if len(str(sock)) <= _SOCKET_PATH_MAX - 20 else ""
        settings = {"listen_addresses": "127.0.0.1", "port": str(self.port), "unix_socket_directories": sockets,
                    "max_connections": str(self.max_connections), "fsync": "off", "synchronous_commit": "off",
                    "full_page_writes": "off", "log_min_messages": "warning",
                    **({"timezone": self.timezone} if self.timezone else {})}
        args = [str(self.bin_dir / "postgres"), "-D", str(self.data_dir)]
        for key, value in settings.items():
            args += ["-c", f"{key}={value}"]
        with open(self.log_file, "ab") as log:
            log_start = log.tell()
            self._proc = subprocess.Popen(self._as_runner(args, pdeathsig=True), stdin=subprocess.DEVNULL,
                                          stdout=log, stderr=subprocess.STDOUT)
        while True:
            try:
                with psycopg.connect(self._conninfo("postgres"), connect_timeout=2, autocommit=True) as conn:
                    exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (self.database,)).fetchone()
                    if exists is None:
                        conn.execute(f'CREATE DATABASE "{self.database}"')  # a checked identifier
                return self
            except psycopg.OperationalError:
                if self._proc.poll() is not None:
                    code = self._proc.returncode
                    self._proc = None
                    raise PostgresServerError(f"postgres exited with status {code} (port {self.port}):\n"
                                              f"{self._log_tail(log_start)}") from None
                if time.monotonic() > deadline:
                    self.stop()
                    raise PostgresServerError(f"postgres did not accept connections within "
                                              f"{self.start_timeout_s:.0f} s (port {self.port}):\n"
                                              f"{self._log_tail(log_start)}") from None
                time.sleep(0.05)

    def stop(self) -> None:
        """Shut PostgreSQL down: fast shutdown (SIGINT: clients are disconnected, data is kept), then an
        immediate one (SIGQUIT), then SIGKILL, each after ``stop_timeout_s``. Safe when stopped."""
        proc = self._proc
        if proc is None:
            return
        for sig in (signal.SIGINT, signal.SIGQUIT, signal.SIGKILL):
            if proc.poll() is not None:
                break
            proc.send_signal(sig)
            try:
                proc.wait(self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                continue
        proc.wait()
        self._proc = None

    def close(self) -> None:
        """Stop the server and remove its folder if it is a temporary one."""
        self.stop()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    # -- internals -------------------------------------------------------------------------------------

    def _conninfo(self, database: str) -> str:
        return (f"host=127.0.0.1 port={self.port} dbname={database} user={self.user} "
                f"password={self.password}")

    def _initdb(self, deadline: float) -> None:
        assert self.bin_dir is not None
        pwfile = self.base_dir / "pwfile"
        pwfile.write_text(self.password + "\n")
        pwfile.chmod(0o600)
        self._hand_over(pwfile)
        args = [str(self.bin_dir / "initdb"), "-D", str(self.data_dir), "-U", self.user, f"--pwfile={pwfile}",
                "--auth-local=trust", "--auth-host=scram-sha-256", "--encoding=UTF8", "--locale=C",
                "--no-sync", "--no-instructions"]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "LC_")) and k != "LANG"}
        try:
            result = subprocess.run(self._as_runner(args, pdeathsig=False), capture_output=True, env=env,
                                    stdin=subprocess.DEVNULL, timeout=max(1.0, deadline - time.monotonic()),
                                    check=False)
        except subprocess.TimeoutExpired:
            raise PostgresServerError(f"initdb did not finish within {self.start_timeout_s:.0f} s") from None
        finally:
            pwfile.unlink(missing_ok=True)
        if result.returncode != 0:
            out = (result.stderr or result.stdout).decode("utf-8", "replace")[-_TAIL_CHARS:]
            raise PostgresServerError(f"initdb failed (exit {result.returncode}) in {self.data_dir}:\n{out}")

    def _as_runner(self, args: list[str], *, pdeathsig: bool) -> list[str]:
        """`args` run as the unprivileged user when root (and tied to this thread when `pdeathsig`)."""
        setpriv = shutil.which("setpriv")
        if setpriv is not None:
            prefix = [setpriv]
            if self._runner is not None:
                uid, gid = self._runner
                prefix += [f"--reuid={uid}", f"--regid={gid}", "--clear-groups"]
            if pdeathsig:
                prefix.append("--pdeathsig=SIGINT")
            return [*prefix, "--", *args] if len(prefix) > 1 else args
        if self._runner is not None:
            runuser = shutil.which("runuser")
            if runuser is None:
                raise PostgresServerError("running as root needs setpriv or runuser (util-linux) to drop to "
                                          "an unprivileged user")
            return [runuser, "-u", pwd.getpwuid(self._runner[0]).pw_name, "--", *args]
        return args

    def _hand_over(self, path: Path) -> None:
        """Give `path` to the unprivileged user (as root)."""
        if self._runner is not None:
            os.chown(path, *self._runner)

    def _log_tail(self, offset: int) -> str:
        try:
            with open(self.log_file, "rb") as f:
                f.seek(offset)
                return f.read().decode("utf-8", "replace")[-_TAIL_CHARS:].strip()
        except OSError as exc:
            return f"(cannot read {self.log_file}: {exc})"


def _runner() -> tuple[int, int] | None:
    """``(uid, gid)`` to run PostgreSQL as when this process is root (``postgres``, else ``nobody``)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            continue
        return entry.pw_uid, entry.pw_gid
    raise PostgresServerError("running as root, and there is no postgres or nobody user to run PostgreSQL as")
