"""Caption stage: every image part of a job's messages becomes a text part ``[image: <description>]``.

Where a description comes from, in order:

1. the caller's own: ``caption`` (or ``alt``) on the image part, such as LoCoMo's BLIP captions. No
   model call, and never cached for others (it is one tenant's word about an image);
2. the shared caption cache (`stores.caption_cache`), keyed by the vision model and the image's bytes
   (``data:``) or URL: the same image anywhere in a backfill costs one call;
3. the vision model (``MEMQ_VISION__MODEL``), asked about all of a job's remaining images at once, up to
   ``max_images_per_call`` per request, each distinct image once. Mem0 asks once per message with an
   image; batching and the cache are memq's own.

An image none of these can describe (no caption and no vision model, an image that cannot be read or
fetched) is dropped: the text around it is kept, and the job's result carries a warning naming the
image's position and the reason. The ``[image: ...]`` marker lets extraction write facts such as
"Caroline shared a photo of a dog at the beach".
"""

from __future__ import annotations

import base64
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass

from pydantic import BaseModel, Field, field_validator

from memq.config import VisionSettings
from memq.errors import InvalidJob, InvalidRequest, LLMOutputError, PipelineError, StageBusy
from memq.images import DataImage, image_key, parse_data_url
from memq.models import AddJob, ImagePart, Message, TextPart
from pipeline.llm import LLM, ImageInput
from pipeline.types import CaptionedMessages, ImageCounts, LLMUsage
from stores.caption_cache import ALONE, DESCRIBED, REFUSED, CaptionCache

__all__ = ["CAPTION_INSTRUCTIONS", "CaptionsReply", "caption", "image_text", "needs_model"]

CAPTION_INSTRUCTIONS = """You write short descriptions of images for an assistant's long-term memory. \
For each image, write one or two plain sentences on what it shows: the kind of picture ("a photo of", \
"a screenshot of", "a drawing of"), the main subject, people by what they do (never guess who they \
are), notable objects, the place, and any text that can be read. No opinions, no guesses beyond the \
picture."""

CAPTION_FORMAT = """Reply with a JSON object only, one entry per image, in this form:
{"captions": [{"image": <the image's number>, "caption": "<description>"}]}"""

BUSY_WAIT_S = 2.0
"""Seconds a job waits while another worker describes one of its images (then it reads the cache)."""

Fetch = Callable[[str], DataImage]
"""Downloads an http(s) image (`stores.image_fetch.ImageFetcher.fetch`); raises a `MemqError` when it
may not or cannot."""


class CaptionItem(BaseModel):
    """One description in the vision model's reply."""

    image: int = Field(description="The image's number, as labelled in the prompt.")
    caption: str = Field(min_length=1, description="The description.")


class CaptionsReply(BaseModel):
    """The vision model's reply. Plain strings are read as the captions of images 0, 1, ... in order."""

    captions: list[CaptionItem]

    @field_validator("captions", mode="before")
    @classmethod
    def _strings_in_order(cls, value: object) -> object:
        if isinstance(value, list):
            return [{"image": i, "caption": v} if isinstance(v, str) else v for i, v in enumerate(value)]
        return value


@dataclass
class _Image:
    """One image part of the job, and what the stage learns about it."""

    where: str
    part: ImagePart
    key: str | None = None
    send: str = ""
    caption: str | None = None
    how: str = ""
    reason: str = ""


def image_text(caption: str) -> str:
    """The text an image part becomes: ``[image: <caption>]``."""
    return f"[image: {caption}]"


def clean_caption(text: str, max_chars: int) -> str:
    """A description safe to store and to mark: control characters, NUL and lone surrogates removed,
    whitespace collapsed, square brackets turned into parentheses (they delimit the marker), at most
    `max_chars` characters."""
    text = text.encode("utf-8", "replace").decode("utf-8")
    text = "".join(ch if unicodedata.category(ch)[0] != "C" else " " for ch in text)
    text = re.sub(r"\s+", " ", text).strip().replace("[", "(").replace("]", ")")
    return text[:max_chars].rstrip()


def needs_model(job: AddJob, vision: LLM | None) -> bool:
    """True when the job has an image without a supplied caption and a vision model could describe it
    (the stage may call the model, so it runs under the stage's compute lease)."""
    return vision is not None and any(p.supplied_caption is None for m in job.messages for p in m.image_parts)


