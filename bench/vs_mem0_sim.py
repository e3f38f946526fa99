"""The model of ``bench/vs_mem0.py``: one OpenAI-compatible simulator that gives memq and Mem0 1.0.11 the same facts.

Both systems call the same `tests.rigs.llm_server.LLMTestServer` (one fixed latency per call, no rate
limit). Its answers come from memq's offline heuristic (`pipeline.offline_model`), whatever prompt asks:

* memq's extract and decide prompts (``Input:`` + JSON naming the task): `pipeline.offline_model.answer`;
* Mem0's fact-extraction prompt (system: Mem0's extraction prompt; user: ``Input:\\nuser: <text>\\n...``):
  ``{"facts": [...]}`` with the facts the heuristic extracts from the same session as memq sees it
  (speaker names and the session date included, which Mem0's prompt does not carry), looked up by the
  session's message texts (`Session.mem0_key`); a prompt that matches no session is a *miss*, answered
  from its own lines (speaker "User", no date) and counted;
* Mem0's update-memory prompt (one user message: its instructions, the memories it retrieved as a Python
  list of ``{"id", "text"}``, the new facts as a Python list of strings): ``{"memory": [{"id", "text",
  "event", "old_memory"?}]}`` from the heuristic's decision (`pipeline.offline_model.decide`), the same
  rule memq's decide answer uses, over what Mem0 retrieved.

So each system stores the same facts for the same session, and each decides (ADD/UPDATE/DELETE/NONE)
over its own neighbours with the same rule. The simulator's own CPU is kept small: every fact is embedded
once before the timed runs (`Simulator.prewarm`; the decide rule embeds facts and memories, which are
fact texts) and replies are kept by prompt hash, so a prompt seen before is replayed. `Simulator.take`
reports the calls and tokens of a phase (tokens as the server counts them: 4 characters a token).
"""

from __future__ import annotations

import ast
import hashlib
import json
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MEM0_EXTRACT, MEM0_UPDATE, MEMQ_EXTRACT, MEMQ_DECIDE, OTHER = (
    "mem0.extract", "mem0.update", "memq.extract", "memq.decide", "other")
KINDS = (MEMQ_EXTRACT, MEMQ_DECIDE, MEM0_EXTRACT, MEM0_UPDATE, OTHER)


def _squash(text: str) -> str:
    return re.sub(r"\s+", "", text)


@dataclass
class Session:
    """One LoCoMo session as both systems receive it.

    Attributes:
        conversation: the LoCoMo ``sample_id`` (``conv-26``).
        number: the session number (1-based).
        user_id: the scope of both systems (``locomo-<sample_id>``).
        memq_request: keyword arguments of memq's `Producer.add_many` (`producer.backfill.read_locomo`'s).
        mem0_messages: ``[{"role": "user", "name": speaker, "content": text}]`` for ``Memory.add``; an
            image's BLIP caption is in the text as ``[image: <caption>]``, as memq's caption stage writes it.
        dia_ids: the LoCoMo turn id of each message, in order.
        facts: the heuristic's facts for the session, in order.
        fact_turns: each fact's source turns (dia ids).
    """

    conversation: str
    number: int
    user_id: str
    memq_request: dict[str, Any]
    mem0_messages: list[dict[str, str]]
    dia_ids: list[str]
    facts: list[str] = field(default_factory=list)
    fact_turns: dict[str, set[str]] = field(default_factory=dict)

    @property
    def mem0_key(self) -> str:
        """The session's Mem0 extraction prompt with whitespace removed (``Input:user:<text>user:<text>...``)."""
        return _squash("Input:" + "".join(f"user: {m['content']}" for m in self.mem0_messages))


def _memq_text(content: str | list[dict[str, Any]]) -> str:
    """A message's text after memq's caption stage: text parts and ``[image: <caption>]`` joined by spaces."""
    if isinstance(content, str):
        return content
    parts = [p["text"] if p.get("type") == "text" else f"[image: {p['caption']}]" for p in content
             if p.get("type") == "text" or p.get("caption")]
    return " ".join(parts)


