"""A local OpenAI-compatible HTTP server with scripted answers: the LLM seam of memq's tests.

``/v1/embeddings`` answers too, with deterministic hashed bag-of-words vectors (`embedding_dims`
floats, unit length), so the litellm embedder path can be tested; `embedding_requests` records them,
and `script_embeddings` queues non-200 answers (a 429) for the next of them.

litellm reaches it over HTTP as ``openai/<any-name>`` with ``api_base`` = `LLMTestServer.url`, so every
call takes the real client path. Replies are scripted per test (FIFO) as `Reply` objects: content,
HTTP status (429 with ``Retry-After``, 5xx), latency, or a raw broken body. With no script left, the
`default` responder answers (e.g. memq's offline heuristic), so a test only scripts what it checks.

With `rpm_limit` set it also behaves like a provider's rate limit: more than `rpm_limit` chat
completions in any sliding window of `window_s` seconds (60 by default: requests per minute) get 429
with ``Retry-After`` (whole seconds until a slot frees), or without it; a refused request takes no slot.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any


@dataclass(frozen=True)
class Reply:
    """One scripted answer.

    Attributes:
        content: the assistant message text (a JSON string for memq's prompts).
        status: HTTP status; non-200 sends an OpenAI-style error body.
        headers: extra response headers (e.g. ``{"Retry-After": "2"}``).
        delay_s: seconds to wait before answering (latency, or a timeout).
        raw_body: send these bytes as the body instead of a completion (broken responses).
    """

    content: str = ""
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0
    raw_body: bytes | None = None


IMAGE_TOKENS = {"low": 85}
"""Prompt tokens the server counts per image, by ``detail`` (OpenAI's counts: 85 at ``low``, 765 for a
1024 px image otherwise)."""
IMAGE_TOKENS_DEFAULT = 765


def prompt_tokens(messages: list[dict[str, Any]]) -> int:
    """Prompt tokens as the server counts them: text at 4 characters a token, images by `IMAGE_TOKENS`."""
    chars, tokens = 0, 0
    for m in messages:
        content = m.get("content", "")
        parts: list[dict[str, Any]] = (content if isinstance(content, list)
                                       else [{"type": "text", "text": str(content)}])
        for part in parts:
            if part.get("type") == "image_url":
                detail = (part.get("image_url") or {}).get("detail")
                tokens += IMAGE_TOKENS.get(str(detail), IMAGE_TOKENS_DEFAULT)
            else:
                chars += len(str(part.get("text", "")))
    return tokens + chars // 4


def image_urls(body: dict[str, Any]) -> list[str]:
    """The image URLs of a chat request's last user message, in order (empty for a text-only call)."""
    user: dict[str, Any] = next((m for m in reversed(body.get("messages", [])) if m.get("role") == "user"), {})
    content = user.get("content")
    if not isinstance(content, list):
        return []
    return [str((p.get("image_url") or {}).get("url", "")) for p in content if p.get("type") == "image_url"]


def _completion(content: str, model: str, tokens_in: int) -> dict[str, Any]:
    prompt_tokens, completion_tokens = tokens_in, len(content) // 4
    return {
        "id": f"chatcmpl-test-{time.monotonic_ns()}", "object": "chat.completion", "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": content}}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    }


def word_overlap(query: str, document: str) -> float:
    """The test server's rerank relevance: the share of the document's words that are in the query
    (0..1; deterministic, and unlike cosine order so a rerank visibly reorders)."""
    words = re.findall(r"\w+", document.lower())
    asked = set(re.findall(r"\w+", query.lower()))
    return round(sum(w in asked for w in words) / len(words), 6) if words else 0.0


def _hashed_vector(text: str, dims: int) -> list[float]:
    vector = [0.0] * dims
    for word in text.lower().split():
        digest = hashlib.blake2b(word.encode(), digest_size=4).digest()
        vector[int.from_bytes(digest, "big") % dims] += 1.0
    norm = math.sqrt(sum(x * x for x in vector)) or 1.0
    return [x / norm for x in vector]


