"""A worker's embeddings of recent texts, kept so that the same text is not embedded twice.

Within one add the same texts are embedded more than once: the extract stage embeds the job's facts,
and the offline model's decider embeds those facts again beside the memories it compares them with,
which were facts of earlier jobs (measured on LoCoMo conv-26 through `memq demo`: 599 texts embedded by
extract, 2,117 by the decider). A hosted embedding model is paid per text. `CachedEmbedder` keeps the
most recently used texts' vectors (least recently used first out; `cachetools.LRUCache`) and embeds
only the texts it lacks, each once per call, in one batch.

A text's cached vector is exactly the one its first batch gave (when two threads embed it at once, the
first to finish); embedding it again in another batch could differ in the last bits (padding:
`tests/test_embedder.py` bounds that).
"""

from __future__ import annotations

import threading

import numpy as np
from cachetools import LRUCache

from memq import metrics
from memq.errors import StoreError
from stores.embedder import Embedder

LONGEST_CACHED = 2000
"""Characters of the longest text kept (longer ones are embedded every time): the cache counts texts, so
this bounds its keys too (4,096 texts of at most 2,000 characters, 1-4 bytes each)."""


class CachedEmbedder:
    """An `Embedder` that keeps the vectors of the last `max_texts` distinct texts it embedded.

    Args:
        inner: the embedder that computes vectors the cache lacks.
        max_texts: how many texts' vectors to keep (> 0); each is kept as the doubles the inner embedder
            gave (8 bytes per dimension), so 4,096 texts of all-MiniLM-L6-v2 (384 dims) take about 13 MB.

    Attributes:
        dims: the inner embedder's.
        hits, misses: texts served from the cache, and texts the inner embedder computed, since start
            (also counted by ``memq_embed_cache_texts_total{result}``).

    Raises:
        ValueError: `max_texts` is not positive.
    """

    def __init__(self, inner: Embedder, max_texts: int) -> None:
        if max_texts <= 0:
            raise ValueError("max_texts must be positive (leave the embedder uncached instead)")
        self.inner = inner
        self.dims = inner.dims
        self.hits = 0
        self.misses = 0
        self._vectors: LRUCache[str, np.ndarray] = LRUCache(maxsize=max_texts)
        self._lock = threading.Lock()

    def embed(self, texts: list[str]) -> list[list[float]]:
        """Embed `texts`, order preserved: cached vectors for the texts seen recently, one call of the
        inner embedder for the others (each distinct text once); texts over `LONGEST_CACHED` characters
        are not kept.

        Returns:
            One list of `dims` floats per text.

        Raises:
            StoreError: the inner embedder returned another number of vectors, or vectors of another size
                or of different sizes.
            Whatever the inner embedder raises (nothing is cached then).
        """
        with self._lock:
            found = {t: self._vectors[t] for t in dict.fromkeys(texts) if t in self._vectors}
        missing = [t for t in dict.fromkeys(texts) if t not in found]
        if missing:
            vectors = self.inner.embed(missing)
            try:
                computed = np.array(vectors, dtype=np.float64)  # exact: Python floats are doubles
            except ValueError as exc:  # rows of different lengths
                raise StoreError(f"the embedder returned ragged vectors for {len(missing)} texts") from exc
            if computed.shape != (len(missing), self.dims):
                raise StoreError(f"the embedder returned {computed.shape} for {len(missing)} texts of "
                                 f"{self.dims} dims")
            with self._lock:
                for text, row in zip(missing, computed):
                    kept = self._vectors.get(text)
                    if kept is None and len(text) <= LONGEST_CACHED:
                        # its own copy: a row of `computed` would keep the whole batch alive
                        kept = self._vectors[text] = row.copy()
                    found[text] = row if kept is None else kept  # a thread that embedded it first wins
        with self._lock:
            self.hits += len(texts) - len(missing)
            self.misses += len(missing)
        metrics.EMBED_CACHE_TEXTS.labels("hit").inc(len(texts) - len(missing))
        metrics.EMBED_CACHE_TEXTS.labels("miss").inc(len(missing))
        return [found[t].tolist() for t in texts]


def cached(inner: Embedder, max_texts: int) -> Embedder:
    """`inner` behind a `CachedEmbedder` of `max_texts` texts, or `inner` itself when `max_texts` is 0."""
    return CachedEmbedder(inner, max_texts) if max_texts > 0 else inner
