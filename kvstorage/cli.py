"""The ``kvstorage`` command line (also ``python -m kvstorage``): look at and fix items, list,
sweep, copy between backends, dump and load, and serve a storage over HTTP.

Every command takes a storage URL (``file:///srv/data``, ``sqlite:///app.db``,
``redis://host:6379/0?base=app``, ``http://host:8787/``, ...). For ``http(s)://`` URLs
without a token, ``$KVSTORAGE_TOKEN`` is used (``serve`` requires it from clients).

Exit status: 0 done, 1 key missing or condition failed, 2 usage error, 3 backend
unreachable or failed. Errors are one line on stderr, without traceback unless ``--debug``.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import re
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Sequence
from contextlib import contextmanager, nullcontext, suppress
from datetime import datetime
from typing import IO, Any, NoReturn

import anyio
import msgspec

from .drivers import Driver, from_url
from .drivers.base import pages_of
from .errors import (
    ConditionFailedError,
    DriverError,
    DriverUnavailableError,
    InvalidKeyError,
    KVStorageError,
    SerializationError,
)
from .keys import base_covers, join_keys, normalize_base, normalize_key
from .storage import Entry, Meta, Storage, create_storage
from .urls import redact_url

__all__ = ["main"]

OK, MISSING, USAGE, BACKEND = 0, 1, 2, 3
_BATCH = 1000
_WRITERS = 32  # single writes in flight at once (items with their own expiry)
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://\S+")
_encode = msgspec.json.encode


class _Exit(Exception):
    """End the command with ``status`` and a one-line ``message`` on stderr."""

    def __init__(self, status: int, message: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class _DumpLine(msgspec.Struct, forbid_unknown_fields=True):
    key: str
    value: bytes  # base64 in the file
    ttl: float | None = None  # seconds left when dumped
    expires_at: float | None = None  # the same as a Unix time: load keeps the expiry exact


def _redact_text(text: str) -> str:
    """``text`` with every URL in it redacted (argparse echoes what it rejects)."""
    return _URL.sub(lambda match: redact_url(match.group(0)), text)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """Usage errors as one line, exit status 2."""
        raise _Exit(USAGE, f"{_redact_text(message)} (see: {self.prog} --help)")


# -- opening storages --------------------------------------------------------------------


def open_storage(url: str) -> Storage:
    """A storage with the driver of ``url`` at its root (``$KVSTORAGE_TOKEN`` is the token
    of ``http(s)://`` URLs that carry none)."""
    scheme = url.partition("://")[0].lower()
    try:
        if scheme in ("http", "https"):
            from .drivers import HTTPDriver

            token = os.environ.get("KVSTORAGE_TOKEN") or None
            driver: Driver = HTTPDriver.from_url(url, token=token)
        else:
            driver = from_url(url)
    except ImportError as exc:
        raise _Exit(BACKEND, str(exc)) from None
    except (ValueError, TypeError) as exc:
        raise _Exit(USAGE, _redact_text(str(exc))) from None
    return create_storage(driver)


# -- output ----------------------------------------------------------------------------


def _out() -> IO[bytes]:
    return sys.stdout.buffer


def _json_line(value: Any) -> bytes:
    return _encode(value) + b"\n"


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat()


class _Progress:
    """A progress bar on stderr when it is a terminal (rich); nothing otherwise."""

    def __init__(self, description: str) -> None:
        self._bar: Any = None
        self._task: Any = None
        if not sys.stderr.isatty():
            return
        try:
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
        except ImportError:  # the cli extra is not installed: no bar
            return
        self._bar = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TextColumn("{task.completed:,} done · {task.fields[skipped]:,} skipped"),
            TimeElapsedColumn(),
            console=Console(stderr=True),
            transient=False,
        )
        self._task = self._bar.add_task(description, total=None, skipped=0)

    def __enter__(self) -> _Progress:
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()

    def update(self, done: int, skipped: int) -> None:
        """Show ``done`` items done and ``skipped`` skipped so far."""
        if self._bar is not None:
            self._bar.update(self._task, completed=done, skipped=skipped)


# -- the commands ----------------------------------------------------------------------


async def _keys(args: argparse.Namespace) -> int:
    (storage,) = args.storages
    out = _out()
    async for key in storage.iter_keys(args.base, max_depth=args.max_depth):
        out.write(key.encode() + b"\n")
    return OK