class LLMTestServer:
    """OpenAI-compatible ``/v1/chat/completions`` on 127.0.0.1 with scripted replies.

    Args:
        default: called with the last user message's text when no scripted reply is left; returns
            the reply content. None answers ``{}``.
        latency_s: delay added to every answer (seconds).
        embedding_dims: length of the ``/v1/embeddings`` vectors.
        rpm_limit: provider-side limit, chat completions per sliding window of `window_s` seconds; over
            it, requests get 429 without using the script. None: no limit.
        with_retry_after: send ``Retry-After`` (whole seconds, >= 1) on those 429s; False omits it.
        window_s: the sliding window's length (seconds; 60: `rpm_limit` is per minute). A short one lets
            a test reach the limit in a few seconds.

    Attributes:
        requests: every chat request body received (parsed JSON), in order, including rate-limited ones.
        request_times: when each of `requests` arrived (``time.time()`` seconds), same order.
        rate_limited: how many 429s were sent because of `rpm_limit` (scripted 429s not counted).
        accepted_at: `time.monotonic` of every chat request `rpm_limit` let through (with a limit set).
        image_captions: what the server "sees" in an image, by URL (a vision call about an image not
            listed gets ``"a photo numbered <first 8 hex of the URL's sha256>"``).
        vision_requests: the image URLs of every vision call (a chat request with image parts), in order.
        refused_images: URLs the server cannot read: an unscripted vision call naming one gets 400 (as a
            provider answers for a link it could not download).
        rerank_requests: every ``/rerank`` body (Cohere's shape); documents are scored by `word_overlap`.
    """

    def __init__(self, default: Callable[[str], str] | None = None, *, latency_s: float = 0.0,
                 embedding_dims: int = 384, rpm_limit: int | None = None, with_retry_after: bool = True,
                 window_s: float = 60.0) -> None:
        if rpm_limit is not None and rpm_limit <= 0:
            raise ValueError(f"rpm_limit must be a positive int or None, got {rpm_limit}")
        if window_s <= 0:
            raise ValueError(f"window_s must be positive, got {window_s}")
        self.default = default
        self.latency_s = latency_s
        self.embedding_dims = embedding_dims
        self.rpm_limit = rpm_limit
        self.with_retry_after = with_retry_after
        self.window_s = window_s
        self.accepted_at: list[float] = []
        self.requests: list[dict[str, Any]] = []
        self.request_times: list[float] = []
        self.embedding_requests: list[dict[str, Any]] = []
        self.rate_limited = 0
        self.image_captions: dict[str, str] = {}
        self.vision_requests: list[list[str]] = []
        self.rerank_requests: list[dict[str, Any]] = []
        self._window: deque[float] = deque()  # monotonic times (s) of accepted chat requests, last window_s
        self._script: deque[Reply] = deque()
        self._embedding_script: deque[Reply] = deque()
        self.refused_images: set[str] = set()
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The API base, ``http://127.0.0.1:PORT/v1``."""
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    @property
    def calls(self) -> int:
        """Number of chat completion requests received."""
        with self._lock:
            return len(self.requests)

    def script(self, *replies: Reply | str) -> None:
        """Queue replies for the next calls (a str is a 200 reply with that content)."""
        with self._lock:
            self._script.extend(Reply(content=r) if isinstance(r, str) else r for r in replies)

    def script_embeddings(self, *replies: Reply) -> None:
        """Queue answers for the next ``/v1/embeddings`` calls (their status, headers and raw body; a 200
        reply answers with the usual vectors)."""
        with self._lock:
            self._embedding_script.extend(replies)

    def reset(self) -> None:
        """Drop the remaining script, the recorded requests and the rate-limit window and counter."""
        with self._lock:
            self._script.clear()
            self._embedding_script.clear()
            self.refused_images.clear()
            self.requests.clear()
            self.request_times.clear()
            self.embedding_requests.clear()
            self.vision_requests.clear()
            self.rerank_requests.clear()
            self._window.clear()
            self.accepted_at.clear()
            self.rate_limited = 0

    def _over_limit(self) -> Reply | None:
        """A 429 reply if this request exceeds `rpm_limit`, else None (and the request takes a slot).

        The caller holds `_lock`.
        """
        if self.rpm_limit is None:
            return None
        now = time.monotonic()
        while self._window and self._window[0] <= now - self.window_s:
            self._window.popleft()
        if len(self._window) < self.rpm_limit:
            self._window.append(now)
            self.accepted_at.append(now)
            return None
        self.rate_limited += 1
        retry_after_s = max(1, math.ceil(self._window[0] + self.window_s - now))
        error = {"error": {"message": f"Rate limit reached: {self.rpm_limit} requests per {self.window_s:g} s",
                           "type": "requests", "param": None, "code": "rate_limit_exceeded"}}
        headers = {"Retry-After": str(retry_after_s)} if self.with_retry_after else {}
        return Reply(status=429, headers=headers, raw_body=json.dumps(error).encode())

    def _next(self, body: dict[str, Any]) -> Reply:
        with self._lock:
            self.requests.append(body)
            self.request_times.append(time.time())
            limited = self._over_limit()
            if limited is not None:
                return limited
            if self._script:
                return self._script.popleft()
            urls = image_urls(body)
            if self.refused_images.intersection(urls):
                self.vision_requests.append(urls)
                return Reply(status=400)
            if urls:
                self.vision_requests.append(urls)
                return Reply(content=json.dumps({"captions": [{"image": n, "caption": self._sees(url)}
                                                              for n, url in enumerate(urls)]}))
        user = next((m.get("content", "") for m in reversed(body.get("messages", [])) if m.get("role") == "user"), "")
        return Reply(content=self.default(str(user)) if self.default else "{}")

    def _sees(self, url: str) -> str:
        """The caption of an image (the caller holds `_lock`)."""
        return self.image_captions.get(url) or f"a photo numbered {hashlib.sha256(url.encode()).hexdigest()[:8]}"

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                return

            def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:  # noqa: N802
                self._send(200, json.dumps({"object": "list", "data": [{"id": "test-model", "object": "model"}]})
                           .encode())

            def do_POST(self) -> None:  # noqa: N802
                length = int(self.headers.get("Content-Length", "0"))
                body = json.loads(self.rfile.read(length) or b"{}")
                if self.path.endswith("/embeddings"):
                    with server._lock:
                        server.embedding_requests.append(body)
                        scripted = server._embedding_script.popleft() if server._embedding_script else None
                    if scripted is not None and scripted.status != 200:
                        error = {"error": {"message": f"scripted {scripted.status}", "type": "test",
                                           "code": scripted.status}}
                        self._send(scripted.status, scripted.raw_body or json.dumps(error).encode(), scripted.headers)
                        return
                    texts = body.get("input", [])
                    texts = [texts] if isinstance(texts, str) else texts
                    data = [{"object": "embedding", "index": i, "embedding": _hashed_vector(t, server.embedding_dims)}
                            for i, t in enumerate(texts)]
                    usage = {"prompt_tokens": sum(len(t) for t in texts) // 4, "total_tokens": 0}
                    self._send(200, json.dumps({"object": "list", "data": data, "model": body.get("model"),
                                                "usage": usage}).encode())
                    return
                if self.path.endswith("/rerank"):  # Cohere's rerank (v1 and v2), as litellm.rerank sends it
                    with server._lock:
                        server.rerank_requests.append(body)
                    query, documents = str(body.get("query", "")), body.get("documents", [])
                    scored = sorted(((i, word_overlap(query, d if isinstance(d, str) else d.get("text", "")))
                                     for i, d in enumerate(documents)), key=lambda r: -r[1])
                    results = [{"index": i, "relevance_score": s} for i, s in scored[:body.get("top_n") or None]]
                    self._send(200, json.dumps({"id": "rerank-test", "results": results,
                                                "meta": {"billed_units": {"search_units": 1}}}).encode())
                    return
                if not self.path.endswith("/chat/completions"):
                    self._send(404, b'{"error": {"message": "not found"}}')
                    return
                reply = server._next(body)
                time.sleep(server.latency_s + reply.delay_s)
                if reply.raw_body is not None:
                    self._send(reply.status, reply.raw_body, reply.headers)
                elif reply.status != 200:
                    error = {"error": {"message": f"scripted {reply.status}", "type": "test", "code": reply.status}}
                    self._send(reply.status, json.dumps(error).encode(), reply.headers)
                else:
                    payload = _completion(reply.content, str(body.get("model", "test-model")),
                                          prompt_tokens(body.get("messages", [])))
                    self._send(200, json.dumps(payload).encode(), reply.headers)

        return Handler

    def start(self) -> LLMTestServer:
        """Serve in a daemon thread."""
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="llm-test-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> LLMTestServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
