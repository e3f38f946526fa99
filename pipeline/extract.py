"""Extract stage: messages -> facts, in one model call.

Semantics follow Mem0's fact extraction (personal details, preferences, plans, relationships, events
worth remembering; nothing from small talk), with one addition: each fact names the messages it came
from, by their position in the prompt, so memories keep their provenance. The prompt text is memq's own.
A custom ``prompt`` on the job replaces the instructions; the reply format is always appended.
"""

from __future__ import annotations

import json
from datetime import datetime

from pydantic import BaseModel, Field, field_validator

from memq.models import AddJob, Message, Role
from pipeline.llm import LLM
from memq.models import Relation
from pipeline.types import CaptionedMessages, Entity, ExtractedFacts, Fact

INSTRUCTIONS = """You keep long-term memory for an assistant. Read the conversation and write down the \
facts worth remembering about the people in it: personal details, preferences and dislikes, plans and \
goals, relationships, jobs, health, events with their dates, and anything they asked to be remembered.
Rules:
- Each fact is one short, self-contained sentence that names who it is about (use the speaker's name \
when given, never "I" or "me").
- Resolve relative dates ("yesterday", "last week") against the conversation date when one is given.
- Skip greetings, small talk, questions without an answer, and anything the assistant merely suggested.
- Text in [image: ...] describes an image the speaker shared; a fact about it says so ("Ann shared a \
photo of her new bike").
- Write facts in the language of the conversation.
- If nothing is worth remembering, return an empty list."""

REPLY_FORMAT = """Reply with a JSON object only, in this form:
{"facts": [{"text": "<fact>", "sources": [<index of each message the fact comes from>]}]}"""

GRAPH_INSTRUCTIONS = """Also list the entities the facts mention (people, places, organisations, \
pets, things, events; the speaker by name) with a short lower-case type, and the relations between \
them: source and destination are entity names, relationship is a short verb phrase in UPPER_SNAKE_CASE \
(WORKS_AT, LIVES_IN, SISTER_OF)."""

GRAPH_REPLY_FORMAT = """Reply with a JSON object only, in this form:
{"facts": [{"text": "<fact>", "sources": [<index of each message the fact comes from>]}],
 "entities": [{"name": "<name>", "entity_type": "<type>"}],
 "relations": [{"source": "<entity name>", "relationship": "<RELATIONSHIP>", "destination": "<entity name>"}]}"""

PROCEDURAL_INSTRUCTIONS = """Summarize what the agent did in this conversation as a procedure another \
agent could follow: the task, each step taken with its key inputs and results, and the outcome. Keep \
names, numbers and errors verbatim."""

PROCEDURAL_FORMAT = """Reply with a JSON object only: {"summary": "<the procedure>"}"""


class ExtractedFact(BaseModel):
    """One fact in the model's reply."""

    text: str = Field(min_length=1, description="The fact, one self-contained sentence.")
    sources: list[int] = Field(default_factory=list, description="Indexes of the messages it comes from.")


class ExtractedEntity(BaseModel):
    """One entity in the model's reply."""

    name: str = Field(min_length=1, description="The entity's name as written.")
    entity_type: str = Field(default="entity", description="A short lower-case type: person, city, pet ...")


class ExtractedRelation(BaseModel):
    """One relation in the model's reply."""

    source: str = Field(min_length=1, description="Name of the entity the relation starts from.")
    relationship: str = Field(min_length=1, description="UPPER_SNAKE_CASE verb phrase.")
    destination: str = Field(min_length=1, description="Name of the entity the relation points to.")


class FactsReply(BaseModel):
    """The model's reply to the extraction prompt. Plain strings are accepted as facts without sources."""

    facts: list[ExtractedFact] = Field(description="Facts worth remembering; may be empty.")
    entities: list[ExtractedEntity] = Field(default_factory=list, description="Entities mentioned (graph on).")
    relations: list[ExtractedRelation] = Field(default_factory=list, description="Relations (graph on).")

    @field_validator("facts", mode="before")
    @classmethod
    def _strings_are_facts(cls, value: object) -> object:
        if isinstance(value, list):
            return [{"text": v} if isinstance(v, str) else v for v in value]
        return value


class ProceduralReply(BaseModel):
    """The model's reply to the procedural-summary prompt."""

    summary: str = Field(min_length=1, description="The procedure, as text.")


def message_ids(messages: list[Message]) -> list[str]:
    """Provenance id of each message: the caller's `message_id`, else its position."""
    return [m.message_id or str(i) for i, m in enumerate(messages)]


