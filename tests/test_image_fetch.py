"""`stores.image_fetch.ImageFetcher` against a real HTTP server on 127.0.0.1.

The server (``http.server.ThreadingHTTPServer`` in a thread) records every request it gets, so a test
can assert that a refused URL was never fetched. Host names are pointed at addresses through the
fetcher's ``resolve`` seam, never through /etc/hosts; nothing inside the fetcher is mocked.
"""

from __future__ import annotations

import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from memq.config import VisionSettings
from memq.errors import ImageFetchError, ImageTooLarge, UnsafeImageURL
from stores.image_fetch import USER_AGENT, ImageFetcher


def _png() -> bytes:
    """A valid 1x1 grey PNG."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00\x80"))
            + chunk(b"IEND", b""))


PNG = _png()
HTML = b"<!doctype html><html><body>not an image</body></html>"
BIG = 50_000_000  # what the oversized handlers try to send (bytes)
LIMIT = 100_000   # fetch_max_bytes in the size tests

Route = Callable[[BaseHTTPRequestHandler], None]


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]


@dataclass
class Server:
    """The test server's state: routes by path, the requests it got, and handler bookkeeping."""

    port: int = 0
    routes: dict[str, Route] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)  # ends stalling handlers
    done: threading.Event = field(default_factory=threading.Event)     # set when a streaming handler ends
    sent: list[int] = field(default_factory=list)                      # bytes a streaming handler got out

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"


def _handler(state: Server) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _any(self) -> None:
            state.requests.append(Request(self.command, self.path, {k.lower(): v for k, v in self.headers.items()}))
            self.close_connection = True
            route = state.routes.get(self.path.split("?", 1)[0])
            if route is None:
                body(404, "text/plain", b"not found")(self)
            else:
                route(self)

        do_GET = do_HEAD = do_POST = _any

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64  # the concurrency test connects 8 at once (a full backlog costs a 1 s SYN retry)

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client hanging up mid-body is what the size tests do


@pytest.fixture
def server() -> Iterator[Server]:
    state = Server()
    httpd = _QuietServer(("127.0.0.1", 0), _handler(state))
    state.port = httpd.server_address[1]
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        state.release.set()
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


# ---- route builders ----------------------------------------------------------------------------------

def body(status: int, content_type: str, data: bytes) -> Route:
    def route(h: BaseHTTPRequestHandler) -> None:
        h.send_response(status)
        h.send_header("Content-Type", content_type)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)
    return route


def redirect(location: str, status: int = 302) -> Route:
    def route(h: BaseHTTPRequestHandler) -> None:
        h.send_response(status)
        h.send_header("Location", location)
        h.send_header("Content-Length", "0")
        h.end_headers()
    return route


def oversized(state: Server, framing: str) -> Route:
    """A PNG of `BIG` bytes, framed by Content-Length, chunked encoding or closing the connection;
    records how many bytes got out before the client hung up."""
    def route(h: BaseHTTPRequestHandler) -> None:
        sent = 0
        try:
            h.send_response(200)
            h.send_header("Content-Type", "image/png")
            if framing == "length":
                h.send_header("Content-Length", str(BIG))
            elif framing == "chunked":
                h.send_header("Transfer-Encoding", "chunked")
            else:
                h.send_header("Connection", "close")
            h.end_headers()
            piece = PNG + bytes(65536 - len(PNG))
            while sent < BIG:
                h.wfile.write(b"%x\r\n%b\r\n" % (len(piece), piece) if framing == "chunked" else piece)
                h.wfile.flush()
                sent += len(piece)
                piece = bytes(65536)
        except OSError:
            pass
        finally:
            state.sent.append(sent)
            state.done.set()
    return route


def stall(state: Server) -> Route:
    """Answers nothing until the test ends."""
    def route(h: BaseHTTPRequestHandler) -> None:
        state.release.wait(10)
    return route