async def _get(args: argparse.Namespace) -> int:
    (storage,) = args.storages
    data = await storage.get_item_raw(args.key)
    if data is None:
        raise _Exit(MISSING, f"no value at {normalize_key(args.key)!r}")
    if args.raw:
        _out().write(data)
        return OK
    try:
        value = msgspec.json.decode(data)
    except msgspec.DecodeError:
        raise _Exit(USAGE, f"the value at {args.key!r} is not JSON; use --raw") from None
    _out().write(_json_line(value))
    return OK


async def _set(args: argparse.Namespace) -> int:
    (storage,) = args.storages
    data = sys.stdin.buffer.read() if args.value == "-" else os.fsencode(args.value)
    options: dict[str, Any] = {"ttl": args.ttl, "if_absent": args.if_absent}
    if args.raw:
        await storage.set_item_raw(args.key, data, **options)
        return OK
    try:
        value = msgspec.json.decode(data)
    except msgspec.DecodeError as exc:
        hint = " (use --raw to store bytes as they are)"
        raise _Exit(USAGE, f"VALUE is not valid JSON: {exc}{hint}") from None
    await storage.set_item(args.key, value, **options)
    return OK


async def _rm(args: argparse.Namespace) -> int:
    (storage,) = args.storages
    wanted = {normalize_key(key) for key in args.keys}
    removed = await storage.remove_items(args.keys)
    _out().write(f"{removed}\n".encode())
    return OK if removed == len(wanted) else MISSING


async def _meta(args: argparse.Namespace) -> int:
    (storage,) = args.storages
    meta = await storage.get_meta(args.key)
    if meta is None:
        raise _Exit(MISSING, f"no value at {normalize_key(args.key)!r}")
    shown = {
        "size": meta.size,
        "etag": meta.etag,
        "mtime": _iso(meta.mtime),
        "expires_at": _iso(meta.expires_at),
        "ttl": meta.ttl,
    }
    _out().write(_json_line(shown))
    return OK


async def _sweep(args: argparse.Namespace) -> int:
    (storage,) = args.storages
    _out().write(f"{await storage.sweep(args.base)}\n".encode())
    return OK


# -- copy ------------------------------------------------------------------------------


def _renamer(base: str, to: str | None) -> Callable[[str], str]:
    """Source key -> destination key: ``base`` replaced by ``to`` (kept without ``to``)."""
    if to is None:
        return lambda key: key
    strip = len(base) + 1 if base else 0
    return lambda key: join_keys(to, key[strip:])


class _Tally:
    def __init__(self) -> None:
        self.copied = 0
        self.skipped = 0
        self.failed = 0


async def _write_entries(
    dst: Storage, items: Sequence[tuple[str, Entry]], tally: _Tally, command: str
) -> None:
    """Write ``(destination key, entry)`` pairs keeping each expiry time (so each remaining
    TTL): one batch for the items without expiry and one per shared expiry time, single
    writes (several at a time) for the rest."""
    groups: dict[float | None, list[tuple[str, bytes]]] = {}
    for key, entry in items:
        expires_at = entry.meta.expires_at
        at = None if expires_at is None else expires_at.timestamp()
        groups.setdefault(at, []).append((key, entry.value))
    singles: list[tuple[str, bytes, float | None]] = []
    for at, pairs in groups.items():
        if len(pairs) == 1 and at is not None:
            singles.append((*pairs[0], at))
        else:
            await _write_batch(dst, pairs, at, tally, command)
    if singles:
        await _write_singles(dst, singles, tally, command)


def _ttl(expires_at: float | None) -> float | None:
    """The TTL that makes an item written now expire at ``expires_at`` (0 if past)."""
    return None if expires_at is None else expires_at - time.time()


async def _write_batch(
    dst: Storage,
    pairs: list[tuple[str, bytes]],
    expires_at: float | None,
    tally: _Tally,
    command: str,
) -> None:
    ttl = _ttl(expires_at)
    if ttl is not None and ttl <= 0:  # expired since it was read
        tally.skipped += len(pairs)
        return
    try:
        await dst.set_items_raw(pairs, ttl=ttl)
    except (InvalidKeyError, DriverError) as exc:
        if _unreachable(exc):
            raise
        # one bad item fails its batch: find it, keep the others
        await _write_singles(dst, [(k, v, expires_at) for k, v in pairs], tally, command)
        return
    tally.copied += len(pairs)


