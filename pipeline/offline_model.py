"""The offline default model: a deterministic heuristic baseline, **not** an LLM.

It lets memq run with no API key and no network. It is plugged into litellm as a custom provider
(``memq-offline/heuristic-v1``), so extraction and decisions take exactly the path a real model takes:
the same prompts go in, JSON comes out and is parsed by the same response models.

What it does (and does not):

- ``extract_facts``: splits each user message into sentences, keeps those that say something about
  someone (first-person statements, named things, numbers; not questions, greetings or reactions),
  rewrites "I/my/me" to the speaker's name, resolves "yesterday", "last week", "last month", "last year"
  against the conversation date (in the text, as "(7 May 2023)"), and keeps image descriptions (``[image: <caption>]``, written by the
  caption stage, or ``[shares <caption>]``) as facts ("<speaker> shared <caption>"). It does not
  understand the text: no coreference beyond the speaker, no summarizing, no inference. Asked for
  dates (``"dates": true``), it gives each fact the date of its sentence's date phrase resolved
  against the conversation date by `pipeline.dates.resolve` (``dateparser``), else the conversation date.
- ``decide_memory_events``: embeds facts and the shown memories with the configured sentence embedder;
  a fact nearly identical to a memory (cosine >= `NONE_SIMILARITY`) is NONE; a close one (>=
  `UPDATE_SIMILARITY`) UPDATEs it, or DELETEs it when exactly one of the two is negated; anything else
  is an ADD. The thresholds were set by hand on all-MiniLM-L6-v2 and LoCoMo sentences.
- graph (when the prompt asks for it): entities are the speaker and capitalized names in each fact;
  a fact that reads "<speaker> <verb words> ... <Name>" gives the relation speaker -[VERB_WORDS]-> Name
  (``Ann moved to Denver`` -> ``MOVED_TO``). A new relation invalidates an existing one with the same
  source and a relationship in `FUNCTIONAL_RELATIONSHIPS` (one destination at a time: ``LIVES_IN``,
  ``WORKS_AT`` ...) but another destination.
- ``procedural_summary``: joins the messages' text as numbered steps.

Any litellm model string in ``MEMQ_LLM__MODEL`` replaces it.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Sequence
from datetime import date, timedelta
from typing import Any

from memq.config import EmbedderSettings
from pipeline.dates import day_of, resolve
from stores.embedder import Embedder, get_embedder
from stores.provider import import_litellm

FUNCTIONAL_RELATIONSHIPS = frozenset({
    "LIVES_IN", "LIVE_IN", "MOVED_TO", "WORKS_AT", "WORK_AT", "WORKS_FOR", "WORK_FOR", "WORKS_AS", "WORK_AS",
    "STUDIES_AT", "STUDY_AT", "IS_MARRIED_TO", "IS_DATING", "IS_ENGAGED_TO", "LIVES_WITH", "LIVE_WITH",
})
NONE_SIMILARITY = 0.95
UPDATE_SIMILARITY = 0.88
MIN_WORDS = 4

_litellm = import_litellm()

_PHATIC = frozenset(
    "hi hey hello hiya thanks thank wow awesome great cool yeah yes no ok okay bye congrats congratulations "
    "haha lol omg aww oh sounds glad nice sure absolutely totally amazing wonderful good love that's".split()
)
_STOP = frozenset(
    "a an the and or but so to of in on at for with from by is are was were be been being it this that these those "
    "i me my mine myself we us our you your he she they them his her their its just really very too also "
    "what when where why how do does did have has had not no yes can could would should will shall may might "
    "about as if than then there here all any some more most such only own same".split()
)
_FIRST_PERSON = re.compile(r"\b(I|I'm|I've|I'd|I'll|my|My|me|myself|mine|we|We|our|Our|us)\b")
_NEGATION = re.compile(r"\b(not|no longer|never|n't|don't|doesn't|didn't|isn't|wasn't|stopped|quit)\b", re.I)
_SHARES = re.compile(r"\[(?:shares?|image:) (?P<caption>[^\]]+)\]")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_WORD = re.compile(r"[A-Za-z0-9']+")

_REWRITES: Sequence[tuple[str, str]] = (
    (r"\bI'm\b|\bI am\b", "{n} is"),
    (r"\bI've\b|\bI have\b", "{n} has"),
    (r"\bI'd\b", "{n} would"),
    (r"\bI'll\b|\bI will\b", "{n} will"),
    (r"\bI was\b", "{n} was"),
    (r"\b[Mm]y\b|\bmine\b", "{n}'s"),
    (r"\bmyself\b|\bme\b|\bI\b", "{n}"),
)


def _relative_dates(text: str, today: date | None) -> str:
    if today is None:
        return text
    found: list[str] = []
    lowered = text.lower()
    if "yesterday" in lowered:
        found.append((today - timedelta(days=1)).strftime("%-d %B %Y"))
    if "last week" in lowered:
        found.append("the week before " + today.strftime("%-d %B %Y"))
    if "last month" in lowered:
        found.append((today.replace(day=1) - timedelta(days=1)).strftime("%B %Y"))
    if "last year" in lowered:
        found.append(str(today.year - 1))
    if re.search(r"\b(today|this morning|tonight)\b", lowered):
        found.append(today.strftime("%-d %B %Y"))
    return f"{text} ({'; '.join(found)})" if found else text


def _informative(sentence: str) -> bool:
    words = _WORD.findall(sentence)
    if len(words) < MIN_WORDS or sentence.rstrip().endswith("?"):
        return False
    content = [w for w in words if w.lower() not in _STOP]
    if len(content) < 2:
        return False
    if words[0].lower() in _PHATIC and len(words) < 8:
        return False
    named = any(w[0].isupper() for w in words[1:] if w not in ("I", "I'm", "I've", "I'd", "I'll"))
    numbers = any(w.isdigit() for w in words)
    return bool(_FIRST_PERSON.search(sentence)) or named or numbers


def _about(sentence: str, speaker: str) -> str:
    if _FIRST_PERSON.search(sentence):
        out = sentence
        for pattern, repl in _REWRITES:
            out = re.sub(pattern, repl.format(n=speaker), out)
        return out
    return f"{speaker} mentioned that {sentence[0].lower()}{sentence[1:]}"


def _date_of(sentence: str, today: date | None) -> str | None:
    if today is None:
        return None
    found = resolve(sentence, day_of(today))
    return (found.when.date() if found is not None else today).isoformat()


def extract(messages: list[dict[str, Any]], conversation_date: str | None,
            dates: bool = False) -> list[dict[str, Any]]:
    """Heuristic facts from messages (see the module docstring).

    Args:
        messages: ``[{"index", "role", "name"?, "text"}]`` as the extract prompt lists them.
        conversation_date: ISO date (``2023-05-08``) or None.
        dates: give each fact a ``date`` (ISO day, or None without a conversation date).

    Returns:
        ``[{"text": fact, "sources": [index]}]`` (with ``"date"`` when `dates`) in message order,
        without duplicates.
    """
    today = date.fromisoformat(conversation_date) if conversation_date else None
    facts: list[dict[str, Any]] = []
    seen: set[str] = set()
    for m in messages:
        if m.get("role") != "user":
            continue
        speaker = m.get("name") or "User"
        text = str(m.get("text", ""))
        captions = [c.group("caption").strip() for c in _SHARES.finditer(text)]
        text = _SHARES.sub("", text).strip()
        sentences = [s.strip() for s in _SENTENCE_END.split(text) if s.strip()]
        candidates = [_about(s.rstrip(".!"), speaker) for s in sentences if _informative(s)]
        candidates += [f"{speaker} shared {c}" for c in captions if len(c.split()) >= 2]
        for raw in candidates:
            fact = _relative_dates(raw.strip(), today)
            if fact.lower() not in seen:
                seen.add(fact.lower())
                facts.append({"text": fact, "sources": [m["index"]],
                              **({"date": _date_of(raw, today)} if dates else {})})
    return facts


_NAME = re.compile(r"\b[A-Z][A-Za-z0-9]+(?:\s+[A-Z][A-Za-z0-9]+)*\b")
_NOT_NAMES = frozenset(
    "I The A An My Our We He She They It This That Yeah Well Wow Hey Hi Oh So And But Or Gonna User "
    "January February March April May June July August September October November December "
    "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split())
_DETERMINERS = frozenset("a an the my his her their our some this that these those".split())


def graph_of(fact: str, speaker: str) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Heuristic entities and relations of one fact (see the module docstring).

    Returns:
        (entities ``[{"name", "entity_type"}]``, relations ``[{"source", "relationship", "destination"}]``).
    """
    text = re.sub(r"\([^)]*\)$", "", fact).strip()
    names = [m.group(0) for m in _NAME.finditer(text)]
    names = [n for n in names if n not in _NOT_NAMES and n != speaker and not n.startswith(speaker + " ")]
    entities = [{"name": speaker, "entity_type": "person"}] + [{"name": n, "entity_type": "entity"} for n in names]
    relations: list[dict[str, str]] = []
    if names and text.startswith(speaker + " "):
        rest = text[len(speaker) + 1:]
        verb: list[str] = []
        for word in rest.split():
            if not word.isalpha() or not word.islower() or word in _DETERMINERS or len(verb) == 3:
                break
            verb.append(word)
        if verb:
            relations.append({"source": speaker, "relationship": "_".join(verb).upper(), "destination": names[0]})
    return entities, relations


