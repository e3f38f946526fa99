"""Decide stage: compare new facts with similar existing memories and choose ADD / UPDATE / DELETE / NONE.

Semantics are Mem0's memory update step: ADD new information, UPDATE a memory when a fact refines or
changes it (keeping its id), DELETE a memory a fact contradicts, NONE when it is already known. As in
Mem0 the prompt shows existing memories under small integer ids ("0", "1", ...) rather than UUIDs;
ids are mapped back afterwards and any id the model invents is dropped. The prompt text is memq's own.
With no existing neighbour there is nothing to compare, so every fact is an ADD without a model call.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Sequence
from datetime import datetime

import numpy as np
from pydantic import BaseModel, Field

from memq.models import AddJob, MemoryEvent, MemoryItem, Relation
from pipeline.llm import LLM
from pipeline.retrieve import Neighbourhood
from pipeline.graph_plan import build_graph_plan
from pipeline.types import Action, ExtractedFacts, Fact, GraphPlan, Plan
from stores.embedder import Embedder

logger = logging.getLogger(__name__)

MEMORY_ID_NAMESPACE = uuid.UUID("0c3f5b8e-9d7a-4f21-b6c4-51e2a8d9f034")
"""uuid5 namespace of memory ids: ``uuid5(NS, f"{job_id}:{position}")``, the same on every retry."""

INSTRUCTIONS = """You maintain an assistant's long-term memory. You get the existing memories that are \
close to some new facts, and the new facts. For every new fact, and for every existing memory it \
touches, choose one event:
- ADD: the fact is new information. Give it a new id (any string) and its text.
- UPDATE: the fact refines or changes an existing memory about the same thing. Keep the existing id, \
give the new text (merge both when they complement each other) and the old text in old_memory.
- DELETE: the fact contradicts an existing memory, which is no longer true. Keep the existing id.
- NONE: the fact is already known. Keep the existing id.
Use only the ids shown for existing memories. Do not repeat an existing memory unless you change it."""

REPLY_FORMAT = """Reply with a JSON object only, in this form:
{"memory": [{"id": "<id>", "text": "<memory text>", "event": "ADD|UPDATE|DELETE|NONE", \
"old_memory": "<previous text, for UPDATE>"}]}"""

GRAPH_INSTRUCTIONS = """You also get existing relations between entities (ids "0", "1", ...) and the \
new relations. List in invalidated_relations the ids of existing relations that the new facts show \
are no longer true (someone moved, changed jobs, ended a relationship). Do not list relations that \
are merely not mentioned."""

GRAPH_REPLY_FORMAT = """Reply with a JSON object only, in this form:
{"memory": [{"id": "<id>", "text": "<memory text>", "event": "ADD|UPDATE|DELETE|NONE", \
"old_memory": "<previous text, for UPDATE>"}], "invalidated_relations": ["<relation id>"]}"""


class Decision(BaseModel):
    """One event in the model's reply."""

    id: str = Field(description="An existing memory's id, or any new id for ADD.")
    text: str = Field(default="", description="The memory text after the event.")
    event: MemoryEvent = Field(description="ADD, UPDATE, DELETE or NONE.")
    old_memory: str | None = Field(default=None, description="The previous text, for UPDATE.")


class DecisionsReply(BaseModel):
    """The model's reply to the decision prompt."""

    memory: list[Decision] = Field(description="The events, one per fact or touched memory.")
    invalidated_relations: list[str] = Field(default_factory=list,
                                             description="Ids of existing relations the new facts contradict.")


def memory_id(job_id: str, position: int) -> str:
    """Deterministic id of the memory a job adds at `position` of its plan."""
    return str(uuid.uuid5(MEMORY_ID_NAMESPACE, f"{job_id}:{position}"))


def build_user_prompt(existing: Sequence[MemoryItem], facts: Sequence[Fact],
                      relations: Sequence[Relation] | None = None,
                      new_relations: Sequence[Relation] = ()) -> str:
    """The user prompt: existing memories under ids "0".."n-1" and the new facts (and, with graph
    memory, existing relations under ids "0".."m-1" and the new relations), as JSON."""
    payload: dict[str, object] = {
        "task": "decide_memory_events",
        "existing_memories": [{"id": str(i), "text": m.memory} for i, m in enumerate(existing)],
        "new_facts": [f.text for f in facts]}
    if relations is not None:
        payload["existing_relations"] = [{"id": str(i), "source": r.source, "relationship": r.relationship,
                                          "destination": r.destination} for i, r in enumerate(relations)]
        payload["new_relations"] = [r.triple() for r in new_relations]
    return "Input:\n" + json.dumps(payload, ensure_ascii=False, indent=1)


