"""memq against Mem0 1.0.11 on the same data, embedder and model server, in one run; writes docs/BENCHMARKS.md.

    .venv/bin/python bench/vs_mem0.py          # the whole benchmark (25 minutes on 2 shared cores)
    .venv/bin/python bench/vs_mem0.py --adds 20 --concurrency 1,4 --search-sizes 1000 --skip-graph   # a quick try

What it runs, all in this one process's run (so ratios come from one run on one machine state):

1. **Mem0's venv.** ``bench/.mem0-venv`` (git-ignored; reused while its stamp matches): a ``python -m venv``
   of this interpreter with ``mem0ai==1.0.11`` (and posthog, backoff: Mem0 imports its telemetry client
   unconditionally) installed ``--no-deps``, and a ``.pth`` line that puts this venv's site-packages after
   its own. Mem0 thus runs in its own interpreter and environment (memq is not importable there) on the
   very same torch, sentence-transformers, qdrant-client and openai builds as memq, and nothing downloads
   torch again (PyPI's torch 2.13.0 pulls 2.7 GB of CUDA libraries).
2. **The model.** One OpenAI-compatible simulator (``bench/vs_mem0_sim.py``) in this process answers both
   systems after ``--latency`` seconds a call, no rate limit, with the same facts for the same session.
3. **Adds** (``--concurrency``, default 1, 4, 8, 16): the first ``--sessions`` sessions of each LoCoMo
   conversation (10 x 10 = 100 adds, one per session, conversation by conversation), for each N: memq with
   one worker process of N threads, the producer enqueueing every add at once and waiting for every job
   (``bench/vs_mem0_memq.py``); then Mem0 with N threads calling ``Memory.add`` at once
   (``bench/mem0_runner.py`` in Mem0's venv). Both first run the same 2 warm-up adds (untimed, another
   user). Reported per run: adds/s, failed adds, model calls and tokens per add, events, memories stored
   and duplicates, CPU seconds of the system's processes.
4. **Scale-out** (``--scale-out``, default 2, 3 processes; memq only): the adds again at the largest N,
   with 1 or 2 more worker processes of N threads beside the first; they consume only the start and
   model stages' queues (``memq.light``, ``memq.llm``) and read the embedded store through the first,
   which owns it (``memq worker --queues memq.light,memq.llm``). With one process from step 3, a curve
   of adds/s against worker processes.
5. **Recall**: after the smallest N's runs, the LoCoMo questions (categories 1-4) whose evidence lies in
   the sessions added, searched in each system's store (top 10): memq dense-only and hybrid, Mem0's search.
6. **Search latency vs store size** (``--search-sizes``): each system's public search over N synthetic
   memories (100 users, LoCoMo turn texts, the same random unit vectors), in its own process.
7. **Graph** (unless ``--skip-graph``): ``bench/graph_backfill.py`` (memq with Neo4j, LoCoMo conv-26): graph
   write vs vector write p50. Mem0's graph memory is not run (it needs its own Neo4j setup and model
   prompts for entities and relations that the simulator does not answer).

Writes ``bench/results/vs_mem0.json`` (every figure and sample) and ``docs/BENCHMARKS.md`` with PNG plots
in ``docs/bench/`` (``bench/vs_mem0_report.py``; ``--report-only`` redraws them from the JSON).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root (the bench's siblings: bench/)

import argparse
import importlib.metadata
import json
import os
import platform
import re
import shutil
import subprocess
import sysconfig
import tempfile
import time
from datetime import datetime, timezone
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# torch's threads, set before torch loads here; both systems' processes inherit it (see --torch-threads)
os.environ["OMP_NUM_THREADS"] = sys.argv[sys.argv.index("--torch-threads") + 1] if "--torch-threads" in sys.argv else "1"

BENCH = Path(__file__).resolve().parent
REPO_ROOT = BENCH.parent
MEM0_PINS = ("mem0ai==1.0.11", "posthog==7.91.1", "backoff==2.2.1")
WARMUP_USER = "bench-warm-up"
LIMIT = 10


def ensure_mem0_venv(venv: Path) -> dict[str, Any]:
    """Create Mem0's venv (module docstring, step 1) unless one with the same pins and base exists.

    Returns:
        ``{"path", "python", "reused": bool, "install_s": seconds (0 when reused), "pins", "base_site"}``.

    Raises:
        subprocess.CalledProcessError: venv or pip failed.
    """
    base_site = sysconfig.get_paths()["purelib"]
    stamp, want = venv / ".bench-stamp", json.dumps({"pins": MEM0_PINS, "base_site": base_site})
    python = venv / "bin" / "python"
    info = {"path": str(venv.relative_to(REPO_ROOT)), "python": str(python), "pins": list(MEM0_PINS),
            "base_site": base_site}
    if python.exists() and stamp.exists() and stamp.read_text() == want:
        return {**info, "reused": True, "install_s": 0.0}
    started = time.monotonic()
    shutil.rmtree(venv, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    Path(site, "memq-bench-base.pth").write_text(base_site + "\n")
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-cache-dir", "--no-deps", *MEM0_PINS], check=True)
    stamp.write_text(want)
    return {**info, "reused": False, "install_s": round(time.monotonic() - started, 1)}


def ensure_matplotlib() -> None:
    """Install the project's ``bench`` extra (matplotlib) into this venv when it is missing, before the long run."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("installing matplotlib (the project's bench extra) ...", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "matplotlib>=3.8"], check=True)


