"""The wire-level speed layer of :class:`~kvstorage.drivers.redis.RedisDriver`.

Kept apart from the driver (which owns the layout, the scripts and the errors):

* :func:`pack_command` formats a command in the Redis protocol (RESP) at a fraction of
  redis-py's generic packing cost;
* :func:`round_trip` sends such a command on a connection of the client's own pool and
  reads its reply, with or without the client's retry;
* :class:`Lane` keeps one of those connections for the calls a driver makes one at a time
  and talks to it directly (no pool checkout, no task or timer per call beyond one);
* :func:`glob_escape` escapes a text for Redis glob patterns (``SCAN MATCH``,
  ``PSUBSCRIBE``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, cast

from redis.asyncio import Redis
from redis.exceptions import ConnectionError, ResponseError, TimeoutError

try:
    from redis._parsers import hiredis as _hiredis

    _HIREDIS_PARSER: Any = _hiredis._AsyncHiredisParser
    NOT_ENOUGH_DATA: Any = _hiredis.NOT_ENOUGH_DATA
except (ImportError, AttributeError):  # pragma: no cover - another layout: the generic path
    _HIREDIS_PARSER = NOT_ENOUGH_DATA = None

__all__ = [
    "INLINE_LIMIT",
    "Lane",
    "glob_escape",
    "pack_command",
    "pack_get",
    "pack_set",
    "round_trip",
]

#: How long a call on a lane polls the event loop for its reply before letting it sleep.
POLL_SECONDS = 100e-6
#: After this many calls in a row whose reply came later than that (a distant server), a
#: lane stops polling, and tries again every :data:`POLL_RETRY` calls.
POLL_GIVE_UP = 8
POLL_RETRY = 64

#: Command arguments up to this many bytes are copied into one buffer; larger ones are
#: sent as separate buffers (no copy).
INLINE_LIMIT = 4096


def pack_command(command: Sequence[bytes | str | int]) -> list[bytes]:
    """``command`` in the Redis protocol, as buffers for ``send_packed_command``.

    redis-py's own packing of a 100-key ``MGET`` costs about as much CPU as the rest of
    the call: it checks and encodes every argument through several layers. Commands of
    ASCII strings only (``GET``, ``MGET``) are formatted as one text and encoded once;
    otherwise values over :data:`INLINE_LIMIT` bytes stay separate buffers (no copy).
    The bytes are the same as redis-py's.
    """
    if set(map(type, command)) == {str}:
        args = cast("Sequence[str]", command)
        text = "".join([f"*{len(args)}\r\n", *[f"${len(a)}\r\n{a}\r\n" for a in args]])
        data = text.encode()
        if len(data) == len(text):  # ASCII: the lengths counted characters = bytes
            return [data]
    packed = [b"*%d\r\n" % len(command)]
    for arg in command:
        data = arg if type(arg) is bytes else str(arg).encode()
        if len(data) > INLINE_LIMIT:
            packed += (b"$%d\r\n" % len(data), data, b"\r\n")
        else:
            packed.append(b"$%d\r\n%b\r\n" % (len(data), data))
    return packed


def pack_get(name: str) -> list[bytes]:
    """``GET name``, packed as :func:`pack_command` packs it."""
    data = name.encode()
    return [b"*2\r\n$3\r\nGET\r\n$%d\r\n%b\r\n" % (len(data), data)]


def pack_set(name: str, value: bytes, pxat: int | None) -> list[bytes]:
    """``SET name value [PXAT pxat]``, packed as :func:`pack_command` packs it."""
    key = name.encode()
    if pxat is None:
        head = b"*3\r\n$3\r\nSET\r\n$%d\r\n%b\r\n" % (len(key), key)
        tail = b"\r\n"
    else:
        head = b"*5\r\n$3\r\nSET\r\n$%d\r\n%b\r\n" % (len(key), key)
        at = b"%d" % pxat
        tail = b"\r\n$4\r\nPXAT\r\n$%d\r\n%b\r\n" % (len(at), at)
    if len(value) > INLINE_LIMIT:
        return [head, b"$%d\r\n" % len(value), value, tail]
    return [b"%b$%d\r\n%b%b" % (head, len(value), value, tail)]


async def round_trip(client: Redis, command: Sequence[bytes | str | int], *, resend: bool) -> Any:
    """Send ``command`` (packed by :func:`pack_command`) on a connection of the client's
    pool and return its reply.

    With ``resend`` (reads, unconditional writes), a broken connection is retried as the
    client's own commands are (its ``retry``); without, it raises. A connection whose reply
    may still come (an error or a cancellation after sending) is disconnected, never
    returned to the pool with the reply pending for the next caller.
    """
    packed = pack_command(command)
    pool = client.connection_pool
    connection = await pool.get_connection()  # type: ignore[no-untyped-call]

    async def attempt() -> Any:
        await connection.send_packed_command(packed)
        return await connection.read_response()

    try:
        if resend:
            return await connection.retry.call_with_retry(
                attempt, lambda _: connection.disconnect()
            )
        return await attempt()
    except ResponseError:  # a complete reply: the connection is in step
        raise
    except BaseException:
        await _drop(connection)
        raise
    finally:
        await pool.release(connection)


async def _drop(connection: Any) -> None:
    """Close ``connection`` at once, discarding what is still unsent: the rest of a
    cancelled command must never reach the server later, after a newer one."""
    writer = connection._writer
    if writer is not None:
        writer.transport.abort()
    await connection.disconnect(nowait=True)


class Lane:
    """One connection of a client's pool, kept by a driver for the calls it makes one at a
    time (the sequential ``get`` / ``set`` of an application).

    A call through the pool checks a connection out and back in (a lock, observability
    hooks, a readiness check), writes under ``wait_for`` (a task of its own before Python
    3.12) and reads under a timeout context: a dozen awaits and several loop iterations.
    On the lane a call writes to the transport and reads the reply from the connection's
    stream into its hiredis reader: one loop iteration, the one that waits for the server.

    A call then polls for its reply for up to :data:`POLL_SECONDS`, yielding to the loop
    (which runs the other ready tasks and checks the sockets without sleeping), before it
    lets the loop sleep until the reply comes. A loop that sleeps is woken by the kernel
    when the reply arrives, and on many machines that wake-up costs more than a loopback
    round trip (measured on a 2-core VM: replies arrive 26-36 us after the write; polling
    took a read-only session request on Redis from 8,200 to 11,500 requests/s). A lane whose
    replies keep coming later than that (a distant server) stops polling after
    :data:`POLL_GIVE_UP` calls and tries again every :data:`POLL_RETRY` calls, so it wastes
    no CPU there.

    The socket timeout is kept by one watchdog timer per lane instead of a timer per call:
    it ticks every half timeout while calls are made, and fails the read of a call it has
    seen in flight for two ticks (so a hung server fails a call after 1 to 1.5 times the
    timeout). Calls made while the lane is :attr:`busy` take the pool as before. The
    connection is redis-py's (connected, authenticated and health-checked by it), so it
    follows the client's options. Whatever may leave a reply on the wire (an error other
    than a complete error reply, a cancellation) disconnects it: the next call reconnects.
    """

    __slots__ = (
        "_calls",
        "_connection",
        "_late",
        "_pool",
        "_seen",
        "_strikes",
        "_watchdog",
        "_watching",
        "busy",
    )

    def __init__(self, client: Redis) -> None:
        self._pool = client.connection_pool
        self._connection: Any = None
        self.busy = False
        self._calls = self._seen = self._strikes = 0
        self._late = 0  # calls in a row whose reply came after the polling
        self._watchdog: asyncio.TimerHandle | None = None
        self._watching: asyncio.AbstractEventLoop | None = None  # the watchdog's loop

    @staticmethod
    def usable(client: Redis) -> bool:
        """Whether a lane may hold one of ``client``'s connections: not the only one its
        pool has (the other calls would wait for it)."""
        return client.connection_pool.max_connections > 1

    async def call(self, packed: list[bytes], *, resend: bool) -> Any:
        """Send ``packed`` and return its reply; only while not :attr:`busy` (it is busy
        until the call returns). With ``resend``, a broken connection is retried with the
        client's retry, as in :func:`round_trip`."""
        self.busy = True
        self._calls += 1
        connection = self._connection
        try:
            if connection is None:
                connection = await self._pool.get_connection()  # type: ignore[no-untyped-call]
                self._connection = connection
            if self._watchdog is None or self._watching is not asyncio.get_running_loop():
                self._watch()  # (re)armed: idle, or first used on another loop
            try:
                return await self._exchange(connection, packed)
            except (ResponseError, asyncio.CancelledError):
                raise
            except Exception as exc:
                if not resend:
                    raise
                failed = [exc]  # replayed as the retry's first failure

                async def attempt() -> Any:
                    if failed:
                        raise failed.pop()
                    return await self._exchange(connection, packed)

                return await connection.retry.call_with_retry(
                    attempt, lambda _: connection.disconnect()
                )
        except ResponseError:  # a complete reply: the connection is in step
            raise
        except BaseException:
            if connection is not None:
                await _drop(connection)
            raise
        finally:
            self.busy = False

    async def _exchange(self, connection: Any, packed: list[bytes]) -> Any:
        if not connection.is_connected:
            await connection.connect()
        interval = connection.health_check_interval
        if interval:
            now = asyncio.get_running_loop().time()
            if now > connection.next_health_check:
                await connection.check_health()
        parser = connection._parser
        if _HIREDIS_PARSER is None or type(parser) is not _HIREDIS_PARSER:
            await connection.send_packed_command(packed, check_health=False)
            return await connection.read_response()
        reader = parser._reader
        stream = connection._reader
        if stream.at_eof() or stream.exception() is not None or stream._buffer or reader.has_data():
            # closed by the server while idle (CLIENT KILL, `timeout`, a restart), a stale
            # watchdog strike, or unsolicited bytes: nothing sent yet, so reconnecting is safe
            await connection.disconnect(nowait=True)
            await connection.connect()
            reader = parser._reader
            stream = connection._reader
        transport = connection._writer.transport
        if transport.is_closing():
            raise ConnectionError("Connection closed by the server before write")
        transport.writelines(packed)
        if self._late < POLL_GIVE_UP or not self._calls % POLL_RETRY:
            # Poll for the reply before letting the loop sleep (see the class docstring);
            # the stream's buffer fills when the loop reads the socket.
            loop = asyncio.get_running_loop()
            deadline = loop.time() + POLL_SECONDS
            while not stream._buffer:
                if loop.time() > deadline:
                    self._late += 1
                    break
                await asyncio.sleep(0)
            else:
                self._late = 0
        while True:
            reply = reader.gets()
            while reply is NOT_ENOUGH_DATA:
                try:
                    data = await stream.read(65536)
                except OSError as exc:
                    raise ConnectionError(
                        f"Error while reading from {connection._host_error()}: {exc}"
                    ) from exc
                if not data:
                    raise ConnectionError("Connection closed by server.")
                reader.feed(data)
                reply = reader.gets()
            if type(reply) is bytes or reply is None:
                break
            push = parser._hiredis_PushNotificationType  # RESP3 pushes come in between
            if push is None or not isinstance(reply, push):
                if isinstance(reply, ResponseError | ConnectionError):
                    raise reply
                break
            await parser.handle_push_response(reply)
        if interval:
            connection.next_health_check = now + interval
        return reply

    def _watch(self) -> None:
        """The watchdog: runs every half socket timeout while calls are made."""
        connection = self._connection
        timeout = None if connection is None else connection.socket_timeout
        if not timeout or (not self.busy and self._calls == self._seen):
            self._watchdog = None  # idle since the last tick: the next call rearms it
            return
        if not self.busy or self._calls != self._seen:
            self._strikes = 0  # a call started since the last tick
        else:
            self._strikes += 1
            stream = connection._reader
            if self._strikes >= 2 and stream is not None and stream.exception() is None:
                where = connection._host_error()
                stream.set_exception(TimeoutError(f"Timeout reading from {where}"))
        self._seen = self._calls
        loop = self._watching = asyncio.get_running_loop()
        self._watchdog = loop.call_later(timeout / 2, self._watch)

    async def close(self) -> None:
        """Give the connection back to the pool (disconnected if a call is still on it)."""
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        connection, self._connection = self._connection, None
        if connection is not None:
            if self.busy:
                await connection.disconnect(nowait=True)
            await self._pool.release(connection)


def glob_escape(text: str) -> str:
    """Escape the characters that are special in Redis glob patterns (MATCH, PSUBSCRIBE)."""
    for char in "\\*?[]":
        text = text.replace(char, "\\" + char)
    return text
