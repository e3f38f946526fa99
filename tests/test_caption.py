"""The caption stage: images become ``[image: ...]`` text from supplied captions, the shared cache or one
vision call per job, through litellm to the LLM test server, with a real Redis cache.

The end-to-end tests run a job through the session worker (its vision model is the test server) and
find the memory by what the image shows.
"""

from __future__ import annotations

import base64
import json
import uuid
from typing import Any

import pytest
import redis

from broker.ratelimit import RateLimiter
from memq.config import LimitsSettings, Settings, VisionSettings
from memq.errors import BrokerUnavailable, LLMOutputError, RateLimited, StageBusy
from memq.images import image_key
from pipeline import caption as caption_stage
from pipeline.llm import LLM, ImageInput
from producer.validate import build_job
from stores.caption_cache import CaptionCache
from tests.conftest import requires_locomo
from tests.helpers import locomo_sessions, wait_done
from tests.rigs.llm_server import LLMTestServer, Reply, image_urls

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\rIHDR" + bytes(17)


def _vision(settings: Settings, **limits: Any) -> LLM:
    llm_settings = settings.vision.llm_settings()
    assert llm_settings is not None
    llm_settings = llm_settings.model_copy(update=limits)
    return LLM(llm_settings, limiter=RateLimiter(redis.Redis.from_url(settings.redis.url)),
               budget=f"vision:{llm_settings.model}")


@pytest.fixture()
def cache(settings: Settings) -> CaptionCache:
    return CaptionCache(redis.Redis.from_url(settings.redis.url), ttl_s=600)


def _job(messages: Any, **kwargs: Any) -> Any:
    kwargs.setdefault("user_id", f"u-{uuid.uuid4().hex[:8]}")
    return build_job(messages, limits=LimitsSettings(), **kwargs)


def _image(url: str, **extra: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}, **extra}


def test_supplied_captions_are_used_without_a_call_and_marked_as_images(llm_server: LLMTestServer) -> None:
    job = _job([{"role": "user", "name": "Ann", "content": [
        {"type": "text", "text": "Look at my garden!"},
        _image("https://img.example/garden.jpg", caption="a photo of tomato plants in raised beds"),
        _image("https://img.example/cat.jpg", alt="a [grey] cat asleep on a sofa")]}])

    out = caption_stage.caption(job, vision=None)

    assert out.messages[0].text == ("Look at my garden! [image: a photo of tomato plants in raised beds] "
                                    "[image: a (grey) cat asleep on a sofa]")
    assert out.images.as_dict() == {"supplied": 2, "model": 0, "cached": 0, "dropped": 0}
    assert out.warnings == [] and out.usage.calls == 0 and llm_server.calls == 0


def test_without_caption_or_vision_model_the_image_is_dropped_with_a_warning_and_the_text_kept() -> None:
    job = _job([{"role": "user", "content": [{"type": "text", "text": "Here is the receipt."},
                                             _image("https://img.example/receipt.png")]},
                {"role": "user", "content": [_image("https://img.example/only.png")]}])

    out = caption_stage.caption(job, vision=None)

    assert [m.text for m in out.messages] == ["Here is the receipt.", ""]
    assert out.images.as_dict() == {"supplied": 0, "model": 0, "cached": 0, "dropped": 2}
    assert out.warnings == [
        "messages[0].content[1]: image dropped: no caption supplied and no vision model (MEMQ_VISION__MODEL)",
        "messages[1].content[0]: image dropped: no caption supplied and no vision model (MEMQ_VISION__MODEL)"]


