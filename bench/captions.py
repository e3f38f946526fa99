"""Caption stage benchmark: vision calls and tokens per add with images, memq's way against Mem0's way.

Data: every LoCoMo session that shares images (``locomo10.json``, read by `producer.backfill.read_locomo`,
one add per session, in backfill order: conversation order, then session order), with LoCoMo's BLIP
captions REMOVED from the image parts, so a vision model has to describe every image. Sessions without
images are skipped. One run measures, against the same local OpenAI-compatible server
(`tests.rigs.llm_server.LLMTestServer`, no latency; it "sees" each image as its BLIP caption, so replies
have realistic lengths) and the same `pipeline.llm.LLM` class:

1. memq's way: `pipeline.caption.caption` on each job in order, with the shared caption cache
   (`stores.caption_cache.CaptionCache` on a real redis-server): the job's undescribed images in one
   call (up to ``max_images_per_call``), each distinct image once across the whole backfill;
2. Mem0's way (the baseline): one vision call per message that has images, no cache, with a short
   prompt of this script's own (the reply is scripted as ``{"description": <caption>}``, the shortest
   JSON the `LLM` class accepts, so the baseline pays no JSON overhead for memq's caption list);
3. memq again over the same backfill with the cache kept (a re-run for another tenant, or after a
   crash): every image should come from the cache, with no call.

Reported: jobs with images, images, distinct images, images per message, calls and prompt/completion
tokens per add (per job with images), the memq/baseline ratios of calls and total tokens, and the cache
hit rate (cached / (model + cached) images) of each memq pass. Token counts are the test server's:
text at 4 characters a token plus 765 tokens per image (85 at ``detail=low``), an OpenAI-style estimate,
not a real provider's bill. It is a ratio benchmark: both ways run in this one script on the same data
and server, so only their ratio is meant to carry over to a real provider.

    .venv/bin/python bench/captions.py [--conversations conv-26 conv-30 ...] [--out bench/results/captions.json]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: the test rigs live in tests/rigs

import argparse
import json
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, SecretStr

LOCOMO = Path(__file__).resolve().parents[2] / "shared/data/locomo10.json"
OUT = Path(__file__).resolve().parent / "results/captions.json"
MODEL = "openai/test-vision"
BASELINE_SYSTEM = ('You turn pictures from a chat into text for a memory store. Reply with JSON only: '
                   '{"description": "<what the picture shows, in a sentence or two>"}.')
BASELINE_USER = "A picture shared in the chat. Describe it."


class Description(BaseModel):
    """The baseline's reply: one description of a message's images."""

    description: str


def load_jobs(path: Path, conversations: list[str] | None) -> tuple[list[Any], dict[str, str]]:
    """The add jobs of every LoCoMo session with images, in backfill order, captions removed.

    Args:
        path: ``locomo10.json``.
        conversations: ``sample_id``s to read (all when None).

    Returns:
        ``(jobs, captions)``: `memq.models.AddJob`s (their `metadata` names conversation and session), and
        LoCoMo's BLIP caption of each image URL (what the test server answers for it).
    """
    from memq.config import LimitsSettings
    from producer.backfill import read_locomo
    from producer.validate import build_job

    jobs, captions = [], {}
    for item in read_locomo(path, conversations=conversations):
        request = dict(item.request)
        messages = []
        for message in request.pop("messages"):
            content = message["content"]
            if isinstance(content, list):
                for part in content:
                    if part.get("type") == "image_url" and part.get("caption"):
                        captions[part["image_url"]["url"]] = part["caption"]
                content = [{k: v for k, v in p.items() if k not in ("caption", "alt")} for p in content]
            messages.append({**message, "content": content})
        job = build_job(messages, limits=LimitsSettings(), **request)
        if any(m.image_parts for m in job.messages):
            jobs.append(job)
    return jobs, captions


def totals(rows: list[dict[str, int]], jobs: int, seconds: float) -> dict[str, Any]:
    """Sum per-job rows (``calls``, ``prompt_tokens``, ``completion_tokens``, optional ``model``/``cached``
    image counts) and add per-add means (over `jobs` adds) and the cache hit rate (0..1)."""
    keys = ("calls", "prompt_tokens", "completion_tokens", "model", "cached")
    out: dict[str, Any] = {k: sum(r.get(k, 0) for r in rows) for k in keys}
    out["total_tokens"] = out["prompt_tokens"] + out["completion_tokens"]
    for k in ("calls", "prompt_tokens", "completion_tokens", "total_tokens"):
        out[f"{k}_per_add"] = round(out[k] / jobs, 2) if jobs else 0.0
    described = out["model"] + out["cached"]
    out["cache_hit_rate"] = round(out["cached"] / described, 4) if described else 0.0
    out["seconds"] = round(seconds, 2)
    return out


def run_memq(jobs: list[Any], vision: Any, cache: Any, settings: Any) -> tuple[list[dict[str, int]], float]:
    """memq's caption stage over `jobs`, in order, sharing `cache`.

    Returns:
        One row per job (``calls``, ``prompt_tokens``, ``completion_tokens``, ``model`` and ``cached``
        images; ``dropped`` must be 0), and the wall time (seconds).
    """
    from pipeline.caption import caption

    rows, start = [], time.perf_counter()
    for job in jobs:
        out = caption(job, vision=vision, cache=cache, settings=settings)
        if out.images.dropped:
            raise RuntimeError(f"job {job.metadata}: {out.warnings}")
        rows.append({**out.usage.model_dump(), "model": out.images.model, "cached": out.images.cached})
    return rows, time.perf_counter() - start


def run_baseline(jobs: list[Any], vision: Any, server: Any, captions: dict[str, str]) -> tuple[
        list[dict[str, int]], float]:
    """Mem0's way over `jobs`: one vision call per message with images, no cache.

    Returns:
        One row per job (``calls``, ``prompt_tokens``, ``completion_tokens``), and the wall time (seconds).
    """
    from pipeline.llm import ImageInput
    from pipeline.types import LLMUsage
    from tests.rigs.llm_server import Reply

    rows, start = [], time.perf_counter()
    for job in jobs:
        usage = LLMUsage()
        for message in job.messages:
            parts = message.image_parts
            if not parts:
                continue
            seen = " ".join(captions.get(p.image_url.url, "a photo") for p in parts)
            server.script(Reply(content=json.dumps({"description": seen})))
            images = [ImageInput(label="", url=p.image_url.url, detail=p.image_url.detail) for p in parts]
            _, spent = vision.complete_json(BASELINE_SYSTEM, BASELINE_USER, Description, images=images)
            usage += spent
        rows.append(usage.model_dump())
    return rows, time.perf_counter() - start


def main() -> None:
    """Run the three phases, print a table and write the JSON figures to ``--out``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--conversations", nargs="*", default=None, help="LoCoMo sample_ids (default: all)")
    parser.add_argument("--data", type=Path, default=LOCOMO)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()

    import redis
    from rich.console import Console
    from rich.table import Table

    from cli.redis_server import RedisServer
    from memq.config import VisionSettings
    from pipeline.llm import LLM
    from stores.caption_cache import CaptionCache
    from tests.rigs.llm_server import LLMTestServer

    jobs, captions = load_jobs(args.data, args.conversations or None)
    urls = [p.image_url.url for j in jobs for m in j.messages for p in m.image_parts]
    per_message = Counter(len(m.image_parts) for j in jobs for m in j.messages if m.image_parts)
    data: dict[str, Any] = {"jobs_with_images": len(jobs), "images": len(urls), "distinct_images": len(set(urls)),
            "messages_with_images": sum(per_message.values()),
            "images_per_message": {str(k): v for k, v in sorted(per_message.items())}}
    missing = [u for u in set(urls) if u not in captions]
    if missing:
        raise RuntimeError(f"{len(missing)} image URLs without a LoCoMo caption, e.g. {missing[0]}")

    with RedisServer() as redis_server, LLMTestServer() as server:
        server.image_captions.update(captions)
        settings = VisionSettings(model=MODEL, api_base=server.url, api_key=SecretStr("x"))
        llm_settings = settings.llm_settings()
        assert llm_settings is not None
        vision = LLM(llm_settings, budget=f"vision:{MODEL}")
        cache = CaptionCache(redis.Redis.from_url(redis_server.url), ttl_s=settings.cache_ttl_s)
        phases: dict[str, tuple[list[dict[str, int]], float]] = {}
        Phase = Callable[[], tuple[list[dict[str, int]], float]]
        runs: tuple[tuple[str, Phase], ...] = (
            ("memq", lambda: run_memq(jobs, vision, cache, settings)),
            ("baseline", lambda: run_baseline(jobs, vision, server, captions)),
            ("memq_second_pass", lambda: run_memq(jobs, vision, cache, settings)))
        for name, run in runs:
            server.reset()  # keeps image_captions
            phases[name] = run()
            calls = sum(r["calls"] for r in phases[name][0])
            if calls != len(server.requests):
                raise RuntimeError(f"{name}: {calls} calls counted, the server saw {len(server.requests)}")
            unknown = [u for batch in server.vision_requests for u in batch if u not in server.image_captions]
            if unknown:
                raise RuntimeError(f"{name}: the server was asked about {len(unknown)} unknown images")
            vision_images = sum(len(b) for b in server.vision_requests) if name != "baseline" else None
            if vision_images is not None and vision_images != sum(r["model"] for r in phases[name][0]):
                raise RuntimeError(f"{name}: {vision_images} images sent, not the count of model captions")

    result = {name: totals(rows, len(jobs), seconds) for name, (rows, seconds) in phases.items()}
    del result["baseline"]["model"], result["baseline"]["cached"], result["baseline"]["cache_hit_rate"]
    memq, base = result["memq"], result["baseline"]
    ratio = {k: round(memq[k] / base[k], 4) if base[k] else None
             for k in ("calls", "prompt_tokens", "completion_tokens", "total_tokens")}
    report = {
        "data": str(args.data), "conversations": args.conversations or "all", "model": MODEL, **data,
        "vision_settings": {"max_images_per_call": settings.max_images_per_call,
                            "max_caption_chars": settings.max_caption_chars},
        "memq": memq, "baseline_mem0_way": base, "memq_second_pass": result["memq_second_pass"],
        "ratio_memq_to_baseline": ratio,
        "cache_hit_rate": {"first_pass": memq["cache_hit_rate"],
                           "first_pass_best_possible": round(1 - data["distinct_images"] / data["images"], 4)
                           if data["images"] else 0.0,
                           "second_pass": result["memq_second_pass"]["cache_hit_rate"]},
        "token_counting": "LLMTestServer estimate: text chars/4 + 765 tokens per image (85 at detail=low); "
                          "OpenAI-style, not a real provider's bill",
        "per_job": [{"conversation": j.metadata["conversation"], "session": j.metadata["session"],
                     "images": sum(len(m.image_parts) for m in j.messages),
                     "memq": phases["memq"][0][i], "baseline": phases["baseline"][0][i],
                     "memq_second_pass": phases["memq_second_pass"][0][i]} for i, j in enumerate(jobs)],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")

    console = Console()
    console.print(f"LoCoMo {report['conversations']}: {data['jobs_with_images']} adds with images, "
                  f"{data['images']} images ({data['distinct_images']} distinct) in "
                  f"{data['messages_with_images']} messages; images per message {data['images_per_message']}")
    table = Table(title="Caption stage per add with images (server's token estimate)")
    for col in ("", "memq pass 1", "Mem0's way", "memq / Mem0", "memq pass 2"):
        table.add_column(col, justify="right")
    second = result["memq_second_pass"]
    for label, key in (("calls / add", "calls"), ("prompt tok / add", "prompt_tokens"),
                       ("completion tok / add", "completion_tokens"), ("total tok / add", "total_tokens")):
        table.add_row(label, f"{memq[key + '_per_add']:.2f}", f"{base[key + '_per_add']:.2f}",
                      f"{ratio[key]:.3f}" if ratio[key] is not None else "-", f"{second[key + '_per_add']:.2f}")
    table.add_row("calls (total)", str(memq["calls"]), str(base["calls"]), "", str(second["calls"]))
    table.add_row("cache hit rate", f"{memq['cache_hit_rate']:.1%}", "-", "", f"{second['cache_hit_rate']:.1%}")
    table.add_row("wall time (s)", f"{memq['seconds']:.1f}", f"{base['seconds']:.1f}", "", f"{second['seconds']:.1f}")
    console.print(table)
    console.print(f"JSON: {args.out}")


if __name__ == "__main__":
    main()
