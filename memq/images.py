"""Checks on image references, shared by the producer (refuse at the edge) and the caption stage.

Nothing here touches the network: a URL is judged by its text (scheme, credentials, a literal address
or a name that always means this machine or a cloud's metadata service), and a ``data:`` URL by its
bytes (an accepted image MIME type, valid base64, magic bytes that match the type, a decoded size
within the limit). Resolving a host name and checking every address it resolves to happens where an
image is fetched (`stores.image_fetch`), as close to the connection as possible.

The address rules follow the usual server-side request forgery defences (OWASP's SSRF prevention
cheat sheet): only globally routable addresses, IPv4-mapped IPv6 unwrapped, metadata endpoints named.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import ipaddress
import re
import unicodedata
from dataclasses import dataclass
from urllib.parse import urlsplit

from memq.errors import ImageTooLarge, InvalidImage, UnsafeImageURL

__all__ = ["IMAGE_TYPES", "DataImage", "address_allowed", "check_image_url", "image_key", "parse_data_url",
           "sniff_image_type"]

IMAGE_TYPES: dict[str, tuple[bytes, ...]] = {
    "image/png": (b"\x89PNG\r\n\x1a\n",),
    "image/jpeg": (b"\xff\xd8\xff",),
    "image/gif": (b"GIF87a", b"GIF89a"),
    "image/webp": (b"RIFF",),  # and b"WEBP" at offset 8, checked in `sniff_image_type`
}
"""Image MIME types memq accepts (the ones vision APIs take), with the magic bytes their files start with."""

METADATA_HOSTS = frozenset({"metadata", "metadata.google.internal", "metadata.goog", "instance-data",
                            "instance-data.ec2.internal"})
"""Host names of cloud metadata services (their addresses are link-local or private as well)."""

METADATA_ADDRESSES = frozenset(ipaddress.ip_address(a) for a in (
    "169.254.169.254", "169.254.170.2", "100.100.100.200", "fd00:ec2::254", "168.63.129.16"))
"""Cloud metadata addresses: never allowed, not even inside ``MEMQ_VISION__FETCH_ALLOW_NETWORKS``."""

GLOBAL_UNICAST_V6 = ipaddress.ip_network("2000::/3")
"""The only IPv6 addresses an image host may have (IANA's global unicast block; `is_global` alone still
admits forms that some stacks route to IPv4 loopback, such as ``::7f00:1``)."""

_DOTS = str.maketrans({"\u3002": ".", "\uff0e": ".", "\uff61": "."})

_DATA_URL = re.compile(r"data:(?P<mime>[\w.+-]+/[\w.+-]+)(?P<params>(?:;[\w.+-]+=[\w.+-]+)*);base64,(?P<payload>.*)",
                       re.IGNORECASE | re.DOTALL)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class DataImage:
    """A decoded ``data:`` image.

    Attributes:
        mime: the MIME type (lower case, one of `IMAGE_TYPES`).
        data: the image's bytes.
    """

    mime: str
    data: bytes


def sniff_image_type(data: bytes) -> str | None:
    """The image MIME type `data`'s first bytes announce, or None when they match no accepted type."""
    for mime, magics in IMAGE_TYPES.items():
        if any(data.startswith(m) for m in magics) and (mime != "image/webp" or data[8:12] == b"WEBP"):
            return mime
    return None


def parse_data_url(url: str, *, max_bytes: int, field: str | None = None) -> DataImage:
    """Decode and check a base64 ``data:`` image URL.

    Args:
        url: ``data:image/png;base64,...``.
        max_bytes: largest decoded size accepted (bytes).
        field: the request field, for the error.

    Returns:
        The image's MIME type and bytes.

    Raises:
        InvalidImage: not a base64 ``data:`` URL, a MIME type outside `IMAGE_TYPES`, invalid base64, or
            bytes whose magic does not match the declared type.
        ImageTooLarge: the decoded image is over `max_bytes` (checked before decoding).
    """
    m = _DATA_URL.fullmatch(url)
    if m is None:
        raise InvalidImage("a data: image URL must read data:<image type>;base64,<payload>", field=field)
    mime = m.group("mime").lower()
    if mime not in IMAGE_TYPES:
        raise InvalidImage(f"data: URL of type {mime[:40]!r}; accepted: {', '.join(IMAGE_TYPES)}", field=field)
    payload = m.group("payload")
    if len(payload) // 4 * 3 > max_bytes + 2:
        raise ImageTooLarge(f"data: image of about {len(payload) // 4 * 3} bytes; the limit is {max_bytes}",
                            field=field)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidImage("data: image payload is not valid base64", field=field) from None
    if len(data) > max_bytes:
        raise ImageTooLarge(f"data: image of {len(data)} bytes; the limit is {max_bytes}", field=field)
    found = sniff_image_type(data)
    if found != mime:
        raise InvalidImage(f"data: URL says {mime} but its bytes are {found or 'not an accepted image type'}",
                           field=field)
    return DataImage(mime=mime, data=data)


