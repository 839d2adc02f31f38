"""RedisDriver: Redis or a Redis Cluster through ``redis.asyncio``. Runs on asyncio only.

Layout
------
Every item is one Redis string at ``<base>:<key>`` (``<key>`` when ``base`` is empty)
holding a 32-byte header followed by the value bytes::

    offset  size  field
    0       4     magic  b"KVS\\x01"
    4       12    etag   random bytes, new on every write (hex in ``Record.etag``)
    16      8     mtime  float64 little-endian, Unix seconds of the write
    24      8     expiry float64 little-endian, Unix seconds, 0.0 = none

So a read is one ``GET``, a write one ``SET`` (with ``PXAT``: Redis expires the key
itself, to the millisecond), a batch one ``MGET`` / ``MSET`` -- the same commands and round
trips as a bare client. Only ``if_match`` writes (a Lua script comparing the first 16
bytes), ``touch`` (a script rewriting the expiry field in place with ``SETRANGE`` and
calling ``PEXPIREAT`` / ``PERSIST``) and ``head`` (a script reading header and length) run
scripts, with ``EVALSHA`` and an ``EVAL`` fallback. ``if_absent`` is ``SET NX``. Values
written by other tools under ``base`` (without the header) raise ``DriverError`` when read
or touched, and are left as they are.
Conditional writes are never resent by redis-py's retry after a broken connection (the
first may have been applied; see ``RedisDriver._once``). ``GET``, ``SET`` and ``MGET`` on a
single server are packed by the driver (``_redis_wire.pack_command``, cheaper than redis-py's
generic packing) and sent on the client's own pool with its retry. The calls made one at a
time go on a *lane* (``_redis_wire.Lane``): one connection of that pool kept by the driver,
written to and read from directly, with no pool checkout and no timer or task per call;
calls made meanwhile take the pool.

Expiry is an absolute time (``PXAT``, rounded down to the millisecond), so Redis drops a key
no later than the header says; this needs Redis 6.2+ and clocks on clients and server that
agree (NTP).

Listing uses ``SCAN`` with ``MATCH <escaped base>:*`` and ``COUNT 1000``, streamed. Like
``SCAN`` itself, a key may in rare cases be listed twice when the database shrinks during
the scan (deduplicating would mean holding every key in memory).

Cluster
-------
Keys of one base spread over every hash slot. Batches are split per slot (one ``MGET`` /
``MSET`` / ``UNLINK`` per slot, all sent as one cluster pipeline, so one round trip per
node) and never raise ``CROSSSLOT``; a batch is then atomic per slot only. Listing runs
``SCAN`` on every primary. Keyspace notifications are per node, so a cluster driver does not
declare native watching: the storage reports the changes made through it.

Concurrency
-----------
Concurrent ``get`` calls are auto-pipelined (``_batching.ReadBatcher``): while one read is
on the wire, the reads issued meanwhile are collected for one event-loop tick and sent as a
single ``MGET`` instead of taking a pool connection and a round trip each.

Errors
------
A server that is down, unreachable or hung raises ``DriverUnavailableError`` naming it by
the URL with its secrets redacted (or by the address of a given client); every call
translates them through one context manager, ``_Unreachable``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import random
import struct
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from functools import partial
from types import TracebackType
from typing import Any, Literal, cast
from urllib.parse import SplitResult, parse_qsl, unquote, urlencode, urlsplit, urlunsplit

from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import parse_url
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import (
    AskError,
    ClusterDownError,
    ConnectionError,
    MovedError,
    NoScriptError,
    RedisClusterException,
    ResponseError,
    TimeoutError,
)

from ..errors import ConditionFailedError, DriverError, DriverUnavailableError
from ..keys import normalize_base
from ..urls import redact_url
from ._batching import ReadBatcher
from ._redis_wire import (
    Lane,
    glob_escape,
    pack_command,
    pack_get,
    pack_set,
    round_trip,
)
from .base import (
    Capabilities,
    Driver,
    EmitEvent,
    Record,
    Stat,
    pages_of,
    require_asyncio,
)

__all__ = ["RedisDriver"]

logger = logging.getLogger("kvstorage")

AnyRedis = Redis | RedisCluster

_MAGIC = b"KVS\x01"
_HEADER = struct.Struct("<4s12sdd")  # magic, etag, mtime, expiry
_HEADER_SIZE = _HEADER.size
_ETAG = slice(4, 16)  # where the etag lies in the header
_EXPIRY = struct.Struct("<d")
_random_bits = random.getrandbits
#: The running asyncio loop, or None (under trio: the first call then says asyncio only).
_running_loop = asyncio._get_running_loop
_UNREACHABLE = (ConnectionError, TimeoutError, ClusterDownError, OSError)
_SCAN_COUNT = 1000
#: Keyspace events a watcher needs: K keyspace channel, g generic (del), $ strings (set),
#: x expired, e evicted.
_NOTIFY_FLAGS = "Kg$xe"


class _Script:
    """A Lua script run with EVALSHA, falling back to EVAL when the server lost it."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    async def __call__(
        self, execute: Callable[..., Awaitable[Any]], key: str, *args: bytes | int | str
    ) -> Any:
        """Run with ``execute`` (``client.execute_command`` or ``RedisDriver._once``)."""
        try:
            return await execute("EVALSHA", self.sha, 1, key, *args)
        except NoScriptError:
            return await execute("EVAL", self.source, 1, key, *args)