@requires_locomo
def test_each_distinct_image_of_a_locomo_session_is_described_once_and_then_comes_from_the_cache(
        settings: Settings, llm_server: LLMTestServer, cache: CaptionCache) -> None:
    # conv-43 session 3 shares 12 images, 11 of them distinct; the BLIP captions are removed, so only
    # the vision model can describe them (the test server "sees" the BLIP caption of each URL)
    session = locomo_sessions(f"u-{uuid.uuid4().hex[:8]}", "conv-43", 3)[2]
    urls: list[str] = []
    for message in session["messages"]:
        if isinstance(message["content"], list):
            for part in message["content"]:
                if part["type"] == "image_url":
                    llm_server.image_captions[part["image_url"]["url"]] = part.pop("caption")
                    urls.append(part["image_url"]["url"])
    distinct = set(urls)
    assert (len(urls), len(distinct)) == (12, 11)
    vision = _vision(settings)
    for url in distinct:  # a clean slate for this session's images
        cache._r.delete("memq:caption:" + image_key("openai/test-vision", url=url))

    first = caption_stage.caption(_job(**session), vision=vision, cache=cache, settings=VisionSettings())

    described = [url for request in llm_server.vision_requests for url in request]
    assert sorted(described) == sorted(distinct)  # every distinct image exactly once
    assert len(llm_server.vision_requests) == 2  # 8 images per call, then 3
    assert first.images.as_dict() == {"supplied": 0, "model": 11, "cached": 1, "dropped": 0}
    assert first.usage.calls == 2
    texts = " ".join(m.text for m in first.messages)
    assert all(f"[image: {llm_server.image_captions[url]}]" in texts for url in distinct)

    llm_server.reset()
    again = caption_stage.caption(_job(**{**session, "user_id": "someone-else"}), vision=vision, cache=cache,
                                  settings=VisionSettings())
    assert llm_server.calls == 0
    assert again.images.as_dict() == {"supplied": 0, "model": 0, "cached": 12, "dropped": 0}
    assert [m.text for m in again.messages] == [m.text for m in first.messages]


def test_data_images_are_keyed_by_their_bytes_and_sent_as_they_are(
        settings: Settings, llm_server: LLMTestServer, cache: CaptionCache) -> None:
    data = PNG + uuid.uuid4().bytes
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    llm_server.image_captions[url] = "a screenshot of a boarding pass"
    job = _job([{"role": "user", "content": [_image(url)]}])

    out = caption_stage.caption(job, vision=_vision(settings), cache=cache)

    assert llm_server.vision_requests == [[url]]
    assert out.messages[0].text == "[image: a screenshot of a boarding pass]"
    assert cache.get_many([image_key("openai/test-vision", data=data)]) == {
        image_key("openai/test-vision", data=data): "a screenshot of a boarding pass"}


def test_an_image_another_worker_is_describing_makes_the_job_wait_then_read_the_cache(
        settings: Settings, llm_server: LLMTestServer, cache: CaptionCache) -> None:
    url = f"https://img.example/{uuid.uuid4().hex}.jpg"
    key = image_key("openai/test-vision", url=url)
    job = _job([{"role": "user", "content": [_image(url)]}])
    theirs, _ = cache.lease([key], ttl_s=30)  # another worker holds the image's lease

    with pytest.raises(StageBusy):
        caption_stage.caption(job, vision=_vision(settings), cache=cache)
    assert llm_server.calls == 0

    cache.put_many({key: "a photo of a sailing boat"})  # the other worker's caption lands
    cache.release(theirs)
    out = caption_stage.caption(job, vision=_vision(settings), cache=cache)
    assert llm_server.calls == 0
    assert out.messages[0].text == "[image: a photo of a sailing boat]"
    assert out.images.as_dict()["cached"] == 1


def test_a_reply_that_skips_an_image_is_an_output_error_and_leaves_no_lease(
        settings: Settings, llm_server: LLMTestServer, cache: CaptionCache) -> None:
    urls = [f"https://img.example/{uuid.uuid4().hex}.jpg" for _ in range(2)]
    llm_server.script(json.dumps({"captions": [{"image": 0, "caption": "a photo of a bridge"}]}))
    job = _job([{"role": "user", "content": [_image(u) for u in urls]}])

    with pytest.raises(LLMOutputError, match="1 of 2"):
        caption_stage.caption(job, vision=_vision(settings), cache=cache)

    keys = [image_key("openai/test-vision", url=u) for u in urls]
    mine, theirs = cache.lease(keys, ttl_s=5)  # both leases were given back
    assert theirs == [] and len(mine) == 2
    cache.release(mine)


