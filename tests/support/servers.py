"""Throwaway servers on free loopback ports, for the tests and the benchmarks alike:
``redis-server`` processes and PostgreSQL clusters (stopped by pid, never a server that was
already running), moto's S3 server, uvicorn serving an ASGI app in a thread, and
``kvstorage serve`` as a child process."""

from __future__ import annotations

import logging
import os
import pwd
import shutil
import signal
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
        stop_process(self.process, signal.SIGTERM)
        self.process = None


def stop_process(process: subprocess.Popen[bytes] | None, sig: int) -> None:
    """Send ``sig`` to a server we started (nothing if it has ended) and wait until it is
    gone, killing it after 30 s."""
    if process is None or process.poll() is not None:
        return
    process.send_signal(sig)
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)


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


def postgres_bindir() -> Path | None:
    """The directory holding PostgreSQL's ``initdb`` and ``postgres`` (Debian's newest
    ``/usr/lib/postgresql/*/bin``, else the ``PATH``), or None when they are missing."""
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda path: int(path.parent.parent.name) if path.parent.parent.name.isdigit() else 0,
    )
    if found:
        return found[-1].parent
    initdb = shutil.which("initdb")
    if initdb is not None and shutil.which("postgres") is not None:
        return Path(initdb).parent
    return None


def _unprivileged_user() -> str | None:
    """The account the cluster runs as: None (this one) unless we are root, whom the
    server refuses; then ``postgres`` (Debian's package creates it), or a system account
    ``kvstorage-pg`` created for the purpose."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "kvstorage-pg"):
        try:
            pwd.getpwnam(name)
        except KeyError:
            continue
        return name
    subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", "kvstorage-pg"],
        check=True,
        capture_output=True,
    )
    return "kvstorage-pg"


@dataclass
class PostgresServer:
    """A throwaway PostgreSQL cluster: ``initdb`` into a fresh temporary directory, then
    the ``postgres`` server on a free loopback port (no Unix socket, ``fsync=off``),
    started and stopped by pid. Run as an unprivileged account when we are root.

    Connections need the password (SCRAM), so URLs carry a secret as in production.
    """

    port: int = field(default_factory=free_port)
    user: str = "kvtest"
    password: str = "pg-s3cret"
    bindir: Path | None = field(default_factory=postgres_bindir)
    directory: Path | None = None
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        """``postgresql://kvtest:<password>@127.0.0.1:<port>/postgres``."""
        return f"postgresql://{self.user}:{self.password}@127.0.0.1:{self.port}/postgres"

    def init(self) -> None:
        """Create the cluster (UTF-8, C locale) in a new temporary directory."""
        if self.bindir is None:
            raise RuntimeError("PostgreSQL's initdb is not installed")
        account = _unprivileged_user()
        self.directory = Path(tempfile.mkdtemp(prefix="kvstorage-pg-"))
        pwfile = self.directory / "pwfile"
        pwfile.write_text(self.password + "\n")
        if account is not None:
            shutil.chown(self.directory, account, account)
            shutil.chown(pwfile, account, account)
        # An ICU en-US default collation (where "a;" sorts before "a:b") where the
        # server has ICU, so the tests see what a COLLATE "C" key column protects from.
        for locale in (["--locale-provider", "icu", "--icu-locale", "en-US"], []):
            result = self._initdb(pwfile, locale, account)
            if result.returncode == 0:
                break
            shutil.rmtree(self.directory / "data", ignore_errors=True)
        pwfile.unlink()
        if result.returncode != 0:
            raise RuntimeError(f"initdb failed: {result.stderr.decode(errors='replace')}")

    def _initdb(
        self, pwfile: Path, locale: list[str], account: str | None
    ) -> subprocess.CompletedProcess[bytes]:
        assert self.bindir is not None and self.directory is not None
        return subprocess.run(
            [
                str(self.bindir / "initdb"),
                "--pgdata",
                str(self.directory / "data"),
                "--username",
                self.user,
                "--pwfile",
                str(pwfile),
                "--auth",
                "scram-sha-256",
                "--encoding",
                "UTF8",
                "--locale",
                "C.UTF-8",
                *locale,
                "--no-sync",
            ],
            capture_output=True,
            cwd=self.directory,
            user=account,
            group=account,
        )

    def start(self) -> None:
        """Start the server (initializing the cluster first if needed) and wait, bounded,
        until it accepts connections."""
        if self.directory is None:
            self.init()
        assert self.bindir is not None and self.directory is not None
        account = _unprivileged_user()
        self.process = subprocess.Popen(
            [
                str(self.bindir / "postgres"),
                "-D",
                str(self.directory / "data"),
                "-p",
                str(self.port),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "unix_socket_directories=",
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
                "-c",
                "max_connections=200",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=self.directory,
            user=account,
            group=account,
        )
        deadline = time.monotonic() + 30
        while not self.ready():
            if self.process.poll() is not None:
                raise RuntimeError(f"postgres on port {self.port} exited at start")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"postgres on port {self.port} did not become ready")
            time.sleep(0.05)

    def ready(self) -> bool:
        """True when the server accepts connections (``pg_isready``)."""
        assert self.bindir is not None
        check = [str(self.bindir / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(self.port)]
        return subprocess.run(check, capture_output=True).returncode == 0

    def stop(self) -> None:
        """Fast shutdown (SIGINT: running sessions are ended) by pid; wait until gone."""
        stop_process(self.process, signal.SIGINT)
        self.process = None

    def destroy(self) -> None:
        """Stop the server and delete the cluster."""
        self.stop()
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None


@contextmanager
def postgres_server() -> Iterator[str | None]:
    """Run a private PostgreSQL cluster meanwhile; yield its URL (with a password), or
    None when PostgreSQL is not installed."""
    server = PostgresServer()
    if server.bindir is None:
        yield None
        return
    server.start()
    try:
        yield server.url
    finally:
        server.destroy()


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


def _serve(kind: str) -> None:
    """``python -m tests.support.servers postgres``: start a throwaway server, print its
    URL, and run until SIGTERM or SIGINT (then delete it). For shell scripts (``.ci/run``)."""
    if kind != "postgres":
        raise SystemExit(f"unknown server {kind!r}; known: postgres")
    server = PostgresServer()
    server.start()
    try:
        print(server.url, flush=True)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        server.destroy()


if __name__ == "__main__":
    _serve(*sys.argv[1:2])
