"""Throwaway servers on free loopback ports, for the tests and the benchmarks alike:
``redis-server`` processes (stopped by pid, never a server that was already running),
moto's S3 server, uvicorn serving an ASGI app in a thread, and ``kvstorage serve`` as a
child process."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def free_port(*, with_bus: bool = False) -> int:
    """A free loopback port (and, with ``with_bus``, port + 10000 free too, for the
    cluster bus)."""
    for _ in range(100):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port: int = sock.getsockname()[1]
        if not with_bus:
            return port
        if port + 10000 > 65535:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port found")


@dataclass
class RedisServer:
    """A ``redis-server`` process started by the tests."""

    port: int
    directory: Path
    args: tuple[str, ...] = ()
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start the server and wait (bounded) until it answers PING."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [
                "redis-server",
                "--save",
                "",
                "--appendonly",
                "no",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.directory),
                *self.args,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while not ping(self.port):
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server on port {self.port} exited at start")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server on port {self.port} did not answer PING")
            time.sleep(0.02)

    def stop(self) -> None:
        """Stop the server by its pid and wait until it is gone."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.process = None


def ping(port: int) -> bool:
    """True when a Redis server on 127.0.0.1:``port`` answers PING."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


@contextmanager
def redis_server() -> Iterator[str | None]:
    """Run a private redis-server (no persistence) meanwhile; yield its URL, or None when
    the binary is missing."""
    if shutil.which("redis-server") is None:
        yield None
        return
    with tempfile.TemporaryDirectory() as directory:
        server = RedisServer(free_port(), Path(directory))
        server.start()
        try:
            yield server.url
        finally:
            server.stop()


@contextmanager
def moto_server() -> Iterator[str | None]:
    """Run moto's S3 server on loopback meanwhile; yield its endpoint URL, or None when
    moto is not installed."""
    try:
        from moto.server import ThreadedMotoServer
    except ImportError:
        yield None
        return
    werkzeug = logging.getLogger("werkzeug")
    level = werkzeug.level
    werkzeug.setLevel(logging.ERROR)  # one access-log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()
        werkzeug.setLevel(level)


@contextmanager
def asgi_server(app: Any, *, port: int | None = None) -> Iterator[str]:
    """Serve the ASGI ``app`` with uvicorn on a loopback port, in a thread of this
    process, meanwhile; yield its URL (``http://127.0.0.1:<port>``)."""
    import uvicorn

    port = port or free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError(f"uvicorn did not start on port {port}")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


@contextmanager
def kvstorage_server(
    url: str = "memory://", *args: str, token: str | None = None, cwd: Path | None = None
) -> Iterator[str]:
    """Run ``python -m kvstorage serve url *args`` on a free loopback port meanwhile (token
    from ``token``); yield the server's URL once it listens. Stopped with SIGTERM, which
    must end it cleanly (status 0)."""
    port = free_port()
    env = {**os.environ, "KVSTORAGE_TOKEN": token or ""}
    command = [sys.executable, "-m", "kvstorage", "serve", url, "--port", str(port), *args]
    root = Path(__file__).resolve().parents[2]
    with subprocess.Popen(command, stderr=subprocess.PIPE, cwd=cwd or root, env=env) as server:
        assert server.stderr is not None
        line = server.stderr.readline().decode()  # written once the socket listens
        if f"at http://127.0.0.1:{port}/" not in line:
            server.kill()
            raise RuntimeError(f"kvstorage serve did not start: {line.strip()!r}")
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            server.terminate()
            status = server.wait(10)
        if status != 0:
            raise RuntimeError(f"kvstorage serve ended with status {status}")