def invalidations(existing: list[dict[str, str]], new: list[dict[str, str]]) -> list[str]:
    """Ids of existing relations a new relation replaces (same source and functional type, other end)."""
    out: list[str] = []
    for e in existing:
        rel = e["relationship"].upper()
        if rel not in FUNCTIONAL_RELATIONSHIPS:
            continue
        if any(n["source"].lower() == e["source"].lower() and n["relationship"].upper() == rel
               and n["destination"].lower() != e["destination"].lower() for n in new):
            out.append(e["id"])
    return out


def _cos(a: Sequence[float], b: Sequence[float]) -> float:
    return sum(x * y for x, y in zip(a, b))


def decide(existing: list[dict[str, str]], facts: list[str], embedder: Embedder) -> list[dict[str, Any]]:
    """Heuristic memory events (see the module docstring).

    Args:
        existing: ``[{"id": "0", "text": ...}]`` as the decide prompt lists them.
        facts: the new facts.
        embedder: embeds facts and memories (unit vectors; cosine = dot product).

    Returns:
        ``[{"id", "text", "event", "old_memory"?}]``; ADD ids are ``"new-<n>"``.
    """
    vectors = embedder.embed([e["text"] for e in existing] + list(facts))
    old_vectors, fact_vectors = vectors[: len(existing)], vectors[len(existing):]
    touched: set[int] = set()
    added: list[list[float]] = []
    events: list[dict[str, Any]] = []
    for n, (fact, fv) in enumerate(zip(facts, fact_vectors)):
        if any(_cos(fv, av) >= NONE_SIMILARITY for av in added):
            continue
        sims = [(_cos(fv, ov), i) for i, ov in enumerate(old_vectors) if i not in touched]
        best, i = max(sims, default=(-1.0, -1))
        if best >= NONE_SIMILARITY or (i >= 0 and existing[i]["text"].lower() == fact.lower()):
            touched.add(i)
            events.append({"id": existing[i]["id"], "text": existing[i]["text"], "event": "NONE"})
        elif best >= UPDATE_SIMILARITY:
            touched.add(i)
            old = existing[i]["text"]
            if bool(_NEGATION.search(old)) != bool(_NEGATION.search(fact)):
                events.append({"id": existing[i]["id"], "text": old, "event": "DELETE"})
            else:
                events.append({"id": existing[i]["id"], "text": fact, "event": "UPDATE", "old_memory": old})
        else:
            added.append(fv)
            events.append({"id": f"new-{n}", "text": fact, "event": "ADD"})
    return events


