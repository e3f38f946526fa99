"""Pydantic models that cross module and process boundaries: jobs, messages, events, results.

Field names follow Mem0 (``memory``, ``event``, ``previous_memory``, ``user_id``/``agent_id``/``run_id``)
so Mem0 users read memq results without a mapping.
"""

from __future__ import annotations

from datetime import datetime, timezone
from enum import StrEnum
from typing import Annotated, Literal
from urllib.parse import quote

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, JsonValue, model_validator


def utcnow() -> datetime:
    """Current time, timezone-aware UTC."""
    return datetime.now(timezone.utc)


class Role(StrEnum):
    """OpenAI-style message roles memq accepts."""

    SYSTEM = "system"
    USER = "user"
    ASSISTANT = "assistant"


class MemoryEvent(StrEnum):
    """What a decision does to memory (Mem0's events)."""

    ADD = "ADD"
    UPDATE = "UPDATE"
    DELETE = "DELETE"
    NONE = "NONE"


class JobState(StrEnum):
    """Life cycle of a job. `partial`: one store failed and is being retried."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    PARTIAL = "partial"
    FAILED = "failed"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ImageURL(_Frozen):
    """An image reference: an http(s) URL or a ``data:`` URL."""

    url: str = Field(min_length=1)
    detail: str | None = None


class TextPart(_Frozen):
    """A text content part."""

    type: Literal["text"] = "text"
    text: str


class ImagePart(_Frozen):
    """An image content part, described in text by the caption stage.

    Attributes:
        image_url: the image (OpenAI's shape: ``{"url": ..., "detail": ...}``).
        caption: a description the caller already has (LoCoMo's ``blip_caption``): used without a model call.
        alt: the image's alt text, used like `caption` when there is no caption.
    """

    type: Literal["image_url"] = "image_url"
    image_url: ImageURL
    caption: str | None = None
    alt: str | None = None

    @property
    def supplied_caption(self) -> str | None:
        """The caller's description of the image (`caption`, else `alt`), or None when both are blank."""
        for text in (self.caption, self.alt):
            if text is not None and text.strip():
                return text.strip()
        return None


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class Message(_Frozen):
    """One chat message.

    `message_id` is the caller's id for provenance (e.g. LoCoMo's ``dia_id``); when absent the
    message's position (``"0"``, ``"1"``, ...) is used. `name` is the speaker (Mem0's ``actor_id``).
    """

    role: Role
    content: str | list[ContentPart]
    name: str | None = None
    message_id: str | None = Field(default=None, validation_alias=AliasChoices("message_id", "id"))

    @property
    def text(self) -> str:
        """The message's text parts joined with a space (images excluded)."""
        if isinstance(self.content, str):
            return self.content
        return " ".join(p.text for p in self.content if isinstance(p, TextPart))

    @property
    def images(self) -> list[str]:
        """URLs of the message's image parts."""
        return [p.image_url.url for p in self.image_parts]

    @property
    def image_parts(self) -> list[ImagePart]:
        """The message's image parts, in order."""
        if isinstance(self.content, str):
            return []
        return [p for p in self.content if isinstance(p, ImagePart)]


class Scope(_Frozen):
    """Who a memory belongs to: at least one of user_id, agent_id, run_id (an absent id is None, never "")."""

    user_id: str | None = None
    agent_id: str | None = None
    run_id: str | None = None

    @model_validator(mode="after")
    def _one_id(self) -> Scope:
        if any(v == "" for v in (self.user_id, self.agent_id, self.run_id)):
            raise ValueError("a scope id is None or a non-empty string")
        if not (self.user_id or self.agent_id or self.run_id):
            raise ValueError("a scope needs at least one of user_id, agent_id, run_id")
        return self

    def as_filter(self) -> dict[str, str]:
        """The scope ids that are set, as ``{"user_id": ...}``."""
        return {k: v for k, v in self.model_dump().items() if v is not None}

    def key(self) -> str:
        """The scope as one string, injective: two different scopes never share a key.

        Each id is percent-encoded (every character outside ``A-Za-z0-9_.-~``, ``&`` and ``=``
        included), and an absent id is empty (ids are never empty strings), so
        ``u=A%7Ca%3Dx&a=&r=`` (``user_id="A|a=x"``) and ``u=A&a=x%7Ca%3D&r=`` (``user_id="A",
        agent_id="x|a="``) differ. Used wherever a scope becomes a key: Redis (order and fencing
        counters, idempotency keys) and Neo4j (``scope_key`` of entities and relations).
        """
        return "&".join(f"{tag}={quote(v or '', safe='')}"
                        for tag, v in (("u", self.user_id), ("a", self.agent_id), ("r", self.run_id)))

    def covers(self, user_id: str | None, agent_id: str | None, run_id: str | None) -> bool:
        """True when a memory with these scope ids is visible to a caller asking with this scope.

        Mem0's read semantics: every id the caller gives must equal the memory's; ids the caller
        leaves out do not matter (``Scope(user_id="carol")`` covers carol's memories of any agent).
        Id-based reads and deletes (get, history, delete, status) check this.
        """
        return all(mine is None or mine == theirs for mine, theirs in
                   ((self.user_id, user_id), (self.agent_id, agent_id), (self.run_id, run_id)))


class Relation(_Frozen):
    """A graph edge: ``source`` -[``relationship``]-> ``destination``; the one type for a relation
    wherever it is, from the model's reply to the graph and back.

    As extracted, the ends are entity names and the type is the model's; once planned (see
    `pipeline.graph_plan`) the ends are entity keys, the type is normalized, and it has its id and
    the memories that support it; as read back it says whether it still holds.

    Attributes:
        source, relationship, destination: the edge.
        rid: its id (deterministic per job and position), once planned or stored.
        memory_ids: the memories supporting it (deleting all of them removes it).
        valid: False once a later fact contradicted it (kept for history, never shown by reads).
    """

    source: str = Field(min_length=1)
    relationship: str = Field(min_length=1)
    destination: str = Field(min_length=1)
    rid: str | None = None
    memory_ids: list[str] = Field(default_factory=list)
    valid: bool = True

    def triple(self) -> dict[str, str]:
        """``{"source", "relationship", "destination"}``: Mem0's shape in results and prompts."""
        return {"source": self.source, "relationship": self.relationship, "destination": self.destination}


class Operation(StrEnum):
    """What a job does. ``add`` runs the whole pipeline on messages; the others are edits a caller asks
    for by memory id (or for a whole scope), run in the scope's order like adds."""

    ADD = "add"
    UPDATE = "update"
    DELETE = "delete"
    DELETE_ALL = "delete_all"


class Edit(_Frozen):
    """One memory an ``update`` or ``delete`` job changes, by id.

    Attributes:
        memory_id: the memory (a point id).
        text: the new text (``update``; None keeps the text and changes only metadata).
        metadata: keys to set in the memory's metadata (``update``; others are kept, as Mem0 merges).
    """

    memory_id: str = Field(min_length=1)
    text: str | None = None
    metadata: dict[str, JsonValue] | None = None


class AddJob(_Frozen):
    """A validated job, stored in Redis under its `job_id` (tasks carry only the id): an add request
    (`messages`), or an edit of memories of exactly its `scope` (`operation` update / delete /
    delete_all, with `edits`)."""

    job_id: str
    scope: Scope
    messages: list[Message] = Field(default_factory=list)
    operation: Operation = Operation.ADD
    edits: list[Edit] = Field(default_factory=list)
    metadata: dict[str, JsonValue] = Field(default_factory=dict)
    infer: bool = True
    memory_type: Literal["procedural_memory"] | None = None
    prompt: str | None = None
    timestamp: datetime | None = Field(default=None, description="Backdates created_at (backfills).")
    idempotency_key: str | None = None
    enqueued_at: datetime = Field(default_factory=utcnow)

    @model_validator(mode="after")
    def _shape(self) -> AddJob:
        if self.operation is Operation.ADD:
            if not self.messages or self.edits:
                raise ValueError("an add job has messages and no edits")
        elif self.messages:
            raise ValueError(f"a {self.operation.value} job has no messages")
        elif (self.operation is Operation.DELETE_ALL) != (not self.edits):
            raise ValueError(f"a {self.operation.value} job has " +
                             ("no edits" if self.operation is Operation.DELETE_ALL else "at least one edit"))
        return self

    @property
    def is_edit(self) -> bool:
        """True for update / delete / delete_all jobs (no caption, extraction or model call)."""
        return self.operation is not Operation.ADD


class Receipt(_Frozen):
    """What `producer.add` returns at once: the job id and the scope it was enqueued in (its status
    is read in that scope). `duplicate`: an earlier add of the scope had the same idempotency key."""

    job_id: str
    scope: Scope
    status: JobState = JobState.QUEUED
    duplicate: bool = False


class MemoryResult(_Frozen):
    """One memory event of a finished job, in Mem0's result shape."""

    id: str
    memory: str
    event: MemoryEvent
    previous_memory: str | None = None


class JobStatus(_Frozen):
    """A job's record: state, error, and once done its events (Mem0's ``results`` shape)."""

    job_id: str
    status: JobState
    stage: str | None = None
    error: str | None = None
    error_type: str | None = None
    waiting: str | None = Field(default=None, description="What a waiting job waits for (its scope's turn).")
    created_at: datetime | None = None
    updated_at: datetime | None = None
    results: list[MemoryResult] = Field(default_factory=list)
    relations: list[dict[str, JsonValue]] = Field(default_factory=list, description="Relations the job added "
                                                  "(``{source, relationship, destination}``) and, with ``\"valid\": "
                                                  "false``, those its facts contradicted.")
    counts: dict[str, int] = Field(default_factory=dict, description="Events per kind, NONE included.")
    images: dict[str, int] = Field(default_factory=dict, description="Images by how they were described: "
                                   "supplied, model, cached, dropped (see `pipeline.types.ImageCounts`).")
    warnings: list[str] = Field(default_factory=list, description="What the job could not use (a dropped image); "
                                "never user text.")

    @property
    def done(self) -> bool:
        """True once the job will not change state by itself (succeeded or failed)."""
        return self.status in (JobState.SUCCEEDED, JobState.FAILED)


class MemoryItem(BaseModel):
    """A stored memory as search/get/get_all return it (Mem0's item shape plus provenance)."""

    model_config = ConfigDict(extra="forbid")

    id: str
    memory: str
    hash: str
    metadata: dict[str, JsonValue] = Field(default_factory=dict)
    score: float | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None
    user_id: str | None = None
    agent_id: str | None = None
    run_id: str | None = None
    actor_id: str | None = None
    role: str | None = None
    source_message_ids: list[str] = Field(default_factory=list)
    occurred_at: datetime | None = Field(default=None, description="When the fact happened (UTC; midnight for "
                                         "a date); None for a memory written without temporal grounding.")


class HistoryItem(BaseModel):
    """One row of a memory's audit trail (Mem0's history columns plus job and scope)."""

    model_config = ConfigDict(extra="forbid")

    id: str
    memory_id: str
    old_memory: str | None
    new_memory: str | None
    event: MemoryEvent
    created_at: datetime
    updated_at: datetime | None
    is_deleted: bool
    actor_id: str | None
    role: str | None
    job_id: str
    user_id: str | None
    agent_id: str | None
    run_id: str | None