def load_sessions(data: Path, per_conversation: int) -> list[Session]:
    """The first `per_conversation` sessions of each LoCoMo conversation, conversation by conversation,
    with the heuristic's facts (what both systems will be told).

    Args:
        data: ``locomo10.json``.
        per_conversation: sessions taken from each of the 10 conversations, oldest first.

    Returns:
        Sessions in enqueue order: every session of the first conversation, then the next one's...
    """
    from pipeline.offline_model import extract
    from producer.backfill import read_locomo

    sessions: list[Session] = []
    taken: Counter[str] = Counter()
    for item in read_locomo(data):
        if taken[item.conversation_id] >= per_conversation:
            continue
        taken[item.conversation_id] += 1
        request = item.request
        texts = [_memq_text(m["content"]) for m in request["messages"]]
        session = Session(conversation=item.conversation_id, number=int(item.session_id.split("_")[1]),
                          user_id=request["user_id"], memq_request=request,
                          mem0_messages=[{"role": "user", "name": m["name"], "content": t}
                                         for m, t in zip(request["messages"], texts)],
                          dia_ids=[m["id"] for m in request["messages"]])
        prompt_messages = [{"index": i, "role": "user", "name": m["name"], "text": t}
                           for i, (m, t) in enumerate(zip(request["messages"], texts)) if t.strip()]
        for fact in extract(prompt_messages, request["timestamp"][:10]):
            session.facts.append(fact["text"])
            session.fact_turns.setdefault(fact["text"], set()).update(session.dia_ids[i] for i in fact["sources"])
        sessions.append(session)
    return sessions


def _fenced_after(prompt: str, marker: str) -> str:
    """The content of the first ``` fence after `marker` in `prompt`."""
    start = prompt.index("```", prompt.index(marker)) + 3
    return prompt[start:prompt.index("```", start)].strip()


def kind_of(prompt: str) -> str:
    """Which prompt this is (`MEMQ_EXTRACT`, `MEMQ_DECIDE`, `MEM0_EXTRACT`, `MEM0_UPDATE` or `OTHER`), from
    the request's last user message."""
    if prompt.startswith("Input:\n{"):
        try:
            task = json.loads(prompt[prompt.index("{"):]).get("task")
        except ValueError:
            return OTHER
        return {"extract_facts": MEMQ_EXTRACT, "decide_memory_events": MEMQ_DECIDE}.get(task, OTHER)
    if "The new retrieved facts are mentioned in the triple backticks" in prompt:
        return MEM0_UPDATE
    if prompt.startswith("Input:\n"):
        return MEM0_EXTRACT
    return OTHER


