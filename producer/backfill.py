"""Backfill readers: existing chat logs -> add requests, one per session, oldest first.

Two formats:

**LoCoMo** (``locomo10.json``, a list of conversations): each ``session_N`` of a conversation becomes
one add, in session order, with ``session_N_date_time`` as its `timestamp`. Scope: one ``user_id`` per
conversation (``<prefix><sample_id>``, e.g. ``locomo-conv-26``). Both speakers are people, so both
speak as role ``user`` and are told apart by ``name`` (the speaker's name, which becomes the memory's
``actor_id``); each turn's ``dia_id`` is its message id (provenance). A turn that shares images sends
each ``img_url`` as an image part carrying the turn's BLIP caption as its ``caption``, so the caption
stage describes it without a model call; a turn with a caption but no URL keeps the caption as text
(``[image: <caption>]``).

**JSONL** (one JSON object per line, one add per line)::

    {"conversation_id": "c-1", "session_id": "2024-05-01", "timestamp": "2024-05-01T10:00:00Z",
     "user_id": "alice", "agent_id": null, "run_id": null, "metadata": {"channel": "web"},
     "messages": [{"role": "user", "content": "I moved to Lyon.", "name": "Alice", "id": "m1"}]}

``conversation_id`` and ``messages`` and one scope id are required; ``session_id`` defaults to the line
number. Lines of one conversation are enqueued in file order.

Idempotency: every add carries the key ``backfill:<source>:<conversation>:<session>`` where
``<source>`` is the file's name (or ``--source-id``), so running the same file again enqueues nothing twice.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from memq.errors import InvalidRequest

LOCOMO_DATE_FORMAT = "%I:%M %p on %d %B, %Y"


class BackfillFormatError(InvalidRequest):
    """A backfill file cannot be read: the message names the file, line or conversation at fault."""


@dataclass(frozen=True)
class BackfillItem:
    """One add request read from a chat log.

    Attributes:
        conversation_id: the conversation (LoCoMo ``sample_id`` or JSONL ``conversation_id``).
        session_id: the session within it.
        request: keyword arguments for `Producer.add_many` (``messages``, scope, ``timestamp``,
            ``metadata``, ``idempotency_key``).
    """

    conversation_id: str
    session_id: str
    request: dict[str, Any]


def idempotency_key(source: str, conversation_id: str, session_id: str) -> str:
    """``backfill:<source>:<conversation>:<session>``."""
    return f"backfill:{source}:{conversation_id}:{session_id}"


def parse_locomo_datetime(value: str) -> datetime:
    """Parse LoCoMo's ``"1:56 pm on 8 May, 2023"`` as UTC.

    Raises:
        BackfillFormatError: another format.
    """
    try:
        return datetime.strptime(value.strip(), LOCOMO_DATE_FORMAT).replace(tzinfo=timezone.utc)
    except ValueError as exc:
        raise BackfillFormatError(f"LoCoMo date {value!r} is not like '1:56 pm on 8 May, 2023'") from exc


def _session_numbers(conversation: dict[str, Any]) -> list[int]:
    return sorted(int(k.split("_")[1]) for k in conversation if re.fullmatch(r"session_\d+", k))


def locomo_turn_text(turn: dict[str, Any]) -> str:
    """A LoCoMo turn's text, with its image caption appended as ``[image: <caption>]``."""
    text = str(turn.get("text", "")).strip()
    caption = turn.get("blip_caption")
    return f"{text} [image: {caption}]" if caption else text


def locomo_turn_content(turn: dict[str, Any]) -> str | list[dict[str, Any]]:
    """A LoCoMo turn as message content: its text, then one image part per ``img_url`` with the turn's
    BLIP caption (or, with no URL, the caption as text); a plain string when the turn shares nothing."""
    urls = [u for u in turn.get("img_url") or []
            if isinstance(u, str) and u.startswith(("http://", "https://", "data:"))]
    if not urls:
        return locomo_turn_text(turn)
    text = str(turn.get("text", "")).strip()
    caption = turn.get("blip_caption")
    parts: list[dict[str, Any]] = [{"type": "text", "text": text}] if text else []
    parts += [{"type": "image_url", "image_url": {"url": url}, **({"caption": caption} if caption else {})}
              for url in urls]
    return parts


