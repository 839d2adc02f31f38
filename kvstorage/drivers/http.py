"""HTTPDriver: a storage served over HTTP -- by ``kvstorage serve`` (or any ASGI server
running :func:`kvstorage.http.create_app`) or by unstorage's storage server. Runs on any
anyio backend (httpx).

Requests (the wire format is in :mod:`kvstorage.http.wire`)
------------------------------------------------------------
``get`` is ``GET /<key>`` with ``Accept: application/octet-stream`` (exact bytes, with
``ETag``, ``Last-Modified`` and ``X-TTL``); ``head`` is ``HEAD``; ``set`` is ``PUT`` with
``X-TTL`` and ``If-None-Match: *`` / ``If-Match``; ``remove`` is ``DELETE`` (the server says
in ``X-Removed`` whether the key held a value); ``scan`` is ``GET /<base>/``, read line by
line as the server streams it; ``clear`` is ``DELETE /<base>/``; ``get_many`` is one ``POST
/<root>/`` per 1,000 keys; ``set_many`` and ``remove_many`` send up to 16 requests at a time
on the one connection pool the driver keeps.

unstorage's server
------------------
A kvstorage server marks every answer with ``X-KVStorage: 1``. Without it (unstorage's
``createStorageServer``), the driver keeps to what that server understands: values that are
JSON go as text (so JavaScript readers get them parsed), others as
``application/octet-stream``; etags are content hashes; conditions are checked by this
driver under a lock (atomic within this process only); batches are single requests;
``clear`` lists and removes (unstorage's own clear only clears whole mounts); ``remove`` asks
``HEAD`` first; listed keys are percent-decoded (unstorage 1.x keeps the encoded form).
Until the first answer arrives the driver does not know the server: a conditional write
first asks ``HEAD`` of its key, a batch read tries ``POST`` and falls back on a 405.
"""

from __future__ import annotations

import email.utils
import functools
import hashlib
import time
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Mapping,
    Sequence,
)
from typing import Any, TypeVar
from urllib.parse import parse_qsl, unquote, urlsplit

import anyio
import httpx
import msgspec

from ..errors import (
    ConditionFailedError,
    DriverError,
    DriverUnavailableError,
    KVStorageError,
    ReadOnlyError,
)
from ..http import wire
from ..keys import normalize_base
from ..urls import redact_url
from .base import Capabilities, Driver, Record, Stat, check_condition, is_expired

__all__ = ["HTTPDriver"]

T = TypeVar("T")

_OCTETS = "application/octet-stream"
_GET_HEADERS = {"accept": _OCTETS}
_BATCH = 1000
_CONCURRENCY = 16
_decode_json = msgspec.json.decode


class _Item(msgspec.Struct):
    """One entry of a batch-read answer (``encoding: base64``)."""

    etag: str
    base64: bytes  # msgspec decodes base64 strings into bytes
    ttl: float | None = None
    expires_at: float | None = None
    mtime: float | None = None


_BATCH_ANSWER = msgspec.json.Decoder(list[_Item | None])
_KEY_LIST = msgspec.json.Decoder(list[str])


@functools.lru_cache(maxsize=64)
def _timestamp(http_date: str) -> float | None:
    try:
        return email.utils.parsedate_to_datetime(http_date).timestamp()
    except (TypeError, ValueError):
        return None


def _expiry(headers: httpx.Headers) -> float | None:
    """The expiry time an answer gives: ``X-Expires-At``, else now + ``X-TTL`` (unstorage)."""
    try:
        at = headers.get(wire.EXPIRES_HEADER)
        if at is not None:
            return wire.parse_expiry(at)
        ttl = headers.get(wire.TTL_HEADER)
        return None if not ttl else time.time() + float(ttl)
    except ValueError:
        return None


def _valid(key: str) -> bool:
    try:
        return normalize_base(key) == key
    except ValueError:
        return False


def _from_unstorage(key: str) -> str:
    """A key as unstorage 1.x lists it (percent-encoded as its http driver sent it)."""
    return "/".join(unquote(segment) for segment in key.replace(":", "/").split("/"))


async def _line_batches(chunks: AsyncIterator[bytes]) -> AsyncGenerator[list[str], None]:
    """The keys of a kvstorage listing (a JSON array, one key a line) as it streams: every
    complete line received so far, decoded together in one call."""
    pending = b""
    async for chunk in chunks:
        pending += chunk
        complete, newline, pending = pending.rpartition(b"\n")
        if newline:
            yield _decode_lines(complete)
    if pending.strip():
        yield _decode_lines(pending)


