"""An HTTP/1.1 proxy on loopback that fails or delays a seeded fraction of requests."""

from __future__ import annotations

import asyncio
import contextlib
import random
from dataclasses import dataclass

from . import LoopThread

_ERRORS = {
    500: ("InternalError", "We encountered an internal error. Please try again."),
    503: ("SlowDown", "Please reduce your request rate."),
}


@dataclass
class HttpCounters:
    """What the proxy did."""

    requests: int = 0
    failed_before: int = 0  #: answered 500/503 without forwarding
    failed_after: int = 0  #: forwarded, then the server's answer replaced by 500/503
    delayed: int = 0
    pages: int = 0  #: listing requests (pages asked for, retries included)

    @property
    def failed(self) -> int:
        return self.failed_before + self.failed_after


def _error(status: int, method: str) -> bytes:
    code, message = _ERRORS[status]
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{message}</Message>"
        "<RequestId>fault-proxy</RequestId></Error>"
    ).encode()
    reason = "Internal Server Error" if status == 500 else "Service Unavailable"
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/xml\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    return head if method == "HEAD" else head + body  # a HEAD response has no body


def _headers(head: bytes) -> dict[str, str]:
    lines = head.decode("latin-1").split("\r\n")[1:]
    return {
        name.strip().lower(): value.strip()
        for name, sep, value in (line.partition(":") for line in lines)
        if sep
    }


async def _read_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
    """The message body as sent (Content-Length or chunked, kept chunked)."""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        raw = bytearray()
        while True:
            size_line = await reader.readuntil(b"\r\n")
            raw += size_line
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                while (line := await reader.readuntil(b"\r\n")) != b"\r\n":  # trailers
                    raw += line
                return bytes(raw + b"\r\n")
            raw += await reader.readexactly(size + 2)
    return await reader.readexactly(int(headers.get("content-length", 0)))


class HttpFaultProxy:
    """Forwards HTTP/1.1 requests to ``upstream`` (``http://host:port``), one upstream
    connection per request; a seeded RNG picks, per request, whether to answer 500/503
    before forwarding (``fail_before``), after forwarding (``fail_after``: the request took
    effect but the client sees an error), to wait ``delay`` seconds first (``delay_rate``),
    or to forward as is. With ``max_keys``, listings (ListObjectsV2) ask for pages of that
    size: S3 may return fewer keys than asked, and small pages make pagination cheap to
    test (moto does not check request signatures)."""

    def __init__(
        self,
        upstream: str,
        *,
        seed: int,
        fail_before: float = 0.0,
        fail_after: float = 0.0,
        delay_rate: float = 0.0,
        delay: float = 0.2,
        max_keys: int | None = None,
    ) -> None:
        host, _, port = upstream.removeprefix("http://").rstrip("/").rpartition(":")
        self._upstream = (host, int(port))
        self._rng = random.Random(seed)
        self.fail_before, self.fail_after = fail_before, fail_after
        self.delay_rate, self.delay = delay_rate, delay
        self.max_keys = max_keys
        self.counters = HttpCounters()
        self._thread = LoopThread(f"http-proxy-{port}")
        self._server = self._thread.run(asyncio.start_server(self._serve, "127.0.0.1", 0))
        self.port: int = self._server.sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        """The proxy's endpoint URL."""
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        """Stop listening and stop the proxy's loop."""

        self._thread.loop.call_soon_threadsafe(self._server.close)
        self._thread.stop()  # cancels the open connections

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            while True:  # keep-alive: one request after the other
                head = await reader.readuntil(b"\r\n\r\n")
                headers = _headers(head)
                if headers.get("expect", "").lower() == "100-continue":
                    # Answer for the server (and do not pass the header on).
                    writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                    head = b"\r\n".join(
                        line
                        for line in head.split(b"\r\n")
                        if not line.lower().startswith(b"expect:")
                    )
                body = await _read_body(reader, headers)
                method = head.split(b" ", 1)[0].decode()
                writer.write(await self._answer(method, head, body))
                await writer.drain()
        writer.transport.abort()

    async def _answer(self, method: str, head: bytes, body: bytes) -> bytes:
        self.counters.requests += 1
        roll = self._rng.random()
        status = self._rng.choice((500, 503))
        if roll < self.fail_before:
            self.counters.failed_before += 1
            return _error(status, method)
        if roll < self.fail_before + self.delay_rate:
            self.counters.delayed += 1
            await asyncio.sleep(self.delay)
        if self.max_keys is not None and b"list-type=2" in head.split(b"\r\n", 1)[0]:
            target = head.split(b" ", 2)
            target[1] += f"&max-keys={self.max_keys}".encode()
            head = b" ".join(target)
            self.counters.pages += 1
        response = await self._forward(method, head, body)
        if roll >= 1 - self.fail_after:
            self.counters.failed_after += 1
            return _error(status, method)
        return response

    async def _forward(self, method: str, head: bytes, body: bytes) -> bytes:
        """Send the request upstream on a new connection and return the response."""
        reader, writer = await asyncio.open_connection(*self._upstream)
        try:
            writer.write(head + body)
            await writer.drain()
            response_head = await reader.readuntil(b"\r\n\r\n")
            headers = _headers(response_head)
            status = int(response_head.split(b" ", 2)[1])
            if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
                return response_head
            if "content-length" in headers or "chunked" in headers.get("transfer-encoding", ""):
                return response_head + await _read_body(reader, headers)
            # Framed by the end of the connection: frame it by its length for our client.
            rest = await reader.read()
            return response_head[:-2] + f"Content-Length: {len(rest)}\r\n\r\n".encode() + rest
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
