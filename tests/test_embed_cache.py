"""The worker's cache of recent texts' embeddings (`stores.embed_cache`), over the litellm embedder and the
OpenAI-compatible test server, which records every text it is sent."""

from __future__ import annotations

import pytest

from memq.config import EmbedderSettings
from memq.errors import LLMUnavailable
from stores.embed_cache import LONGEST_CACHED, CachedEmbedder, cached
from stores.embedder import LiteLLMEmbedder
from tests.rigs.llm_server import LLMTestServer, Reply


def _remote(server: LLMTestServer) -> LiteLLMEmbedder:
    return LiteLLMEmbedder(EmbedderSettings(model="openai/test-embedder", dims=384, api_base=server.url,
                                            api_key="test-key"))  # type: ignore[arg-type]


def test_each_text_is_sent_once_until_it_is_the_least_recently_used(llm_server: LLMTestServer) -> None:
    from prometheus_client import REGISTRY

    def counted(result: str) -> float:
        return REGISTRY.get_sample_value("memq_embed_cache_texts_total", {"result": result}) or 0.0

    remote = _remote(llm_server)
    embedder = CachedEmbedder(remote, max_texts=3)
    llm_server.reset()
    before = counted("hit"), counted("miss")

    def sent() -> list[list[str]]:
        requests = [list(r["input"]) for r in llm_server.embedding_requests]
        llm_server.embedding_requests.clear()
        return requests

    # When a call repeats a text, it is sent once and both places get its vector, the server's own
    first = embedder.embed(["ann likes tea", "bob runs", "ann likes tea"])
    assert sent() == [["ann likes tea", "bob runs"]]
    assert first[0] == first[2] and first[:2] == remote.embed(["ann likes tea", "bob runs"])
    sent()
    # When a later call shares a text, only the new one is sent, and the shared one keeps its vector
    second = embedder.embed(["bob runs", "cat sleeps"])
    assert sent() == [["cat sleeps"]] and second[0] == first[1]
    # When a fourth text comes to a cache of three, the least recently used ("ann likes tea") makes room
    embedder.embed(["dan sings"])
    assert sent() == [["dan sings"]]
    assert embedder.embed(["bob runs", "cat sleeps", "dan sings"]) and sent() == []
    embedder.embed(["ann likes tea"])
    assert sent() == [["ann likes tea"]]
    assert (embedder.hits, embedder.misses) == (5, 5)
    assert (counted("hit") - before[0], counted("miss") - before[1]) == (5, 5)
    # And each kept vector owns its numbers (a view into its call's batch would keep the whole batch alive)
    assert all(row.base is None for row in embedder._vectors.values())
    # And a text longer than the cache keeps is sent every time (the cache's keys stay bounded)
    long_text = "word " * (LONGEST_CACHED // 5 + 1)
    embedder.embed([long_text]), embedder.embed([long_text])
    assert sent() == [[long_text], [long_text]]


def test_a_failed_call_caches_nothing_and_the_next_call_sends_again(llm_server: LLMTestServer) -> None:
    embedder = CachedEmbedder(_remote(llm_server), max_texts=8)
    llm_server.reset()
    # When the model answers 503, the error reaches the caller
    llm_server.script_embeddings(Reply(status=503))
    with pytest.raises(LLMUnavailable):
        embedder.embed(["eve paints"])
    # Then nothing was kept: the next call sends the text again and gets a vector
    llm_server.embedding_requests.clear()
    assert len(embedder.embed(["eve paints"])[0]) == 384
    assert [list(r["input"]) for r in llm_server.embedding_requests] == [["eve paints"]]


def test_a_cache_of_zero_texts_is_no_cache_and_a_negative_size_is_refused(llm_server: LLMTestServer) -> None:
    remote = _remote(llm_server)
    assert cached(remote, 0) is remote
    assert isinstance(cached(remote, 16), CachedEmbedder)
    with pytest.raises(ValueError, match="positive"):
        CachedEmbedder(remote, max_texts=-1)
    with pytest.raises(ValueError):
        EmbedderSettings(cache_texts=-1)
