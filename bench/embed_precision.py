"""The offline embedder in float32 and under bfloat16 autocast: CPU per call, and how close the vectors are.

Two `SentenceTransformerEmbedder` instances in this one process, ``precision="float32"`` and
``precision="bfloat16"``, embed the same calls of `--texts` LoCoMo turns each (26: the facts a decide
stage embeds for one session in `bench/vs_mem0.py`), alternating call by call so both see the same
machine load. Then every turn of the first `--conversations` conversations is embedded both ways, and
each QA question of those conversations ranks its conversation's turns both ways. Reported (one JSON
object): CPU ms per call each way and their ratio; the cosine between each turn's two vectors (min,
mean); and the mean overlap of the questions' top-10 turns (1.0: the same ten turns).

    .venv/bin/python bench/embed_precision.py [--calls 20] [--texts 26] [--conversations 2] [--torch-threads 1]

A bfloat16 product is only fast on a CPU that has it natively (`stores.embedder.native_bfloat16`);
elsewhere expect a ratio under 1.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _thread_cpu_ms() -> float:
    return time.thread_time() * 1000


def main() -> None:
    """Run and print one JSON object of figures."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--texts", type=int, default=26)
    parser.add_argument("--conversations", type=int, default=2)
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/locomo10.json")
    args = parser.parse_args()

    import numpy as np

    from stores.embedder import SentenceTransformerEmbedder, native_bfloat16

    embedders = {p: SentenceTransformerEmbedder(threads=args.torch_threads, passes=1, precision=p)
                 for p in ("float32", "bfloat16")}
    samples = json.loads(args.data.read_text())
    turns = [[t["text"] for k, v in s["conversation"].items()
              if k.startswith("session_") and not k.endswith("date_time") for t in v] for s in samples]
    every = [t for conv in turns for t in conv]

    for e in embedders.values():  # warm-up: first passes allocate
        e.embed(every[:args.texts])
    cpu_ms: dict[str, list[float]] = {p: [] for p in embedders}
    for c in range(args.calls):
        texts = every[c * args.texts:(c + 1) * args.texts]
        for p, e in embedders.items():
            t0 = _thread_cpu_ms()
            e.embed(texts)
            cpu_ms[p].append(_thread_cpu_ms() - t0)

    cosines: list[float] = []
    overlaps: list[float] = []
    for conv, sample in zip(turns[:args.conversations], samples[:args.conversations]):
        questions = [str(q["question"]) for q in sample["qa"]]
        docs = {p: np.asarray(e.embed(conv)) for p, e in embedders.items()}
        queries = {p: np.asarray(e.embed(questions)) for p, e in embedders.items()}
        cosines.extend((docs["float32"] * docs["bfloat16"]).sum(axis=1).tolist())
        top = {p: np.argsort(-(queries[p] @ docs[p].T), axis=1)[:, :10] for p in embedders}
        overlaps.extend(len(set(a) & set(b)) / 10 for a, b in zip(top["float32"], top["bfloat16"]))

    mean = {p: statistics.mean(v) for p, v in cpu_ms.items()}
    print(json.dumps({
        "native_bfloat16": native_bfloat16(), "torch_threads": args.torch_threads,
        "calls": args.calls, "texts_per_call": args.texts,
        "cpu_ms_per_call": {p: round(v, 1) for p, v in mean.items()},
        "cpu_ratio_float32_over_bfloat16": round(mean["float32"] / mean["bfloat16"], 2),
        "turns_compared": len(cosines), "cosine_min": round(min(cosines), 6),
        "cosine_mean": round(statistics.mean(cosines), 6),
        "questions": len(overlaps), "top10_overlap_mean": round(statistics.mean(overlaps), 4),
        "top10_overlap_min": min(overlaps)}, indent=1))


if __name__ == "__main__":
    main()
