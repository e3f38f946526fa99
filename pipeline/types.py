"""Stage inputs and outputs: what each stage stores with the job and the next one reads."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field, JsonValue

from memq.models import MemoryEvent, Message, Relation


class _Stage(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class LLMUsage(_Stage):
    """Model calls and tokens a stage spent (tokens as the provider counted them)."""

    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def __add__(self, other: LLMUsage) -> LLMUsage:
        return LLMUsage(calls=self.calls + other.calls, prompt_tokens=self.prompt_tokens + other.prompt_tokens,
                        completion_tokens=self.completion_tokens + other.completion_tokens)


class ImageCounts(_Stage):
    """How the caption stage described a job's images (one count per image part).

    Attributes:
        supplied: described by the caption or alt text the caller sent with the image (no model call).
        model: described by a vision model call of this job.
        cached: described by the shared caption cache (another job's call, or the same image earlier
            in this job).
        dropped: not described (no caption and no vision model, or the image could not be read or
            fetched); the job's warnings say why.
    """

    supplied: int = 0
    model: int = 0
    cached: int = 0
    dropped: int = 0

    @property
    def total(self) -> int:
        """Image parts in the job."""
        return self.supplied + self.model + self.cached + self.dropped

    def as_dict(self) -> dict[str, int]:
        """``{"supplied", "model", "cached", "dropped"}``; empty when the job had no image."""
        return self.model_dump() if self.total else {}


class CaptionedMessages(_Stage):
    """Output of the caption stage: the job's messages with each image part replaced by a text part
    ``[image: <description>]`` (or removed when it could not be described).

    Attributes:
        messages: the messages, text only.
        images: how the images were described.
        warnings: one line per dropped image (its position and the reason; never user text).
        usage: the vision model's calls and tokens.
    """

    messages: list[Message]
    images: ImageCounts = ImageCounts()
    warnings: list[str] = Field(default_factory=list)
    usage: LLMUsage = LLMUsage()


class Fact(_Stage):
    """A candidate statement extracted from messages, before any decision.

    Attributes:
        text: the fact, one self-contained sentence.
        source_message_ids: ids of the messages it came from (caller's ids or positions).
        actor_id: the speaker (message ``name``) when all sources share one.
        role: the role of the source messages when all share one.
        occurred_at: the date the fact refers to (UTC; `pipeline.dates`), None without temporal grounding.
    """

    text: str = Field(min_length=1)
    source_message_ids: list[str] = Field(default_factory=list)
    actor_id: str | None = None
    role: str | None = None
    occurred_at: datetime | None = None


class Entity(_Stage):
    """A graph node extracted from messages: a person, place, organisation, thing or idea."""

    name: str = Field(min_length=1)
    entity_type: str = "entity"


class ExtractedFacts(_Stage):
    """Output of the extract stage (entities and relations only when graph memory is on)."""

    facts: list[Fact]
    entities: list[Entity] = Field(default_factory=list)
    relations: list[Relation] = Field(default_factory=list)
    usage: LLMUsage = LLMUsage()
    vectors: str = Field(default="", description=(
        "The facts' vectors, then the graph names' (`pipeline.graph_plan.graph_names` order), packed "
        "(`pipeline.packed`), embedded by the extract stage outside the scope's turn; \"\": not embedded "
        "(the decide stage embeds them)."))


class Action(_Stage):
    """One decided change to memory, ready to apply.

    Attributes:
        event: ADD / UPDATE / DELETE / NONE.
        memory_id: the point id (new and deterministic for ADD; the existing id otherwise).
        memory: the memory text after the change (the old text for DELETE/NONE).
        previous_memory: the text before an UPDATE or DELETE.
        vector: embedding of `memory` for ADD/UPDATE; empty otherwise.
        created_at: creation time to write (kept from the existing memory on UPDATE).
        metadata: payload metadata to write.
        source_message_ids, actor_id, role: provenance.
        occurred_at: the date the memory refers to (its fact's on ADD and UPDATE, else kept), or None.
    """

    event: MemoryEvent
    memory_id: str
    memory: str
    previous_memory: str | None = None
    vector: list[float] = Field(default_factory=list)
    created_at: datetime
    metadata: dict[str, JsonValue] = Field(default_factory=dict)
    source_message_ids: list[str] = Field(default_factory=list)
    actor_id: str | None = None
    role: str | None = None
    occurred_at: datetime | None = None


class GraphPlan(_Stage):
    """What the job does to the graph (see `stores.graph.GraphWrite`)."""

    entities: list[Entity] = Field(default_factory=list)
    relations: list[Relation] = Field(default_factory=list, description="Planned: keys, normalized types, rids.")
    invalidated: list[str] = Field(default_factory=list, description="rids of contradicted relations.")
    invalidated_relations: list[Relation] = Field(default_factory=list, description="The contradicted relations "
                                                  "themselves (for the job's result, and for the graph write, which "
                                                  "finds each from its source entity).")
    rejected: int = Field(default=0, description="Relations dropped for an invalid relationship type.")
    forgotten: list[str] = Field(default_factory=list, description="Memories whose support of relations goes "
                                 "(an edit's deleted or rewritten memories).")
    embeddings: dict[str, list[float]] = Field(default_factory=dict, description="Name embeddings of the "
                                               "entities new to the scope, by entity key (embedded with the facts).")


class Plan(_Stage):
    """Output of the decide stage: the actions of one job, in order, and its graph change."""

    actions: list[Action]
    graph: GraphPlan | None = None
    usage: LLMUsage = LLMUsage()
    neighbours: int = Field(default=0, description="Existing memories shown to the decider.")
    relations_shown: int = Field(default=0, description="Existing relations shown to the decider.")
    missing: list[str] = Field(default_factory=list, description="Memory ids an edit job named that were not "
                               "there (deleted meanwhile, or not of the job's exact scope).")


class WriteResult(_Stage):
    """Output of a store write stage."""

    store: str
    upserted: int = 0
    deleted: int = 0
    skipped: bool = False
    duration_ms: float = 0.0
    names: int = Field(default=0, description="Entity-name points written (the vector write, graph memory on).")
    forgotten_entities: list[str] = Field(default_factory=list, description="Keys of the entities the graph "
                                          "write's forgetting deleted: finalize removes their name points.")