_SET_IF_MATCH = _Script(
    """
local current = redis.call('GET', KEYS[1])
if not current or string.sub(current, 1, 16) ~= ARGV[2] then return 0 end
if ARGV[3] == '0' then
  redis.call('SET', KEYS[1], ARGV[1])
else
  redis.call('SET', KEYS[1], ARGV[1], 'PXAT', ARGV[3])
end
return 1
"""
)
_TOUCH = _Script(
    f"""
local header = redis.call('GETRANGE', KEYS[1], 0, {_HEADER_SIZE - 1})
if #header < {_HEADER_SIZE} or string.sub(header, 1, {len(_MAGIC)}) ~= ARGV[3] then
  if header == '' and redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
  return -1
end
redis.call('SETRANGE', KEYS[1], 24, ARGV[1])
if ARGV[2] == '0' then
  redis.call('PERSIST', KEYS[1])
else
  redis.call('PEXPIREAT', KEYS[1], ARGV[2])
end
return 1
"""
)
_HEAD = _Script(
    f"""
local header = redis.call('GETRANGE', KEYS[1], 0, {_HEADER_SIZE - 1})
if header == '' then return false end
return {{header, redis.call('STRLEN', KEYS[1])}}
"""
)


def _pack(value: bytes, expires_at: float | None) -> bytes:
    # 96 random bits: unique, not secret (the random module reseeds in forked children)
    etag = _random_bits(96).to_bytes(12, "little")
    return _HEADER.pack(_MAGIC, etag, time.time(), expires_at or 0.0) + value


def _pxat(expires_at: float | None) -> int | None:
    """``expires_at`` in Unix milliseconds for ``PXAT`` / ``PEXPIREAT``, early enough that
    Redis never keeps a key its header calls expired.

    Redis drops a key once its clock in whole milliseconds is *past* the given time, so
    the time is the millisecond before the one ``expires_at`` falls in: a listing right
    after a read that found the item expired must not name it any more.
    """
    return None if expires_at is None else math.floor(expires_at * 1000) - 1


def _valid(data: bytes) -> bool:
    return data.startswith(_MAGIC) and len(data) >= _HEADER_SIZE


def _decode(data: bytes) -> Record:
    """The record stored in ``data`` (header + value); ValueError if it has no header."""
    return cast(Record, _decode_many([data])[0])


def _decode_many(values: list[bytes | None]) -> list[Record | None]:
    """The records stored in ``values`` (None stays None); ValueError if one has no
    header. One loop, no call per value: this is the per-key cost of ``MGET``."""
    unpack, make = _HEADER.unpack_from, Record
    records: list[Record | None] = []
    append = records.append
    try:
        for data in values:
            if data is None:
                append(None)
                continue
            magic, etag, mtime, expires_at = unpack(data)
            if magic != _MAGIC:
                raise ValueError("no kvstorage header")
            append(make(data[_HEADER_SIZE:], etag.hex(), mtime, expires_at or None))
    except struct.error:
        raise ValueError("no kvstorage header") from None
    return records


