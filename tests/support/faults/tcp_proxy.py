"""A TCP proxy on loopback that can stall or cut the connections it forwards."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import socket
import struct
from dataclasses import dataclass

from . import LoopThread


class Mode(enum.Enum):
    """What the proxy does with connections."""

    NORMAL = "normal"  #: forward bytes both ways
    STALL = "stall"  #: accept and keep connections, drop every byte (a black hole)
    CUT = "cut"  #: reset every connection, and new ones as soon as they are accepted


@dataclass(eq=False)
class _Link:
    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter
    broken: bool = False  # bytes were dropped: the stream can never be resumed


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST (SO_LINGER 0), not a FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class TcpFaultProxy:
    """Forwards ``127.0.0.1:<port>`` to ``127.0.0.1:<target_port>``; see :class:`Mode`
    (and :attr:`delay`, for a distant server).

    Leaving ``STALL`` resets the connections that lost bytes while stalled (their streams
    are broken), so nothing held during the stall reaches either side later.

    ``target_port`` may be left None and set before the first connection, when the
    server must be told the proxy's port first (a cluster node announcing it); until
    then connections are reset.
    """

    def __init__(self, target_port: int | None = None) -> None:
        self.target_port: int | None = target_port
        self._mode = Mode.NORMAL
        self.delay = 0.0  #: seconds each chunk is held before it is forwarded
        self._links: set[_Link] = set()
        self._thread = LoopThread(f"tcp-proxy-{target_port}")
        self._server = self._thread.run(self._serve())
        self.port: int = self._server.sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        """``redis://`` URL of the proxy (for a Redis behind it)."""
        return f"redis://127.0.0.1:{self.port}/0"

    def set_mode(self, mode: Mode) -> None:
        """Switch to ``mode`` (returns once it applies to every connection)."""
        self._thread.run(self._switch(mode))

    def reset_connections(self) -> int:
        """Reset the connections open now (new ones are served as the mode says); return
        how many were reset."""
        return self._thread.run(self._reset_all())

    def close(self) -> None:
        """Reset every connection and stop listening."""
        self._thread.run(self._close())
        self._thread.stop()

    # -- on the proxy's loop ---------------------------------------------------------------

    async def _serve(self) -> asyncio.Server:
        return await asyncio.start_server(self._accept, "127.0.0.1", 0)

    async def _switch(self, mode: Mode) -> None:
        previous, self._mode = self._mode, mode
        doomed = [
            link
            for link in self._links
            if mode is Mode.CUT or (previous is Mode.STALL and link.broken)
        ]
        for link in doomed:
            self._drop(link)

    async def _reset_all(self) -> int:
        links = list(self._links)
        for link in links:
            self._drop(link)
        return len(links)

    async def _close(self) -> None:
        self._server.close()
        await self._reset_all()

    def _drop(self, link: _Link) -> None:
        if link in self._links:
            self._links.discard(link)
            _reset(link.client)
            link.upstream.transport.abort()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._mode is Mode.CUT or self.target_port is None:
            _reset(writer)
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            _reset(writer)
            return
        link = _Link(writer, up_writer)
        self._links.add(link)
        pumps = [
            asyncio.ensure_future(self._pump(reader, up_writer, link)),
            asyncio.ensure_future(self._pump(up_reader, writer, link)),
        ]
        await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        for pump in pumps:
            pump.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)
        if link in self._links:  # one side closed: close the other
            self._links.discard(link)
            writer.transport.abort()
            up_writer.transport.abort()

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, link: _Link
    ) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                if self.delay:
                    await asyncio.sleep(self.delay)
                if self._mode is Mode.NORMAL and not link.broken:
                    writer.write(data)
                    await writer.drain()
                else:
                    link.broken = True
