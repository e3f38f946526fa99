"""Graph planning: turn extracted entities and relations, the decided actions and the decider's
contradictions into the graph change of a job (pure; applied by `pipeline.apply.write_graph`).

Relationship types come from the model, so each is normalized with `stores.graph.relationship_type`;
one that does not normalize to ``[A-Z][A-Z0-9_]*`` is dropped here and never reaches a query. A relation
is supported by the job's memories whose text names both of its ends (else by all memories the job
wrote), so deleting those memories later removes it.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence

from memq.models import MemoryEvent
from memq.models import Relation
from pipeline.types import Action, Entity, ExtractedFacts, GraphPlan
from stores.graph import InvalidRelationshipType, entity_key, relationship_type

logger = logging.getLogger(__name__)

RELATION_ID_NAMESPACE = uuid.UUID("3b1f7c2e-5a94-4d8e-8f61-0e9c2d7b4a15")


def graph_names(extracted: ExtractedFacts) -> dict[str, str]:
    """Entity key -> the name the job's graph plan gives it (its first entity's, else its first relation
    end's), for every entity a job mentions: the names whose embeddings its entity-name points need."""
    names: dict[str, str] = {}
    for e in extracted.entities:
        if entity_key(e.name):
            names.setdefault(entity_key(e.name), e.name)
    for r in extracted.relations:
        for n in (r.source, r.destination):
            if entity_key(n):
                names.setdefault(entity_key(n), n.strip())
    return names


def graph_keys(extracted: ExtractedFacts) -> list[str]:
    """Entity keys a job mentions (entities and relation ends), for finding existing relations."""
    return sorted(graph_names(extracted))


def _supporters(source: str, destination: str, actions: Sequence[Action]) -> list[str]:
    written = [a for a in actions if a.event in (MemoryEvent.ADD, MemoryEvent.UPDATE, MemoryEvent.NONE)]
    both = [a.memory_id for a in written if source in a.memory.lower() and destination in a.memory.lower()]
    if both:
        return both
    fresh = [a.memory_id for a in written if a.event is not MemoryEvent.NONE]
    return fresh or [a.memory_id for a in written]


def build_graph_plan(job_id: str, extracted: ExtractedFacts, actions: Sequence[Action],
                     shown: Sequence[Relation], invalidated_ids: Sequence[str]) -> GraphPlan:
    """The job's graph change.

    Args:
        job_id: the job (relation ids are ``uuid5`` of it and the relation's position).
        extracted: entities and relations from the extract stage.
        actions: the decided memory actions (for support links).
        shown: existing relations shown to the decider, in the order of their small ids ("0", "1", ...).
        invalidated_ids: the small ids the decider marked contradicted; unknown ids are dropped.

    Returns:
        Entities (deduplicated by key, relation ends included), relations with normalized types,
        the rids to invalidate, and how many relations were rejected.
    """
    entities: dict[str, Entity] = {}
    for e in extracted.entities:
        key = entity_key(e.name)
        if key and key not in entities:
            entities[key] = e
    relations: list[Relation] = []
    seen: set[tuple[str, str, str]] = set()
    rejected = 0
    for r in extracted.relations:
        source, destination = entity_key(r.source), entity_key(r.destination)
        try:
            rel_type = relationship_type(r.relationship)
        except InvalidRelationshipType:
            rejected += 1
            continue
        if not source or not destination or (source, rel_type, destination) in seen:
            continue
        seen.add((source, rel_type, destination))
        for key, name in ((source, r.source), (destination, r.destination)):
            entities.setdefault(key, Entity(name=name.strip()))
        relations.append(Relation(
            rid=str(uuid.uuid5(RELATION_ID_NAMESPACE, f"{job_id}:{len(relations)}")), source=source,
            relationship=rel_type, destination=destination, memory_ids=_supporters(source, destination, actions)))
    if rejected:
        logger.warning("job %s: dropped %d relations with invalid relationship types", job_id, rejected)
    by_small_id = {str(i): r for i, r in enumerate(shown) if r.rid}
    contradicted = {by_small_id[i.strip()].rid: by_small_id[i.strip()]
                    for i in invalidated_ids if i.strip() in by_small_id}
    invalidated = sorted(rid for rid in contradicted if rid)
    return GraphPlan(entities=list(entities.values()), relations=relations, invalidated=invalidated,
                     invalidated_relations=[contradicted[rid] for rid in invalidated], rejected=rejected)