def drip(state: Server) -> Route:
    """Headers at once, then one body byte every 0.1 s: each read is quick, the whole is not."""
    def route(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Type", "image/png")
        h.send_header("Content-Length", str(len(PNG) + 1000))
        h.end_headers()
        _dribble(h, state, PNG + bytes(1000))
    return route


def _dribble(h: BaseHTTPRequestHandler, state: Server, data: bytes) -> None:
    """Write `data` one byte every 0.1 s until done, the client hangs up, or the test ends."""
    try:
        for byte in data:
            h.wfile.write(bytes([byte]))
            h.wfile.flush()
            if state.release.wait(0.1):
                return
    except OSError:
        pass


def drip_headers(state: Server) -> Route:
    """The status line and headers one byte every 0.1 s (no body read yet to check a deadline between)."""
    def route(h: BaseHTTPRequestHandler) -> None:
        _dribble(h, state, b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\n" + b"X-Pad: " + b"a" * 200 + b"\r\n\r\n")
    return route


def fetcher(*, allow: tuple[str, ...] = (), resolve: Callable[[str, int], list[str]] | None = None,
            **settings: Any) -> ImageFetcher:
    vision = VisionSettings(fetch=True, allow_networks=allow, **{"fetch_timeout_s": 3.0, **settings})
    return ImageFetcher(vision, resolve=resolve)


LOOPBACK = ("127.0.0.0/8",)


def to(*addresses: str) -> Callable[[str, int], list[str]]:
    """A resolver answering `addresses` for every name."""
    return lambda host, port: list(addresses)


# ---- 1, 2: a literal address, allowed or not ---------------------------------------------------------

def test_fetches_a_png_from_an_allowed_network(server: Server) -> None:
    server.routes["/img.png"] = body(200, "image/png", PNG)
    got = fetcher(allow=LOOPBACK).fetch(server.url("/img.png"))
    assert (got.mime, got.data) == ("image/png", PNG)
    [req] = server.requests
    assert req.method == "GET"
    assert req.headers["user-agent"] == USER_AGENT
    assert "cookie" not in req.headers and "authorization" not in req.headers


def test_content_type_parameters_and_case_are_ignored(server: Server) -> None:
    server.routes["/img.png"] = body(200, "Image/PNG; charset=binary", PNG)
    assert fetcher(allow=LOOPBACK).fetch(server.url("/img.png")).mime == "image/png"


def test_loopback_without_allow_networks_is_refused_unfetched(server: Server) -> None:
    server.routes["/img.png"] = body(200, "image/png", PNG)
    with pytest.raises(UnsafeImageURL):
        fetcher().fetch(server.url("/img.png"))
    assert server.requests == []


# ---- 3: names resolved at connect time ---------------------------------------------------------------

def test_name_resolving_to_loopback_is_refused_unfetched(server: Server) -> None:
    server.routes["/img.png"] = body(200, "image/png", PNG)
    with pytest.raises(UnsafeImageURL, match="resolves to"):
        fetcher(resolve=to("127.0.0.1")).fetch(server.url("/img.png", host="images.example.test"))
    assert server.requests == []


@pytest.mark.parametrize("addresses", [("93.184.215.14", "127.0.0.1"), ("127.0.0.1", "93.184.215.14"),
                                       ("2606:2800:21f:cb07:6820:80da:af6b:8b2c", "::ffff:127.0.0.1"),
                                       ("93.184.215.14", "10.0.0.5")])
def test_name_resolving_to_any_private_address_is_refused(server: Server, addresses: tuple[str, ...]) -> None:
    with pytest.raises(UnsafeImageURL):
        fetcher(resolve=to(*addresses)).fetch(server.url("/img.png", host="mixed.example.test"))
    assert server.requests == []


def test_name_connects_to_the_checked_address_and_sends_the_name(server: Server) -> None:
    """The socket goes to the address the resolver gave (the name resolves nowhere else), checked once;
    the Host header still carries the name."""
    calls: list[tuple[str, int]] = []

    def resolve(host: str, port: int) -> list[str]:
        calls.append((host, port))
        return ["127.0.0.1"]

    server.routes["/img.png"] = body(200, "image/png", PNG)
    got = fetcher(allow=LOOPBACK, resolve=resolve).fetch(server.url("/img.png", host="images.example.test"))
    assert got.data == PNG
    assert calls == [("images.example.test", server.port)]
    assert server.requests[0].headers["host"] == f"images.example.test:{server.port}"


def test_a_name_that_does_not_resolve_is_a_fetch_error(server: Server) -> None:
    def resolve(host: str, port: int) -> list[str]:
        raise OSError("no such host")

    with pytest.raises(ImageFetchError, match="could not resolve"):
        fetcher(resolve=resolve).fetch("http://nowhere.example.test/img.png")


def test_a_hung_resolver_costs_no_more_than_the_deadline(server: Server) -> None:
    def resolve(host: str, port: int) -> list[str]:
        server.release.wait(10)
        return ["127.0.0.1"]

    start = time.monotonic()
    with pytest.raises(ImageFetchError):
        fetcher(allow=LOOPBACK, resolve=resolve, fetch_timeout_s=0.5).fetch(server.url("/x", host="slow.example.test"))
    assert time.monotonic() - start < 5
    assert server.requests == []


# ---- 4: redirects -----------------------------------------------------------------------------------

def test_relative_redirect_is_followed(server: Server) -> None:
    server.routes["/start"] = redirect("/img.png", 301)
    server.routes["/img.png"] = body(200, "image/png", PNG)
    assert fetcher(allow=LOOPBACK).fetch(server.url("/start")).data == PNG
    assert [r.path for r in server.requests] == ["/start", "/img.png"]


def test_redirect_to_metadata_is_refused(server: Server) -> None:
    server.routes["/start"] = redirect("http://169.254.169.254/latest/meta-data/")
    with pytest.raises(UnsafeImageURL, match="redirects to"):
        fetcher(allow=LOOPBACK).fetch(server.url("/start"))
    assert [r.path for r in server.requests] == ["/start"]


@pytest.mark.parametrize("target", ["http://[::1]:{port}/img.png", "http://localhost:{port}/img.png",
                                    "http://127.0.0.2:{port}/img.png", "file:///etc/passwd"])
def test_redirect_outside_the_allowed_network_is_refused(server: Server, target: str) -> None:
    server.routes["/start"] = redirect(target.format(port=server.port), 307)
    server.routes["/img.png"] = body(200, "image/png", PNG)
    with pytest.raises(UnsafeImageURL):
        fetcher(allow=("127.0.0.1/32",)).fetch(server.url("/start"))
    assert [r.path for r in server.requests] == ["/start"]


def test_redirect_to_a_name_resolving_to_a_private_address_is_refused(server: Server) -> None:
    """The redirect target's name is resolved and checked like the first URL's."""
    def resolve(host: str, port: int) -> list[str]:
        return ["127.0.0.1"] if host == "allowed.example.test" else ["192.168.1.10"]

    server.routes["/start"] = redirect("http://internal.example.test/admin")
    with pytest.raises(UnsafeImageURL, match="internal.example.test"):
        fetcher(allow=LOOPBACK, resolve=resolve).fetch(server.url("/start", host="allowed.example.test"))
    assert [r.path for r in server.requests] == ["/start"]


def test_redirects_up_to_the_limit_are_followed_and_one_more_is_refused(server: Server) -> None:
    for n in range(4):
        server.routes[f"/r{n}"] = redirect(f"/r{n + 1}")
    server.routes["/r4"] = body(200, "image/png", PNG)
    assert fetcher(allow=LOOPBACK, fetch_max_redirects=4).fetch(server.url("/r0")).data == PNG
    server.requests.clear()
    with pytest.raises(ImageFetchError, match="more than 3 redirects"):
        fetcher(allow=LOOPBACK, fetch_max_redirects=3).fetch(server.url("/r0"))
    assert [r.path for r in server.requests] == ["/r0", "/r1", "/r2", "/r3"]


def test_redirect_loop_ends(server: Server) -> None:
    server.routes["/loop"] = redirect("/loop")
    with pytest.raises(ImageFetchError, match="redirects"):
        fetcher(allow=LOOPBACK).fetch(server.url("/loop"))
    assert len(server.requests) == 4  # the first request and 3 redirects


# ---- 5: lying content types -------------------------------------------------------------------------

def test_png_content_type_with_html_bytes_is_refused(server: Server) -> None:
    server.routes["/img.png"] = body(200, "image/png", HTML)
    with pytest.raises(ImageFetchError, match="lying content type") as info:
        fetcher(allow=LOOPBACK).fetch(server.url("/img.png"))
    assert "html" not in str(info.value).lower()  # no body in the message


def test_html_content_type_with_png_bytes_is_refused(server: Server) -> None:
    server.routes["/img.png"] = body(200, "text/html", PNG)
    with pytest.raises(ImageFetchError, match="content type 'text/html'"):
        fetcher(allow=LOOPBACK).fetch(server.url("/img.png"))


def test_jpeg_content_type_with_png_bytes_is_refused(server: Server) -> None:
    server.routes["/img.jpg"] = body(200, "image/jpeg", PNG)
    with pytest.raises(ImageFetchError, match="lying content type"):
        fetcher(allow=LOOPBACK).fetch(server.url("/img.jpg"))


# ---- 6: size ----------------------------------------------------------------------------------------

def test_content_length_over_the_limit_is_refused_before_the_body(server: Server) -> None:
    server.routes["/big.png"] = oversized(server, "length")
    start = time.monotonic()
    with pytest.raises(ImageTooLarge, match=str(BIG)):
        fetcher(allow=LOOPBACK, fetch_max_bytes=LIMIT).fetch(server.url("/big.png"))
    assert time.monotonic() - start < 5
    assert server.done.wait(5)
    assert server.sent[0] < BIG // 2


@pytest.mark.parametrize("framing", ["chunked", "close"])
def test_body_without_length_is_cut_at_the_limit(server: Server, framing: str) -> None:
    server.routes["/big.png"] = oversized(server, framing)
    start = time.monotonic()
    with pytest.raises(ImageTooLarge):
        fetcher(allow=LOOPBACK, fetch_max_bytes=LIMIT).fetch(server.url("/big.png"))
    assert time.monotonic() - start < 5
    assert server.done.wait(5)
    # The client hung up after about LIMIT bytes; what got out is what the socket buffers held.
    assert server.sent[0] < BIG // 2


def test_body_exactly_at_the_limit_is_accepted(server: Server) -> None:
    data = PNG + bytes(LIMIT - len(PNG))
    server.routes["/img.png"] = body(200, "image/png", data)
    assert fetcher(allow=LOOPBACK, fetch_max_bytes=LIMIT).fetch(server.url("/img.png")).data == data


# ---- 7: time ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("route", [stall, drip, drip_headers])
def test_one_deadline_for_the_whole_fetch(server: Server, route: Callable[[Server], Route]) -> None:
    """A server that stalls, or drips its body or its headers one byte per 0.1 s (each read well within
    any per-read timeout, the whole not)."""
    server.routes["/slow.png"] = route(server)
    start = time.monotonic()
    with pytest.raises(ImageFetchError, match="longer than 0.5s"):
        fetcher(allow=LOOPBACK, fetch_timeout_s=0.5).fetch(server.url("/slow.png"))
    assert time.monotonic() - start < 5


# ---- 8: status and URL text -------------------------------------------------------------------------

def test_not_found_is_a_fetch_error(server: Server) -> None:
    with pytest.raises(ImageFetchError, match="HTTP 404") as info:
        fetcher(allow=LOOPBACK).fetch(server.url("/missing.png"))
    assert "not found" not in str(info.value)  # the body is not quoted


def test_connection_refused_is_a_chained_fetch_error(server: Server) -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ImageFetchError) as info:
        fetcher(allow=LOOPBACK).fetch(f"http://127.0.0.1:{port}/img.png")
    assert info.value.__cause__ is not None


@pytest.mark.parametrize("url", ["file:///etc/passwd", "http://user:pass@127.0.0.1:{port}/img.png",
                                 "ftp://127.0.0.1:{port}/img.png", "http://2130706433:{port}/img.png",
                                 "http://0177.0.0.1:{port}/img.png"])
def test_unsafe_url_text_is_refused_unfetched(server: Server, url: str) -> None:
    server.routes["/img.png"] = body(200, "image/png", PNG)
    allow = () if "0177" in url or "2130706433" in url else LOOPBACK
    with pytest.raises(UnsafeImageURL):
        fetcher(allow=allow).fetch(url.format(port=server.port))
    assert server.requests == []


# ---- 9: metadata ------------------------------------------------------------------------------------

def test_metadata_address_is_refused_even_inside_allow_networks() -> None:
    f = fetcher(allow=("169.254.0.0/16",))
    with pytest.raises(UnsafeImageURL):
        f.fetch("http://169.254.169.254/latest/meta-data/")
    with pytest.raises(UnsafeImageURL, match="resolves to"):  # and when a name resolves to it
        fetcher(allow=("169.254.0.0/16",), resolve=to("169.254.169.254")).fetch("http://meta.example.test/")


# ---- environment, threads, close --------------------------------------------------------------------

def test_proxy_environment_is_ignored(server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")  # discard port: a used proxy would fail
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    server.routes["/img.png"] = body(200, "image/png", PNG)
    assert fetcher(allow=LOOPBACK).fetch(server.url("/img.png")).data == PNG


def test_concurrent_fetches_share_one_fetcher(server: Server) -> None:
    server.routes["/img.png"] = body(200, "image/png", PNG)
    f = fetcher(allow=LOOPBACK)
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: f.fetch(server.url("/img.png")), range(16)))
    assert all(r.data == PNG for r in results)
    assert len(server.requests) == 16