async def _write_singles(
    dst: Storage,
    items: Sequence[tuple[str, bytes, float | None]],
    tally: _Tally,
    command: str,
) -> None:
    queue = iter(items)

    async def writer() -> None:  # a few workers, not a task per item: spawning costs more
        for key, data, expires_at in queue:
            ttl = _ttl(expires_at)  # now, right before the write
            if ttl is not None and ttl <= 0:
                tally.skipped += 1
                continue
            try:
                await dst.set_item_raw(key, data, ttl=ttl)
            except (InvalidKeyError, DriverError) as exc:
                if _unreachable(exc):
                    raise
                tally.failed += 1
                _warn(f"{command}: {key!r} failed: {exc}")
                continue
            tally.copied += 1

    await _in_parallel([writer] * min(_WRITERS, len(items)))


def _unreachable(exc: Exception) -> bool:
    return isinstance(exc, DriverUnavailableError)


async def _in_parallel(calls: Sequence[Callable[[], Coroutine[Any, Any, None]]]) -> None:
    """Run ``calls`` in one task group; the first failure is raised as itself."""
    try:
        async with anyio.create_task_group() as group:
            for call in calls:
                group.start_soon(call)
    except BaseExceptionGroup as failures:
        error: BaseException = failures
        while isinstance(error, BaseExceptionGroup):
            error = error.exceptions[0]
        raise error from None


async def _copy(args: argparse.Namespace) -> int:
    src, dst = args.storages
    base = normalize_base(args.base)
    to = None if args.to is None else normalize_base(args.to)
    if args.src == args.dst and to is not None and (to == base or base_covers(base, to)):
        raise _Exit(USAGE, "--to lies inside --base of the same storage: the copy would loop")
    rename = _renamer(base, to)
    tally = _Tally()
    progress = _Progress("dry run" if args.dry_run else "copying")
    # one task reads (and checks) the next batch while this one writes the last
    send, receive = anyio.create_memory_object_stream[list[tuple[str, Entry]]](1)

    async def read() -> None:
        async with send:
            async for keys in pages_of(src.iter_keys(base), _BATCH):
                entries = await src.get_entries_raw(keys)
                items = [(rename(k), e) for k, e in entries.items() if e is not None]
                tally.skipped += len(keys) - len(items)  # expired or removed meanwhile
                if args.skip_existing and items:
                    present = await dst.get_entries_raw([k for k, _ in items])
                    kept = [(k, e) for k, e in items if present[k] is None]
                    tally.skipped += len(items) - len(kept)
                    items = kept
                await send.send(items)

    try:
        with progress:
            async with anyio.create_task_group() as group, receive:
                group.start_soon(read)
                async for items in receive:
                    if args.dry_run:
                        tally.copied += len(items)
                    else:
                        await _write_entries(dst, items, tally, "copy")
                    progress.update(tally.copied, tally.skipped)
    finally:
        verb = "would copy" if args.dry_run else "copied"
        summary = f"{verb} {tally.copied}, skipped {tally.skipped}, failed {tally.failed}\n"
        _out().write(summary.encode())
        _out().flush()
    return BACKEND if tally.failed else OK


# -- dump and load ---------------------------------------------------------------------


async def _dump(args: argparse.Namespace) -> int:
    (storage,) = args.storages
    out: IO[bytes] = args.output or _out()
    try:
        async for keys in pages_of(storage.iter_keys(args.base), _BATCH):
            entries = await storage.get_entries_raw(keys)
            now = time.time()
            for key, entry in entries.items():
                if entry is None:
                    continue
                expires_at = entry.meta.expires_at
                ttl = None if expires_at is None else expires_at.timestamp() - now
                if ttl is not None and ttl <= 0:
                    continue
                at = None if expires_at is None else expires_at.timestamp()
                out.write(_json_line(_DumpLine(key, entry.value, ttl, at)))
    finally:
        if out is not _out():
            out.close()
    return OK


async def _load(args: argparse.Namespace) -> int:
    (storage,) = args.storages
    to = normalize_base(args.to) if args.to else ""
    decode = msgspec.json.Decoder(_DumpLine).decode
    tally = _Tally()
    batch: list[tuple[str, Entry]] = []
    lines: IO[bytes] = args.file
    with lines if lines is not sys.stdin.buffer else nullcontext(lines):
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                item = decode(line)
                key = join_keys(to, normalize_key(item.key))
            except (msgspec.DecodeError, msgspec.ValidationError, InvalidKeyError) as exc:
                raise _Exit(USAGE, f"line {number}: not a dump line: {exc}") from None
            batch.append((key, _as_entry(item)))
            if len(batch) >= _BATCH:
                await _write_entries(storage, batch, tally, "load")
                batch = []
    if batch:
        await _write_entries(storage, batch, tally, "load")
    summary = f"loaded {tally.copied}, skipped {tally.skipped}, failed {tally.failed}\n"
    _out().write(summary.encode())
    return BACKEND if tally.failed else OK