def _token(etag: str) -> bytes | None:
    """The 16 stored header bytes an etag stands for, or None when it is not one of ours."""
    try:
        raw = bytes.fromhex(etag)
    except ValueError:
        return None
    return _MAGIC + raw if len(raw) == 12 else None


def _check_url(parts: SplitResult, shown: str) -> list[tuple[str, int]]:
    """Check the ports and database number of a redis URL (redis-py would ignore a bad
    database number and fail on a bad port only at the first call); ValueError showing
    the URL as ``shown`` (redacted). Returns the ``(host, port)`` of each node of a
    ``redis+cluster://`` URL, ``[]`` for the other schemes."""
    scheme = parts.scheme.lower()
    try:
        if scheme == "redis+cluster":
            nodes = []
            for address in parts.netloc.rpartition("@")[2].split(","):
                host, colon, port = address.rpartition(":")
                if not colon:  # no port
                    host, port = address, ""
                nodes.append((host or "127.0.0.1", int(port or 6379)))
            return nodes
        if scheme in {"redis", "rediss"}:  # as redis-py reads them
            int(parts.port or 0)
            int(unquote(parts.path).replace("/", "") or 0)
    except ValueError:
        raise ValueError(f"bad port or database number in redis URL {shown!r}") from None
    return []


def _forget_connections(client: AnyRedis) -> None:
    """Drop the connections of ``client`` without closing them (they belong to an event
    loop that is gone); it opens new ones when next used."""
    if isinstance(client, Redis):
        client.connection_pool.reset()  # type: ignore[no-untyped-call,unused-ignore]
        return
    # Each cluster node keeps its own connections; redis-py can close them (an await on
    # their loop) but not forget them, so their lists are emptied as the pool's reset does.
    for node in [*client.get_nodes(), *client.nodes_manager.startup_nodes.values()]:
        node._connections.clear()
        node._free.clear()


class _Watch:
    """One ``watch`` of a driver: its callback, and the subscription and task listening
    for it on one event loop (None before the first subscription)."""

    __slots__ = ("emit", "pubsub", "task")

    def __init__(self, emit: EmitEvent) -> None:
        self.emit = emit
        self.pubsub: PubSub | None = None
        self.task: asyncio.Task[None] | None = None

    @property
    def live(self) -> bool:
        """Listening on the running event loop."""
        return self.task is not None and self.task.get_loop() is _running_loop()

    async def close(self) -> None:
        """Stop listening and unsubscribe. What another event loop started is dropped: its
        task ended with that loop, and its connection cannot be closed from this one."""
        live, pubsub, task = self.live, self.pubsub, self.task
        self.pubsub = self.task = None
        if live and task is not None and pubsub is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await pubsub.aclose()  # type: ignore[no-untyped-call,unused-ignore]


class _Unreachable:
    """Context manager: a connection failure (one of ``errors``) raised inside becomes
    :class:`~kvstorage.errors.DriverUnavailableError` naming the server as ``where()``
    shows it (never a password). One instance per driver, reused by every call."""

    __slots__ = ("_driver", "_errors", "_where")

    def __init__(
        self,
        where: Callable[[], str],
        driver: str,
        errors: tuple[type[BaseException], ...] = _UNREACHABLE,
    ) -> None:
        self._where = where
        self._driver = driver
        self._errors = errors

    def including(self, *errors: type[BaseException]) -> _Unreachable:
        """The same, translating ``errors`` too."""
        return _Unreachable(self._where, self._driver, (*self._errors, *errors))

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if isinstance(exc, self._errors):
            raise self.error(exc) from exc

    def error(self, exc: BaseException) -> DriverUnavailableError:
        """The error to raise for ``exc``, one of ``errors`` (for a hot path that catches
        them itself: an ``except`` costs nothing until it catches)."""
        message = f"cannot reach {self._where()}: {exc}"
        return DriverUnavailableError(message, driver=self._driver)


