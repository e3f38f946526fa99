"""Retrieve stage: embed a job's facts in one batch and find the nearest existing memories of the job's
exact scope (memories of a wider or narrower scope are never shown to the decider, so a job never
changes them)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from memq.models import MemoryItem, Scope
from pipeline.types import Fact
from stores.embedder import Embedder
from stores.vectors import VectorStore


@dataclass(frozen=True)
class Neighbourhood:
    """Facts with their vectors and the existing memories near them.

    Attributes:
        fact_vectors: one vector per fact, in order.
        memories: distinct neighbours over all facts, best score first (what the decider sees).
        name_vectors: one vector per name asked for (entity names new to the graph), in order.
    """

    fact_vectors: list[list[float]]
    memories: list[MemoryItem]
    name_vectors: list[list[float]] = field(default_factory=list)


def find_neighbours(facts: list[Fact], scope: Scope, embedder: Embedder, vectors: VectorStore,
                    *, top_k: int, names: Sequence[str] = (),
                    fact_vectors: Sequence[Sequence[float]] | None = None) -> Neighbourhood:
    """Embed `facts` (and `names`) in one request and query `top_k` neighbours per fact in `scope`, in one batch.

    Args:
        facts: the job's facts (may be empty).
        names: more texts to embed in the same request (entity names, for their name points).
        fact_vectors: the facts' vectors when already embedded (the extract stage's), one per fact:
            then only `names` are embedded.
        scope: only memories whose scope equals this one exactly (absent ids included) are considered.
        embedder: the embedder (one call).
        vectors: the vector store (one batched query).
        top_k: neighbours per fact.

    Returns:
        The `Neighbourhood`; neighbours found by several facts appear once, with their best score.

    Raises:
        LLMUnavailable: a remote embedder is unavailable.
        StoreUnavailable: Qdrant is unreachable.
    """
    if fact_vectors is not None and len(fact_vectors) == len(facts):
        known = [list(v) for v in fact_vectors]
        name_vectors = embedder.embed(list(names)) if names else []
    else:
        texts = [f.text for f in facts] + list(names)
        embedded = embedder.embed(texts) if texts else []
        known, name_vectors = embedded[:len(facts)], embedded[len(facts):]
    if not facts:
        return Neighbourhood(fact_vectors=[], memories=[], name_vectors=name_vectors)
    best: dict[str, MemoryItem] = {}
    for hits in vectors.search_batch(known, scope, limit=top_k, exact=True):
        for hit in hits:
            if hit.id not in best or (hit.score or 0.0) > (best[hit.id].score or 0.0):
                best[hit.id] = hit
    memories = sorted(best.values(), key=lambda m: (-(m.score or 0.0), m.id))
    return Neighbourhood(fact_vectors=known, memories=memories, name_vectors=name_vectors)
