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
"""Reciprocal rank fusion's constant (Qdrant's default). A trial on LoCoMo's dialogue turns (all 10
conversations, the 1,540 questions of categories 1-4, evidence among the top 10) with 40 candidates
per list found 0.72 of the questions with k = 2 against 0.66 with the RRF paper's k = 60 (dense
alone: 0.52); with k = 60, 20 candidates per list found 0.72 and 100 found 0.64, hence a short list
(`fusion_depth`). ``bench/recall.py`` measures the choice: 0.73 on the turns, and 0.70 against
dense's 0.63 on the memories memq extracts from them."""

_lock = threading.Lock()


@lru_cache(maxsize=1)
def _model() -> qe.Bm25:
    return qe.Bm25(qe.Bm25Config())


def fusion_depth(limit: int) -> int:
    """How many candidates each prefetch (dense, BM25) passes to the fusion for a search of `limit`
    results: ``max(2 * limit, 20)`` (deeper lists let weak matches of one list crowd out points both
    lists found, which measured worse on LoCoMo; see `RRF_K`)."""
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
