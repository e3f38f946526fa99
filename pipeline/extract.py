"""Extract stage: messages -> facts, in one model call.

Semantics follow Mem0's fact extraction (personal details, preferences, plans, relationships, events
worth remembering; nothing from small talk), with one addition: each fact names the messages it came
from, by their position in the prompt, so memories keep their provenance. The prompt text is memq's own.
A custom ``prompt`` on the job replaces the instructions; the reply format is always appended.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone

from pydantic import BaseModel, Field, field_validator

from memq.models import AddJob, Message, Role
from pipeline.dates import day_of, parse_date, resolve
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

TEMPORAL_INSTRUCTIONS = """Dates: write every relative date in a fact ("yesterday", "last week", "two days \
ago", "next month", "last Saturday") as an absolute date computed from the conversation date ("Ann went \
hiking on 7 May 2023", "the week before 8 May 2023"), and give each fact a "date": the day it refers to as \
YYYY-MM-DD (the event's date when the fact names one, else the conversation date), or null if unknown."""

_SOURCES = '"sources": [<index of each message the fact comes from>]}'
_DATED = '"sources": [<index of each message the fact comes from>], "date": "<YYYY-MM-DD>"}'

PROCEDURAL_INSTRUCTIONS = """Summarize what the agent did in this conversation as a procedure another \
agent could follow: the task, each step taken with its key inputs and results, and the outcome. Keep \
names, numbers and errors verbatim."""

PROCEDURAL_FORMAT = """Reply with a JSON object only: {"summary": "<the procedure>"}"""


class ExtractedFact(BaseModel):
    """One fact in the model's reply."""

    text: str = Field(min_length=1, description="The fact, one self-contained sentence.")
    sources: list[int] = Field(default_factory=list, description="Indexes of the messages it comes from.")
    date: str | None = Field(default=None, description="The day the fact refers to (YYYY-MM-DD), when asked for.")

    @field_validator("date", mode="before")
    @classmethod
    def _any_date(cls, value: object) -> object:
        """A date that is not a string (a number, an object) counts as none: never fail a job over it."""
        return value if isinstance(value, str) else None


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


def build_user_prompt(task: str, messages: list[Message], when: datetime | None, *, graph: bool = False,
                      dates: bool = False) -> str:
    """The user prompt: the task name, the conversation date and the numbered messages, as JSON (with
    ``"graph": true`` / ``"dates": true`` when entities or a date per fact are asked for)."""
    payload: dict[str, object] = {"task": task, "conversation_date": when.date().isoformat() if when else None,
                                  "messages": _prompt_messages(messages)}
    if graph:
        payload["graph"] = True
    if dates:
        payload["dates"] = True
    return "Input:\n" + json.dumps(payload, ensure_ascii=False, indent=1)


def _speaker(messages: list[Message], indexes: list[int]) -> tuple[str | None, str | None]:
    names = {messages[i].name for i in indexes}
    roles = {messages[i].role.value for i in indexes}
    return (names.pop() if len(names) == 1 else None), (roles.pop() if len(roles) == 1 else None)


def occurred_at(text: str, answered: object, when: datetime) -> datetime:
    """The date a fact refers to: the model's `answered` date when it parses (`pipeline.dates.parse_date`),
    else a date phrase in the fact's text resolved against `when` (`pipeline.dates.resolve`), else `when`
    (the job's timestamp: the session date in a backfill, else its enqueue time). A day the model gives
    that is the session's own day keeps the session's time. UTC; never raises."""
    session = when.astimezone(timezone.utc)
    found = parse_date(answered)
    if found is not None and found == day_of(session.date()):
        return session
    if found is None:
        resolved = resolve(text, when)
        found = resolved.when if resolved is not None else None
    return found or session


def verbatim_facts(messages: list[Message], when: datetime | None = None) -> ExtractedFacts:
    """``infer=False``: every non-system message with text becomes a fact as written, no model call
    (dated by `occurred_at` when `when` is given, i.e. with temporal grounding)."""
    ids = message_ids(messages)
    facts = [Fact(text=m.text.strip(), source_message_ids=[ids[i]], actor_id=m.name, role=m.role.value,
                  occurred_at=occurred_at(m.text, None, when) if when is not None else None)
             for i, m in enumerate(messages) if m.role is not Role.SYSTEM and m.text.strip()]
    return ExtractedFacts(facts=facts)


def extract_facts(job: AddJob, captioned: CaptionedMessages, llm: LLM, *, graph: bool = False,
                  instructions: str | None = None, temporal: bool = False) -> ExtractedFacts:
    """Turn a job's messages into facts (and, with `graph`, entities and relations) in one model call.

    Args:
        job: the add job (`infer`, `prompt`, `memory_type`, `timestamp` are honoured).
        captioned: the messages after the caption stage.
        llm: the model.
        graph: graph memory is on: ask for entities and relations in the same reply.
        instructions: the deployment's own instructions (``MEMQ_PROMPTS__FACT_EXTRACTION``) in place of
            `INSTRUCTIONS`; the job's ``prompt`` wins over both. The reply format is always appended.
        temporal: temporal grounding (``MEMQ_PIPELINE__TEMPORAL_GROUNDING``): the model also rewrites
            relative dates and gives a date per fact; each fact gets ``occurred_at`` (`occurred_at`: the
            model's date, else a date phrase of the fact resolved against the job's timestamp, else
            that timestamp). A missing or invalid date never fails the job.

    Returns:
        Facts with their source message ids, entities and relations, and the stage's usage (0 or 1
        model call).

    Raises:
        LLMUnavailable: the model is unavailable (retryable).
        LLMOutputError: the reply does not fit `FactsReply`.
    """
    messages = captioned.messages
    when = job.timestamp or job.enqueued_at
    if not job.infer:
        return verbatim_facts(messages, when if temporal else None)
    ids = message_ids(messages)
    if job.memory_type == "procedural_memory":
        reply, usage = llm.complete_json(PROCEDURAL_INSTRUCTIONS + "\n\n" + PROCEDURAL_FORMAT,
                                         build_user_prompt("procedural_summary", messages, when), ProceduralReply)
        return ExtractedFacts(facts=[Fact(text=reply.summary.strip(), source_message_ids=ids, role="assistant",
                                          occurred_at=when.astimezone(timezone.utc) if temporal else None)],
                              usage=usage)
    base = job.prompt or instructions or INSTRUCTIONS
    if temporal:
        base += "\n\n" + TEMPORAL_INSTRUCTIONS
    reply_format = GRAPH_REPLY_FORMAT if graph else REPLY_FORMAT
    if temporal:
        reply_format = reply_format.replace(_SOURCES, _DATED)
    system = base + "\n\n" + (GRAPH_INSTRUCTIONS + "\n\n" if graph else "") + reply_format
    user = build_user_prompt("extract_facts", messages, when, graph=graph, dates=temporal)
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
        facts.append(Fact(text=text, source_message_ids=[ids[i] for i in indexes], actor_id=actor_id, role=role,
                          occurred_at=occurred_at(text, f.date, when) if temporal else None))
    if not graph:
        return ExtractedFacts(facts=facts, usage=usage)
    entities = [Entity(name=e.name.strip(), entity_type=e.entity_type.strip().lower() or "entity")
                for e in facts_reply.entities if e.name.strip()]
    relations = [Relation(source=r.source.strip(), relationship=r.relationship.strip(), destination=r.destination.strip())
                 for r in facts_reply.relations if r.source.strip() and r.destination.strip() and r.relationship.strip()]
    return ExtractedFacts(facts=facts, entities=entities, relations=relations, usage=usage)
