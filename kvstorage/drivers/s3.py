"""S3Driver: one object per key in an S3 bucket (AWS or any S3-compatible server), through
aiobotocore. Runs on asyncio only (aiobotocore is asyncio-only).

**Object names.** Key ``a:b`` is the object ``<prefix>/a/b``. Within a segment, every
character outside ``A-Z a-z 0-9 - _ . ~ ! * ' ( )`` is percent-encoded (UTF-8), so the
mapping is reversible and no key can leave the prefix. Listing skips objects whose
names are not the encoding of a valid key (written by other tools).

**Etags and conditions.** An S3 ETag is the MD5 of the content, so rewriting the same
bytes would keep it and let a stale ``If-Match`` succeed. Every object therefore ends
with a trailer of 32 or 33 random bytes of JSON whitespace (space, tab, CR, LF; its
length is in the object metadata and it is stripped on read): the ETag changes on
every write, and ``if_match`` is S3's own atomic ``If-Match`` on it. Objects holding
JSON stay valid JSON for other tools. ``if_absent`` is ``If-None-Match: *``; when the
object exists but has expired, it is replaced with ``If-Match`` on its ETag, so of
several writers racing for an expired key exactly one wins. The etag returned is the
S3 ETag, followed by ``@<expires_at>`` for objects with a TTL so that ``if_match``
refuses an expired version without a HEAD. (moto checks the conditions but not under
a lock, so against moto they are atomic only in practice, not by guarantee.) When
botocore retried a conditional write after an error and the retry fails its
condition, the first attempt may have been applied: if the object holds what was
sent, the write succeeded, otherwise :class:`~kvstorage.errors.DriverError` says the
outcome is unknown (never a false "condition failed" that would make ``update_item``
apply its function twice).

**TTL** is stored in the object metadata and enforced on read (S3 has no per-object
expiry; run ``storage.sweep()`` to delete expired objects). Listing does not return
metadata, so the trailer length is chosen to make objects with a TTL odd-sized and
the others even-sized: listing HEADs only odd-sized objects to skip expired ones.

``remove``/``remove_items`` HEAD each key first to report whether it existed, then
delete (DeleteObjects, in chunks of 1000); ``clear`` lists and deletes without HEADs.
``sweep`` deletes an expired object only if its ETag is unchanged, so a concurrent
rewrite survives.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import math
import os
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping, Sequence
from contextlib import AsyncExitStack
from typing import Any, NoReturn, TypeVar
from urllib.parse import parse_qs, quote, unquote, urlsplit

from botocore.exceptions import ClientError, ConnectionClosedError
from botocore.exceptions import ConnectionError as BotoConnectionError

from ..errors import ConditionFailedError, DriverError, DriverUnavailableError
from ..keys import normalize_key
from ..urls import redact_url
from .base import Capabilities, Driver, Record, Stat, is_expired, require_asyncio

__all__ = ["S3Driver"]

_T = TypeVar("_T")
_R = TypeVar("_R")

# Characters kept as they are in object names (AWS's "safe characters"); everything else in
# a key segment, including `%` and all non-ASCII, is percent-encoded as UTF-8.
_SAFE = "!*'()"
# The write id that ends every object: random bytes mapped onto JSON whitespace.
_TRAILER = 32
_WHITESPACE = bytes(b" \t\n\r"[i & 3] for i in range(256))
_PAD = "kv-pad"  # object metadata: trailer length
_EXPIRES = "kv-expires"  # object metadata: absolute expiry, Unix seconds
_DELETE_BATCH = 1000  # the most keys one DeleteObjects call takes


class S3Driver(Driver):
    """Stores each key as one object in an S3 bucket, under ``prefix``.

    Works with AWS and with any S3-compatible server (``endpoint_url``); runs on asyncio
    only (aiobotocore), and raises :class:`~kvstorage.errors.DriverError` under trio.

    Args:
        bucket: the bucket; it must exist.
        prefix: object-name prefix that namespaces every key (``"app"`` and ``"app/"`` are
            the same); nothing outside it is ever read, listed or deleted.
        endpoint_url: URL of an S3-compatible server (default: AWS).
        region: region name (default: from the AWS configuration).
        client: a ready aiobotocore S3 client, used as is and never closed.
        max_concurrency: requests in flight at once within one batch call (``get_items``,
            ``set_items``, ``remove_items``) and for the HEADs of one listing page.
        conditional_writes: the server honours ``If-None-Match: *`` and ``If-Match`` on
            PutObject (AWS since 2024, MinIO, Ceph, R2, moto). Pass False for a server that
            ignores them: the core then serializes conditional writes with a lock, which
            is atomic only within this process.
        client_options: extra keyword arguments for ``session.create_client`` (credentials,
            ``config=AioConfig(...)``, ``verify``, ...).

    Credentials come from ``client_options`` or the usual AWS sources (environment,
    config files, instance roles). The client is created on first use (from one
    aiobotocore session shared by all drivers, which caches the service model and the
    credentials) and closed by :meth:`dispose`. Its defaults: a connection pool of at
    least ``max_concurrency``, botocore's ``standard`` retry mode with 3 attempts and a
    5 s connect timeout, so an unreachable endpoint raises
    :class:`~kvstorage.errors.DriverUnavailableError` (naming it) within seconds; a
    ``config`` in ``client_options`` overrides them.
    """

    name = "s3"
    capabilities = Capabilities(max_depth=True, conditions=True, asyncio_only=True)

    def __init__(
        self,
        bucket: str,
        *,
        prefix: str = "",
        endpoint_url: str | None = None,
        region: str | None = None,
        client: Any = None,
        max_concurrency: int = 16,
        conditional_writes: bool = True,
        client_options: Mapping[str, Any] | None = None,
    ) -> None:
        if not bucket:
            raise ValueError("bucket must not be empty")
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be at least 1")
        prefix = prefix.strip("/")
        self.bucket = bucket
        self.prefix = prefix + "/" if prefix else ""
        self.endpoint_url = endpoint_url
        self.region = region
        self.max_concurrency = max_concurrency
        if not conditional_writes:
            self.capabilities = dataclasses.replace(self.capabilities, conditions=False)
        self._client_options = dict(client_options or {})
        self._client: Any = None  # set by _connect on first use
        self._given_client = client
        self._stack: AsyncExitStack | None = None
        self._connecting: asyncio.Lock | None = None

    @classmethod
    def from_url(cls, url: str) -> S3Driver:
        """Build from ``s3://bucket/prefix?endpoint_url=...&region=...`` (also
        ``max_concurrency=16`` and ``conditional_writes=false``)."""
        shown = redact_url(url)
        parts = urlsplit(url)
        query = {name: values[-1] for name, values in parse_qs(parts.query).items()}
        unknown = set(query) - {"endpoint_url", "region", "max_concurrency", "conditional_writes"}
        if unknown:
            names = ", ".join(sorted(unknown))
            raise ValueError(f"unknown option(s) in S3 URL {shown!r}: {names}")
        if "@" in parts.netloc:
            raise ValueError(
                f"S3 URL {shown!r} holds credentials: give them the usual AWS way "
                "(environment, config file or role), not in the URL"
            )
        if not parts.netloc:
            raise ValueError(f"S3 URL {shown!r} names no bucket (s3://bucket/prefix)")
        conditional = query.get("conditional_writes", "true").lower()
        if conditional not in ("true", "false", "1", "0"):
            raise ValueError(f"conditional_writes must be true or false in {shown!r}")
        return cls(
            parts.netloc,
            prefix=parts.path,
            endpoint_url=query.get("endpoint_url"),
            region=query.get("region"),
            max_concurrency=int(query.get("max_concurrency", 16)),
            conditional_writes=conditional in ("true", "1"),
        )

    def __repr__(self) -> str:
        where = f", endpoint_url={redact_url(self.endpoint_url)!r}" if self.endpoint_url else ""
        return f"S3Driver({self.bucket!r}, prefix={self.prefix!r}{where})"

    # -- client and errors --------------------------------------------------------------

    async def _connect(self) -> Any:
        require_asyncio(self.name)
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self._client is None and self._given_client is not None:
                self._client = self._given_client
            elif self._client is None:
                from aiobotocore.config import AioConfig

                options = dict(self._client_options)
                config = AioConfig(
                    max_pool_connections=max(self.max_concurrency, 10),
                    retries={"mode": "standard", "max_attempts": 3},
                    connect_timeout=5,
                )
                if options.get("config") is not None:
                    config = config.merge(options["config"])
                options["config"] = config
                stack = AsyncExitStack()
                client = _session().create_client(
                    "s3", region_name=self.region, endpoint_url=self.endpoint_url, **options
                )
                self._client = await stack.enter_async_context(client)
                self._stack = stack
        return self._client

    def _fail(self, exc: Exception) -> NoReturn:
        """Re-raise a botocore exception as ours: unreachable endpoint or S3 error code."""
        if isinstance(exc, BotoConnectionError | ConnectionClosedError):
            where = self.endpoint_url or f"AWS S3 ({self.region or 'default region'})"
            raise DriverUnavailableError(f"cannot reach {where}: {exc}", driver=self.name) from exc
        if isinstance(exc, ClientError):
            error = exc.response.get("Error", {})
            code, message = error.get("Code", "?"), error.get("Message", "")
            raise DriverError(
                f"S3 {code} on bucket {self.bucket!r}: {message}", driver=self.name
            ) from exc
        raise exc

    # -- object names -------------------------------------------------------------------

    def _name(self, key: str) -> str:
        return self.prefix + _encode(key)

    def _key(self, name: str) -> str | None:
        """The key stored at object ``name``, or None if no key encodes to it."""
        relative = name[len(self.prefix) :]
        try:
            key = ":".join(unquote(segment, errors="strict") for segment in relative.split("/"))
            if normalize_key(key) != key or _encode(key) != relative:
                return None
        except (ValueError, UnicodeError):
            return None
        return key

    # -- reading ------------------------------------------------------------------------

    async def _object(self, key: str, *, with_body: bool) -> dict[str, Any] | None:
        """GetObject (its body read into ``"Data"``) or HeadObject of ``key``; None when
        the object does not exist."""
        client = self._client or await self._connect()
        name = self._name(key)
        try:
            if not with_body:
                response: dict[str, Any] = await client.head_object(Bucket=self.bucket, Key=name)
                return response
            response = await client.get_object(Bucket=self.bucket, Key=name)
            async with response["Body"] as body:
                response["Data"] = await body.read()
            return response
        except Exception as exc:
            if isinstance(exc, ClientError) and _code(exc) in ("NoSuchKey", "404"):
                return None
            self._fail(exc)

    async def get(self, key: str) -> Record | None:
        response = await self._object(key, with_body=True)
        if response is None:
            return None
        data = response["Data"]
        metadata = response["Metadata"]
        pad = int(metadata.get(_PAD, 0))
        expires_at = _expires(metadata)
        return Record(
            data[: len(data) - pad] if pad else data,
            _etag(response["ETag"], expires_at),
            response["LastModified"].timestamp(),
            expires_at,
        )

    async def head(self, key: str) -> Stat | None:
        response = await self._object(key, with_body=False)
        if response is None:
            return None
        metadata = response["Metadata"]
        expires_at = _expires(metadata)
        return Stat(
            response["ContentLength"] - int(metadata.get(_PAD, 0)),
            _etag(response["ETag"], expires_at),
            response["LastModified"].timestamp(),
            expires_at,
        )

    async def get_many(self, keys: Sequence[str]) -> list[Record | None]:
        return await self._map(self.get, keys)

    # -- writing ------------------------------------------------------------------------

    async def set(
        self,
        key: str,
        value: bytes,
        *,
        expires_at: float | None = None,
        if_absent: bool = False,
        if_match: str | None = None,
    ) -> None:
        if if_match is not None:
            s3_etag, _, expiry = if_match.partition("@")
            if expiry and _parse_float(expiry) <= time.time():
                raise ConditionFailedError(f"key {key!r} has expired")
            if not await self._put(key, value, expires_at, IfMatch=f'"{s3_etag}"'):
                raise ConditionFailedError(f"etag of {key!r} does not match")
        elif if_absent:
            await self._put_if_absent(key, value, expires_at)
        else:
            await self._put(key, value, expires_at)

    async def _put_if_absent(self, key: str, value: bytes, expires_at: float | None) -> None:
        while True:
            if await self._put(key, value, expires_at, IfNoneMatch="*"):
                return
            current = await self.head(key)
            if current is None:
                continue  # deleted since: try to create it again
            if not is_expired(current.expires_at):
                raise ConditionFailedError(f"key {key!r} already exists")
            # Expired counts as absent: replace exactly the expired object (one racer wins).
            s3_etag = current.etag.partition("@")[0]
            if await self._put(key, value, expires_at, IfMatch=f'"{s3_etag}"'):
                return

    async def _put(
        self, key: str, value: bytes, expires_at: float | None, **condition: str
    ) -> bool:
        """PutObject with the trailer and metadata; False when ``condition`` fails."""
        # An odd total size marks objects with an expiry (see the class docstring).
        pad = _TRAILER + ((len(value) + _TRAILER) % 2 != (expires_at is not None))
        metadata = {_PAD: str(pad)}
        if expires_at is not None:
            metadata[_EXPIRES] = repr(float(expires_at))
        client = self._client or await self._connect()
        body = value + os.urandom(pad).translate(_WHITESPACE)
        try:
            await client.put_object(
                Bucket=self.bucket, Key=self._name(key), Body=body, Metadata=metadata, **condition
            )
        except ClientError as exc:
            # 412: the condition is false; 404: If-Match on a missing object; 409: a
            # concurrent conditional write to the same key won.
            if condition and _code(exc) in (
                "PreconditionFailed",
                "NoSuchKey",
                "ConditionalRequestConflict",
            ):
                if exc.response.get("ResponseMetadata", {}).get("RetryAttempts"):
                    return await self._retried_put_landed(key, body)
                return False
            self._fail(exc)
        except Exception as exc:
            self._fail(exc)
        return True

    async def _retried_put_landed(self, key: str, body: bytes) -> bool:
        """A conditional PUT that botocore retried failed its condition: an earlier
        attempt may have been applied before its response was lost (a 5xx or a broken
        connection after the write), and then it was our own write that failed the
        condition. True if the object holds our body (unique thanks to the random
        trailer; a single-part ETag is its MD5); otherwise the outcome is unknown, and
        reporting a failed condition could make ``update_item`` apply its function twice.
        """
        stat = await self.head(key)
        if stat is not None and stat.etag.partition("@")[0] == _md5(body):
            return True
        raise DriverError(
            f"conditional write of {key!r} to bucket {self.bucket!r} was retried after an "
            "error and its condition then failed; an earlier attempt may have been applied",
            driver=self.name,
        )

    async def set_many(
        self, items: Sequence[tuple[str, bytes]], *, expires_at: float | None = None
    ) -> None:
        async def put(item: tuple[str, bytes]) -> bool:
            return await self._put(item[0], item[1], expires_at)

        await self._map(put, items)

    # -- deleting -----------------------------------------------------------------------

    async def remove(self, key: str) -> bool:
        return await self.remove_many([key]) == 1

    async def remove_many(self, keys: Sequence[str]) -> int:
        keys = list(dict.fromkeys(keys))
        stats = await self._map(self.head, keys)
        found = [key for key, stat in zip(keys, stats, strict=True) if stat is not None]
        for start in range(0, len(found), _DELETE_BATCH):
            await self._delete([self._name(key) for key in found[start : start + _DELETE_BATCH]])
        return sum(stat is not None and not is_expired(stat.expires_at) for stat in stats)

    async def _delete(self, names: list[str]) -> None:
        """Delete up to 1000 objects in one DeleteObjects call."""
        client = self._client or await self._connect()
        if len(names) == 1:
            try:
                await client.delete_object(Bucket=self.bucket, Key=names[0])
            except Exception as exc:
                self._fail(exc)
            return
        try:
            response = await client.delete_objects(
                Bucket=self.bucket,
                Delete={"Objects": [{"Key": name} for name in names], "Quiet": True},
            )
        except Exception as exc:
            self._fail(exc)
        errors = response.get("Errors")
        if errors:
            first = errors[0]
            raise DriverError(
                f"S3 {first.get('Code')} deleting {len(errors)} object(s) from bucket "
                f"{self.bucket!r}, first {first.get('Key')!r}: {first.get('Message')}",
                driver=self.name,
            )

    async def clear(self, base: str = "") -> None:
        async for page in self._pages(base, None):
            for start in range(0, len(page), _DELETE_BATCH):
                await self._delete([name for name, _, _ in page[start : start + _DELETE_BATCH]])

    async def sweep(self, base: str = "") -> int:
        async def delete_if_expired(item: tuple[str, str, int]) -> bool:
            name, key, _ = item
            stat = await self.head(key)
            if stat is None or not is_expired(stat.expires_at):
                return False
            client = self._client or await self._connect()
            try:  # only the expired version: a concurrent rewrite survives
                etag = stat.etag.partition("@")[0]
                await client.delete_object(Bucket=self.bucket, Key=name, IfMatch=f'"{etag}"')
            except ClientError as exc:
                if _code(exc) in ("PreconditionFailed", "NoSuchKey", "404"):
                    return False
                self._fail(exc)
            except Exception as exc:
                self._fail(exc)
            return True

        swept = 0
        async for page in self._pages(base, None):
            candidates = [item for item in page if item[2] % 2]  # odd size: has an expiry
            swept += sum(await self._map(delete_if_expired, candidates))
        return swept

    # -- listing ------------------------------------------------------------------------

    async def scan(
        self, base: str = "", *, max_depth: int | None = None
    ) -> AsyncGenerator[str, None]:
        async for page in self._pages(base, max_depth):
            candidates = [key for _, key, size in page if size % 2]
            expired: set[str] = set()
            if candidates:
                stats = await self._map(self.head, candidates)
                expired = {
                    key
                    for key, stat in zip(candidates, stats, strict=True)
                    if stat is None or is_expired(stat.expires_at)
                }
            for _, key, _ in page:
                if key not in expired:
                    yield key

    async def _pages(
        self, base: str, max_depth: int | None
    ) -> AsyncGenerator[list[tuple[str, str, int]], None]:
        """Yield the ListObjectsV2 pages under ``base`` as ``(name, key, size)`` lists,
        keeping only names that encode a key within ``max_depth``."""
        client = self._client or await self._connect()
        prefix = self.prefix + (_encode(base) + "/" if base else "")
        request: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix}
        if max_depth == 0:
            request["Delimiter"] = "/"  # direct children only; sub-"folders" not listed
        while True:
            try:
                response = await client.list_objects_v2(**request)
            except Exception as exc:
                self._fail(exc)
            page = []
            for item in response.get("Contents", ()):
                name = item["Key"]
                if max_depth is not None and name.count("/", len(prefix)) > max_depth:
                    continue
                key = self._key(name)
                if key is not None:
                    page.append((name, key, item["Size"]))
            yield page
            if not response.get("IsTruncated"):
                return
            request["ContinuationToken"] = response["NextContinuationToken"]

    # -- helpers ------------------------------------------------------------------------

    async def _map(self, fn: Callable[[_T], Awaitable[_R]], items: Sequence[_T]) -> list[_R]:
        """``[await fn(item) for item in items]`` with up to ``max_concurrency`` at once."""
        if len(items) <= 1:
            return [await fn(item) for item in items]
        results: list[Any] = [None] * len(items)
        pending = iter(enumerate(items))

        async def worker() -> None:
            for index, item in pending:
                results[index] = await fn(item)

        try:
            async with asyncio.TaskGroup() as group:
                for _ in range(min(self.max_concurrency, len(items))):
                    group.create_task(worker())
        except BaseExceptionGroup as failures:
            first = failures.exceptions[0]  # raised below as is, keeping its own cause
        else:
            return results
        raise first

    async def dispose(self) -> None:
        stack, self._stack = self._stack, None
        self._client = None
        if stack is not None:
            await stack.aclose()


_shared_session: Any = None


def _session() -> Any:
    """One aiobotocore session for every driver: it caches the parsed service model (a
    new session costs ~0.1 s per client) and the resolved credentials."""
    global _shared_session
    if _shared_session is None:
        from aiobotocore.session import get_session

        _shared_session = get_session()
    return _shared_session


def _encode(key: str) -> str:
    """``a:b c`` -> ``a/b%20c``: each segment percent-encoded, joined by ``/``."""
    return "/".join(quote(segment, safe=_SAFE) for segment in key.split(":"))


def _md5(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def _parse_float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return math.inf  # not one of our etags: S3 will find that it does not match


def _code(exc: ClientError) -> str:
    code: str = exc.response.get("Error", {}).get("Code", "")
    return code


def _expires(metadata: Mapping[str, str]) -> float | None:
    expires = metadata.get(_EXPIRES)
    return None if expires is None else float(expires)


def _etag(s3_etag: str, expires_at: float | None) -> str:
    """Our etag: the S3 ETag, plus the expiry when there is one (so ``if_match`` can
    refuse an expired version without a HEAD)."""
    etag = s3_etag.strip('"')
    return etag if expires_at is None else f"{etag}@{expires_at!r}"