_embedder: Embedder | None = None
_embedder_lock = threading.Lock()


def use_embedder(embedder: Embedder) -> None:
    """Make the decider embed with `embedder` (the worker's), instead of loading the default one."""
    global _embedder
    with _embedder_lock:
        _embedder = embedder


def _get_embedder() -> Embedder:
    global _embedder
    with _embedder_lock:
        if _embedder is None:
            _embedder = get_embedder(EmbedderSettings())
        return _embedder


def answer(prompt: str) -> dict[str, Any]:
    """The heuristic's JSON answer to a memq prompt (the user message, ``Input:`` + JSON).

    Raises:
        ValueError: the prompt carries no JSON input or names an unknown task.
    """
    start = prompt.find("{")
    if start < 0:
        raise ValueError("the offline model only answers memq prompts (no JSON input found)")
    data = json.loads(prompt[start:])
    task = data.get("task")
    if task == "extract_facts":
        messages = data.get("messages", [])
        facts = extract(messages, data.get("conversation_date"), bool(data.get("dates")))
        if not data.get("graph"):
            return {"facts": facts}
        speakers = {m["index"]: m.get("name") or "User" for m in messages}
        entities: dict[str, dict[str, str]] = {}
        relations: list[dict[str, str]] = []
        for f in facts:
            found, related = graph_of(f["text"], speakers[f["sources"][0]])
            for e in found:
                entities.setdefault(e["name"].lower(), e)
            relations += [r for r in related if r not in relations]
        return {"facts": facts, "entities": list(entities.values()), "relations": relations}
    if task == "decide_memory_events":
        events = decide(data.get("existing_memories", []), data.get("new_facts", []), _get_embedder())
        if "existing_relations" not in data:
            return {"memory": events}
        return {"memory": events,
                "invalidated_relations": invalidations(data["existing_relations"], data.get("new_relations", []))}
    if task == "procedural_summary":
        steps = [f"{i + 1}. {m['text']}" for i, m in enumerate(data.get("messages", [])) if m.get("text")]
        return {"summary": "\n".join(steps)}
    raise ValueError(f"the offline model does not know the task {task!r}")


class OfflineHeuristicModel(_litellm.CustomLLM):  # type: ignore[misc,name-defined]
    """litellm custom provider serving `answer` as a chat completion (usage: characters / 4 as tokens)."""

    def completion(self, model: str, messages: list[dict[str, Any]], *args: Any, **kwargs: Any) -> Any:
        """Answer the last user message of `messages` with the heuristic's JSON."""
        response = kwargs["model_response"]
        prompt = next((m["content"] for m in reversed(messages) if m.get("role") == "user"), "")
        try:
            text = json.dumps(answer(str(prompt)), ensure_ascii=False)
        except ValueError as exc:
            raise _litellm.exceptions.BadRequestError(str(exc), model=model, llm_provider="memq-offline") from exc
        response.choices[0].message.content = text
        response.model = f"memq-offline/{model}"
        prompt_tokens = sum(len(str(m.get("content", ""))) for m in messages) // 4
        response.usage = _litellm.Usage(prompt_tokens=prompt_tokens, completion_tokens=len(text) // 4,
                                        total_tokens=prompt_tokens + len(text) // 4)
        return response
