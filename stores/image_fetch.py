"""Download http(s) images safely for the caption stage (``MEMQ_VISION__FETCH=true``).

An image URL in a message is chosen by whoever sent the message, and fetching it makes memq's workers
issue a request from inside memq's network: a server-side request forgery (SSRF) vector. The defences
follow the OWASP Server-Side Request Forgery Prevention Cheat Sheet (validate the target, resolve and
check every address, do not follow redirects blindly, bound time and size):

- **The URL's text** is checked first by `memq.images.check_image_url`, before any lookup or connection:
  http/https only (no ``file:``, ``gopher:``...), no credentials, no ``localhost``/metadata host names,
  and a literal address in any form IP parsers accept (``127.0.0.1``, decimal ``2130706433``, octal
  ``0177.0.0.1``, hex ``0x7f.1``, ``[::1]``, IPv4-mapped IPv6) must pass `memq.images.address_allowed`.
- **Host names resolving to internal addresses**: a name is resolved by memq itself, inside the
  connection step (a custom httpcore network backend, `_GuardedBackend.connect_tcp`), and the
  connection is refused with `UnsafeImageURL` unless *every* address the name resolves to is allowed
  (globally routable, or inside the operator's ``allow_networks``; cloud metadata addresses never). A
  name with one public and one private address is refused: which one a client would pick is not ours
  to guess.
- **DNS rebinding** (a name that resolves to a public address when checked and to a private one when
  connected): there is no separate "check" lookup. The one lookup whose answer is checked is the one
  whose answer is connected to: the socket connects to the checked IP address literal, never to the
  name again, so no second DNS answer is ever used. TLS still verifies the certificate against the
  host name (SNI and verification use the name from the URL), and the ``Host`` header carries the name.
- **Redirects to internal addresses**: redirects are never followed by the HTTP library; memq follows
  at most ``fetch_max_redirects`` of them (301, 302, 303, 307, 308; always with GET), and each target
  goes through exactly the checks of the first URL (its text, then its resolved addresses at connect).
- **Resource exhaustion**: one deadline (``fetch_timeout_s``) covers the whole fetch, redirects
  included: name lookups, connects, TLS handshakes and every socket read and write are capped by the
  time left, so a server dripping a byte at a time cannot outlast it. A ``Content-Length`` over
  ``fetch_max_bytes`` is refused before the body is read; a body without one is streamed and the
  connection dropped as soon as it passes the limit.
- **Content confusion**: the ``Content-Type`` must be an image type memq accepts (`memq.images.IMAGE_TYPES`)
  and the bytes' magic must say the same type.

No proxy is taken from the environment (httpcore reads no ``*_PROXY`` variable), no cookies are kept,
no credentials are sent, and only GET requests with a fixed ``User-Agent`` are made. Error messages
never quote a response body or server-sent text; URLs appear without their query, cut to 80 characters.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import quote, urljoin, urlsplit

import httpcore

from memq.config import VisionSettings
from memq.errors import ImageFetchError, ImageTooLarge, MemqError, UnsafeImageURL
from memq.images import IMAGE_TYPES, DataImage, Network, address_allowed, check_image_url, sniff_image_type

__all__ = ["USER_AGENT", "ImageFetcher", "Resolve"]

USER_AGENT = "memq-image-fetch/1"
"""The ``User-Agent`` of every image request."""

Resolve = Callable[[str, int], list[str]]
"""``resolve(host, port)``: the IP addresses (strings) a host name resolves to; raises `OSError` when it
does not resolve."""

_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_DEFAULT_PORTS = {"http": 80, "https": 443}
_MIME = re.compile(r"[\w.+-]{1,30}/[\w.+-]{1,40}")  # a content type shown in an error only in this shape
_URL_SAFE = "/%:@!$&'()*+,;=-._~?"  # characters left as they are when a path or query is re-quoted


def _resolve_getaddrinfo(host: str, port: int) -> list[str]:
    """Every address `host` resolves to for TCP (system resolver), in the resolver's order, no repeats."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    addresses: list[str] = []
    for *_, sockaddr in infos:
        address = str(sockaddr[0])
        if address not in addresses:
            addresses.append(address)
    return addresses


def _shown(url: str) -> str:
    """`url` as error messages show it: without query or fragment (signed URLs carry secrets there),
    cut to 80 characters."""
    try:
        parts = urlsplit(url)
        text = f"{parts.scheme}://{parts.netloc}{parts.path}" + ("?…" if parts.query else "")
    except ValueError:
        text = url
    return text if len(text) <= 80 else text[:79] + "…"


