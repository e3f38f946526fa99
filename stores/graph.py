"""Neo4j graph store: entities and relations per scope, written with MERGE, read by similarity.

Model:

- ``(:__Entity__)`` nodes, unique per (``scope_key``, ``key``) where ``key`` is the normalized name;
  properties ``name``, ``entity_type``, the scope ids, ``created_at``, ``updated_at``, ``mentions``
  (jobs that mentioned it; a retried job counts once) and ``job_ids`` (the latest `RECENT_JOBS` of them).
  The embedding of an entity's name is not on the node: it is a point of the vector store's entity-name
  collection (`stores.entity_names`), written once per name and scope, which graph search asks first.
- relations between two entities of one scope, typed by the relationship (``WORKS_AT``), with
  ``rid``, ``created_at``, ``updated_at``, ``job_id``, ``memory_ids`` (the memories supporting it),
  ``valid`` and, once contradicted, ``invalid_at`` and ``invalidated_by``: a contradicted relation is
  kept for history (as Graphiti does) and reads show only valid ones.

Every value is a ``$parameter``, relationship types too: a job's relations of every type are merged by
one ``UNWIND`` query with Cypher's dynamic types (``MERGE (s)-[x:$(r.type)]->(d)``, Neo4j 5.26+). The
types are still normalized to ``[A-Z][A-Z0-9_]*`` (at most 64 characters) by `relationship_type`, and
anything else is refused before the query runs. Schema (constraint, index) is created once, idempotently.

Every lookup of entities asks for a seek of its index (``USING INDEX SEEK``): on a small graph Neo4j's
planner otherwise reads a whole index (every tenant's entities) where a seek of the scope's keys would do
(a plain ``USING INDEX`` hint it may meet with such a scan), and a plan made then is kept until the
statistics drift. With the hints a query's plan does not depend on the statistics
(`tests/test_graph.py` checks every per-job and per-request query's plan). Measured: no change in a
write's time on this machine (conv-26's replayed writes, 4-5 ms either way, also beside 23,000 other
relations). A relation's MERGE between its two found ends cannot be hinted: Neo4j plans it as a scan of
every relationship while the graph holds few (a few hundred, read in well under a millisecond) and as an
expansion between the two ends once it holds more.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Literal, LiteralString

import neo4j
from neo4j import GraphDatabase
from neo4j.exceptions import ClientError, DriverError, Neo4jError, ServiceUnavailable, SessionExpired
from neo4j.exceptions import TransientError as Neo4jTransientError

from memq.config import Settings
from memq.errors import StoreError, StoreUnavailable
from memq.models import Relation, Scope
from stores.entity_names import EntityNames

RECENT_JOBS = 8
"""How many of the latest jobs that mentioned an entity it keeps (``job_ids``): a job's graph write runs
again only before a later job of its scope may write (one scope, one order), so the latest is what
counts a retried job once; a bounded list keeps every write of a much-mentioned entity small."""

_TYPE = re.compile(r"[A-Z][A-Z0-9_]{0,63}")
_SEPARATORS = re.compile(r"[\s\-]+")


class InvalidRelationshipType(StoreError, ValueError):
    """A relationship type that is not ``[A-Z][A-Z0-9_]*`` after normalization; never sent to Neo4j."""


def relationship_type(raw: str) -> str:
    """Normalize a relationship type (``"works at"`` -> ``"WORKS_AT"``).

    Raises:
        InvalidRelationshipType: the result is not ``[A-Z][A-Z0-9_]{0,63}`` (e.g. it holds Cypher).
    """
    normalized = _SEPARATORS.sub("_", raw.strip()).upper()
    if not _TYPE.fullmatch(normalized):
        # the type comes from the model and may quote user text: the message never holds it
        raise InvalidRelationshipType(f"a relationship type of {len(raw)} characters is not [A-Z][A-Z0-9_]* "
                                      "after normalization")
    return normalized


def entity_key(name: str) -> str:
    """The merge key of an entity name: lower case, single spaces, no surrounding punctuation."""
    return " ".join(name.lower().split()).strip(" .,;:!?\"'()[]{}")


@dataclass(frozen=True)
class EntityWrite:
    """An entity to merge: `key` (normalized), display `name`, `entity_type`, and the name's `embedding`;
    None: embedded by the write only when the scope has no embedded entity of this key yet."""

    key: str
    name: str
    entity_type: str
    embedding: Sequence[float] | None = None


@dataclass(frozen=True)
class GraphWrite:
    """Everything one job does to the graph, applied in one transaction.

    Attributes:
        job_id: the job (recorded on what it creates).
        scope: whose graph.
        when: the job's time (UTC), used for created_at/updated_at/invalid_at.
        entities, relations: what to merge (relations planned: entity keys, normalized types, rids).
        invalidated: the relations the job's facts contradict (as the decide stage read them: `rid` and
            `source`, the source entity's name or key).
        deleted_memory_ids: memories the job deleted (or whose text an update replaced); relations they
            alone supported go, and so do entities left without any relation.
    """

    job_id: str
    scope: Scope
    when: datetime
    entities: Sequence[EntityWrite] = ()
    relations: Sequence[Relation] = ()
    invalidated: Sequence[Relation] = ()
    deleted_memory_ids: Sequence[str] = field(default_factory=tuple)


def _check_types(change: GraphWrite) -> None:
    types = {r.relationship: relationship_type(r.relationship) for r in change.relations}
    if any(t != raw for raw, t in types.items()):
        raise InvalidRelationshipType("relation types must be normalized before the write")


@contextmanager
def _mapped(what: str) -> Iterator[None]:
    try:
        yield
    except InvalidRelationshipType:
        raise
    except (ServiceUnavailable, SessionExpired, Neo4jTransientError, OSError) as exc:
        raise StoreUnavailable(f"Neo4j {what}: {type(exc).__name__}") from exc
    except (ClientError, Neo4jError, DriverError) as exc:
        raise StoreError(f"Neo4j {what}: {type(exc).__name__}: {getattr(exc, 'code', '')}") from exc


def _scope_params(scope: Scope) -> dict[str, Any]:
    return {"scope_key": scope.key(), "user_id": scope.user_id, "agent_id": scope.agent_id, "run_id": scope.run_id}


def _scope_match(scope: Scope) -> LiteralString:
    """The entity filter of every scope `scope` covers (Mem0's filter by the ids given): one equality per
    id that is set, so Neo4j seeks the id's index (``$x IS NULL OR e.x = $x`` made it scan every entity
    of every tenant). The fragments are constants; the ids stay parameters."""
    parts: list[LiteralString] = []
    if scope.user_id is not None:
        parts.append("e.user_id = $user_id")
    if scope.agent_id is not None:
        parts.append("e.agent_id = $agent_id")
    if scope.run_id is not None:
        parts.append("e.run_id = $run_id")
    if not parts:
        raise ValueError("a scope needs at least one id")
    return " AND ".join(parts)


def _scope_hint(scope: Scope) -> LiteralString:
    """The index-seek hint for the narrowest id `_scope_match` filters on (a run, else a user, else an
    agent, which many users may share): Neo4j plans a small graph's lookups as scans of a whole index
    (every tenant's entities) unless told; every per-job and per-request query asks for its seek, so its
    plan does not depend on the graph's statistics."""
    if scope.run_id is not None:
        return "USING INDEX SEEK e:__Entity__(run_id) "
    if scope.user_id is not None:
        return "USING INDEX SEEK e:__Entity__(user_id) "
    if scope.agent_id is not None:
        return "USING INDEX SEEK e:__Entity__(agent_id) "
    raise ValueError("a scope needs at least one id")


_FORGET: LiteralString = (
    # memories $ids deleted: their support goes; relations left without support go, and so do the entities
    # those relations were the last ones of (only their endpoints are checked, not the whole scope)
    "CALL () { "
    "  WITH $ids AS ids WHERE size(ids) > 0 "
    "  MATCH (e:__Entity__ {scope_key: $scope_key})-[x]->(d) USING INDEX SEEK e:__Entity__(scope_key) "
    "  WHERE any(m IN x.memory_ids WHERE m IN ids) "
    "  SET x.memory_ids = [m IN x.memory_ids WHERE NOT m IN ids] "
    "  WITH e, d, x WHERE size(x.memory_ids) = 0 "
    "  DELETE x "
    "  WITH collect(e) + collect(d) AS ends "
    "  UNWIND ends AS n "
    "  WITH DISTINCT n WHERE NOT (n)--() "
    "  WITH n, n.key AS key DELETE n "
    "  RETURN collect(key) AS gone "
    "} "
    "RETURN gone"
)
"""Forgetting deleted memories (``$ids``) in a scope: the end of every write, and `GraphStore.forget_memories`;
returns the keys of the entities it deleted (``gone``: their name embeddings go too)."""

_WRITE: LiteralString = (
    # entities: merged by key; a retried job counts once (its id is among the latest)
    "CALL () { "
    "  UNWIND $entities AS e "
    "  MERGE (n:__Entity__ {scope_key: $scope_key, key: e.key}) "
    "  ON CREATE SET n.name = e.name, n.created_at = $when, n.user_id = $user_id, "
    "    n.agent_id = $agent_id, n.run_id = $run_id, n.job_ids = [], n.mentions = 0 "
    "  SET n.updated_at = $when, n.entity_type = e.entity_type "
    "  WITH n, e WHERE NOT $job_id IN n.job_ids "
    "  SET n.job_ids = n.job_ids[-($recent - 1)..] + $job_id, n.mentions = n.mentions + 1 "
    "} "
    # relations of every type, merged on their ends, type and validity
    "CALL () { "
    "  UNWIND $rows AS r "
    "  MATCH (s:__Entity__ {scope_key: $scope_key, key: r.source}) USING INDEX SEEK s:__Entity__(scope_key, key) "
    "  MATCH (d:__Entity__ {scope_key: $scope_key, key: r.destination}) USING INDEX SEEK d:__Entity__(scope_key, key) "
    "  MERGE (s)-[x:$(r.type) {valid: true}]->(d) "
    "  ON CREATE SET x.rid = r.rid, x.created_at = $when, x.job_id = $job_id, "
    "    x.scope_key = $scope_key, x.memory_ids = [] "
    "  SET x.updated_at = $when, "
    "    x.memory_ids = x.memory_ids + [m IN r.memory_ids WHERE NOT m IN x.memory_ids] "
    "} "
    # contradicted relations: kept, marked invalid (found from their source entity, by the key constraint)
    "CALL () { "
    "  UNWIND $invalid AS v "
    "  MATCH (e:__Entity__ {scope_key: $scope_key, key: v.source})-[x]->() USING INDEX SEEK e:__Entity__(scope_key, key) "
    "  WHERE x.rid = v.rid AND x.valid "
    "  SET x.valid = false, x.invalid_at = $when, x.invalidated_by = $job_id "
    "} "
    + _FORGET
)
"""One job's graph change as one query (see `GraphStore.write`); every value is a parameter."""


class GraphStore:
    """Entities and relations in Neo4j, their name embeddings in the vector store (`stores.entity_names`).

    Args:
        driver: a `neo4j.Driver`.
        names: the entity-name collection.
        database: database name (None: the server's default).
    """

    def __init__(self, driver: neo4j.Driver, names: EntityNames, database: str | None = None) -> None:
        self._driver = driver
        self.names = names
        self._database = database
        self._ready = False
        self._lock = threading.Lock()

    def _run(self, cypher: LiteralString, **params: Any) -> list[dict[str, Any]]:
        records, _, _ = self._driver.execute_query(cypher, params, database_=self._database)
        return [r.data() for r in records]

    def ensure_schema(self) -> None:
        """Create the uniqueness constraint and scope indexes once (idempotent), and move name embeddings an
        earlier memq kept on the nodes into the entity-name collection (`move_name_embeddings`).

        Raises:
            StoreUnavailable: Neo4j or the vector store is unreachable.
        """
        if self._ready:
            return
        with self._lock:
            if self._ready:
                return
            with _mapped("schema"):
                self._run("CREATE CONSTRAINT memq_entity_key IF NOT EXISTS "
                          "FOR (e:__Entity__) REQUIRE (e.scope_key, e.key) IS UNIQUE")
                self._run("CREATE INDEX memq_entity_user IF NOT EXISTS FOR (e:__Entity__) ON (e.user_id)")
                self._run("CREATE INDEX memq_entity_scope IF NOT EXISTS FOR (e:__Entity__) ON (e.scope_key)")
                self._run("CREATE INDEX memq_entity_agent IF NOT EXISTS FOR (e:__Entity__) ON (e.agent_id)")
                self._run("CREATE INDEX memq_entity_run IF NOT EXISTS FOR (e:__Entity__) ON (e.run_id)")
            self.move_name_embeddings()
            self._ready = True

    def move_name_embeddings(self, page: int = 500) -> int:
        """Move name embeddings stored on entity nodes (by memq before 2026-11-22) to the entity-name
        collection, then remove them from the nodes; idempotent, safe with workers running (a point is
        written before its node's property goes). Runs once per process from `ensure_schema`.

        Returns:
            How many embeddings were moved.

        Raises:
            StoreUnavailable: Neo4j or the vector store is unreachable.
        """
        moved = 0
        while True:
            with _mapped("move name embeddings"):
                rows = self._run("MATCH (e:__Entity__) WHERE e.embedding IS NOT NULL "
                                 "RETURN e.scope_key AS scope_key, e.user_id AS u, e.agent_id AS a, e.run_id AS r, "
                                 "e.key AS key, e.name AS name, e.embedding AS embedding, e.created_at AS created_at "
                                 "LIMIT $page", page=page)
            if not rows:
                return moved
            batches: dict[tuple[Scope, str | None], list[tuple[str, str, Sequence[float]]]] = {}
            for r in rows:  # one upsert per scope and creation time (a job's entities share it)
                scope = Scope(user_id=r["u"] or None, agent_id=r["a"] or None, run_id=r["r"] or None)
                batches.setdefault((scope, r["created_at"]), []).append((r["key"], r["name"] or r["key"], r["embedding"]))
            for (scope, created), names in batches.items():
                when = datetime.fromisoformat(created) if created else datetime.now(timezone.utc)
                self.names.upsert(scope, names, when=when, job_id="moved-from-graph")
            with _mapped("move name embeddings"):
                self._run("UNWIND $rows AS r MATCH (e:__Entity__ {scope_key: r.scope_key, key: r.key}) "
                          "REMOVE e.embedding", rows=[{"scope_key": r["scope_key"], "key": r["key"]} for r in rows])
            moved += len(rows)

    def write(self, change: GraphWrite, embed: Callable[[list[str]], list[list[float]]] | None = None) -> None:
        """Apply one job's graph change whole: its name embeddings (`write_names`), then its entities and
        relations in Neo4j (`merge_change`), then the removal of the name embeddings of entities that
        forgetting deleted. The pipeline runs the halves in its two store writes instead (the names with
        the vectors, Neo4j alone in the graph write) and removes the names when both have landed.

        Args:
            change: the job's graph change.
            embed: embeds entity names without an embedding (see `write_names`).

        Raises:
            InvalidRelationshipType, ValueError, StoreUnavailable, StoreError, LLMUnavailable: see
                `write_names` and `merge_change`.
        """
        _check_types(change)  # before anything is written
        self.write_names(change, embed)
        self.names.delete(change.scope, self.merge_change(change))

    def write_names(self, change: GraphWrite, embed: Callable[[list[str]], list[list[float]]] | None = None) -> int:
        """The vector-store half of a job's graph change: upsert the name embeddings it carries into the
        entity-name collection, and embed (one batch) the names the plan took for embedded that are not
        (checked by one read by id; rare). Touches no Neo4j. Idempotent (keyed points).

        Args:
            change: the job's graph change. An entity's embedding is None when the decide stage found its
                key already embedded in the scope (the key is the normalized name, so it would not change).
            embed: embeds entity names; used only for entities that are without an embedding in the
                collection too (a plan made before the name was known, or without embeddings).

        Returns:
            How many name points were written.

        Raises:
            ValueError: an entity needs an embedding and `embed` is None (before any write).
            StoreUnavailable: the vector store is unreachable (retryable).
            LLMUnavailable: a remote embedder is unavailable (retryable).
        """
        given = {e.key: (e.key, e.name, e.embedding) for e in change.entities if e.embedding is not None}
        bare = {e.key: e.name for e in change.entities if e.embedding is None and e.key not in given}
        if bare:
            embedded = self.names.embedded(change.scope, list(bare))
            missing = [k for k in bare if k not in embedded]
            if missing:
                if embed is None:
                    raise ValueError("entities without an embedding need an embed function")
                given.update({k: (k, bare[k], v) for k, v in zip(missing, embed([bare[k] for k in missing]))})
        self.names.upsert(change.scope, list(given.values()), when=change.when, job_id=change.job_id)
        return len(given)

    def merge_change(self, change: GraphWrite) -> list[str]:
        """The Neo4j half of a job's graph change: one auto-commit query (one transaction, one Bolt round
        trip) merges its entities, merges its relations of every type, invalidates contradicted relations
        (found from their source entity by key) and forgets deleted memories (checking only the endpoints
        of the relations it deletes for entities left bare). Touches no vector store (but for the one-off
        move of `ensure_schema`, at a process's first use). MERGE-based: running it twice changes
        nothing, and a job is counted once in ``mentions``.

        Returns:
            The keys of the entities forgetting deleted (their name embeddings are the caller's to remove).

        Raises:
            InvalidRelationshipType: a relation's type is not normalized (checked before any write).
            StoreUnavailable: Neo4j is unreachable (retryable).
            StoreError: a permanent failure.
        """
        _check_types(change)
        self.ensure_schema()
        params = {**_scope_params(change.scope), "job_id": change.job_id, "when": change.when.isoformat()}
        rows = [{"rid": r.rid, "source": r.source, "destination": r.destination, "type": r.relationship,
                 "memory_ids": list(r.memory_ids)} for r in change.relations]
        entities = [{"key": e.key, "name": e.name, "entity_type": e.entity_type} for e in change.entities]
        invalid = [{"rid": r.rid, "source": entity_key(r.source)} for r in change.invalidated if r.rid]
        with _mapped("write"), self._driver.session(database=self._database) as session:
            # one auto-commit query: one round trip, one transaction
            return [k for r in session.run(_WRITE, entities=entities, rows=rows, invalid=invalid,
                                           ids=list(change.deleted_memory_ids), recent=RECENT_JOBS, **params)
                    for k in r["gone"]]

    def forget_names(self, scope: Scope, keys: Sequence[str]) -> list[str]:
        """Remove the name points of those `keys` whose entity is not in the scope's graph (any more): the
        keys a graph write's forgetting deleted, checked again when the job finalizes, since a later job
        of the scope may have merged the entity again meanwhile (its point must stay).

        Returns:
            The keys whose points were removed.

        Raises:
            StoreUnavailable: Neo4j or the vector store is unreachable.
        """
        if not keys:
            return []
        self.ensure_schema()
        with _mapped("read"):
            present = {r["key"] for r in self._run(
                "MATCH (e:__Entity__ {scope_key: $scope_key}) USING INDEX SEEK e:__Entity__(scope_key, key) "
                "WHERE e.key IN $keys RETURN e.key AS key", keys=list(keys), scope_key=scope.key())}
        absent = [k for k in keys if k not in present]
        self.names.delete(scope, absent)
        return absent

    def embedded_keys(self, scope: Scope, keys: Sequence[str]) -> set[str]:
        """Which of the entity `keys` have a name embedding in exactly this scope (the decide stage embeds
        only the other names, in its batch with the facts).

        Raises:
            StoreUnavailable: the vector store is unreachable.
        """
        return self.names.embedded(scope, keys)

    def relations_of(self, scope: Scope, keys: Sequence[str], *, limit: int = 50) -> list[Relation]:
        """Valid relations touching any of the entity `keys` in exactly this scope (for the decider).

        Raises:
            StoreUnavailable: Neo4j is unreachable.
        """
        if not keys:
            return []
        self.ensure_schema()
        with _mapped("read relations"):
            rows = self._run(
                "MATCH (e:__Entity__ {scope_key: $scope_key}) USING INDEX SEEK e:__Entity__(scope_key, key) "
                "WHERE e.key IN $keys "
                "MATCH (e)-[x {valid: true}]-(o:__Entity__) "
                "WITH DISTINCT x ORDER BY x.created_at, x.rid LIMIT $limit "
                "RETURN x.rid AS rid, startNode(x).name AS source, type(x) AS relationship, "
                "  endNode(x).name AS destination",
                keys=list(keys), limit=limit, **_scope_params(scope),
            )
        return [Relation(**r) for r in rows]

    def search(self, scope: Scope, vector: Sequence[float], query: str, *, limit: int = 20,
               threshold: float = 0.5, top_entities: int = 5) -> list[Relation]:
        """Valid relations of the entities most related to a query, in the query's scope only.

        Entities are those whose name embedding has cosine similarity >= `threshold` with `vector` (the
        entity-name collection's nearest `top_entities`) or whose name appears in the query (named ones
        first; one found only by name ranks at `threshold`); the `top_entities` best give their relations,
        ordered by their entity's similarity.

        Raises:
            StoreUnavailable: Neo4j or the vector store is unreachable.
        """
        self.ensure_schema()
        near = [{"scope_key": h.scope.key(), "key": h.key, "sim": h.score}
                for h in self.names.similar(scope, vector, limit=top_entities, threshold=threshold)]
        with _mapped("search"):
            rows = self._run(
                "CALL () { "
                "  UNWIND $near AS h "
                "  MATCH (e:__Entity__ {scope_key: h.scope_key, key: h.key}) USING INDEX SEEK e:__Entity__(scope_key, key) "
                "  RETURN e, h.sim AS sim "
                "  UNION ALL "
                "  MATCH (e:__Entity__) " + _scope_hint(scope) + "WHERE " + _scope_match(scope) + " "
                "  AND size(e.key) >= 3 AND $query CONTAINS e.key RETURN e, $threshold AS sim "
                "} "
                "WITH e, max(sim) AS sim "
                "WITH e, sim, (size(e.key) >= 3 AND $query CONTAINS e.key) AS named "
                "ORDER BY named DESC, sim DESC LIMIT $top "
                "MATCH (e)-[x {valid: true}]-(:__Entity__) "
                "WITH x, max(sim) AS sim ORDER BY sim DESC, x.updated_at DESC LIMIT $limit "
                "RETURN x.rid AS rid, startNode(x).name AS source, type(x) AS relationship, "
                "  endNode(x).name AS destination",
                near=near, query=query.lower(), threshold=threshold, top=top_entities, limit=limit,
                **_scope_params(scope),
            )
        return [Relation(**r) for r in rows]

    def all_relations(self, scope: Scope, *, include_invalid: bool = False) -> list[Relation]:
        """Every relation of exactly this scope (tests, exports), oldest first."""
        self.ensure_schema()  # the queries name the schema's indexes
        with _mapped("read"):
            rows = self._run(
                "MATCH (s:__Entity__ {scope_key: $scope_key})-[x]->(d:__Entity__) USING INDEX SEEK s:__Entity__(scope_key) "
                "WHERE $all OR x.valid "
                "RETURN x.rid AS rid, s.name AS source, type(x) AS relationship, d.name AS destination, "
                "  x.valid AS valid ORDER BY x.created_at, x.rid",
                all=include_invalid, **_scope_params(scope),
            )
        return [Relation(**r) for r in rows]

    def relations(self, scope: Scope, *, limit: int = 100, offset: int = 0) -> list[dict[str, str]]:
        """Valid relations of every scope the caller's `scope` covers, oldest first, skipping `offset`,
        in the shape Mem0's ``get_all`` gives them: ``[{"source", "relationship", "target"}]``.

        Raises:
            StoreUnavailable: Neo4j is unreachable.
        """
        self.ensure_schema()
        with _mapped("read"):
            rows = self._run(
                "MATCH (e:__Entity__) " + _scope_hint(scope) + "WHERE " + _scope_match(scope) + " "
                "MATCH (e)-[x {valid: true}]->(d:__Entity__) "
                "RETURN e.name AS source, type(x) AS relationship, d.name AS target "
                "ORDER BY x.created_at, x.rid SKIP $offset LIMIT $limit",
                limit=limit, offset=offset, **_scope_params(scope))
        return [{"source": r["source"], "relationship": r["relationship"], "target": r["target"]} for r in rows]

    def entities(self, scope: Scope) -> list[dict[str, Any]]:
        """Entities of exactly this scope: ``{key, name, entity_type, mentions}``, by key."""
        self.ensure_schema()  # the queries name the schema's indexes
        with _mapped("read"):
            return self._run(
                "MATCH (e:__Entity__ {scope_key: $scope_key}) USING INDEX SEEK e:__Entity__(scope_key) "
                "RETURN e.key AS key, e.name AS name, e.entity_type AS entity_type, e.mentions AS mentions "
                "ORDER BY e.key", **_scope_params(scope))

    def forget_memories(self, scope: Scope, memory_ids: Sequence[str]) -> None:
        """Remove memories' support from relations; drop unsupported relations and orphaned entities."""
        if not memory_ids:
            return
        self.ensure_schema()
        with _mapped("delete"), self._driver.session(database=self._database) as session:
            gone = [k for r in session.run(_FORGET, ids=list(memory_ids), scope_key=scope.key()) for k in r["gone"]]
        self.names.delete(scope, gone)

    def delete_scope(self, scope: Scope) -> int:
        """Delete every entity (and so every relation) matching the scope's ids, and their name embeddings.
        Returns entities deleted."""
        self.ensure_schema()
        with _mapped("delete"):
            rows = self._run("MATCH (e:__Entity__) " + _scope_hint(scope) + "WHERE " + _scope_match(scope) + " "
                             "DETACH DELETE e RETURN count(*) AS n",
                             **_scope_params(scope))
        self.names.delete_scope(scope)
        return int(rows[0]["n"]) if rows else 0

    def migrate_scope_keys(self) -> int:
        """Re-key entities and relations written with memq's first scope encoding (``u=A|a=|r=``, which
        was not injective) to `Scope.key`. Run once, with workers stopped.

        Entities of two scopes that the old encoding confused were merged into one node when they were
        written; such a node moves to the scope of the ids it was created with.

        Returns:
            How many entities were re-keyed.

        Raises:
            StoreUnavailable: Neo4j is unreachable.
            StoreError: a re-keyed entity collides with one already written under the new key.
        """
        self.ensure_schema()
        moved = 0
        with _mapped("migrate"):
            groups = self._run("MATCH (e:__Entity__) WHERE e.scope_key CONTAINS '|a=' "
                               "RETURN DISTINCT e.scope_key AS old, e.user_id AS u, e.agent_id AS a, e.run_id AS r")
            for g in groups:
                new = Scope(user_id=g["u"] or None, agent_id=g["a"] or None, run_id=g["r"] or None).key()
                rows = self._run(
                    "MATCH (e:__Entity__ {scope_key: $old}) WHERE coalesce(e.user_id, '') = coalesce($u, '') "
                    "AND coalesce(e.agent_id, '') = coalesce($a, '') AND coalesce(e.run_id, '') = coalesce($r, '') "
                    "SET e.scope_key = $new RETURN count(e) AS n", old=g["old"], new=new, u=g["u"], a=g["a"], r=g["r"])
                moved += int(rows[0]["n"]) if rows else 0
            self._run("MATCH (s:__Entity__)-[x]->() WHERE x.scope_key <> s.scope_key SET x.scope_key = s.scope_key")
        return moved

    def close(self) -> None:
        """Close the driver."""
        self._driver.close()


_stores: dict[tuple[str, str, str, str], GraphStore] = {}
_stores_lock = threading.Lock()


def open_graph_store(settings: Settings, *, role: Literal["owner", "reader"] = "owner",
                     own_if_free: bool = False) -> GraphStore | None:
    """The process-wide `GraphStore`, or None when graph memory is off (no ``neo4j.uri``).

    Args:
        settings: memq settings (Neo4j's, and the vector store's for the entity-name collection).
        role, own_if_free: how the entity-name collection is opened (`stores.entity_names.open_entity_names`).

    Raises:
        StoreOwned, StoreNeedsMigration, StoreError, StoreUnavailable: the entity-name collection cannot
            be opened (see `stores.vector_open.open_vector_store`).
    """
    neo = settings.neo4j
    if not neo.uri:
        return None
    from stores.entity_names import open_entity_names

    # the role is part of the key: a reader's entity names are the owner's, read through Redis
    key = (neo.uri, str(settings.qdrant.url or settings.qdrant.path), settings.qdrant.collection, role)
    with _stores_lock:
        store = _stores.get(key)
        if store is None:
            names = open_entity_names(settings, role=role, own_if_free=own_if_free)
            password = neo.password.get_secret_value() if neo.password else ""
            driver = GraphDatabase.driver(neo.uri, auth=(neo.user, password),
                                          connection_timeout=5.0, max_transaction_retry_time=5.0,
                                          notifications_min_severity="OFF")
            store = GraphStore(driver, names, neo.database)
            _stores[key] = store
        return store
