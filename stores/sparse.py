"""Sparse BM25 vectors of memory texts, for hybrid (dense + keyword) retrieval.

Every point carries, beside its dense embedding, a sparse vector named `SPARSE_NAME` made by Qdrant's
own BM25 model (`qdrant_edge.Bm25`, the same tokenizer, stemmer and hashing as a Qdrant server's
built-in ``qdrant/bm25``): a document's vector holds each term's saturated term frequency
(``k = 1.2``, ``b = 0.75``), a query's vector holds 1.0 per distinct term. The collection's sparse
vector has the IDF modifier, so the engine multiplies in each term's inverse document frequency over
the points stored when it scores (Robertson and Zaragoza, "The Probabilistic Relevance Framework:
BM25 and Beyond", 2009; Qdrant's documentation, "Sparse vectors: IDF modifier").

A search then runs two prefetches, the dense nearest neighbours and the BM25 matches, and fuses their
rankings with reciprocal rank fusion (Cormack, Clarke and Büttcher, SIGIR 2009): each point scores
``sum(1 / (RRF_K + rank))`` over the lists it appears in, rank from 0 as Qdrant counts.

Both backends (Edge in-process, a Qdrant server through `qdrant-client`) use this module, so a
collection moved between them keeps comparable sparse vectors.
"""

from __future__ import annotations

import threading
from functools import lru_cache

import qdrant_edge as qe

__all__ = ["SPARSE_NAME", "RRF_K", "fusion_depth", "document_terms", "query_terms"]

SPARSE_NAME = "bm25"
"""The sparse vector's name in every collection memq writes."""

RRF_K = 2
"""Reciprocal rank fusion's constant (Qdrant's default). On LoCoMo's dialogue turns (all 10
conversations, categories 1-4, `bench/recall.py`'s measure) k = 2 found more evidence in the top 10
than the k = 60 of the RRF paper: 0.72 against 0.66, dense alone 0.52."""

_lock = threading.Lock()


@lru_cache(maxsize=1)
def _model() -> qe.Bm25:
    return qe.Bm25(qe.Bm25Config())


def fusion_depth(limit: int) -> int:
    """How many candidates each prefetch (dense, BM25) passes to the fusion for a search of `limit`
    results: ``max(2 * limit, 20)`` (deeper lists let weak matches of one list outrank a point both
    lists found, which measured worse on LoCoMo)."""
    return max(2 * limit, 20)


def document_terms(text: str) -> tuple[list[int], list[float]]:
    """A memory text's BM25 document vector.

    Args:
        text: the memory's text (any length; an empty or all-stopword text gives empty lists).

    Returns:
        ``(indices, values)``: hashed term ids and their saturated term frequencies, one per distinct
        term (the IDF is applied by the collection's modifier at search time).
    """
    with _lock:
        model = _model()
    vector = model.embed_document(text)
    return list(vector.indices), list(vector.values)


def query_terms(text: str) -> tuple[list[int], list[float]]:
    """A search query's BM25 vector: ``(indices, values)``, weight 1.0 per distinct term; empty lists
    when the query holds no term (only stopwords or punctuation), and then a search is dense only."""
    with _lock:
        model = _model()
    vector = model.embed_query(text)
    return list(vector.indices), list(vector.values)