def test_closed_fetcher_refuses(server: Server) -> None:
    server.routes["/img.png"] = body(200, "image/png", PNG)
    f = fetcher(allow=LOOPBACK)
    f.close()
    f.close()
    with pytest.raises(ImageFetchError, match="closed"):
        f.fetch(server.url("/img.png"))
    assert server.requests == []


# ---- the caption stage with MEMQ_VISION__FETCH ------------------------------------------------------

def _caption_job(url: str) -> Any:
    from memq.models import AddJob, Message, Scope

    # built directly, as a job stored before the producer's checks would be: the fetcher must hold alone
    return AddJob(job_id="j-fetch", scope=Scope(user_id="u"), messages=[Message.model_validate(
        {"role": "user", "name": "Ann", "content": [{"type": "text", "text": "My bike:"},
                                                    {"type": "image_url", "image_url": {"url": url}}]})])


def _vision(settings: Any) -> Any:
    from pipeline.llm import LLM

    llm_settings = settings.vision.llm_settings()
    return LLM(llm_settings, budget=f"vision:{llm_settings.model}")


def test_the_caption_stage_sends_fetched_bytes_to_the_vision_model(server: Server, settings: Any,
                                                                   llm_server: Any) -> None:
    import base64

    from pipeline.caption import caption

    server.routes["/bike.png"] = body(200, "image/png", PNG)
    data_url = "data:image/png;base64," + base64.b64encode(PNG).decode()
    llm_server.image_captions[data_url] = "a photo of a green bicycle"
    vision = VisionSettings(fetch=True, allow_networks=LOOPBACK)

    out = caption(_caption_job(server.url("/bike.png")), vision=_vision(settings), settings=vision,
                  fetch=ImageFetcher(vision).fetch)

    assert len(server.requests) == 1
    assert llm_server.vision_requests == [[data_url]]  # the bytes went to the model, not the URL
    assert out.messages[0].text == "My bike: [image: a photo of a green bicycle]"


def test_the_caption_stage_drops_an_image_whose_host_resolves_to_loopback_and_fetches_nothing(
        server: Server, settings: Any, llm_server: Any) -> None:
    from pipeline.caption import caption

    server.routes["/bike.png"] = body(200, "image/png", PNG)
    vision = VisionSettings(fetch=True)

    out = caption(_caption_job(server.url("/bike.png", host="images.example.test")), vision=_vision(settings),
                  settings=vision, fetch=ImageFetcher(vision, resolve=to("127.0.0.1")).fetch)

    assert server.requests == [] and llm_server.calls == 0
    assert out.messages[0].text == "My bike:"
    assert out.warnings == ["messages[0].content[1]: image dropped: image URL refused (UnsafeImageURL)"]
    assert out.images.as_dict() == {"supplied": 0, "model": 0, "cached": 0, "dropped": 1}