class _Deadline:
    """The one deadline of a fetch (`time.monotonic` seconds)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.at = time.monotonic() + seconds

    def left(self) -> float:
        """Seconds left (negative once passed)."""
        return self.at - time.monotonic()

    def cap(self, timeout: float | None, expired: type[Exception]) -> float:
        """`timeout` cut to the time left; raises `expired` (an httpcore timeout class) once it passed.

        Never returns 0 or less: a socket timeout of 0 would make the socket non-blocking.
        """
        left = self.left()
        if left <= 0:
            raise expired(f"the fetch's deadline of {self.seconds:g}s passed")
        return left if timeout is None else min(timeout, left)


class _DeadlineStream(httpcore.NetworkStream):
    """A network stream whose reads, writes and TLS handshake never wait past the fetch's deadline."""

    def __init__(self, inner: httpcore.NetworkStream, deadline: _Deadline) -> None:
        self._inner = inner
        self._deadline = deadline

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, self._deadline.cap(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, self._deadline.cap(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._inner.close()

    def start_tls(self, ssl_context: ssl.SSLContext, server_hostname: str | None = None,
                  timeout: float | None = None) -> httpcore.NetworkStream:
        inner = self._inner.start_tls(ssl_context, server_hostname,
                                      self._deadline.cap(timeout, httpcore.ConnectTimeout))
        return _DeadlineStream(inner, self._deadline)

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class _GuardedBackend(httpcore.SyncBackend):
    """httpcore's blocking socket backend, with the host name resolved here and every address checked.

    httpcore calls `connect_tcp` with the URL's host name; this resolves it once (within the deadline),
    refuses unless every address passes `address_allowed`, and connects to the checked address literal
    (trying the next one only on a connection failure). httpcore keeps using the name for SNI,
    certificate verification and (through the request) the ``Host`` header.
    """

    def __init__(self, *, allow: tuple[Network, ...], resolve: Resolve, deadline: _Deadline) -> None:
        self._allow = allow
        self._resolve = resolve
        self._deadline = deadline

    def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                    socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None) -> httpcore.NetworkStream:
        addresses = self._addresses(host, port)
        for address in addresses:
            if not _allowed(address, self._allow):
                raise UnsafeImageURL(f"image host {host[:60]!r} resolves to a loopback, private, link-local, "
                                     "reserved or metadata address")
        error: Exception | None = None
        for address in addresses:
            try:
                capped = self._deadline.cap(timeout, httpcore.ConnectTimeout)
                stream = super().connect_tcp(address, port, timeout=capped, local_address=local_address,
                                             socket_options=socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                error = exc
                if self._deadline.left() <= 0:
                    break
                continue
            return _DeadlineStream(stream, self._deadline)
        assert error is not None
        raise error

    def _addresses(self, host: str, port: int) -> list[str]:
        """The addresses to check and connect to: a literal as it is, a name resolved (in a daemon thread,
        so a hung resolver costs no more than the time left)."""
        try:
            return [str(ipaddress.ip_address(host))]
        except ValueError:
            pass
        found: list[str] = []
        failed: list[BaseException] = []
        done = threading.Event()

        def run() -> None:
            try:
                found.extend(self._resolve(host, port))
            except BaseException as exc:  # handed to the fetching thread
                failed.append(exc)
            finally:
                done.set()

        threading.Thread(target=run, name="memq-image-resolve", daemon=True).start()
        if not done.wait(self._deadline.cap(None, httpcore.ConnectTimeout)):
            raise httpcore.ConnectTimeout(f"resolving {host[:60]!r} took longer than the fetch's deadline "
                                          f"of {self._deadline.seconds:g}s")
        if failed:
            raise httpcore.ConnectError(f"could not resolve {host[:60]!r} ({type(failed[0]).__name__}: "
                                        f"{str(failed[0])[:100]})")
        if not found:
            raise httpcore.ConnectError(f"{host[:60]!r} resolves to no address")
        return list(found)


def _allowed(address: str, allow: tuple[Network, ...]) -> bool:
    """`address_allowed` for a resolver's answer; an answer that is not an IP address is refused."""
    try:
        return address_allowed(address, allow=allow)
    except ValueError:
        return False


def _default_ssl_context() -> ssl.SSLContext:
    """Certificate-verifying TLS context: certifi's CA bundle when installed, else the system's."""
    try:
        import certifi
    except ImportError:  # pragma: no cover - certifi comes with httpx/litellm
        return ssl.create_default_context()
    return ssl.create_default_context(cafile=certifi.where())


class ImageFetcher:
    """Downloads http(s) images with the SSRF defences described in the module docstring.

    Thread-safe: `fetch` shares no mutable state between calls (the settings, the resolver and the TLS
    context are read-only), and each call opens its own short-lived httpcore connection pool, closed
    before it returns. One pool per call is deliberate: the deadline belongs to one fetch and is enforced
    by that fetch's network backend; no connection, and no address checked for one URL, is ever reused
    by another fetch; a slow image server cannot hold connections that other fetches wait for. The cost,
    one TCP (and TLS) handshake per image, is small next to a vision model call; a redirect back to the
    same origin still reuses the connection inside the call.

    Args:
        settings: `VisionSettings`; reads `fetch_timeout_s` (seconds, the whole fetch including
            redirects), `fetch_max_bytes` (bytes of the body), `fetch_max_redirects` (count) and
            `networks` (the parsed ``allow_networks``: private networks of the operator's own image hosts).
        resolve: ``resolve(host, port) -> ["203.0.113.7", ...]``, the IP addresses of a host name
            (raising `OSError` when it has none); defaults to `socket.getaddrinfo`. A seam for tests. Not
            called for hosts written as IP addresses.
    """

    def __init__(self, settings: VisionSettings, *, resolve: Resolve | None = None) -> None:
        self._timeout_s = settings.fetch_timeout_s
        self._max_bytes = settings.fetch_max_bytes
        self._max_redirects = settings.fetch_max_redirects
        self._allow = settings.networks
        self._resolve: Resolve = resolve or _resolve_getaddrinfo
        self._ssl_context = _default_ssl_context()
        self._closed = False

    def fetch(self, url: str) -> DataImage:
        """Download one image.

        Args:
            url: an ``http://`` or ``https://`` image URL.

        Returns:
            The image's MIME type (one of `IMAGE_TYPES`, from the final response's ``Content-Type``,
            confirmed by its magic bytes) and its bytes (at most ``fetch_max_bytes``).

        Raises:
            UnsafeImageURL: the URL, or a redirect's target, fails `check_image_url` (scheme,
                credentials, ``localhost``/metadata names, a refused literal address), or its host name
                resolves to any refused address; raised before connecting to that host.
            ImageTooLarge: the ``Content-Length`` is over ``fetch_max_bytes`` (body not read), or the
                body passed it while streaming (connection dropped).
            ImageFetchError: the fetch took longer than ``fetch_timeout_s`` in all; a name that does
                not resolve, a refused or failed connection, TLS or protocol error; more than
                ``fetch_max_redirects`` redirects, or one without a ``Location``; a final status other
                than 200; a ``Content-Type`` outside `IMAGE_TYPES`, or bytes that are not that type (a
                lying content type); the fetcher is closed. Library errors are chained (``from exc``).
        """
        if self._closed:
            raise ImageFetchError("the image fetcher is closed")
        check_image_url(url, allow=self._allow)
        deadline = _Deadline(self._timeout_s)
        backend = _GuardedBackend(allow=self._allow, resolve=self._resolve, deadline=deadline)
        pool = httpcore.ConnectionPool(ssl_context=self._ssl_context, max_connections=2, retries=0,
                                       http1=True, http2=False, network_backend=backend)
        try:
            with pool:
                return self._follow(pool, url, deadline)
        except MemqError:
            raise
        except httpcore.TimeoutException as exc:
            raise ImageFetchError(f"image fetch of {_shown(url)} took longer than {self._timeout_s:g}s") from exc
        except httpcore.ConnectError as exc:  # our own resolver messages or an OS error: no server text
            raise ImageFetchError(f"could not connect for image {_shown(url)}: {str(exc)[:200]}") from exc
        except Exception as exc:  # protocol, read and write errors: the class only, never server text
            raise ImageFetchError(f"image fetch of {_shown(url)} failed ({type(exc).__name__})") from exc

    def close(self) -> None:
        """Refuse further fetches (`ImageFetchError`). Fetches under way finish (within their deadline);
        there is no pool kept between calls to close. Idempotent."""
        self._closed = True

    def _follow(self, pool: httpcore.ConnectionPool, url: str, deadline: _Deadline) -> DataImage:
        """GET `url`, following redirects by hand; the image of the final 200 response."""
        current = url
        for _ in range(self._max_redirects + 1):
            request_url, headers = self._request(current)
            left = deadline.cap(None, httpcore.PoolTimeout)
            extensions = {"timeout": {"connect": left, "read": left, "write": left, "pool": left}}
            with pool.stream("GET", request_url, headers=headers, extensions=extensions) as response:
                if response.status in _REDIRECTS:
                    current = self._redirect_target(current, response)
                    continue
                if response.status != 200:
                    raise ImageFetchError(f"image fetch of {_shown(current)} answered HTTP {response.status}")
                return self._image(current, response, deadline)
        raise ImageFetchError(f"image fetch of {_shown(url)}: more than {self._max_redirects} redirects")

    def _request(self, url: str) -> tuple[httpcore.URL, list[tuple[bytes, bytes]]]:
        """The httpcore URL (host name kept, path re-quoted, fragment dropped) and headers for `url`,
        whose text has been checked."""
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        host = (parts.hostname or "").rstrip(".")
        try:
            ascii_host = host.encode("ascii")
        except UnicodeEncodeError:
            try:
                ascii_host = host.encode("idna")
            except UnicodeError as exc:
                raise ImageFetchError(f"image URL host of {_shown(url)} is not a valid host name") from exc
        port = parts.port or _DEFAULT_PORTS[scheme]
        target = quote(parts.path or "/", safe=_URL_SAFE) + ("?" + quote(parts.query, safe=_URL_SAFE)
                                                             if parts.query else "")
        host_header = b"[%b]" % ascii_host if b":" in ascii_host else ascii_host
        if port != _DEFAULT_PORTS[scheme]:
            host_header += b":%d" % port
        headers = [
            (b"Host", host_header),
            (b"User-Agent", USER_AGENT.encode()),
            (b"Accept", ", ".join(IMAGE_TYPES).encode()),
            (b"Accept-Encoding", b"identity"),
            (b"Connection", b"close"),
        ]
        return httpcore.URL(scheme=scheme.encode(), host=ascii_host, port=port, target=target.encode("ascii")), headers

    def _redirect_target(self, current: str, response: httpcore.Response) -> str:
        """The checked absolute URL a redirect points to."""
        location = _header(response, b"location")
        if not location:
            raise ImageFetchError(f"image fetch of {_shown(current)} answered HTTP {response.status} "
                                  "without a Location")
        target = urljoin(current, location.strip())
        try:
            check_image_url(target, allow=self._allow)
        except UnsafeImageURL as exc:
            raise UnsafeImageURL(f"image URL {_shown(current)} redirects to {_shown(target)}: {exc}") from exc
        return target

    def _image(self, url: str, response: httpcore.Response, deadline: _Deadline) -> DataImage:
        """Check the final response's type and size and read its body (streamed, bounded)."""
        mime = (_header(response, b"content-type") or "").split(";", 1)[0].strip().lower()
        if mime not in IMAGE_TYPES:
            shown = repr(mime) if _MIME.fullmatch(mime) else "(not a MIME type)"
            raise ImageFetchError(f"image fetch of {_shown(url)}: content type {shown} is not one of "
                                  f"{', '.join(IMAGE_TYPES)}")
        length = _header(response, b"content-length")
        if length is not None and length.strip().isdigit() and int(length) > self._max_bytes:
            raise ImageTooLarge(f"image {_shown(url)} is {int(length)} bytes; the limit is {self._max_bytes}")
        body = bytearray()
        for chunk in response.iter_stream():
            body += chunk
            if len(body) > self._max_bytes:
                raise ImageTooLarge(f"image {_shown(url)} is over the limit of {self._max_bytes} bytes")
            deadline.cap(None, httpcore.ReadTimeout)
        found = sniff_image_type(bytes(body[:16]))
        if found != mime:
            raise ImageFetchError(f"image fetch of {_shown(url)}: lying content type ({mime} but the bytes are "
                                  f"{found or 'not an accepted image type'})")
        return DataImage(mime=mime, data=bytes(body))


def _header(response: httpcore.Response, name: bytes) -> str | None:
    """The first value of header `name` (lower case), decoded as Latin-1; None when absent."""
    for key, value in response.headers:
        if key.lower() == name:
            return value.decode("latin-1")
    return None
