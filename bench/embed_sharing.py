"""Shared forward passes in the offline embedder: 8 threads embedding a few facts each, with and without.

Each of `--threads` threads makes `--calls` calls of `--texts` LoCoMo sentences (what a decide stage
embeds for one job), all at once. *alone*: every call runs its own forward pass, one at a time (memq's
embedder before passes were shared: a lock around `encode`). *shared*: `SentenceTransformerEmbedder.embed`
as it is. The two alternate `--rounds` times in this one process, so both see the same machine load;
reported per mode: wall seconds, process CPU seconds, forward passes, and the ratios alone / shared.

    .venv/bin/python bench/embed_sharing.py [--threads 8] [--calls 20] [--texts 5] [--rounds 3] [--torch-threads 1]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root

import argparse
import json
import os
import statistics
import threading
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    """Run and print one JSON object of figures."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--texts", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/locomo10.json")
    args = parser.parse_args()

    from stores.embedder import SentenceTransformerEmbedder, _Call

    embedder = SentenceTransformerEmbedder(threads=args.torch_threads)
    samples = json.loads(args.data.read_text())
    sentences = [t["text"] for s in samples for k, v in s["conversation"].items()
                 if k.startswith("session_") and not k.endswith("date_time") for t in v]
    lock = threading.Lock()

    def alone(texts: list[str]) -> list[list[float]]:
        call = _Call(texts)
        with lock:
            embedder._encode([call])
        return call.vectors

    def run(embed: object) -> dict[str, float]:
        start = threading.Barrier(args.threads)

        def work(t: int) -> None:
            start.wait()
            for c in range(args.calls):
                first = ((t * args.calls + c) * args.texts) % (len(sentences) - args.texts)
                embed(sentences[first:first + args.texts])  # type: ignore[operator]

        passes = embedder.passes
        cpu, wall = time.process_time(), time.perf_counter()
        threads = [threading.Thread(target=work, args=(t,)) for t in range(args.threads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu,
                "passes": embedder.passes - passes if embed == embedder.embed else args.threads * args.calls}

    embedder.embed(sentences[:5])  # load and warm up
    runs: dict[str, list[dict[str, float]]] = {"alone": [], "shared": []}
    for _ in range(args.rounds):
        runs["alone"].append(run(alone))
        runs["shared"].append(run(embedder.embed))
    med = {mode: {k: round(statistics.median(r[k] for r in rs), 3) for k in rs[0]} for mode, rs in runs.items()}
    out = {"threads": args.threads, "calls": args.calls, "texts_per_call": args.texts, "rounds": args.rounds,
           "load_avg": os.getloadavg()[0], "median": med,
           "wall_ratio_alone_over_shared": round(med["alone"]["wall_s"] / med["shared"]["wall_s"], 2),
           "cpu_ratio_alone_over_shared": round(med["alone"]["cpu_s"] / med["shared"]["cpu_s"], 2)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
