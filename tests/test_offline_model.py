"""The offline heuristic baseline, alone and through litellm's custom-provider path."""

from __future__ import annotations

import json

import pytest

from memq.config import EmbedderSettings, LLMSettings
from memq.errors import LLMOutputError
from pipeline import offline_model
from pipeline.decide import DecisionsReply
from pipeline.extract import FactsReply
from pipeline.llm import LLM, parse_reply
from stores.embedder import get_embedder


def test_extraction_names_the_speaker_resolves_dates_and_skips_small_talk() -> None:
    messages = [
        {"index": 0, "role": "user", "name": "Caroline", "text": "Hey Mel! Good to see you!"},
        {"index": 1, "role": "user", "name": "Caroline",
         "text": "I went to a LGBTQ support group yesterday and it was so powerful. How are you?"},
        {"index": 2, "role": "assistant", "text": "I am an assistant and I like helping."},
        {"index": 3, "role": "user", "name": "Melanie", "text": "Wow! [shares a photo of a sunset over a lake]"},
    ]
    facts = offline_model.extract(messages, "2023-05-08")
    assert facts == [
        {"text": "Caroline went to a LGBTQ support group yesterday and it was so powerful (7 May 2023)",
         "sources": [1]},
        {"text": "Melanie shared a photo of a sunset over a lake", "sources": [3]},
    ]


def test_extraction_is_deterministic() -> None:
    messages = [{"index": 0, "role": "user", "name": "Ann", "text": "I'm a teacher in Oslo. My son is 7."}]
    assert offline_model.extract(messages, None) == offline_model.extract(messages, None)


def test_decisions_follow_similarity_and_negation() -> None:
    embedder = get_embedder(EmbedderSettings())
    existing = [{"id": "0", "text": "Ann is a teacher in Oslo"}, {"id": "1", "text": "Ann likes cheese pizza"}]
    facts = ["Ann is a teacher in Oslo", "Ann does not like cheese pizza", "Ann has a cat named Pixel"]
    events = offline_model.decide(existing, facts, embedder)
    assert [(e["event"], e["id"]) for e in events] == [("NONE", "0"), ("DELETE", "1"), ("ADD", "new-2")]


def test_the_offline_model_answers_through_litellm_like_any_model() -> None:
    llm = LLM(LLMSettings())
    user = "Input:\n" + json.dumps({"task": "extract_facts", "conversation_date": None,
                                    "messages": [{"index": 0, "role": "user", "name": "Bo",
                                                  "text": "I moved to Lisbon in 2021."}]})
    reply, usage = llm.complete_json("system prompt", user, FactsReply)
    assert [f.text for f in reply.facts] == ["Bo moved to Lisbon in 2021"]
    assert usage.calls == 1 and usage.prompt_tokens > 0


def test_a_reply_that_needs_repair_is_repaired_once_and_garbage_is_an_error() -> None:
    repaired = parse_reply('```json\n{"memory": [{"id": "0", "text": "x", "event": "NONE",}]\n```', DecisionsReply)
    assert repaired.memory[0].event.value == "NONE"
    with pytest.raises(LLMOutputError):
        parse_reply("I could not find any facts.", FactsReply)
