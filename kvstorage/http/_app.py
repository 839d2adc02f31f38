"""The ASGI application behind :func:`kvstorage.http.create_app` (see the package
docstring for the protocol)."""

from __future__ import annotations

import base64
import email.utils
import hmac
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, NoReturn
from urllib.parse import parse_qsl, unquote_to_bytes

import msgspec

from ..errors import (
    ConditionFailedError,
    DriverUnavailableError,
    InvalidKeyError,
    KVStorageError,
    ReadOnlyError,
    SerializationError,
)
from ..keys import normalize_base, normalize_key
from ..storage import Entry, Meta, Storage
from . import wire

__all__ = ["ASGIApp", "Receive", "Scope", "Send", "StorageApp"]

logger = logging.getLogger("kvstorage.http")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
#: An ASGI 3 application.
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_OCTETS = "application/octet-stream"
_JSON = "application/json"
_READS = ("GET", "HEAD", "POST")
_STREAM_CHUNK = 64 * 1024
_BATCH_LIMIT = 10_000
_JUST_EXPIRING = 0.001  # the TTL of an item sent with an expiry time already past
_encode_json = msgspec.json.encode
_REASONS = {
    304: "Not Modified",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    405: "Method Not Allowed",
    412: "Precondition Failed",
    413: "Content Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


class _Batch(msgspec.Struct, forbid_unknown_fields=True):
    keys: list[str]
    encoding: str = "json"


@dataclass
class _Response:
    status: int
    body: bytes = b""
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    stream: AsyncGenerator[bytes, None] | None = None
    content_type: str = "text/plain; charset=utf-8"


class _Fail(Exception):
    """An answer other than 2xx, raised from anywhere in a handler."""

    def __init__(self, status: int, message: str, *headers: tuple[bytes, bytes]) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = list(headers)


def _meta_headers(meta: Meta) -> list[tuple[bytes, bytes]]:
    headers = [(b"etag", wire.quote_etag(meta.etag).encode())]
    if meta.mtime is not None:
        modified = email.utils.format_datetime(meta.mtime, usegmt=True)
        headers.append((b"last-modified", modified.encode()))
    if meta.ttl is not None:
        headers.append((wire.TTL_HEADER.encode(), wire.format_ttl(meta.ttl).encode()))
    if meta.expires_at is not None:
        at = wire.format_expiry(meta.expires_at.timestamp())
        headers.append((wire.EXPIRES_HEADER.encode(), at.encode()))
    return headers


def _text_type(data: bytes) -> str:
    """The content type a value is served with when JSON was asked for."""
    if wire.is_json(data):
        return _JSON
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return _OCTETS
    return "text/plain; charset=utf-8"


class StorageApp:
    """The ASGI app :func:`kvstorage.http.create_app` returns (see the package docstring).

    It never disposes ``storage``: whoever created the storage closes it.
    """

    def __init__(
        self,
        storage: Storage,
        *,
        token: str | None = None,
        read_only: bool = False,
        max_body: int = 16 * 2**20,
    ) -> None:
        if not isinstance(storage, Storage):
            raise TypeError(f"expected a Storage, got {type(storage).__name__}")
        if token is not None and (not isinstance(token, str) or not token):
            raise ValueError("token must be a non-empty string or None")
        if not isinstance(max_body, int) or max_body < 0:
            raise ValueError(f"max_body must be an int >= 0, got {max_body!r}")
        self.storage = storage
        self.read_only = read_only
        self.max_body = max_body
        self._token = None if token is None else token.encode("utf-8")

    def __repr__(self) -> str:
        auth = ", token=***" if self._token is not None else ""
        mode = ", read_only=True" if self.read_only else ""
        return f"<StorageApp {self.storage!r}{auth}{mode}>"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await _lifespan(receive, send)
            return
        if kind != "http":
            raise RuntimeError(f"StorageApp serves http, not {kind!r}")
        try:
            response = await self._handle(scope, receive)
        except _Fail as fail:
            response = _error(fail.status, fail.message, fail.headers)
        except Exception:
            logger.exception("%s %s failed", scope.get("method"), scope.get("path", "")[:200])
            response = _error(500, "the storage failed; see the server log")
        await _send(send, response, head=scope["method"] == "HEAD")

    # -- dispatch -------------------------------------------------------------------------

    async def _handle(self, scope: Scope, receive: Receive) -> _Response:
        headers = {name.decode("latin-1"): value for name, value in scope["headers"]}
        self._authorize(headers.get("authorization"))
        method: str = scope["method"]
        key, is_base = _path_key(scope)
        if method not in ("GET", "HEAD", "PUT", "DELETE", "POST"):
            raise _Fail(405, f"method {method} is not allowed", _allow(is_base, self.read_only))
        if self.read_only and method not in _READS:
            raise _Fail(405, "this storage is served read-only", _allow(is_base, True))
        try:
            if is_base:
                if method == "GET":
                    return await self._list(key, scope)
                if method == "DELETE":
                    await self.storage.clear(key)
                    return _Response(200, b"OK")
                if method == "POST":
                    body = await _read_body(receive, headers, self.max_body)
                    return await self._batch(key, body)
                raise _Fail(405, f"{method} needs a key, not a base", _allow(True, self.read_only))
            if method == "GET":
                return await self._get(key, headers)
            if method == "HEAD":
                return await self._head(key)
            if method == "PUT":
                body = await _read_body(receive, headers, self.max_body)
                return await self._put(key, body, headers)
            if method == "DELETE":
                if "if-match" in headers or "if-none-match" in headers:
                    raise _Fail(400, "conditional DELETE is not supported")
                removed = await self.storage.remove_item(key)
                flag = b"1" if removed else b"0"
                return _Response(200, b"OK", [(wire.REMOVED_HEADER.encode(), flag)])
            raise _Fail(
                405, "POST needs a base (a path ending in /)", _allow(False, self.read_only)
            )
        except KVStorageError as exc:
            _fail_for(exc)

    def _authorize(self, given: bytes | None) -> None:
        if self._token is None:
            return
        scheme, _, credentials = (given or b"").partition(b" ")
        if scheme.lower() != b"bearer" or not hmac.compare_digest(credentials.strip(), self._token):
            raise _Fail(401, "a valid bearer token is required", (b"www-authenticate", b"Bearer"))

    # -- items ----------------------------------------------------------------------------

    async def _get(self, key: str, headers: dict[str, bytes]) -> _Response:
        entry = await self.storage.get_entry_raw(key)
        if entry is None:
            raise _Fail(404, "KV value not found")
        data: bytes = entry.value
        meta_headers = _meta_headers(entry.meta)
        match = headers.get("if-none-match")
        if match is not None:
            tags = {tag.strip() for tag in match.split(b",")}
            if b"*" in tags or wire.quote_etag(entry.etag).encode() in tags:
                return _Response(304, headers=meta_headers)
        raw = _OCTETS.encode() in headers.get("accept", b"")
        content_type = _OCTETS if raw else _text_type(data)
        return _Response(200, data, meta_headers, content_type=content_type)

    async def _head(self, key: str) -> _Response:
        meta = await self.storage.get_meta(key)
        if meta is None:
            raise _Fail(404, "KV value not found")
        headers = _meta_headers(meta)
        headers.append((b"content-length", str(meta.size).encode()))
        return _Response(200, headers=headers, content_type=_OCTETS)

    async def _put(self, key: str, body: bytes, headers: dict[str, bytes]) -> _Response:
        _requested_ttl(headers)  # a malformed TTL is a 400 before anything is read
        if_absent, if_match = await self._conditions(key, headers)
        ttl = _requested_ttl(headers)
        content_type = headers.get("content-type", b"").partition(b";")[0].strip().lower()
        storage = self.storage
        if content_type == _OCTETS.encode() or wire.is_json(body):
            await storage.set_item_raw(key, body, ttl=ttl, if_absent=if_absent, if_match=if_match)
        else:
            try:  # text that is not JSON: a string, as unstorage's setItem sends strings
                text = body.decode("utf-8")
            except UnicodeDecodeError:
                message = "a text body must be UTF-8 (or send application/octet-stream)"
                raise _Fail(400, message) from None
            await storage.set_item(key, text, ttl=ttl, if_absent=if_absent, if_match=if_match)
        return _Response(200, b"OK")

    async def _conditions(self, key: str, headers: dict[str, bytes]) -> tuple[bool, str | None]:
        """(if_absent, if_match) from ``If-None-Match: *`` / ``If-Match``."""
        none_match = headers.get("if-none-match")
        match = headers.get("if-match")
        if none_match is not None and match is not None:
            raise _Fail(400, "send If-Match or If-None-Match, not both")
        if none_match is not None:
            if none_match.strip() != b"*":
                raise _Fail(400, "PUT supports If-None-Match: * only")
            return True, None
        if match is None:
            return False, None
        if match.strip() == b"*":  # any current value: pin the one there now
            meta = await self.storage.get_meta(key)
            if meta is None:
                raise _Fail(412, "the key holds no value")
            return False, meta.etag
        etag = wire.unquote_etag(match.decode("latin-1"))
        if etag is None:
            raise _Fail(412, "the etag does not match")
        return False, etag

    # -- bases ----------------------------------------------------------------------------

    async def _list(self, base: str, scope: Scope) -> _Response:
        max_depth = None
        for name, value in parse_qsl(scope.get("query_string", b"").decode("latin-1")):
            if name in ("max_depth", "maxDepth"):
                try:
                    max_depth = int(value)
                except ValueError:
                    raise _Fail(400, "max_depth must be an integer") from None
        keys = self.storage.iter_keys(base, max_depth=max_depth)
        try:  # the first key (or the end) before answering: a bad base is a clean 4xx
            first: str | None = await anext(keys)
        except StopAsyncIteration:
            first = None
        except ValueError as exc:  # max_depth < 0 (InvalidKeyError is a KVStorageError)
            raise _Fail(400, str(exc)) from None
        if first is None:
            return _Response(200, b"[]\n", content_type=_JSON)
        return _Response(200, content_type=_JSON, stream=_json_lines(first, keys))

    async def _batch(self, base: str, body: bytes) -> _Response:
        try:
            request = msgspec.json.decode(body, type=_Batch)
        except msgspec.DecodeError as exc:
            raise _Fail(400, f'expected {{"keys": [...], "encoding": "json"}}: {exc}') from None
        if request.encoding not in ("json", "base64"):
            raise _Fail(400, 'encoding must be "json" or "base64"')
        if len(request.keys) > _BATCH_LIMIT:
            raise _Fail(413, f"at most {_BATCH_LIMIT} keys per batch")
        prefix = base + ":" if base else ""
        keys = [normalize_key(key) for key in request.keys]
        entries = await self.storage.get_entries_raw([prefix + key for key in keys])
        items = [_batch_item(key, entries[prefix + key], request.encoding) for key in keys]
        return _Response(200, _encode_json(items), content_type=_JSON)


def _batch_item(key: str, entry: Entry | None, encoding: str) -> dict[str, Any] | None:
    if entry is None:
        return None
    meta = entry.meta
    item: dict[str, Any] = {
        "key": key,
        "etag": wire.quote_etag(entry.etag),
        "ttl": meta.ttl,
        "expires_at": None if meta.expires_at is None else meta.expires_at.timestamp(),
        "mtime": None if meta.mtime is None else meta.mtime.timestamp(),
    }
    data: bytes = entry.value
    if encoding == "json" and wire.is_json(data):
        item["value"] = msgspec.Raw(data)
    else:
        item["base64"] = base64.b64encode(data).decode("ascii")
    return item


async def _json_lines(first: str, rest: AsyncIterator[str]) -> AsyncGenerator[bytes, None]:
    """A JSON array of keys (``/`` separators, as unstorage lists them), one a line."""
    try:
        chunk = bytearray(b"[\n" + _encode_json(first.replace(":", "/")))
        async for key in rest:
            chunk += b",\n" + _encode_json(key.replace(":", "/"))
            if len(chunk) >= _STREAM_CHUNK:
                yield bytes(chunk)
                chunk.clear()
        chunk += b"\n]\n"
        yield bytes(chunk)
    finally:
        close = getattr(rest, "aclose", None)
        if close is not None:
            await close()


def _requested_ttl(headers: dict[str, bytes]) -> float | None:
    """The TTL a PUT asks for, now: the time left until ``X-Expires-At`` when given (it
    wins), else ``X-TTL``; None without either; 400 when malformed."""
    try:
        if wire.EXPIRES_HEADER in headers:
            expires_at = wire.parse_expiry(headers[wire.EXPIRES_HEADER].decode("latin-1"))
            return max(expires_at - time.time(), _JUST_EXPIRING)
        if wire.TTL_HEADER in headers:
            return wire.parse_ttl(headers[wire.TTL_HEADER].decode("latin-1"))
    except ValueError as exc:
        raise _Fail(400, str(exc)) from None
    return None


def _path_key(scope: Scope) -> tuple[str, bool]:
    """(normalized key or base, whether the path names a base) of the request path,
    percent-decoded as UTF-8; 400 for anything that is not a valid key."""
    raw: bytes | None = scope.get("raw_path")
    try:
        path = (unquote_to_bytes(raw) if raw is not None else scope["path"].encode()).decode()
    except UnicodeDecodeError:
        raise _Fail(400, "the path is not valid UTF-8 once percent-decoded") from None
    path = path.partition("?")[0] if raw is None else path
    root: str = scope.get("root_path", "")
    if root and path.startswith(root):  # mounted under a prefix (Starlette's Mount, ...)
        path = path[len(root) :]
    is_base = path == "" or path[-1] in "/:"
    try:
        return (normalize_base(path) if is_base else normalize_key(path)), is_base
    except InvalidKeyError as exc:
        raise _Fail(400, f"invalid key: {exc}") from None


def _allow(is_base: bool, read_only: bool) -> tuple[bytes, bytes]:
    if is_base:
        methods = "GET, POST" if read_only else "GET, POST, DELETE"
    else:
        methods = "GET, HEAD" if read_only else "GET, HEAD, PUT, DELETE"
    return b"allow", methods.encode()


def _fail_for(exc: KVStorageError) -> NoReturn:
    """The HTTP answer for an error of the storage."""
    if isinstance(exc, ConditionFailedError):
        raise _Fail(412, str(exc)) from exc
    if isinstance(exc, InvalidKeyError | SerializationError):
        raise _Fail(400, str(exc)) from exc
    if isinstance(exc, ReadOnlyError):
        raise _Fail(405, str(exc)) from exc
    logger.error("storage error: %s", exc)
    if isinstance(exc, DriverUnavailableError):
        raise _Fail(503, str(exc)) from exc
    raise _Fail(500, str(exc)) from exc


async def _read_body(receive: Receive, headers: dict[str, bytes], limit: int) -> bytes:
    declared = headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _Fail(413, f"the body is larger than {limit} bytes")
    body = bytearray()
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _Fail(400, "the client went away")
        body += message.get("body", b"")
        if len(body) > limit:
            raise _Fail(413, f"the body is larger than {limit} bytes")
        if not message.get("more_body", False):
            return bytes(body)


def _error(
    status: int, message: str, headers: list[tuple[bytes, bytes]] | None = None
) -> _Response:
    reason = _REASONS.get(status, "Error")
    body = _encode_json({"status": status, "statusText": reason, "message": message})
    return _Response(status, body, headers or [], content_type=_JSON)


async def _send(send: Send, response: _Response, *, head: bool) -> None:
    headers = [
        (b"content-type", response.content_type.encode()),
        (wire.PROTOCOL_HEADER.encode(), wire.PROTOCOL_VERSION.encode()),
        *response.headers,
    ]
    stream = response.stream
    unsized = stream is not None or response.status == 304
    if not unsized and not any(name == b"content-length" for name, _ in headers):
        headers.append((b"content-length", str(len(response.body)).encode()))
    await send({"type": "http.response.start", "status": response.status, "headers": headers})
    if stream is None or head:
        await send({"type": "http.response.body", "body": b"" if head else response.body})
        if stream is not None:
            await stream.aclose()
        return
    async with aclosing(stream):
        try:
            async for chunk in stream:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except Exception:  # headers are out: the client sees a cut-off body, never a bad list
            logger.exception("listing failed midway")
            raise
    await send({"type": "http.response.body", "body": b""})


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