def run_mem0(python: Path, spec: dict[str, Any], log: Path) -> dict[str, Any]:
    """Run one phase of ``bench/mem0_runner.py`` in Mem0's venv and return its JSON (stderr appended to `log`).

    Raises:
        RuntimeError: the runner failed (the message ends with its stderr).
    """
    with tempfile.TemporaryDirectory(prefix="mem0-vs-memq-") as workdir:
        spec_file = Path(workdir) / "spec.json"
        spec_file.write_text(json.dumps({**spec, "workdir": workdir}))
        env = {k: v for k, v in os.environ.items() if not k.startswith("MEMQ_")}
        done = subprocess.run([str(python), str(BENCH / "mem0_runner.py"), str(spec_file)], cwd=workdir, env=env,
                              capture_output=True, text=True)
    with log.open("a") as f:
        f.write(done.stderr)
    if done.returncode != 0:
        raise RuntimeError(f"mem0_runner failed ({done.returncode}): {done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def recall_questions(data: Path, sessions: list[Any]) -> list[dict[str, Any]]:
    """LoCoMo questions of categories 1-4 whose every evidence turn is in a session added.

    Returns:
        ``[{"user_id", "question", "category", "gold": [dia ids]}]``.
    """
    from cli.demo import evidence_ids
    from recall import CATEGORIES

    added = {(s.conversation, s.number) for s in sessions}
    users = {s.conversation: s.user_id for s in sessions}
    out = []
    for sample in json.loads(data.read_text()):
        if sample["sample_id"] not in users:
            continue
        for q in sample["qa"]:
            gold = evidence_ids(q.get("evidence", []))
            if q.get("category") in CATEGORIES and gold and all(
                    (sample["sample_id"], int(g[1:].split(":")[0])) in added for g in gold):
                out.append({"user_id": users[sample["sample_id"]], "question": q["question"],
                            "category": q["category"], "gold": sorted(gold)})
    return out


def score(questions: list[dict[str, Any]], found: list[list[str]], turns: dict[str, dict[str, set[str]]],
          search_ms: list[float]) -> dict[str, Any]:
    """Recall@5/@10 by category (`recall.Tally`) when each result cites the turns its text came from.

    Args:
        questions: `recall_questions`' output.
        found: per question, the result texts, best first.
        turns: per user id, fact text -> the turns it was extracted from (every session added).
        search_ms: per question, the search's latency.

    Returns:
        `recall.Tally.report` plus ``"results_citing_nothing"`` (result texts that are no extracted fact).
    """
    from recall import Tally

    tally, unmapped = Tally(), 0
    for q, texts, ms in zip(questions, found, search_ms):
        cited = [turns[q["user_id"]].get(t, set()) for t in texts]
        unmapped += sum(not c for c in cited)
        tally.add(q["category"], set(q["gold"]), cited, ms)
    return {**tally.report(), "results_citing_nothing": unmapped}


def _versions() -> dict[str, str]:
    names = ("qdrant-client", "qdrant-edge-py", "torch", "sentence-transformers", "litellm", "celery", "openai",
             "matplotlib")
    out = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "absent"
    redis = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout
    out["redis-server"] = (re.search(r"v=(\S+)", redis) or re.search(r"(\S+)", redis or "?")).group(1)  # type: ignore[union-attr]
    git = ["git", "-C", str(REPO_ROOT)]
    out["memq commit"] = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True,
                                        text=True).stdout.strip()
    if subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                      text=True).stdout.strip():
        out["memq commit"] += " (with uncommitted changes)"
    return out