def _prompt_messages(messages: list[Message]) -> list[dict[str, object]]:
    return [{"index": i, "role": m.role.value, **({"name": m.name} if m.name else {}), "text": m.text}
            for i, m in enumerate(messages) if m.text.strip()]


def build_user_prompt(task: str, messages: list[Message], when: datetime | None, *, graph: bool = False) -> str:
    """The user prompt: the task name, the conversation date and the numbered messages, as JSON."""
    payload: dict[str, object] = {"task": task, "conversation_date": when.date().isoformat() if when else None,
                                  "messages": _prompt_messages(messages)}
    if graph:
        payload["graph"] = True
    return "Input:\n" + json.dumps(payload, ensure_ascii=False, indent=1)


def _speaker(messages: list[Message], indexes: list[int]) -> tuple[str | None, str | None]:
    names = {messages[i].name for i in indexes}
    roles = {messages[i].role.value for i in indexes}
    return (names.pop() if len(names) == 1 else None), (roles.pop() if len(roles) == 1 else None)


def verbatim_facts(messages: list[Message]) -> ExtractedFacts:
    """``infer=False``: every non-system message with text becomes a fact as written, no model call."""
    ids = message_ids(messages)
    facts = [Fact(text=m.text.strip(), source_message_ids=[ids[i]], actor_id=m.name, role=m.role.value)
             for i, m in enumerate(messages) if m.role is not Role.SYSTEM and m.text.strip()]
    return ExtractedFacts(facts=facts)


def extract_facts(job: AddJob, captioned: CaptionedMessages, llm: LLM, *, graph: bool = False,
                  instructions: str | None = None) -> ExtractedFacts:
    """Turn a job's messages into facts (and, with `graph`, entities and relations) in one model call.

    Args:
        job: the add job (`infer`, `prompt`, `memory_type`, `timestamp` are honoured).
        captioned: the messages after the caption stage.
        llm: the model.
        graph: graph memory is on: ask for entities and relations in the same reply.
        instructions: the deployment's own instructions (``MEMQ_PROMPTS__FACT_EXTRACTION``) in place of
            `INSTRUCTIONS`; the job's ``prompt`` wins over both. The reply format is always appended.

    Returns:
        Facts with their source message ids, entities and relations, and the stage's usage (0 or 1
        model call).

    Raises:
        LLMUnavailable: the model is unavailable (retryable).
        LLMOutputError: the reply does not fit `FactsReply`.
    """
    messages = captioned.messages
    if not job.infer:
        return verbatim_facts(messages)
    ids = message_ids(messages)
    when = job.timestamp or job.enqueued_at
    if job.memory_type == "procedural_memory":
        reply, usage = llm.complete_json(PROCEDURAL_INSTRUCTIONS + "\n\n" + PROCEDURAL_FORMAT,
                                         build_user_prompt("procedural_summary", messages, when), ProceduralReply)
        return ExtractedFacts(facts=[Fact(text=reply.summary.strip(), source_message_ids=ids, role="assistant")],
                              usage=usage)
    base = job.prompt or instructions or INSTRUCTIONS
    if graph:
        system = base + "\n\n" + GRAPH_INSTRUCTIONS + "\n\n" + GRAPH_REPLY_FORMAT
    else:
        system = base + "\n\n" + REPLY_FORMAT
    user = build_user_prompt("extract_facts", messages, when, graph=graph)
    facts_reply, usage = llm.complete_json(system, user, FactsReply)
    facts: list[Fact] = []
    seen: set[str] = set()
    for f in facts_reply.facts:
        text = f.text.strip()
        if not text or text.lower() in seen:
            continue
        seen.add(text.lower())
        indexes = sorted({i for i in f.sources if 0 <= i < len(messages)}) or list(range(len(messages)))
        actor_id, role = _speaker(messages, indexes)
        facts.append(Fact(text=text, source_message_ids=[ids[i] for i in indexes], actor_id=actor_id, role=role))
    if not graph:
        return ExtractedFacts(facts=facts, usage=usage)
    entities = [Entity(name=e.name.strip(), entity_type=e.entity_type.strip().lower() or "entity")
                for e in facts_reply.entities if e.name.strip()]
    relations = [Relation(source=r.source.strip(), relationship=r.relationship.strip(), destination=r.destination.strip())
                 for r in facts_reply.relations if r.source.strip() and r.destination.strip() and r.relationship.strip()]
    return ExtractedFacts(facts=facts, entities=entities, relations=relations, usage=usage)