def caption(job: AddJob, *, vision: LLM | None = None, cache: CaptionCache | None = None,
            settings: VisionSettings | None = None, fetch: Fetch | None = None,
            lease_s: float = 120.0) -> CaptionedMessages:
    """Describe the job's images in text (see the module docstring for the order of sources).

    Args:
        job: the add job.
        vision: the vision model; None: supplied captions only (other images are dropped).
        cache: the shared caption cache; None describes every image afresh.
        settings: vision settings (images per call, caption length, fetch); defaults when None.
        fetch: downloads http(s) images when ``settings.fetch`` is on; ignored otherwise.
        lease_s: how long an image's caption lease lives if this worker dies while holding it (seconds;
            it must cover one batch: its downloads and its call).

    Returns:
        The messages with image parts replaced by ``[image: ...]`` text parts (dropped images
        removed), the counts by source, warnings for dropped images, and the vision calls' usage.

    Raises:
        LLMUnavailable, RateLimited, LLMOutputError: from the vision model (the captions of earlier
            requests of this job are cached, so a retry does not pay for them again).
        StageBusy: another worker is describing one of the job's images right now (re-queued, not
            an attempt; the job then reads the cache).
        BrokerUnavailable: Redis (the caption cache) stayed unreachable; nothing is lost, the stage runs again.
    """
    settings = settings or VisionSettings()
    images = [_Image(f"messages[{i}].content[{j}]", part) for i, m in enumerate(job.messages)
              for j, part in enumerate(m.content if isinstance(m.content, list) else []) if isinstance(part, ImagePart)]
    if not images:
        return CaptionedMessages(messages=list(job.messages))
    usage = LLMUsage()
    pending: list[_Image] = []
    for image in images:
        supplied = image.part.supplied_caption
        if supplied is not None:
            image.caption, image.how = clean_caption(supplied, settings.max_caption_chars) or "an image", "supplied"
        elif vision is None:
            image.how, image.reason = "dropped", "no caption supplied and no vision model (MEMQ_VISION__MODEL)"
        else:
            _key(image, vision.settings.model)
            if image.how != "dropped":
                pending.append(image)
    if pending and vision is not None:
        usage = _describe(pending, vision, _Progress(cache, job.job_id), settings, fetch if settings.fetch else None,
                          lease_s)
    return _result(job.messages, images, usage)


def _key(image: _Image, model: str) -> None:
    url, detail = image.part.image_url.url, image.part.image_url.detail
    if url[:5].lower() == "data:":
        try:
            decoded = parse_data_url(url, max_bytes=len(url))
        except InvalidRequest as exc:  # the producer checks this; a job stored by an older memq may not be
            image.how, image.reason = "dropped", f"unreadable data: image ({type(exc).__name__})"
            return
        image.key = image_key(model, data=decoded.data, detail=detail)
        image.send = f"data:{decoded.mime};base64,{base64.b64encode(decoded.data).decode()}"  # canonical form
    else:
        image.key = image_key(model, url=url, detail=detail)
        image.send = url


REFUSED_REASON = "the vision model refused the image (InvalidJob)"


@dataclass
class _Progress:
    """Where a job's captions go as each call answers (the shared cache) and what it learned about its
    images (the job's notes, `stores.caption_cache`), so a stage re-queued mid-way (`RateLimited` between
    the single-image calls of a refused batch) neither repeats the batch nor redoes finished images."""

    cache: CaptionCache | None
    job_id: str

    def notes(self) -> dict[str, str]:
        return self.cache.notes(self.job_id) if self.cache is not None else {}

    def described(self, captions: dict[str, str]) -> None:
        if self.cache is not None and captions:
            self.cache.put_many(captions)
            self.cache.note(self.job_id, dict.fromkeys(captions, DESCRIBED))

    def note(self, keys: list[str], what: str) -> None:
        if self.cache is not None:
            self.cache.note(self.job_id, dict.fromkeys(keys, what))


def _describe(pending: list[_Image], vision: LLM, progress: _Progress, settings: VisionSettings,
              fetch: Fetch | None, lease_s: float) -> LLMUsage:
    """Fill in captions of `pending` from the cache and the model; returns the model's usage.

    Distinct images go to the model in batches of ``max_images_per_call``; each batch's leases are
    taken just before its downloads and call and given back right after, so a job never holds an
    image's lease while it waits on other images (another tenant's job sharing one image waits at most
    one batch). A batch the provider refuses (4xx) is retried one image at a time and the images it
    still refuses are dropped with a warning, so one bad image never fails the add. Each caption is
    cached as its call answers, and the job notes which images must go alone or were refused, so a run
    stopped by `RateLimited` goes on from there when re-queued (an image the model described in an
    earlier run of the job still counts as ``model``).
    """
    cache = progress.cache
    by_key: dict[str, list[_Image]] = {}
    for image in pending:
        by_key.setdefault(image.key or "", []).append(image)
    found = cache.get_many(list(by_key)) if cache is not None else {}
    notes = progress.notes()
    for key in by_key:
        if key not in found and notes.get(key) == REFUSED:
            _drop(by_key[key], REFUSED_REASON)
    missing = [k for k in by_key if k not in found and notes.get(k) != REFUSED]
    together = [k for k in missing if notes.get(k) != ALONE]
    step = settings.max_images_per_call
    batches = [[k] for k in missing if notes.get(k) == ALONE] + [together[i:i + step]
                                                                 for i in range(0, len(together), step)]
    usage = LLMUsage()
    described: dict[str, str] = {}
    theirs: list[str] = []
    for batch in batches:
        if cache is not None:
            mine, busy = cache.lease(batch, ttl_s=lease_s)
            theirs += busy
        else:
            mine = {k: "" for k in batch}
        try:
            inputs = [(key, src) for key in mine if (src := _source(by_key[key], fetch)) is not None]
            got, spent = _ask_or_split(vision, inputs, settings.max_caption_chars, by_key, progress)
            usage += spent
            described.update(got)
        finally:
            if cache is not None and mine:
                cache.release(mine)
    if theirs:
        found.update(cache.get_many(theirs) if cache is not None else {})
        waiting = [k for k in theirs if k not in found]
        if waiting:
            raise StageBusy(f"another worker is describing {len(waiting)} of the job's images",
                            retry_after_s=BUSY_WAIT_S)
    seen: set[str] = set()
    for key, group in by_key.items():
        for image in group:
            if image.how == "dropped":
                continue
            image.caption = described[key] if key in described else found[key]
            ours = key in described or notes.get(key) == DESCRIBED
            image.how = "model" if ours and key not in seen else "cached"
            seen.add(key)
    return usage