def _machine() -> dict[str, Any]:
    cpu = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
    mem = re.search(r"MemTotal:\s*(\d+)", Path("/proc/meminfo").read_text())
    return {"cpus": os.cpu_count(), "cpu": cpu.group(1) if cpu else "?",
            "memory_gib": round(int(mem.group(1)) / 2**20, 1) if mem else None, "kernel": platform.release()}


def _summary(system: str, run: dict[str, Any], llm: dict[str, Any]) -> dict[str, Any]:
    adds = run["adds"]
    calls, prompt, completion = (sum(llm[k].values()) for k in ("calls", "prompt_tokens", "completion_tokens"))
    return {"system": system, "threads": run["threads"], "adds": adds, "elapsed_s": round(run["elapsed_s"], 2),
            "adds_per_s": round(adds / run["elapsed_s"], 2), "failed": run["failed"],
            "succeeded_per_s": round((adds - run["failed"]) / run["elapsed_s"], 2),
            "calls_per_add": round(calls / adds, 2), "prompt_tokens_per_add": round(prompt / adds),
            "completion_tokens_per_add": round(completion / adds), "events": run["events"],
            "memories": run["memories"], "duplicates": run["duplicates"], "llm": llm,
            "store_unreadable": run.get("store_unreadable"),
            **{k: run[k] for k in ("cpu_s", "errors", "errors_raised", "errors_logged", "add_s") if k in run}}


