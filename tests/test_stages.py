"""Stage logic called directly (no queue), with real stores and the litellm embedder over HTTP."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

from memq.config import EmbedderSettings, QdrantSettings
from memq.models import AddJob, Scope
from tests.rigs.llm_server import LLMTestServer
from pipeline.retrieve import find_neighbours
from pipeline.types import Fact
from stores.embedder import LiteLLMEmbedder
from stores.vector_open import close_vector_store, open_vector_store
from stores.vectors import MemoryPoint


def test_a_jobs_facts_are_embedded_in_one_request_and_neighbours_stay_in_scope(
    llm_server: LLMTestServer, tmp_path: Path
) -> None:
    embedder = LiteLLMEmbedder(EmbedderSettings(model="openai/test-embedder", dims=384, api_base=llm_server.url,
                                                api_key="test-key"))  # type: ignore[arg-type]
    store = open_vector_store(QdrantSettings(path=tmp_path / "q", collection="stages"), dims=384)
    now = datetime(2024, 1, 1, tzinfo=timezone.utc)
    texts = ["ann likes green tea", "ann works at the bank", "bob likes green tea"]
    vectors = embedder.embed(texts)
    store.upsert([MemoryPoint(id=f"00000000-0000-0000-0000-00000000000{i}", vector=v, memory=t,
                              scope=Scope(user_id=t.split()[0]), created_at=now, updated_at=None, metadata={},
                              actor_id=None, role=None, source_message_ids=[], job_id="j")
                  for i, (t, v) in enumerate(zip(texts, vectors))])
    llm_server.reset()
    facts = [Fact(text=t) for t in ("ann likes tea", "ann has a bank job", "ann has a cat", "ann runs", "ann sings")]
    # When neighbours are found for five facts
    near = find_neighbours(facts, Scope(user_id="ann"), embedder, store, top_k=2)
    # Then the five facts went in one embedding request, and only ann's memories came back
    assert len(llm_server.embedding_requests) == 1 and len(llm_server.embedding_requests[0]["input"]) == 5
    assert len(near.fact_vectors) == 5
    assert {m.memory for m in near.memories} == {"ann likes green tea", "ann works at the bank"}
    close_vector_store(store)  # only this test's store: the session worker's stays open


def test_an_add_job_round_trips_through_json_unchanged() -> None:
    job = AddJob(job_id="j", scope=Scope(user_id="u"), messages=[{"role": "user", "content": "hi", "id": "m1"}])
    assert AddJob.model_validate_json(job.model_dump_json()) == job