class Simulator:
    """The shared model server (see the module docstring).

    Args:
        sessions: every session either system will add (warm-up sessions included).
        latency_s: seconds every chat completion takes.

    Attributes:
        url: the API base both systems call (``http://127.0.0.1:PORT/v1``).
        fact_check: memq extraction prompts answered, by whether the facts were those Mem0 is told for the
            same session (``same facts``), others, or the session was not recognised (never reset).
    """

    def __init__(self, sessions: list[Session], latency_s: float) -> None:
        from memq.config import EmbedderSettings
        from pipeline.offline_model import use_embedder
        from stores.embed_cache import CachedEmbedder
        from stores.embedder import get_embedder
        from tests.rigs.llm_server import LLMTestServer

        self.sessions = sessions
        # every distinct text embedded once (the worker's cache, never full here: a few thousand texts)
        self.embedder = CachedEmbedder(get_embedder(EmbedderSettings()), max_texts=1_000_000)
        use_embedder(self.embedder)  # memq's decide answers embed through the cache too
        self._facts = {s.mem0_key: s.facts for s in sessions}
        self._replies: dict[str, str] = {}
        self._lock = threading.Lock()
        self._served: Counter[str] = Counter()
        self._cpu_s = 0.0
        self.fact_check: Counter[str] = Counter()
        self.server = LLMTestServer(default=self._reply, latency_s=latency_s).start()
        self.url = self.server.url

    def prewarm(self) -> None:
        """Embed every fact once (untimed), so decisions in the timed runs embed nothing new."""
        self.embedder.embed(sorted({f for s in self.sessions for f in s.facts}))

    def _reply(self, prompt: str) -> str:
        key = hashlib.sha256(prompt.encode()).hexdigest()
        with self._lock:
            if key in self._replies:
                self._served["replayed"] += 1
                return self._replies[key]
        started = time.thread_time()
        kind = kind_of(prompt)
        content = json.dumps(self._answer(kind, prompt), ensure_ascii=False)
        with self._lock:
            self._replies[key] = content
            self._served["computed"] += 1
            self._cpu_s += time.thread_time() - started
        return content

    def _answer(self, kind: str, prompt: str) -> dict[str, Any]:
        from pipeline.offline_model import answer, decide, extract

        if kind == MEMQ_EXTRACT:
            reply = answer(prompt)
            self._check_facts(prompt, [f["text"] for f in reply["facts"]])
            return reply
        if kind == MEMQ_DECIDE:
            return answer(prompt)
        if kind == MEM0_UPDATE:
            facts = ast.literal_eval(_fenced_after(prompt, "The new retrieved facts are mentioned"))
            old = ([] if "Current memory is empty." in prompt
                   else ast.literal_eval(_fenced_after(prompt, "I have collected till now")))
            return {"memory": decide([{"id": str(m["id"]), "text": str(m["text"])} for m in old],
                                     [str(f) for f in facts], self.embedder)}
        if kind == MEM0_EXTRACT:
            facts = self._facts.get(_squash(prompt))
            if facts is not None:
                return {"facts": facts}
            with self._lock:
                self._served["mem0_extract_misses"] += 1
            lines = [line[len("user: "):] for line in prompt.splitlines() if line.startswith("user: ")]
            found = extract([{"index": i, "role": "user", "name": "User", "text": t} for i, t in enumerate(lines)],
                            None)
            return {"facts": [f["text"] for f in found]}
        with self._lock:
            self._served["unknown_prompts"] += 1
        return {}

    def _check_facts(self, prompt: str, facts: list[str]) -> None:
        """Count whether memq's extraction got the facts Mem0 is told for the same session (`fact_check`)."""
        messages = json.loads(prompt[prompt.index("{"):]).get("messages", [])
        told = self._facts.get(_squash("Input:" + "".join(f"user: {m['text']}" for m in messages)))
        outcome = "unknown session" if told is None else "same facts" if told == facts else "other facts"
        with self._lock:
            self.fact_check[outcome] += 1

    def take(self, since: float | None = None) -> dict[str, Any]:
        """The calls and tokens since the last `take` (then forgets them).

        Args:
            since: count only requests that arrived at or after this ``time.time()`` (seconds); None: all.

        Returns:
            ``{"calls": {kind: n}, "prompt_tokens": {kind: n}, "completion_tokens": {kind: n},
            "simulator": {"computed": n, "replayed": n, "mem0_extract_misses": n, "unknown_prompts": n,
            "cpu_s": seconds of the simulator's own answer computation}}``; the ``simulator`` counts are all
            since the last `take`, whatever `since` says.
        """
        from tests.rigs.llm_server import prompt_tokens

        calls: Counter[str] = Counter()
        prompt: Counter[str] = Counter()
        completion: Counter[str] = Counter()
        bodies = [b for b, t in zip(self.server.requests, self.server.request_times)  # between phases: none in flight
                  if since is None or t >= since]
        for body in bodies:
            messages = body.get("messages", [])
            user = next((str(m.get("content", "")) for m in reversed(messages) if m.get("role") == "user"), "")
            kind = kind_of(user)
            calls[kind] += 1
            prompt[kind] += prompt_tokens(messages)
            with self._lock:
                completion[kind] += len(self._replies.get(hashlib.sha256(user.encode()).hexdigest(), "")) // 4
        with self._lock:
            served = {**{k: 0 for k in ("computed", "replayed", "mem0_extract_misses", "unknown_prompts")},
                      **self._served, "cpu_s": round(self._cpu_s, 2)}
            self._served.clear()
            self._cpu_s = 0.0
        self.server.reset()
        return {"calls": dict(calls), "prompt_tokens": dict(prompt), "completion_tokens": dict(completion),
                "simulator": served}

    def stop(self) -> None:
        """Stop the server."""
        self.server.stop()