def _source(group: list[_Image], fetch: Fetch | None) -> ImageInput | None:
    """What to send for an image: its URL, or with `fetch` its downloaded bytes; None (the group
    dropped with a warning) when the download is refused or fails."""
    image = group[0]
    url = image.send
    if fetch is not None and url[:5].lower() != "data:":
        try:
            got = fetch(url)
        except PipelineError as exc:
            _drop(group, f"could not fetch the image ({type(exc).__name__})")
            return None
        except InvalidRequest as exc:
            _drop(group, f"image URL refused ({type(exc).__name__})")
            return None
        url = f"data:{got.mime};base64,{base64.b64encode(got.data).decode()}"
    return ImageInput(label="", url=url, detail=image.part.image_url.detail)


def _ask_or_split(vision: LLM, inputs: list[tuple[str, ImageInput]], max_chars: int,
                  by_key: dict[str, list[_Image]], progress: _Progress) -> tuple[dict[str, str], LLMUsage]:
    """Captions of `inputs` by key (each cached as its call answers): one call, or, when the provider
    refuses the request (`InvalidJob`: a 4xx such as a dead link it could not download), one call per
    image, dropping those it refuses (both noted for the job, so a re-queued run does not ask again)."""
    if not inputs:
        return {}, LLMUsage()
    try:
        captions, usage = _ask(vision, [i for _, i in inputs], max_chars)
        got = {key: captions[n] for n, (key, _) in enumerate(inputs)}
        progress.described(got)
        return got, usage
    except InvalidJob:
        if len(inputs) == 1:
            progress.note([inputs[0][0]], REFUSED)
            _drop(by_key[inputs[0][0]], REFUSED_REASON)
            return {}, LLMUsage()
        progress.note([key for key, _ in inputs], ALONE)
    got = {}
    usage = LLMUsage()
    for one in inputs:
        part, spent = _ask_or_split(vision, [one], max_chars, by_key, progress)
        got.update(part)
        usage += spent
    return got, usage


def _ask(vision: LLM, images: list[ImageInput], max_chars: int) -> tuple[list[str], LLMUsage]:
    """One vision call for `images`; their captions in order."""
    labelled = [ImageInput(label=f"Image {n}:", url=i.url, detail=i.detail) for n, i in enumerate(images)]
    user = f"Describe each of the {len(images)} images below, numbered from 0."
    reply, usage = vision.complete_json(CAPTION_INSTRUCTIONS + "\n\n" + CAPTION_FORMAT, user, CaptionsReply,
                                        images=labelled)
    got = {item.image: clean_caption(item.caption, max_chars) for item in reply.captions}
    missing = [n for n in range(len(images)) if not got.get(n)]
    if missing:
        raise LLMOutputError(f"the vision model described {len(images) - len(missing)} of {len(images)} images "
                             f"(missing {missing[:10]})")
    return [got[n] for n in range(len(images))], usage


def _drop(images: list[_Image], reason: str) -> None:
    for image in images:
        image.how, image.reason = "dropped", reason


def _result(messages: list[Message], images: list[_Image], usage: LLMUsage) -> CaptionedMessages:
    by_where = {image.where: image for image in images}
    out: list[Message] = []
    for i, message in enumerate(messages):
        if isinstance(message.content, str) or not message.image_parts:
            out.append(message)
            continue
        parts: list[TextPart | ImagePart] = []
        for j, part in enumerate(message.content):
            image = by_where.get(f"messages[{i}].content[{j}]")
            if image is None:
                parts.append(part)
            elif image.caption is not None:
                parts.append(TextPart(text=image_text(image.caption)))
        out.append(message.model_copy(update={"content": parts}))
    counts = ImageCounts(**{how: sum(1 for image in images if image.how == how)
                            for how in ("supplied", "model", "cached", "dropped")})
    warnings = [f"{image.where}: image dropped: {image.reason}" for image in images if image.how == "dropped"]
    return CaptionedMessages(messages=out, images=counts, warnings=warnings, usage=usage)