def _as_entry(item: _DumpLine) -> Entry:
    """A dump line as the :class:`Entry` the writers take (only value and expiry count)."""
    at = item.expires_at
    if at is None and item.ttl is not None:
        if not (math.isfinite(item.ttl) and item.ttl > 0):
            raise _Exit(USAGE, f"bad ttl {item.ttl!r} for {item.key!r}")
        at = time.time() + item.ttl
    if at is not None and not math.isfinite(at):
        raise _Exit(USAGE, f"bad expires_at {at!r} for {item.key!r}")
    return Entry(item.value, "", Meta(len(item.value), "", None, at))


# -- serve -----------------------------------------------------------------------------


async def _serve(args: argparse.Namespace) -> int:
    (storage,) = args.storages
    try:
        import uvicorn
    except ImportError:
        raise _Exit(BACKEND, "serve needs uvicorn: pip install 'kvstorage[http]'") from None
    from .http import create_app

    token = os.environ.get("KVSTORAGE_TOKEN") or None
    try:
        sock = socket.create_server((args.host, args.port))
    except OSError as exc:
        raise _Exit(BACKEND, f"cannot listen on {args.host}:{args.port}: {exc}") from None
    # asyncio sets TCP_NODELAY only on sockets it accepts on listeners it created: without
    # it, a small response waits for the client's delayed ACK (~40 ms a request)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    host, port = sock.getsockname()[:2]
    loopback = args.host in ("127.0.0.1", "::1", "localhost")
    if token is None and not loopback:
        _warn("serving without a token on a non-loopback address: set KVSTORAGE_TOKEN")
    app = create_app(storage, token=token, read_only=args.read_only)
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off")
    server = _graceful_server_class()(config)
    mode = " (read-only)" if args.read_only else ""
    _warn(f"serving {redact_url(args.url)}{mode} at http://{host}:{port}/")
    with sock:
        await server.serve(sockets=[sock])
    return OK


def _graceful_server_class() -> type[Any]:
    import uvicorn

    class GracefulServer(uvicorn.Server):
        """uvicorn's server, stopped by SIGINT/SIGTERM without re-raising the signal
        afterwards (uvicorn's own handlers do), so the storage is disposed and the
        command exits 0."""

        @contextmanager
        def capture_signals(self) -> Iterator[None]:
            def stop(signum: int, frame: object) -> None:
                if self.should_exit and signum == signal.SIGINT:
                    self.force_exit = True
                self.should_exit = True

            previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    return GracefulServer


# -- the parser and main ---------------------------------------------------------------


def _checked(convert: Callable[[str], Any], valid: Callable[[Any], bool], rule: str) -> Any:
    """An argparse ``type``: ``convert`` the text, then insist on ``valid`` (``rule``)."""

    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not valid(value):
            raise argparse.ArgumentTypeError(f"must be {rule}: {text!r}")
        return value

    return parse


