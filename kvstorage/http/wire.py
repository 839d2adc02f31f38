"""The wire format shared by the server (:func:`kvstorage.http.create_app`) and
:class:`~kvstorage.drivers.HTTPDriver`: how keys become paths, how etags and TTLs travel in
headers, which values count as JSON.

* A key ``a:b`` is the path ``/a/b``, each segment percent-encoded as JavaScript's
  ``encodeURIComponent`` does (so unstorage's http driver and this one send the same path
  for the same key). A path ending in ``/`` or ``:`` names a *base* (list, clear, batch).
* An etag travels as an HTTP entity tag: ``"<etag>"`` when every character of it may stand
  between the quotes, else ``"~<base64url of its UTF-8>"``.
* A TTL travels in ``X-TTL`` as seconds with a decimal point (``"59.875"``), which
  unstorage reads with ``parseInt``, and beside it, from and to kvstorage, as the absolute
  expiry time in ``X-Expires-At`` (Unix seconds, ``"1767225600.125"``), which wins: a
  relative TTL would move the expiry by the time the message spends on the wire. (Like
  Redis' ``PXAT``, this assumes clocks that agree, as NTP keeps them.)
* Every response of a kvstorage server carries ``X-KVStorage: 1``; unstorage's server does
  not, which is how the driver knows what the server can do.
"""

from __future__ import annotations

import base64
import math
import re
from urllib.parse import quote

import msgspec

__all__ = [
    "PROTOCOL_HEADER",
    "PROTOCOL_VERSION",
    "REMOVED_HEADER",
    "EXPIRES_HEADER",
    "TTL_HEADER",
    "format_expiry",
    "format_ttl",
    "is_json",
    "key_path",
    "parse_expiry",
    "parse_ttl",
    "quote_etag",
    "unquote_etag",
]

#: Response header naming a kvstorage server (value: :data:`PROTOCOL_VERSION`).
PROTOCOL_HEADER = "x-kvstorage"
PROTOCOL_VERSION = "1"
#: Request header of a PUT (time to live) and response header of GET/HEAD (time left).
TTL_HEADER = "x-ttl"
#: The same as an absolute Unix time; preferred over ``X-TTL`` where both are present.
EXPIRES_HEADER = "x-expires-at"
#: Response header of a DELETE of one key: ``1`` when the key held a value, else ``0``.
REMOVED_HEADER = "x-removed"

_decode_json = msgspec.json.decode
_ETAG_PLAIN = re.compile(r"[\x21\x23-\x7e]*")  # etagc of RFC 9110, ASCII part


def key_path(key: str) -> str:
    """The URL path of a normalized key or base, without the leading ``/``
    (``"a:b c"`` -> ``"a/b%20c"``; ``""`` -> ``""``)."""
    return "/".join(quote(segment, safe="!~*'()") for segment in key.split(":")) if key else ""


def is_json(data: bytes) -> bool:
    """True when ``data`` is one JSON document (the server serves such values as
    ``application/json``; the driver sends them to unstorage as text)."""
    try:
        _decode_json(data)
    except (msgspec.DecodeError, RecursionError):
        return False
    return True


def quote_etag(etag: str) -> str:
    """The entity tag (with its quotes) that carries ``etag`` on the wire."""
    if _ETAG_PLAIN.fullmatch(etag) and not etag.startswith("~"):
        return f'"{etag}"'
    encoded = base64.urlsafe_b64encode(etag.encode("utf-8", "surrogatepass")).decode("ascii")
    return f'"~{encoded.rstrip("=")}"'


def unquote_etag(tag: str) -> str | None:
    """The etag an entity tag from :func:`quote_etag` carries; None for anything else
    (a weak tag, a missing quote, bad base64), which then matches no stored etag."""
    tag = tag.strip()
    if len(tag) < 2 or tag[0] != '"' or tag[-1] != '"':
        return None
    inner = tag[1:-1]
    if not inner.startswith("~"):
        return inner if _ETAG_PLAIN.fullmatch(inner) else None
    try:
        padded = inner[1:] + "=" * (-len(inner[1:]) % 4)
        return base64.urlsafe_b64decode(padded.encode("ascii")).decode("utf-8", "surrogatepass")
    except (ValueError, UnicodeError):
        return None


def format_ttl(seconds: float) -> str:
    """Seconds for ``X-TTL``: fixed point, millisecond precision (``"1209600.000"``)."""
    return f"{max(seconds, 0.0):.3f}"


def parse_ttl(value: str) -> float:
    """The seconds in an ``X-TTL`` header; ``ValueError`` unless a finite number > 0."""
    seconds = float(value.strip())
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"X-TTL must be a number of seconds > 0, got {value[:40]!r}")
    return seconds


def format_expiry(expires_at: float) -> str:
    """Unix seconds for ``X-Expires-At``, to the microsecond."""
    return f"{expires_at:.6f}"


def parse_expiry(value: str) -> float:
    """The Unix time in an ``X-Expires-At`` header; ``ValueError`` unless finite and > 0."""
    expires_at = float(value.strip())
    if not math.isfinite(expires_at) or expires_at <= 0:
        raise ValueError(f"X-Expires-At must be a Unix time, got {value[:40]!r}")
    return expires_at