def _decode_lines(lines: bytes) -> list[str]:
    body = lines.strip().removeprefix(b"[").removesuffix(b"]").strip().rstrip(b",")
    return _KEY_LIST.decode(b"[" + body + b"]") if body else []


def _first_leaf(group: BaseExceptionGroup[Any]) -> BaseException:
    error: BaseException = group
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    return error


class HTTPDriver(Driver):
    """Stores items on a kvstorage server (``kvstorage serve``) or an unstorage storage
    server, over HTTP(S), with one connection pool.

    Args:
        url: the server and the base path every key goes under:
            ``http://127.0.0.1:8787/base`` stores ``a:b`` at ``/base/a/b``. A password in
            the URL (``http://:TOKEN@host/``) or a ``token`` query parameter is taken as
            the token and removed from the URL.
        token: sent as ``Authorization: Bearer <token>``; never shown in ``repr`` or errors.
        headers: extra headers for every request.
        client: a ready ``httpx.AsyncClient`` to use (not closed by :meth:`dispose`);
            requests use absolute URLs, so its ``base_url`` does not matter.
        timeout: seconds to connect and to wait for an answer.
        max_connections: size of the connection pool the driver creates.

    Against a kvstorage server every part of the driver contract holds, conditions and TTL
    included: the server's storage expires items and checks conditions atomically. A server
    that cannot be reached raises :class:`~kvstorage.errors.DriverUnavailableError` naming
    the URL (without the token); a write to a read-only server raises
    :class:`~kvstorage.errors.ReadOnlyError`; a rejected token a
    :class:`~kvstorage.errors.DriverError` saying so.
    """

    name = "http"
    capabilities = Capabilities(ttl=True, conditions=True)

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        headers: Mapping[str, str] | None = None,
        client: httpx.AsyncClient | None = None,
        timeout: float = 10.0,
        max_connections: int = 100,
    ) -> None:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s):// URL with a host: {redact_url(url)!r}")
        query = parse_qsl(parts.query, keep_blank_values=True)
        for name, value in query:
            if name == "token" and token is None:
                token = value
        unknown = sorted({name for name, _ in query} - {"token"})
        if unknown:
            raise ValueError(f"unknown http URL option(s): {', '.join(unknown)}")
        if parts.password and token is None:
            token = unquote(parts.password)
        host = parts.netloc.rpartition("@")[2]
        root = normalize_base(unquote(parts.path))
        self._root_path = "/" + wire.key_path(root) if root else ""
        self._root_prefix = root + ":" if root else ""
        self._origin = f"{scheme}://{host}"
        #: The server and base path, without any secret.
        self.url = self._origin + self._root_path
        self._token = token
        self._headers = dict(headers or {})
        if token is not None:
            self._headers["authorization"] = f"Bearer {token}"
        self._given = client
        self._client: httpx.AsyncClient | None = None
        self._timeout = timeout
        self._max_connections = max_connections
        #: Whether the server is a kvstorage server (None until its first answer).
        self._kvstorage: bool | None = None
        self._lock: anyio.Lock | None = None

    @classmethod
    def from_url(cls, url: str, *, token: str | None = None) -> HTTPDriver:
        """Build from ``http(s)://host:port/base`` (a ``?token=`` or a password in the URL
        is the token; ``token=`` is used when the URL has none)."""
        parts = urlsplit(url)
        in_url = bool(parts.password) or any(k == "token" for k, _ in parse_qsl(parts.query))
        return cls(url) if in_url else cls(url, token=token)

    def __repr__(self) -> str:
        token = ", token=***" if self._token is not None else ""
        return f"HTTPDriver({self.url!r}{token})"

    # -- requests -------------------------------------------------------------------------

    def _open(self) -> httpx.AsyncClient:
        if self._given is not None:
            self._client = self._given
        else:
            limits = httpx.Limits(
                max_connections=self._max_connections,
                max_keepalive_connections=self._max_connections,
            )
            self._client = httpx.AsyncClient(timeout=self._timeout, limits=limits)
        return self._client

    def _url(self, key: str, *, base: bool = False) -> str:
        path = wire.key_path(key)
        if base:
            return f"{self.url}/{path}/" if path else f"{self.url}/"
        return f"{self.url}/{path}"

    def _unreachable(self, exc: httpx.TransportError) -> DriverUnavailableError:
        kind = type(exc).__name__
        return DriverUnavailableError(
            f"cannot reach the server at {self.url}: {kind}: {exc}", driver=self.name
        )

    async def _send(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        content: bytes | None = None,
    ) -> httpx.Response:
        client = self._client or self._open()
        merged = {**self._headers, **headers} if headers else self._headers
        try:
            response = await client.request(method, url, headers=merged, content=content)
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc
        self._kvstorage = wire.PROTOCOL_HEADER in response.headers
        return response

    def _fail(self, response: httpx.Response, what: str) -> KVStorageError:
        """The error for an answer that is neither a success nor an expected 404/412."""
        status = response.status_code
        try:
            detail = str(_decode_json(response.content).get("message", ""))[:200]
        except (msgspec.DecodeError, AttributeError):
            detail = response.text[:200] if status < 500 else ""
        said = f"{status} {response.reason_phrase}" + (f": {detail}" if detail else "")
        if status in (401, 403):
            return DriverError(
                f"the server at {self.url} refused {what} ({said}); check the token",
                driver=self.name,
            )
        if status == 405 and what.startswith("writing"):
            return ReadOnlyError(f"the server at {self.url} is read-only ({said})")
        if status == 503:
            return DriverUnavailableError(
                f"the server at {self.url} cannot reach its storage ({said})", driver=self.name
            )
        return DriverError(f"{what} at {self.url} failed: {said}", driver=self.name)

    def _record(self, response: httpx.Response, value: bytes) -> Record:
        headers = response.headers
        etag = headers.get("etag")
        if etag is None:  # unstorage: a content hash stands in for the etag
            etag = '"#' + hashlib.blake2b(value, digest_size=12).hexdigest() + '"'
        modified = headers.get("last-modified")
        return Record(value, etag, _timestamp(modified) if modified else None, _expiry(headers))

    # -- single items ---------------------------------------------------------------------

    async def get(self, key: str) -> Record | None:
        response = await self._send("GET", self._url(key), headers=_GET_HEADERS)
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            raise self._fail(response, f"reading {key!r}")
        return self._record(response, response.content)

    async def head(self, key: str) -> Stat | None:
        response = await self._send("HEAD", self._url(key))
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            raise self._fail(response, f"reading {key!r}")
        if not self._kvstorage:  # no etag nor size from unstorage's server
            record = await self.get(key)
            return (
                None
                if record is None
                else Stat(len(record.value), record.etag, record.mtime, record.expires_at)
            )
        record = self._record(response, b"")
        size = int(response.headers.get("content-length", 0))
        return Stat(size, record.etag, record.mtime, record.expires_at)

    async def set(
        self,
        key: str,
        value: bytes,
        *,
        expires_at: float | None = None,
        if_absent: bool = False,
        if_match: str | None = None,
    ) -> None:
        headers = {}
        if expires_at is not None:
            headers[wire.TTL_HEADER] = wire.format_ttl(max(expires_at - time.time(), 0.001))
            headers[wire.EXPIRES_HEADER] = wire.format_expiry(expires_at)  # kvstorage: exact
        if if_absent or if_match is not None:
            if self._kvstorage is None:
                await self._send("HEAD", self._url(key))  # learn what the server is
            if not self._kvstorage:
                await self._set_checked(key, value, headers, if_absent, if_match)
                return
            if if_absent:
                headers["if-none-match"] = "*"
            elif if_match is not None:
                headers["if-match"] = if_match
        await self._put(key, value, headers)

    async def _put(self, key: str, value: bytes, headers: dict[str, str]) -> None:
        json_text = not self._kvstorage and wire.is_json(value)
        headers["content-type"] = "application/json" if json_text else _OCTETS
        response = await self._send("PUT", self._url(key), headers=headers, content=value)
        if response.status_code == 412:
            what = "already exists" if "if-none-match" in headers else "has another etag"
            raise ConditionFailedError(f"key {key!r} {what}")
        if not 200 <= response.status_code < 300:
            raise self._fail(response, f"writing {key!r}")

    async def _set_checked(
        self,
        key: str,
        value: bytes,
        headers: dict[str, str],
        if_absent: bool,
        if_match: str | None,
    ) -> None:
        """A conditional write on a server without conditions: check, then write, under
        this driver's lock."""
        if self._lock is None:
            self._lock = anyio.Lock()
        async with self._lock:
            current = await self.get(key)
            live = current is not None and not is_expired(current.expires_at)
            etag = current.etag if current is not None and live else None
            check_condition(key, etag, if_absent=if_absent, if_match=if_match)
            await self._put(key, value, headers)

    async def remove(self, key: str) -> bool:
        url = self._url(key)
        existed = None
        if not self._kvstorage:  # unstorage does not say whether the key existed
            existed = await self.head(key) is not None
        response = await self._send("DELETE", url)
        if not 200 <= response.status_code < 300:
            raise self._fail(response, f"writing (removing) {key!r}")
        flag = response.headers.get(wire.REMOVED_HEADER)
        return flag == "1" if flag is not None else bool(existed)

    # -- batches --------------------------------------------------------------------------

    async def get_many(self, keys: Sequence[str]) -> list[Record | None]:
        records: list[Record | None] = []
        for start in range(0, len(keys), _BATCH):
            chunk = keys[start : start + _BATCH]
            if self._kvstorage is False:
                records += await self._concurrently([functools.partial(self.get, k) for k in chunk])
                continue
            body = msgspec.json.encode({"keys": chunk, "encoding": "base64"})
            response = await self._send(
                "POST",
                self._url("", base=True),
                headers={"content-type": "application/json"},
                content=body,
            )
            if response.status_code == 405 and not self._kvstorage:
                records += await self._concurrently([functools.partial(self.get, k) for k in chunk])
                continue
            if response.status_code != 200:
                raise self._fail(response, "reading a batch")
            now = time.time()
            for item in _BATCH_ANSWER.decode(response.content):
                if item is None:
                    records.append(None)
                    continue
                expires_at = item.expires_at
                if expires_at is None and item.ttl is not None:
                    expires_at = now + item.ttl
                records.append(Record(item.base64, item.etag, item.mtime, expires_at))
        return records

    async def set_many(
        self, items: Sequence[tuple[str, bytes]], *, expires_at: float | None = None
    ) -> None:
        await self._concurrently(
            [functools.partial(self.set, k, v, expires_at=expires_at) for k, v in items]
        )

    async def remove_many(self, keys: Sequence[str]) -> int:
        return sum(await self._concurrently([functools.partial(self.remove, k) for k in keys]))

    async def _concurrently(self, calls: Sequence[Callable[[], Awaitable[T]]]) -> list[T]:
        """Run ``calls`` at most :data:`_CONCURRENCY` at a time; results in order. The
        first failure is raised as itself (not as an exception group)."""
        if len(calls) <= 1:
            return [await call() for call in calls]
        results: list[Any] = [None] * len(calls)
        limiter = anyio.CapacityLimiter(_CONCURRENCY)

        async def run(index: int, call: Callable[[], Awaitable[T]]) -> None:
            async with limiter:
                results[index] = await call()

        try:
            async with anyio.create_task_group() as group:
                for index, call in enumerate(calls):
                    group.start_soon(run, index, call)
        except BaseExceptionGroup as failures:
            raise _first_leaf(failures) from None
        return results

    # -- listing --------------------------------------------------------------------------

    async def scan(
        self, base: str = "", *, max_depth: int | None = None
    ) -> AsyncGenerator[str, None]:
        url = self._url(base, base=True)
        if max_depth is not None:  # a kvstorage server filters; unstorage's ignores it
            url += f"?max_depth={max_depth}"
        client = self._client or self._open()
        try:
            async with client.stream("GET", url, headers=self._headers) as response:
                self._kvstorage = wire.PROTOCOL_HEADER in response.headers
                if response.status_code != 200:
                    await response.aread()
                    raise self._fail(response, f"listing {base!r}")
                if self._kvstorage:  # one key a line: decoded a chunk of lines at a time
                    async for keys in _line_batches(response.aiter_bytes()):
                        for key in self._under(keys, base, trusted=True):
                            yield key
                    return
                listed = _decode_json(await response.aread())
                if not isinstance(listed, list):
                    raise DriverError(f"listing {base!r} at {self.url}: not a JSON array")
                decoded = [_from_unstorage(key) for key in listed if isinstance(key, str)]
                for key in self._under(decoded, base, trusted=False):
                    yield key
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc

    def _under(self, listed: list[str], base: str, *, trusted: bool) -> list[str]:
        """The listed keys (``/``-separated, relative to the server) that lie under
        ``base``, relative to this driver's root. Keys from other servers are also
        checked (a kvstorage server lists only keys it accepted)."""
        within = self._root_prefix + (base + ":" if base else "")
        strip = len(self._root_prefix)
        keys = [key for path in listed if (key := path.replace("/", ":")).startswith(within)]
        if not trusted:
            keys = [key for key in keys if key != within and _valid(key)]
        return [key[strip:] for key in keys] if strip else keys

    async def clear(self, base: str = "") -> None:
        if self._kvstorage is None:
            await self._send("HEAD", self._url(base, base=True))  # learn what the server is
        if not self._kvstorage:  # unstorage clears whole mounts only: list and remove
            await super().clear(base)
            return
        response = await self._send("DELETE", self._url(base, base=True))
        if not 200 <= response.status_code < 300:
            raise self._fail(response, f"writing (clearing) {base!r}")

    async def dispose(self) -> None:
        client, self._client = self._client, None
        if client is not None and client is not self._given:
            with anyio.CancelScope(shield=True):
                await client.aclose()