def _unit_rows(vectors: Sequence[Sequence[float]]) -> np.ndarray:
    """The vectors as rows of unit length (float64); a zero vector stays zero."""
    matrix = np.asarray(vectors, dtype=np.float64).reshape(len(vectors), -1)
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    units: np.ndarray = np.divide(matrix, norms, out=np.zeros_like(matrix), where=norms > 0)
    return units


class _Planner:
    """Turns decisions into actions with ids, vectors, timestamps and provenance."""

    def __init__(self, job: AddJob, facts: list[Fact], fact_vectors: list[list[float]], embedder: Embedder) -> None:
        self.job = job
        self.facts = facts
        self.fact_vectors = fact_vectors
        self._fact_units: np.ndarray | None = None
        self.embedder = embedder
        self.when: datetime = job.timestamp or job.enqueued_at
        self.metadata = dict(job.metadata)
        if job.memory_type:
            self.metadata["memory_type"] = job.memory_type

    def vectors_for(self, texts: list[str]) -> list[list[float]]:
        """Reuse a fact's vector when the text is the fact; embed the rest in one batch."""
        by_text = {f.text.strip().lower(): v for f, v in zip(self.facts, self.fact_vectors)}
        missing = sorted({t for t in texts if t.strip().lower() not in by_text})
        if missing:
            by_text.update({t.strip().lower(): v for t, v in zip(missing, self.embedder.embed(missing))})
        return [by_text[t.strip().lower()] for t in texts]

    def source_of(self, vector: list[float]) -> Fact:
        """The fact nearest to a decided text by cosine similarity (its provenance; the first on a tie).

        One matrix-vector product over the job's unit fact vectors (computed once per job): a pure-Python
        cosine per (memory, fact) pair took 37% of the decide stage's CPU on LoCoMo sessions of ~30 facts
        (bench/stage_profile.py under py-spy, 2026-11-22).
        """
        if self._fact_units is None:
            self._fact_units = _unit_rows(self.fact_vectors)
        scores = self._fact_units @ np.asarray(vector, dtype=np.float64)
        return self.facts[int(np.argmax(scores))]

    def add(self, position: int, text: str, vector: list[float]) -> Action:
        fact = self.source_of(vector)
        return Action(event=MemoryEvent.ADD, memory_id=memory_id(self.job.job_id, position), memory=text,
                      vector=vector, created_at=self.when, metadata=self.metadata, source_message_ids=fact.source_message_ids,
                      actor_id=fact.actor_id, role=fact.role, occurred_at=fact.occurred_at)

    def update(self, old: MemoryItem, text: str, vector: list[float]) -> Action:
        """An UPDATE: the new text takes the date of the fact it came from (the memory's own when the
        fact has none)."""
        fact = self.source_of(vector)
        sources = list(dict.fromkeys([*old.source_message_ids, *fact.source_message_ids]))
        return Action(event=MemoryEvent.UPDATE, memory_id=old.id, memory=text, previous_memory=old.memory,
                      vector=vector, created_at=old.created_at or self.when,
                      metadata={**old.metadata, **self.metadata}, source_message_ids=sources,
                      actor_id=fact.actor_id, role=fact.role, occurred_at=fact.occurred_at or old.occurred_at)

    def keep(self, old: MemoryItem, event: MemoryEvent) -> Action:
        return Action(event=event, memory_id=old.id, memory=old.memory, previous_memory=old.memory,
                      created_at=old.created_at or self.when, metadata=old.metadata,
                      source_message_ids=old.source_message_ids, actor_id=old.actor_id, role=old.role,
                      occurred_at=old.occurred_at)