def main() -> None:
    """Run everything (module docstring), write the JSON and the report."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=REPO_ROOT.parent / "shared/data/locomo10.json")
    parser.add_argument("--sessions", type=int, default=10, help="sessions per conversation (10 conversations)")
    parser.add_argument("--adds", type=int, default=None, help="only the first N adds (quick runs)")
    parser.add_argument("--concurrency", default="1,4,8,16", help="threads per run, comma-separated")
    parser.add_argument("--latency", type=float, default=0.3, help="seconds per model call")
    parser.add_argument("--search-sizes", default="1000,10000,30000", help="memories per store, comma-separated")
    parser.add_argument("--search-queries", type=int, default=50, help="timed searches per store and system")
    parser.add_argument("--scale-out", default="2,3",
                        help="memq worker processes for the scale-out curve at the largest concurrency, comma-separated "
                             "(the first owns the store, the others run the model stages; empty: none)")
    parser.add_argument("--skip-search", action="store_true")
    parser.add_argument("--skip-recall", action="store_true")
    parser.add_argument("--skip-graph", action="store_true")
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="torch intra-op threads of every process that embeds (OMP_NUM_THREADS, both systems)")
    parser.add_argument("--embed-precision", choices=("auto", "float32", "bfloat16"), default="auto",
                        help="the embedder's arithmetic for both systems (auto: memq's default, bfloat16 on a CPU "
                             "with native bfloat16)")
    parser.add_argument("--embed-processes", action=argparse.BooleanOptionalAction, default=True,
                        help="memq's worker embeds in child processes (MEMQ_EMBEDDER__PROCESSES)")
    parser.add_argument("--mem0-venv", type=Path, default=BENCH / ".mem0-venv")
    parser.add_argument("--json", type=Path, default=BENCH / "results" / "vs_mem0.json")
    parser.add_argument("--doc", type=Path, default=REPO_ROOT / "docs" / "BENCHMARKS.md")
    parser.add_argument("--report-only", action="store_true", help="redraw the doc and plots from --json")
    args = parser.parse_args()

    from vs_mem0_report import write_report

    if args.report_only:
        write_report(json.loads(args.json.read_text()), args.doc)
        return
    started, load_before = time.monotonic(), os.getloadavg()
    command = " ".join([".venv/bin/python", "bench/vs_mem0.py", *sys.argv[1:]])
    ensure_matplotlib()
    print("mem0 venv ...", file=sys.stderr, flush=True)
    venv = ensure_mem0_venv(args.mem0_venv.resolve())
    mem0_python = Path(venv["python"])

    from stores.embedder import native_bfloat16

    precision = args.embed_precision if args.embed_precision != "auto" else (
        "bfloat16" if native_bfloat16() else "float32")
    os.environ["MEMQ_EMBEDDER__PRECISION"] = precision  # memq's worker, its search side and the simulator
    from vs_mem0_memq import run_adds as memq_adds, run_search as memq_search, self_cpu_s
    from vs_mem0_sim import Simulator, load_sessions

    sessions = load_sessions(args.data, args.sessions)[: args.adds]
    warmup = sessions[:2]
    sim = Simulator(sessions, args.latency)
    sim.prewarm()
    requests = [s.memq_request for s in sessions]
    warm_requests = [{**s.memq_request, "user_id": WARMUP_USER} for s in warmup]
    mem0_adds = [{"user_id": s.user_id, "messages": s.mem0_messages, "metadata": s.memq_request["metadata"]}
                 for s in sessions]
    mem0_warm = [{**a, "user_id": WARMUP_USER} for a in mem0_adds[:2]]
    questions = [] if args.skip_recall else recall_questions(args.data, sessions)
    turns: dict[str, dict[str, set[str]]] = {}
    for s in sessions:
        for text, cited in s.fact_turns.items():
            turns.setdefault(s.user_id, {}).setdefault(text, set()).update(cited)
    log = args.json.parent / "vs_mem0.mem0.log"
    args.json.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("")

    concurrency = [int(n) for n in args.concurrency.split(",")]
    runs: list[dict[str, Any]] = []
    recall: dict[str, Any] = {}
    for n in concurrency:
        ask = questions if n == concurrency[0] else []
        print(f"memq, {n} threads ...", file=sys.stderr, flush=True)
        bench_cpu0 = self_cpu_s()
        run = memq_adds(requests, warm_requests, n, sim.url, ask, LIMIT, sim.take, args.embed_processes)
        run["cpu_s"]["bench_process"] = self_cpu_s() - bench_cpu0  # the simulator and the producer, for reference
        runs.append(_summary("memq", run, run["llm"]))
        if ask:
            recall["memq_dense"] = score(ask, [[h["memory"] for h in r] for r in run["found"]["dense"]], turns,
                                         run["search_ms"]["dense"])
            recall["memq_hybrid"] = score(ask, [[h["memory"] for h in r] for r in run["found"]["hybrid"]], turns,
                                          run["search_ms"]["hybrid"])
            provenance = [[set(h["source_message_ids"]) for h in r] for r in run["found"]["hybrid"]]
            recall["memq_hybrid_by_own_provenance_recall@10"] = round(sum(
                any(set(q["gold"]) & c for c in cited[:LIMIT]) for q, cited in zip(ask, provenance)) / len(ask), 3)
        print(f"mem0, {n} threads ...", file=sys.stderr, flush=True)
        sim.take()
        mem0 = run_mem0(mem0_python, {"phase": "adds", "llm_url": sim.url, "threads": n, "adds": mem0_adds, "precision": precision,
                                      "warmup": mem0_warm, "questions": [{"user_id": q["user_id"],
                                                                          "question": q["question"]} for q in ask],
                                      "limit": LIMIT}, log)
        runs.append(_summary("mem0", mem0, sim.take(since=mem0["timed_from"])))  # not its warm-up's calls
        if ask:
            recall["mem0"] = score(ask, mem0["found"], turns, mem0["search_ms"])
        print(json.dumps({k: v for k, v in runs[-2].items() if k in ("threads", "adds_per_s", "failed")}),
              json.dumps({k: v for k, v in runs[-1].items() if k in ("threads", "adds_per_s", "failed")}),
              file=sys.stderr, flush=True)
    scale_out: list[dict[str, Any]] = []
    for processes in [int(n) for n in args.scale_out.split(",") if n.strip()]:
        n = max(concurrency)
        print(f"memq, {processes} worker processes of {n} threads ...", file=sys.stderr, flush=True)
        run = memq_adds(requests, warm_requests, n, sim.url, [], LIMIT, sim.take, args.embed_processes,
                        model_workers=processes - 1)
        scale_out.append({**_summary("memq", run, run["llm"]), "processes": processes})
        print(json.dumps({k: v for k, v in scale_out[-1].items() if k in ("processes", "threads", "adds_per_s", "failed")}),
              file=sys.stderr, flush=True)
    if recall:
        recall["questions"] = len(questions)
    result: dict[str, Any] = {
        "setup": {"adds": len(sessions), "sessions_per_conversation": args.sessions,
                  "conversations": sorted({s.conversation for s in sessions}), "latency_s": args.latency,
                  "concurrency": concurrency, "warmup_adds": len(warmup), "limit": LIMIT,
                  "torch_threads": args.torch_threads, "embed_precision": precision,
                  "embed_processes": args.embed_processes,
                  "facts_told": sum(len(s.facts) for s in sessions), "fact_check": dict(sim.fact_check),
                  "simulator_embeddings_computed": sim.embedder.misses},
        "throughput": runs, "scale_out": scale_out, "recall": recall,
    }
    if not args.skip_search:
        sizes = [int(n) for n in args.search_sizes.split(",")]
        samples = json.loads(args.data.read_text())
        texts = [f"{t['speaker']}: {t['text']}" for s in samples for k, v in s["conversation"].items()
                 if re.fullmatch(r"session_\d+", k) for t in v]
        all_questions = [q["question"] for s in samples for q in s["qa"] if q.get("category") in (1, 2, 3, 4)]
        step = max(1, len(all_questions) // args.search_queries)
        queries = all_questions[::step][: args.search_queries]
        users = [f"u{i}" for i in range(100)]
        print(f"search, memq {sizes} ...", file=sys.stderr, flush=True)
        memq_rows = memq_search(sizes, texts, users, queries, 5, LIMIT)
        print(f"search, mem0 {sizes} ...", file=sys.stderr, flush=True)
        mem0_rows = run_mem0(mem0_python, {"phase": "search", "llm_url": sim.url, "sizes": sizes, "texts": texts, "precision": precision,
                                           "users": users, "queries": queries, "warmup": 5, "limit": LIMIT}, log)
        result["search"] = {"users": len(users), "queries": len(queries), "memq": memq_rows["rows"],
                            "mem0": mem0_rows["rows"]}
    sim.stop()
    if not args.skip_graph:
        print("graph (memq, Neo4j) ...", file=sys.stderr, flush=True)
        t = time.monotonic()
        done = subprocess.run([sys.executable, str(BENCH / "graph_backfill.py"), "--data", str(args.data)],
                              capture_output=True, text=True, cwd=REPO_ROOT)
        result["graph"] = (json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0
                           else {"error": done.stderr[-2000:]})
        result["graph"]["bench_wall_s"] = round(time.monotonic() - t, 1)
    result["meta"] = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "command": command,
        "machine": _machine(), "versions": {**_versions(), "mem0ai": MEM0_PINS[0].split("==")[1]},
        "mem0_venv": venv, "load_before": [round(x, 2) for x in load_before],
        "load_after": [round(x, 2) for x in os.getloadavg()], "wall_s": round(time.monotonic() - started, 1),
    }
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    write_report(result, args.doc)
    print(f"wrote {args.json} and {args.doc} in {result['meta']['wall_s']} s", file=sys.stderr)


if __name__ == "__main__":
    main()