def test_the_vision_model_has_its_own_budget_in_the_shared_limiter(settings: Settings,
                                                                    llm_server: LLMTestServer) -> None:
    model = f"openai/test-vision-{uuid.uuid4().hex[:6]}"
    vision = LLM(settings.llm.model_copy(update={"model": model, "rpm": 1, "burst_s": 1}),
                 limiter=RateLimiter(redis.Redis.from_url(settings.redis.url)), budget=f"vision:{model}")
    extract = LLM(settings.llm.model_copy(update={"model": model, "rpm": 1, "burst_s": 1}),
                  limiter=RateLimiter(redis.Redis.from_url(settings.redis.url)))
    llm_server.script(Reply(content='{"captions": ["a photo of a kite"]}'), Reply(content='{"facts": []}'))
    image = [ImageInput(label="Image 0:", url="https://img.example/kite.jpg")]

    vision.complete_json("describe", "x", caption_stage.CaptionsReply, images=image)
    with pytest.raises(RateLimited, match=f"vision:{model}"):
        vision.complete_json("describe", "x", caption_stage.CaptionsReply, images=image)
    from pipeline.extract import FactsReply

    extract.complete_json("extract", "y", FactsReply)  # the extraction budget is untouched
    assert llm_server.calls == 2
    sent = llm_server.requests[0]["messages"][1]["content"]
    assert sent[1:] == [{"type": "text", "text": "Image 0:"},
                        {"type": "image_url", "image_url": {"url": "https://img.example/kite.jpg"}}]


def test_an_image_only_message_becomes_a_memory_that_search_finds_by_what_the_image_shows(
        producer: Any, memories: Any, llm_server: LLMTestServer, user_id: str) -> None:
    url = f"https://img.example/{uuid.uuid4().hex}.jpg"
    llm_server.image_captions[url] = "a photo of a red lighthouse on a rocky cliff at sunset"
    receipt = producer.add([{"role": "user", "name": "Dana", "content": [
                                {"type": "image_url", "image_url": {"url": url, "detail": "low"}}]},
                            {"role": "user", "name": "Dana", "content": "I adopted a beagle named Rufus last week."}],
                           user_id=user_id)

    status = wait_done(producer, receipt)

    assert status.status.value == "succeeded", status
    assert status.images == {"supplied": 0, "model": 1, "cached": 0, "dropped": 0}
    assert status.warnings == []
    assert llm_server.vision_requests == [[url]]
    assert llm_server.requests[0]["messages"][1]["content"][2]["image_url"] == {"url": url, "detail": "low"}
    found = memories.search("lighthouse by the sea", user_id=user_id, limit=3)["results"]
    assert "lighthouse" in found[0]["memory"], found
    assert found[0]["memory"].startswith("Dana shared a photo of a red lighthouse")
    assert found[0]["source_message_ids"] == ["0"]


def test_an_image_the_provider_refuses_is_dropped_alone_and_the_add_goes_on(
        settings: Settings, llm_server: LLMTestServer, cache: CaptionCache) -> None:
    good, dead = (f"https://img.example/{uuid.uuid4().hex}.jpg" for _ in range(2))
    # the batch is refused (a 400, e.g. a link the provider could not download), then each image alone
    llm_server.script(Reply(status=400), Reply(content='{"captions": ["a photo of a red tram"]}'), Reply(status=400))
    job = _job([{"role": "user", "content": [{"type": "text", "text": "Trams!"}, _image(good), _image(dead)]}])

    out = caption_stage.caption(job, vision=_vision(settings), cache=cache)

    assert [image_urls(r) for r in llm_server.requests] == [[good, dead], [good], [dead]]
    assert out.messages[0].text == "Trams! [image: a photo of a red tram]"
    assert out.images.as_dict() == {"supplied": 0, "model": 1, "cached": 0, "dropped": 1}
    assert out.warnings == ["messages[0].content[2]: image dropped: the vision model refused the image (InvalidJob)"]
    assert cache.get_many([image_key("openai/test-vision", url=dead)]) == {}  # a refusal is not cached