def decide(job: AddJob, extracted: ExtractedFacts, neighbourhood: Neighbourhood, llm: LLM,
           embedder: Embedder, *, relations: Sequence[Relation] | None = None,
           instructions: str | None = None) -> Plan:
    """Decide what the job's facts do to memory (and, with graph memory, which relations they contradict).

    Args:
        job: the add job.
        extracted: its facts (and entities and relations).
        neighbourhood: fact vectors and existing neighbours (from `find_neighbours`).
        llm: the model; not called when there is nothing to compare (no neighbour memory and no
            existing relation), for ``infer=False``, or for procedural memory.
        embedder: embeds decided texts that are not a fact verbatim (one batch).
        relations: existing valid relations touching the job's entities; None when graph memory is off.
        instructions: the deployment's own instructions (``MEMQ_PROMPTS__UPDATE_MEMORY``) in place of
            `INSTRUCTIONS`; the reply format (and the graph part) is always appended.

    Returns:
        The `Plan`: actions in order, the graph change (graph on), usage (0 or 1 model call), and how
        many memories and relations the decider was shown.

    Raises:
        LLMUnavailable: the model or a remote embedder is unavailable (retryable).
        LLMOutputError: the reply does not fit `DecisionsReply`.
    """
    facts = extracted.facts
    planner = _Planner(job, facts, neighbourhood.fact_vectors, embedder)
    existing = neighbourhood.memories
    shown = list(relations or [])
    if not facts and not extracted.relations:
        return Plan(actions=[], graph=GraphPlan() if relations is not None else None)
    if (not existing and not shown) or not job.infer or job.memory_type:
        texts = list(dict.fromkeys(f.text for f in facts)) if job.infer else [f.text for f in facts]
        vectors = planner.vectors_for(texts)
        actions = [planner.add(i, t, v) for i, (t, v) in enumerate(zip(texts, vectors))]
        graph = build_graph_plan(job.job_id, extracted, actions, [], []) if relations is not None else None
        return Plan(actions=actions, graph=graph)
    if relations is None:
        system = (instructions or INSTRUCTIONS) + "\n\n" + REPLY_FORMAT
        user = build_user_prompt(existing, facts)
    else:
        system = (instructions or INSTRUCTIONS) + "\n\n" + GRAPH_INSTRUCTIONS + "\n\n" + GRAPH_REPLY_FORMAT
        user = build_user_prompt(existing, facts, shown, extracted.relations)
    reply, usage = llm.complete_json(system, user, DecisionsReply)
    actions = _actions(reply.memory, existing, planner)
    graph = (build_graph_plan(job.job_id, extracted, actions, shown, reply.invalidated_relations)
             if relations is not None else None)
    return Plan(actions=actions, graph=graph, usage=usage, neighbours=len(existing), relations_shown=len(shown))


def _actions(decisions: list[Decision], existing: list[MemoryItem], planner: _Planner) -> list[Action]:
    by_small_id = {str(i): m for i, m in enumerate(existing)}
    kept: list[tuple[MemoryEvent, str, MemoryItem | None]] = []
    touched: set[str] = set()
    added: set[str] = set()
    invented = 0
    for d in decisions:
        if d.event is MemoryEvent.ADD:
            if d.text.strip() and d.text.strip().lower() not in added:
                added.add(d.text.strip().lower())
                kept.append((d.event, d.text.strip(), None))
            continue
        old = by_small_id.get(d.id.strip())
        if old is None:
            invented += 1
            continue
        if old.id in touched or (d.event is MemoryEvent.UPDATE and not d.text.strip()):
            continue
        touched.add(old.id)
        kept.append((d.event, d.text.strip(), old))
    if invented:
        logger.warning("dropped %d decisions with ids the model invented (job %s)", invented, planner.job.job_id)
    texts = [text for event, text, _ in kept if event in (MemoryEvent.ADD, MemoryEvent.UPDATE)]
    vectors = iter(planner.vectors_for(texts))
    actions: list[Action] = []
    for position, (event, text, old) in enumerate(kept):
        if event is MemoryEvent.ADD:
            actions.append(planner.add(position, text, next(vectors)))
        elif event is MemoryEvent.UPDATE and old is not None:
            if text == old.memory:
                actions.append(planner.keep(old, MemoryEvent.NONE))
                next(vectors)
            else:
                actions.append(planner.update(old, text, next(vectors)))
        elif old is not None:
            actions.append(planner.keep(old, event))
    return actions