_positive = _checked(float, lambda seconds: math.isfinite(seconds) and seconds > 0, "> 0")
_depth = _checked(int, lambda depth: depth >= 0, "an integer >= 0")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``kvstorage`` command."""
    parser = _Parser(prog="kvstorage", description=__doc__.split("\n\n")[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, run: Callable[[argparse.Namespace], Awaitable[int]], text: str) -> Any:
        sub = commands.add_parser(name, help=text, description=text)
        sub.set_defaults(run=run)
        return sub

    sub = command("keys", _keys, "list the keys under BASE, one a line")
    sub.add_argument("url", metavar="URL")
    sub.add_argument("base", metavar="BASE", nargs="?", default="")
    sub.add_argument("--max-depth", type=_depth, metavar="N")

    sub = command("get", _get, "print the value of KEY as JSON (exact bytes with --raw)")
    sub.add_argument("url", metavar="URL")
    sub.add_argument("key", metavar="KEY")
    sub.add_argument("--raw", action="store_true", help="write the stored bytes unchanged")

    sub = command("set", _set, "store VALUE (JSON, or - to read stdin) at KEY")
    sub.add_argument("url", metavar="URL")
    sub.add_argument("key", metavar="KEY")
    sub.add_argument("value", metavar="VALUE")
    sub.add_argument("--ttl", type=_positive, metavar="S", help="expire after S seconds")
    sub.add_argument("--raw", action="store_true", help="store VALUE's bytes unchanged")
    sub.add_argument("--if-absent", action="store_true", help="only if KEY holds no value")

    sub = command("rm", _rm, "remove KEYs; print how many were removed")
    sub.add_argument("url", metavar="URL")
    sub.add_argument("keys", metavar="KEY", nargs="+")

    sub = command("meta", _meta, "print size, etag, mtime, expiry and ttl of KEY as JSON")
    sub.add_argument("url", metavar="URL")
    sub.add_argument("key", metavar="KEY")

    sub = command("copy", _copy, "copy every item (raw bytes, remaining TTL) to DST_URL")
    sub.add_argument("src", metavar="SRC_URL")
    sub.add_argument("dst", metavar="DST_URL")
    sub.add_argument("--base", default="", metavar="B", help="copy only the keys under B")
    sub.add_argument("--to", metavar="BASE", help="write under BASE instead of B")
    sub.add_argument("--skip-existing", action="store_true", help="leave keys DST has alone")
    sub.add_argument("--dry-run", action="store_true", help="count, write nothing")

    sub = command("sweep", _sweep, "remove expired items; print how many")
    sub.add_argument("url", metavar="URL")
    sub.add_argument("base", metavar="BASE", nargs="?", default="")

    dump_help = 'write JSON Lines {"key", "value" (base64), "ttl", "expires_at"}'
    sub = command("dump", _dump, dump_help)
    sub.add_argument("url", metavar="URL")
    sub.add_argument("base", metavar="BASE", nargs="?", default="")
    sub.add_argument(
        "-o", "--output", type=argparse.FileType("wb"), metavar="FILE", help="write to FILE"
    )

    sub = command("load", _load, "read what dump wrote (stdin by default)")
    sub.add_argument("url", metavar="URL")
    sub.add_argument("file", metavar="FILE", nargs="?", type=argparse.FileType("rb"), default="-")
    sub.add_argument("--to", metavar="BASE", help="write every key under BASE")

    sub = command("serve", _serve, "serve URL over HTTP (token from $KVSTORAGE_TOKEN)")
    sub.add_argument("url", metavar="URL")
    sub.add_argument("--host", default="127.0.0.1")
    sub.add_argument("--port", type=int, default=8787)
    sub.add_argument("--read-only", action="store_true", help="answer writes with 405")
    return parser


def _warn(message: str) -> None:
    sys.stderr.write(f"kvstorage: {message}\n")
    sys.stderr.flush()


def _status_of(exc: BaseException) -> tuple[int, str]:
    """Exit status and one-line message for an error of a command."""
    while isinstance(exc, BaseExceptionGroup):  # from a task group: its first error
        exc = exc.exceptions[0]
    if isinstance(exc, _Exit):
        return exc.status, exc.message
    if isinstance(exc, ConditionFailedError):
        return MISSING, f"condition failed: {exc}"
    if isinstance(exc, InvalidKeyError | SerializationError | ValueError | TypeError):
        return USAGE, str(exc)
    if isinstance(exc, KVStorageError):
        return BACKEND, str(exc)
    if isinstance(exc, OSError):
        return USAGE, f"{exc.strerror or exc}: {exc.filename}" if exc.filename else str(exc)
    return BACKEND, f"{type(exc).__name__}: {exc}"


async def _run(args: argparse.Namespace) -> int:
    urls = [args.src, args.dst] if args.command == "copy" else [args.url]
    args.storages = [open_storage(url) for url in urls]
    try:
        status: int = await args.run(args)
        return status
    finally:
        with anyio.CancelScope(shield=True):
            for storage in args.storages:
                await storage.dispose()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status (the console script exits with it)."""
    debug = "--debug" in (sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING)
    library = logging.getLogger("kvstorage")
    level = library.level
    if not debug:
        library.setLevel(logging.CRITICAL)  # errors are reported once, by the command
    try:
        return _main(argv, debug)
    finally:
        library.setLevel(level)  # main() may run inside a program (tests): leave it as it was


def _main(argv: Sequence[str] | None, debug: bool) -> int:
    try:
        args = build_parser().parse_args(argv)
        return anyio.run(_run, args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `kvstorage keys ... | head`: the reader has what it wanted
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return OK
    except Exception as exc:
        if debug:
            raise
        status, message = _status_of(exc)
        if message:
            _warn(_redact_text(message).replace("\n", " "))
        return status
    finally:
        with suppress(BrokenPipeError):
            sys.stdout.flush()