def read_locomo(path: Path, *, conversations: Iterable[str] | None = None, source: str | None = None,
                user_prefix: str = "locomo-") -> list[BackfillItem]:
    """Read a LoCoMo file into one add per session.

    Args:
        path: ``locomo10.json``.
        conversations: only these ``sample_id``s (all when None), in file order.
        source: the idempotency source (the file name when None).
        user_prefix: prepended to the ``sample_id`` to make the ``user_id``.

    Returns:
        Items in conversation order, sessions in chronological (session number) order.

    Raises:
        BackfillFormatError: the file is not LoCoMo, or a named conversation is missing.
    """
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise BackfillFormatError(f"{path}: not a readable JSON file: {exc}") from exc
    if not isinstance(data, list) or not all(isinstance(s, dict) and "conversation" in s for s in data):
        raise BackfillFormatError(f"{path}: not LoCoMo (expected a list of samples with 'conversation')")
    wanted = list(conversations) if conversations is not None else None
    found = {s.get("sample_id") for s in data}
    missing = [c for c in wanted or [] if c not in found]
    if missing:
        raise BackfillFormatError(f"{path}: no conversation {missing} (have {sorted(map(str, found))})")
    source = source or path.name
    items: list[BackfillItem] = []
    for sample in data:
        sample_id = str(sample.get("sample_id"))
        if wanted is not None and sample_id not in wanted:
            continue
        conv = sample["conversation"]
        for n in _session_numbers(conv):
            turns = conv[f"session_{n}"]
            messages = [{"role": "user", "name": t["speaker"], "id": t["dia_id"], "content": locomo_turn_content(t)}
                        for t in turns if locomo_turn_content(t)]
            if not messages:
                continue
            when = parse_locomo_datetime(conv[f"session_{n}_date_time"])
            items.append(BackfillItem(sample_id, f"session_{n}", {
                "messages": messages,
                "user_id": f"{user_prefix}{sample_id}",
                "timestamp": when.isoformat(),
                "metadata": {"source": "locomo", "conversation": sample_id, "session": n},
                "idempotency_key": idempotency_key(source, sample_id, f"session_{n}"),
            }))
    return items


def read_jsonl(path: Path, *, source: str | None = None) -> list[BackfillItem]:
    """Read a JSONL chat log (format in the module docstring), one add per line.

    Raises:
        BackfillFormatError: a line is not JSON or lacks ``conversation_id``/``messages`` (names the line).
    """
    source = source or path.name
    items: list[BackfillItem] = []
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise BackfillFormatError(f"{path}: cannot read: {exc}") from exc
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise BackfillFormatError(f"{path}:{number}: not JSON: {exc.msg}") from exc
        if not isinstance(row, dict) or "conversation_id" not in row or "messages" not in row:
            raise BackfillFormatError(f"{path}:{number}: needs 'conversation_id' and 'messages'")
        conversation_id = str(row["conversation_id"])
        session_id = str(row.get("session_id", number))
        request = {k: row[k] for k in ("messages", "user_id", "agent_id", "run_id", "metadata", "timestamp", "infer")
                   if row.get(k) is not None}
        request["idempotency_key"] = idempotency_key(source, conversation_id, session_id)
        items.append(BackfillItem(conversation_id, session_id, request))
    return items


def read_backfill(path: Path, *, fmt: str = "auto", conversations: Iterable[str] | None = None,
                  source: str | None = None) -> list[BackfillItem]:
    """Read a chat log in either format (``auto``: ``.jsonl`` is JSONL, anything else LoCoMo).

    Raises:
        BackfillFormatError: unreadable file, unknown format, or bad content.
    """
    if fmt == "auto":
        fmt = "jsonl" if path.suffix == ".jsonl" else "locomo"
    if fmt == "locomo":
        return read_locomo(path, conversations=conversations, source=source)
    if fmt == "jsonl":
        items = read_jsonl(path, source=source)
        wanted = set(conversations) if conversations is not None else None
        return [i for i in items if wanted is None or i.conversation_id in wanted]
    raise BackfillFormatError(f"unknown backfill format {fmt!r}; use locomo, jsonl or auto")