def address_allowed(address: str | ipaddress.IPv4Address | ipaddress.IPv6Address, *,
                    allow: tuple[Network, ...] = ()) -> bool:
    """True when memq may connect to `address` for an image: a globally routable address, or one inside
    `allow` (an operator's own image host); cloud metadata addresses never.

    IPv4-mapped and 6to4/NAT64-embedded IPv4 addresses are judged by the IPv4 address they carry.
    """
    ip = ipaddress.ip_address(address) if isinstance(address, str) else address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        elif ip.sixtofour is not None:
            ip = ip.sixtofour
        elif ip in ipaddress.ip_network("64:ff9b::/96"):
            ip = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip in METADATA_ADDRESSES:
        return False
    if any(ip in net for net in allow if net.version == ip.version):
        return True
    if isinstance(ip, ipaddress.IPv6Address) and ip not in GLOBAL_UNICAST_V6:
        return False  # ::/96 (IPv4-compatible), ::ffff:0:0:0/96, 64:ff9b:1::/48 ...: not for image hosts
    return ip.is_global and not ip.is_multicast


def check_image_url(url: str, *, field: str | None = None, allow: tuple[Network, ...] = ()) -> str:
    """Check an http(s) image URL by its text alone (no DNS lookup).

    Args:
        url: the URL.
        field: the request field, for the error.
        allow: networks an operator allows (see `address_allowed`).

    Returns:
        The URL's host name (lower case, without brackets).

    Raises:
        UnsafeImageURL: a scheme other than http/https, credentials in the URL, no host, a literal
            address that `address_allowed` refuses (in any of the forms IP parsers accept: dotted,
            decimal, octal, hex), ``localhost`` or a ``.localhost`` name, or a metadata host name.
    """
    try:
        parts = urlsplit(url)
        port = parts.port  # raises ValueError on a bad port
    except ValueError:
        raise UnsafeImageURL("image URL is malformed", field=field) from None
    del port
    if parts.scheme.lower() not in ("http", "https"):
        raise UnsafeImageURL(f"image URL scheme {parts.scheme[:20]!r}; only http, https and data: images",
                             field=field)
    if parts.username is not None or parts.password is not None:
        raise UnsafeImageURL("image URL carries credentials", field=field)
    host = _ascii_host(parts.hostname or "", field)
    if not host:
        raise UnsafeImageURL("image URL has no host", field=field)
    if host == "localhost" or host.endswith(".localhost") or host in METADATA_HOSTS:
        raise UnsafeImageURL(f"image URL host {host[:60]!r} is this machine or a metadata service", field=field)
    literal = _literal_address(host)
    if literal is not None and not address_allowed(literal, allow=allow):
        raise UnsafeImageURL(f"image URL host {host[:60]!r} is a loopback, private, link-local, reserved or "
                             "metadata address", field=field)
    return host


def _ascii_host(host: str, field: str | None) -> str:
    """The host as HTTP clients will read it: NFKC-normalized (full-width digits and letters, circled
    letters), ideographic and full-width dots as dots, IDNA-encoded, lower case, no trailing dot. A
    host holding ``%`` or ``\\`` (read differently by different URL parsers) is refused."""
    if "%" in host or "\\" in host:
        raise UnsafeImageURL("image URL host holds '%' or a backslash", field=field)
    if host.isascii():
        return host.rstrip(".").lower()
    normalized = unicodedata.normalize("NFKC", host).translate(_DOTS).rstrip(".")
    try:
        return normalized.encode("idna").decode("ascii").lower()
    except UnicodeError:
        raise UnsafeImageURL("image URL host is not a valid internationalized name", field=field) from None


def _literal_address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address a host written as an IP literal means, in the forms resolvers accept
    (``127.0.0.1``, ``2130706433``, ``0x7f.1``, ``0177.0.0.1``, ``[::1]``); None for a name."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    import socket

    if re.fullmatch(r"[0-9a-fx.]+", host):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host))  # inet_aton reads the legacy forms, no DNS
        except OSError:
            return None
    return None


def image_key(model: str, *, url: str | None = None, data: bytes | None = None, detail: str | None = None) -> str:
    """The caption cache key of an image for a vision model: sha256 over the model, the ``detail`` asked
    for, and the image's bytes (``data:`` images) or its URL (http(s) images), hex.

    Raises:
        ValueError: neither or both of `url` and `data`.
    """
    if (url is None) == (data is None):
        raise ValueError("give exactly one of url and data")
    h = hashlib.sha256(model.encode() + b"\x00" + (detail or "").encode() + b"\x00")
    h.update(b"url\x00" + url.encode() if url is not None else b"data\x00" + (data or b""))
    return h.hexdigest()