class RedisDriver(Driver):
    """Stores items in Redis (standalone or Cluster) under ``base``, with native TTL.

    Runs on asyncio only (``redis.asyncio``); under trio the first call raises
    :class:`~kvstorage.errors.DriverError`.

    Args:
        url: ``redis://[user:password@]host:port/db``, ``rediss://...`` (TLS),
            ``unix:///path.sock`` or ``redis+cluster://host:port,host:port``. A ``base``
            query parameter sets ``base``; the other query parameters go to redis-py.
            Default ``redis://127.0.0.1:6379/0``.
        client: a ready ``redis.asyncio.Redis`` or ``RedisCluster`` to use instead of
            ``url``; it must not decode responses. It is used as is and never closed.
        base: namespace of every key (``"app"`` stores ``users:1`` at ``app:users:1``).
            Nothing outside it is ever read, listed or deleted. ``""`` uses the whole
            database.
        cluster: connect to ``url`` as a Redis Cluster (implied by ``redis+cluster://``).
        timeout: seconds to connect and to wait for a reply. A call to a server that is
            down, unreachable or hung raises
            :class:`~kvstorage.errors.DriverUnavailableError` naming the address within
            about this time.
        **options: passed to ``Redis.from_url`` / ``RedisCluster``.

    Values live in a 32-byte header + value layout (see the module docstring). A broken
    connection is re-established on the next call, so a restarted server is picked up
    without a new driver. ``watch`` (standalone only) uses keyspace notifications: it turns
    on the ``notify-keyspace-events`` flags ``Kg$xe`` with ``CONFIG SET`` (adding to what
    is set, never removing) and raises :class:`~kvstorage.errors.DriverError` when they
    are missing and cannot be set. Where ``CONFIG`` is disabled altogether (managed
    services), the server must be configured with them; a warning is logged.
    """

    name = "redis"
    #: Per instance: a cluster client has no ``watch``.
    capabilities = Capabilities(
        ttl=True, watch=True, conditions=True, asyncio_only=True, exact_watch=True
    )

    def __init__(
        self,
        url: str | None = None,
        *,
        client: AnyRedis | None = None,
        base: str = "",
        cluster: bool = False,
        timeout: float = 5.0,
        **options: Any,
    ) -> None:
        if url is not None and client is not None:
            raise ValueError("pass url or client, not both")
        url = url or "redis://127.0.0.1:6379/0"
        parts = urlsplit(url)
        query = parse_qsl(parts.query, keep_blank_values=True)
        for name, value in query:
            if name == "base" and not base:
                base = value
        query = [(name, value) for name, value in query if name != "base"]
        self._url = urlunsplit(parts._replace(query=urlencode(query)))
        self._shown = redact_url(self._url)  # for repr, errors and logs
        scheme = parts.scheme.lower()
        if scheme == "redis+cluster":
            cluster = True
        elif client is None and scheme not in {"redis", "rediss", "unix"}:
            raise ValueError(f"not a redis URL: {redact_url(url)!r}")
        self._nodes = _check_url(parts, self._shown)
        if client is not None:
            cluster = isinstance(client, RedisCluster)
            if client.get_encoder().decode_responses:
                raise ValueError("the redis client must not decode responses (bytes in, out)")
        self.base = normalize_base(base)
        self._ns = self.base + ":" if self.base else ""
        self._cluster = cluster
        self._timeout = timeout
        self._options = options
        self._given = client
        self._client: AnyRedis | None = None
        self._lane: Lane | None = None  # standalone only
        self._lock: asyncio.Lock | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # of the client, lane, lock, watches
        self._reads = ReadBatcher(self._get_one, self._mget)
        self._unreachable = _Unreachable(self._where, self.name)
        self._watches: set[_Watch] = set()
        self.capabilities = Capabilities(
            ttl=True,
            watch=not cluster,
            conditions=True,
            asyncio_only=True,
            exact_watch=not cluster,
        )

    @classmethod
    def from_url(cls, url: str) -> RedisDriver:
        """Build from ``redis://host:port/db?base=app``, ``rediss://...`` or
        ``redis+cluster://host:port,host:port?base=app``."""
        return cls(url)

    def __repr__(self) -> str:
        where = self._shown if self._given is None else repr(self._given)
        return f"RedisDriver({where!r}, base={self.base!r})"

    # -- connection -----------------------------------------------------------------------

    async def _connect(self) -> AnyRedis:
        """Create the client on first use (and initialize a cluster client once: redis-py
        fails commands that race its first initialization), and again on the first use on
        another event loop, where the watches subscribe again."""
        require_asyncio(self.name)
        loop = asyncio.get_running_loop()
        if self._lock is None or self._loop is not loop:
            self._abandon()
            self._lock = asyncio.Lock()
            self._loop = loop
        async with self._lock:
            if self._client is None:
                client = self._given or self._open()
                if isinstance(client, RedisCluster):
                    # "cannot be connected" is a RedisClusterException
                    with self._unreachable.including(RedisClusterException):
                        await client.initialize()
                else:
                    try:
                        await self._resume_watches(client)
                    except BaseException:
                        if client is not self._given:
                            await client.aclose()
                        raise
                    if Lane.usable(client):
                        self._lane = Lane(client)
                self._client = client
        return self._client

    def _here(self) -> AnyRedis | None:
        """The client, when it was made on the running event loop; else None (connect)."""
        return self._client if self._loop is _running_loop() else None

    def _lane_here(self) -> Lane | None:
        """The lane, when it was made on the running event loop."""
        return self._lane if self._loop is _running_loop() else None

    def _abandon(self) -> None:
        """Drop the client and lane made on another event loop (one ``asyncio.run`` after
        another): their connections belong to that loop, most likely closed, and can be
        neither used nor closed from this one. Ours go with their sockets (closed when
        collected); a given client forgets its connections, so that it opens new ones on
        this loop."""
        self._lane = None
        client, self._client = self._client, None
        if client is not None and client is self._given:
            _forget_connections(client)

    def _open(self) -> AnyRedis:
        options: dict[str, Any] = {
            "socket_timeout": self._timeout,
            "socket_connect_timeout": self._timeout,
            "health_check_interval": 30,
        }
        options.update(self._options)
        client: AnyRedis
        if self._cluster:
            client = self._open_cluster(options)
        else:
            # One quick retry after a broken connection (a restarted server), none after a
            # timeout, so that a call fails within about `timeout`.
            retry = Retry(ExponentialBackoff(cap=0.5, base=0.05), 1, (ConnectionError,))
            options.setdefault("retry", retry)
            client = Redis.from_url(self._url, **options)
        return client

    def _open_cluster(self, options: dict[str, Any]) -> RedisCluster:
        parts = urlsplit(self._url)
        if parts.scheme.lower() != "redis+cluster":
            return RedisCluster.from_url(self._url, **options)
        userinfo, _, hosts = parts.netloc.rpartition("@")
        # redis-py parses credentials and typed query options of a one-host URL
        first = (userinfo + "@" if userinfo else "") + hosts.split(",")[0]
        parsed = dict(parse_url(urlunsplit(("redis", first, "", parts.query, ""))))
        for name in ("host", "port", "db"):
            parsed.pop(name, None)
        options = {**options, **parsed}  # as in redis-py, the URL wins
        nodes = [ClusterNode(host, port) for host, port in self._nodes]
        return RedisCluster(startup_nodes=nodes, **options)

    def _where(self) -> str:
        """The server(s) for messages: the URL with its secrets redacted, or the address of
        a given client (redis-py keeps its password out of it)."""
        client = self._given
        if isinstance(client, RedisCluster):
            nodes = client.get_nodes() or client.startup_nodes or []
            return "redis cluster " + ",".join(f"{n.host}:{n.port}" for n in nodes)
        if isinstance(client, Redis):
            kwargs = client.connection_pool.connection_kwargs
            if "path" in kwargs:
                return f"redis at unix:{kwargs['path']}"
            return f"redis at {kwargs.get('host')}:{kwargs.get('port')}/{kwargs.get('db', 0)}"
        return f"redis at {self._shown}"

    async def _call(self, client: AnyRedis, *command: Any) -> Any:
        """Run ``command`` with the client's retry: routed by redis-py on a cluster, sent by
        :func:`round_trip` (cheaper than redis-py's generic path) on a single server."""
        lane = self._lane_here()  # standalone only
        if lane is not None and not lane.busy:
            return await lane.call(pack_command(command), resend=True)
        if isinstance(client, RedisCluster):
            return await client.execute_command(*command)
        return await round_trip(client, command, resend=True)

    async def _once(self, client: AnyRedis, *command: Any) -> Any:
        """Send ``command`` and read its reply without redis-py's retry.

        A conditional write resent after its connection broke may have been applied the
        first time; the second would then fail its own condition, and ``update_item``
        would apply its function twice. So a broken connection raises instead (the write
        may or may not have been applied, as for any failed call).
        """
        lane = self._lane_here()  # standalone only
        if lane is not None and not lane.busy:
            return await lane.call(pack_command(command), resend=False)
        if isinstance(client, RedisCluster):
            # Straight to the key's primary, outside the cluster client's retry loop.
            # (Tested by tests/test_faults_network.py::
            # test_redis_cluster_conditional_writes_are_not_resent_after_a_reset.)
            key = command[3] if command[0] in ("EVALSHA", "EVAL") else command[1]
            node = client.get_node_from_key(key)
            assert node is not None  # the client is initialized in _connect
            try:
                return await node.execute_command(*command)
            except (MovedError, AskError):
                # Redirected, so not applied: the client's own routing sends it on. (That
                # path has the client's retry: a connection lost during a slot migration
                # could still resend the write -- a known gap, rare.)
                return await client.execute_command(*command)
        return await round_trip(client, command, resend=False)

    # -- single items ---------------------------------------------------------------------

    async def get(self, key: str) -> Record | None:
        try:
            data = await self._reads.read(self._ns + key)
        except _UNREACHABLE as exc:
            raise self._unreachable.error(exc) from exc
        if data is None:
            return None
        try:
            return _decode(data)
        except ValueError:
            raise self._foreign(key) from None

    def _get_one(self, name: str) -> Awaitable[bytes | None]:
        """``GET name``: a read sent alone by the read batcher (on the lane when free)."""
        lane = self._lane_here()
        if lane is not None and not lane.busy:
            return cast("Awaitable[bytes | None]", lane.call(pack_get(name), resend=True))
        return self._get_pooled(name)

    async def _get_pooled(self, name: str) -> bytes | None:
        client = self._here() or await self._connect()
        return cast("bytes | None", await self._call(client, "GET", name))

    def _foreign(self, key: str) -> DriverError:
        where = self._ns + key
        return DriverError(f"the value at {where!r} was not written by kvstorage", driver=self.name)

    async def head(self, key: str) -> Stat | None:
        with self._unreachable:
            client = self._here() or await self._connect()
            reply = await _HEAD(client.execute_command, self._ns + key)
        if reply is None:
            return None
        header, length = reply
        try:
            record = _decode(header)
        except ValueError:
            raise self._foreign(key) from None
        return Stat(length - _HEADER_SIZE, record.etag, record.mtime, record.expires_at)

    async def set(
        self,
        key: str,
        value: bytes,
        *,
        expires_at: float | None = None,
        if_absent: bool = False,
        if_match: str | None = None,
    ) -> str:
        name = self._ns + key
        data = _pack(value, expires_at)
        px = _pxat(expires_at)
        lane = self._lane_here()
        if lane is not None and not lane.busy and not if_absent and if_match is None:
            try:
                await lane.call(pack_set(name, data, px), resend=True)
            except _UNREACHABLE as exc:
                raise self._unreachable.error(exc) from exc
            return data[_ETAG].hex()
        expiry = () if px is None else ("PXAT", px)
        with self._unreachable:
            client = self._here() or await self._connect()
            if if_match is not None:
                token = _token(if_match)
                done = token is not None and await _SET_IF_MATCH(
                    partial(self._once, client), name, data, token, px or 0
                )
                if not done:
                    raise ConditionFailedError(f"etag of {key!r} does not match")
            elif if_absent:
                if not await self._once(client, "SET", name, data, *expiry, "NX"):
                    raise ConditionFailedError(f"key {key!r} already exists")
            else:
                await self._call(client, "SET", name, data, *expiry)
        return data[_ETAG].hex()

    async def remove(self, key: str) -> bool:
        name = self._ns + key
        lane = self._lane_here()
        try:
            if lane is not None and not lane.busy:
                removed: int = await lane.call(pack_command(("UNLINK", name)), resend=True)
            else:
                removed = await (self._here() or await self._connect()).unlink(name)
        except _UNREACHABLE as exc:
            raise self._unreachable.error(exc) from exc
        return removed > 0

    async def touch(self, key: str, *, expires_at: float | None) -> bool:
        expiry = _EXPIRY.pack(expires_at or 0.0)
        with self._unreachable:
            client = self._here() or await self._connect()
            done = await _TOUCH(
                client.execute_command,
                self._ns + key,
                expiry,
                _pxat(expires_at) or 0,
                _MAGIC,
            )
        if done < 0:  # left untouched, as get reports it
            raise self._foreign(key)
        return bool(done)

    # -- batches --------------------------------------------------------------------------

    async def _mget(self, names: list[str]) -> list[bytes | None]:
        """``MGET names`` (one per slot on a cluster), for get_many and the read batcher."""
        client = self._here() or await self._connect()
        if self._cluster:  # one MGET per slot, in one pipeline
            cluster = cast(RedisCluster, client)
            return cast("list[bytes | None]", await cluster.mget_nonatomic(names))
        return cast("list[bytes | None]", await self._call(client, "MGET", *names))

    async def get_many(self, keys: Sequence[str]) -> list[Record | None]:
        if not keys:
            return []
        ns = self._ns
        with self._unreachable:
            values = await self._mget([ns + key for key in keys])
        try:
            return _decode_many(values)
        except ValueError:
            bad = next(
                k for k, v in zip(keys, values, strict=True) if v is not None and not _valid(v)
            )
            raise self._foreign(bad) from None

    async def set_many(
        self, items: Sequence[tuple[str, bytes]], *, expires_at: float | None = None
    ) -> None:
        if not items:
            return
        ns = self._ns
        pairs = [(ns + key, _pack(value, expires_at)) for key, value in items]
        px = _pxat(expires_at)
        with self._unreachable:
            client = self._here() or await self._connect()
            cluster = isinstance(client, RedisCluster)
            if px is None and isinstance(client, RedisCluster):
                await client.mset_nonatomic(dict(pairs))  # one MSET per slot
            elif px is None:
                await client.mset(dict(pairs))
            else:  # one pipeline of SETs, a transaction on a single server
                async with client.pipeline(transaction=not cluster) as pipe:
                    for name, data in pairs:
                        pipe.set(name, data, pxat=px)
                    await pipe.execute()

    async def remove_many(self, keys: Sequence[str]) -> int:
        if not keys:
            return 0
        names = [self._ns + key for key in keys]
        with self._unreachable:
            client = self._here() or await self._connect()
            removed: int = await client.unlink(*names)  # per slot in a cluster
        return removed

    # -- listing --------------------------------------------------------------------------

    scan = Driver.scan_by_pages

    async def scan_pages(
        self, base: str = "", *, max_depth: int | None = None
    ) -> AsyncGenerator[list[str], None]:
        pattern = glob_escape(self._ns + base + ":" if base else self._ns) + "*"
        strip = len(self._ns)
        with self._unreachable:
            client = self._here() or await self._connect()
            if isinstance(client, RedisCluster):  # scan_iter walks every primary
                every = client.scan_iter(match=pattern, count=_SCAN_COUNT)
                async with contextlib.aclosing(pages_of(every)) as pages:
                    async for page in pages:
                        yield [name.decode()[strip:] for name in page]
                return
            cursor = None  # each SCAN reply is a page
            while cursor != 0:
                cursor, names = await client.scan(cursor or 0, match=pattern, count=_SCAN_COUNT)
                if names:
                    yield [name.decode()[strip:] for name in cast(list[bytes], names)]

    # -- watching -------------------------------------------------------------------------

    async def watch(self, emit: EmitEvent) -> Callable[[], Awaitable[None]]:
        """Report changes from Redis keyspace notifications (standalone servers only)."""
        client = self._here() or await self._connect()
        if isinstance(client, RedisCluster):
            raise NotImplementedError("the redis driver does not watch a cluster")
        watch = _Watch(emit)
        await self._subscribe(client, watch)
        self._watches.add(watch)
        return partial(self._unwatch, watch)

    async def _unwatch(self, watch: _Watch) -> None:
        self._watches.discard(watch)
        await watch.close()

    async def _resume_watches(self, client: Redis) -> None:
        """Subscribe again the watches whose listener ran on another event loop (it ended
        with that loop), before the first call on this one is sent: that call's change is
        reported. A failure raises from that call, and the next call tries again."""
        for watch in list(self._watches):
            if not watch.live:
                await self._subscribe(client, watch)
                if watch not in self._watches:  # unwatched meanwhile
                    await watch.close()

    async def _subscribe(self, client: Redis, watch: _Watch) -> None:
        """Subscribe to the keyspace events under ``base`` and listen for ``watch`` on the
        running loop; returns once Redis confirmed it: from then on, every write is
        reported."""
        db = client.connection_pool.connection_kwargs.get("db", 0)
        channel = f"__keyspace@{db}__:{self._ns}"
        pubsub = client.pubsub()
        with self._unreachable:
            try:
                await self._enable_notifications(client)
                await pubsub.psubscribe(f"__keyspace@{db}__:{glob_escape(self._ns)}*")
                if await pubsub.get_message(timeout=self._timeout) is None:
                    raise TimeoutError("no reply to PSUBSCRIBE")
            except BaseException:
                await pubsub.aclose()  # type: ignore[no-untyped-call,unused-ignore]
                raise
        listener = self._listen(client, pubsub, watch.emit, len(channel.encode()))
        watch.pubsub, watch.task = pubsub, asyncio.get_running_loop().create_task(listener)

    async def _enable_notifications(self, client: Redis) -> None:
        try:
            reply = await client.config_get("notify-keyspace-events")
        except ResponseError as exc:  # CONFIG is disabled (managed services): trust the server
            logger.warning(
                "cannot read notify-keyspace-events on %s (%s); watching relies on the "
                "server publishing keyspace events %s",
                self._where(),
                exc,
                _NOTIFY_FLAGS,
            )
            return
        flags = next(iter(reply.values()), b"")
        flags = flags.decode() if isinstance(flags, bytes) else str(flags)
        covered = set(flags) | (set("g$xe") if "A" in flags else set())
        missing = "".join(flag for flag in _NOTIFY_FLAGS if flag not in covered)
        if not missing:
            return
        try:
            await client.config_set("notify-keyspace-events", flags + missing)
        except ResponseError as exc:
            raise DriverError(
                f"watching needs keyspace notifications on {self._where()}, but "
                f"notify-keyspace-events is {flags!r} and CONFIG SET failed ({exc}); "
                f"configure the server with notify-keyspace-events {_NOTIFY_FLAGS}",
                driver=self.name,
            ) from exc

    async def _listen(self, client: Redis, pubsub: PubSub, emit: EmitEvent, strip: int) -> None:
        events: dict[bytes, Literal["update", "remove"]] = {
            b"set": "update",
            b"del": "remove",
            b"expired": "remove",
            b"evicted": "remove",
        }
        while True:
            try:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=None)
            except _UNREACHABLE:
                # The server went away. Retry until it is back; a restarted server has lost
                # its notification flags, so set them again (redis-py resubscribes itself).
                await asyncio.sleep(0.5)
                with contextlib.suppress(*_UNREACHABLE):
                    await self._enable_notifications(client)
                continue
            if message is None or message["type"] != "pmessage":
                continue
            event = events.get(message["data"])
            if event is not None:
                emit(event, message["channel"][strip:].decode())

    # -- lifecycle ------------------------------------------------------------------------

    async def dispose(self) -> None:
        for watch in list(self._watches):
            await self._unwatch(watch)
        self._reads.cancel()
        if self._loop is not _running_loop():
            self._abandon()  # nothing of another loop can be closed from this one
        lane, self._lane = self._lane, None
        if lane is not None:
            await lane.close()
        client, self._client = self._client, None
        if client is not None and client is not self._given:
            await client.aclose()