def test_data_images_are_sent_in_canonical_form_and_the_detail_is_part_of_the_key(
        settings: Settings, llm_server: LLMTestServer, cache: CaptionCache) -> None:
    data = PNG + uuid.uuid4().bytes
    sent = "DATA:IMAGE/PNG;base64," + base64.b64encode(data).decode()
    canonical = "data:image/png;base64," + base64.b64encode(data).decode()
    low = {"type": "image_url", "image_url": {"url": sent, "detail": "low"}}

    caption_stage.caption(_job([{"role": "user", "content": [low]}]), vision=_vision(settings), cache=cache)
    caption_stage.caption(_job([{"role": "user", "content": [_image(sent)]}]), vision=_vision(settings), cache=cache)

    assert llm_server.vision_requests == [[canonical], [canonical]]  # low and default detail: two captions
    assert llm_server.requests[0]["messages"][1]["content"][2]["image_url"] == {"url": canonical, "detail": "low"}


def test_a_redis_outage_in_the_caption_stage_leaves_the_job_for_redelivery_instead_of_failing_it(
        settings: Settings, llm_server: LLMTestServer) -> None:
    # Given a caption cache whose Redis is down (a closed port), riding out an outage of 0.5 s
    dead = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2)
    cache = CaptionCache(dead, ttl_s=60, outage_s=0.5)
    job = _job([{"role": "user", "content": [_image(f"https://img.example/{uuid.uuid4().hex}.jpg")]}])
    # When the stage runs, Then it reports the broker unavailable (the worker requeues the message;
    # an unknown error would fail the job) and asks the model nothing
    with pytest.raises(BrokerUnavailable):
        caption_stage.caption(job, vision=_vision(settings), cache=cache)
    assert llm_server.calls == 0


def test_a_refused_batch_split_while_the_budget_holds_one_call_goes_on_where_it_stopped_when_requeued(
        producer: Any, llm_server: LLMTestServer, settings: Settings, user_id: str) -> None:
    # Given the worker's vision model paced at a learned 30 calls a minute, a bucket of one call
    client = redis.Redis.from_url(settings.redis.url)
    budget = f"memq:ratelimit:vision:{settings.vision.model}"
    client.delete(budget)
    client.hset(budget, "a_rate", "30")
    # And three images of which the provider cannot read the third (a 400 for any call naming it)
    urls = [f"https://img.example/{uuid.uuid4().hex}.jpg" for _ in range(3)]
    llm_server.refused_images.add(urls[2])
    try:
        # When they are added together: the batch is refused and split, and each single call after the
        # first finds no budget, so the stage is re-queued between them
        receipt = producer.add([{"role": "user", "content": [{"type": "text", "text": "My holiday:"},
                                                             *(_image(u) for u in urls)]}], user_id=user_id)
        status = wait_done(producer, receipt, timeout_s=45)  # before: batch, one image, no budget, again, forever
    finally:
        client.delete(budget)
    # Then the job succeeded, with the two readable images described and the third dropped
    assert status.status.value == "succeeded", status
    assert status.images == {"supplied": 0, "model": 2, "cached": 0, "dropped": 1}
    assert status.warnings == ["messages[0].content[3]: image dropped: the vision model refused the image (InvalidJob)"]
    # And no call was repeated across the re-queues: the batch once, then each image alone once
    assert sorted(llm_server.vision_requests) == sorted([urls, [urls[0]], [urls[1]], [urls[2]]])
