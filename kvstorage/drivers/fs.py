"""FSDriver: one file per key in a directory tree. Runs on any anyio backend (asyncio,
trio); needs a POSIX system (Linux, macOS: ``fcntl.flock``, ``dir_fd`` support).

Layout
------
Key segments become directories, the last one a file holding the value::

    key "users:42"      ->  <base>/users:/42
    key "users"         ->  <base>/users
    key "a:b:c"         ->  <base>/a:/b:/c

A directory carries the segment name plus a trailing ``:`` (so the path reads like the key
with ``/`` inserted), a value file carries the bare segment name. Segments never contain
``:``, so the file of key ``a`` and the directory of keys ``a:...`` never collide: ``a`` and
``a:b`` both exist (unstorage fails there with ``ENOTDIR``). A segment longer than 240
UTF-8 bytes (file names are limited to 255) is split into pieces stored as nested
directories named ``<piece>::``; listing joins them back. Names that *start* with ``:`` are
the driver's own (temp files, TTL markers, the ``:locks`` directory) and are never listed.
``remove`` deletes directories it leaves empty; ``clear`` and ``sweep`` also delete
directories holding nothing but a TTL marker.

Values, expiry and etags
------------------------
A value written without TTL is stored as exactly its bytes, so other tools can read the
folder. A value written with a TTL starts with a 16-byte header (8 magic bytes
``\\x00kvs\\xffttl`` and the expiry as a little-endian float64), so the expiry is atomic with
the value, survives restarts and is seen by other processes. A value written without TTL
that happens to start with the magic bytes also gets a header (with "no expiry"), so
every value reads back exactly.

Listing must skip expired keys without opening every file: a directory that may hold
files with a TTL header contains an empty marker file ``:ttl`` (created before such a file
is moved in, removed only with the directory). Listing and sweeping read headers only in
marked directories; directories of plain values are listed from ``scandir`` alone.

The etag is ``<inode>-<mtime ns>-<size>``. Every write creates a new file (a new inode) and
sets its mtime to ``time.time_ns()``, so the etag changes on every write even when the
filesystem recycles inode numbers. It needs a filesystem with nanosecond timestamps (ext4
with 256-byte inodes, xfs, btrfs, tmpfs, APFS).

Atomicity and concurrency
-------------------------
A write goes to a temp file ``:tmp:<random>`` in the target directory, is optionally
fsynced (``fsync=True``, which also syncs the directory) and is moved into place with
``os.replace``: readers see the old or the new value, never a torn one, even if the writer
is killed. Temp files left by a killed writer are never listed; :meth:`FSDriver.sweep` and
:meth:`FSDriver.clear` delete those older than :attr:`FSDriver.stale_temp_after` seconds.

Every write (conditional or not, ``remove`` and ``clear`` included) holds an exclusive
``fcntl.flock`` on one of 64 lock files in ``<base>/:locks`` (chosen by a hash of the key)
plus an in-process lock, so conditions are atomic against every writer in every process
that uses the same base directory. Reads take no lock.

Safety
------
Paths are opened relative to the base directory one component at a time with
``O_NOFOLLOW``: the driver never follows a symbolic link below ``base`` (a link raises
:class:`~kvstorage.errors.DriverError` naming the path; listing skips links), so no key
can reach outside ``base``.

Watching
--------
``storage.watch()`` uses native file watching (``watchfiles``: inotify, FSEvents, ...), so
it reports changes made by every process and by other tools, not only by this storage.
Events arrive in batches, typically 50-100 ms after the write; within a batch the events
of one key collapse into one, judged by what is on disk when the batch is read (a live
key is an ``"update"``, a deleted or expired one a ``"remove"``). Temp files, markers and
directories never produce events. Expiry itself produces no event.

Each operation (batches and listing chunks included) is one hop to a worker thread.
Expiry is not native: expired files are invisible but stay on disk until
:meth:`FSDriver.sweep` (``storage.sweep()``) deletes them.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import itertools
import logging
import math
import os
import re
import secrets
import stat as stat_mode
import struct
import threading
import time
import zlib
from collections.abc import (
    AsyncGenerator,
    Awaitable,
    Callable,
    Generator,
    Iterable,
    Iterator,
    Sequence,
)
from typing import Literal, TypeVar
from urllib.parse import parse_qs, unquote, urlsplit

import anyio.from_thread
import anyio.lowlevel
import anyio.to_thread
from anyio.lowlevel import EventLoopToken

from ..errors import (
    DriverError,
    InvalidKeyError,
    KVStorageError,
    ReadOnlyError,
)
from .base import Capabilities, Driver, EmitEvent, Record, Stat, check_condition, is_expired

__all__ = ["FSDriver"]

logger = logging.getLogger("kvstorage")

_T = TypeVar("_T")

_MAGIC = b"\x00kvs\xffttl"
_HEADER = struct.Struct("<8sd")
_NAME_LIMIT = 240  # bytes of a segment stored as one name (NAME_MAX is 255)
_TEMP = ":tmp:"
_TTL_MARK = ":ttl"  # in a directory that may hold files with a TTL header
_LOCKS = ":locks"
_STRIPES = 64
_CHUNK = 512  # keys per worker-thread hop when listing

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC  # no FIFO hangs
_TEMP_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_TOUCH_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
_LINK_ERRORS = (errno.ELOOP, errno.ENOTDIR)
_FOREIGN = re.compile(r"[\x00-\x1f\x7f-\x9f\\]")  # names no key segment can have


def _pieces(segment: str) -> list[str]:
    """Split a segment into names of at most ``_NAME_LIMIT`` UTF-8 bytes (usually one)."""
    if len(segment) * 4 <= _NAME_LIMIT:
        return [segment]
    data = segment.encode()
    if len(data) <= _NAME_LIMIT:
        return [segment]
    pieces = []
    while data:
        cut = min(_NAME_LIMIT, len(data))
        while cut < len(data) and data[cut] & 0xC0 == 0x80:  # not inside a character
            cut -= 1
        pieces.append(data[:cut].decode())
        data = data[cut:]
    return pieces


def _components(key: str) -> list[str]:
    """The path components under ``base`` of a key or base (see the module docstring)."""
    parts: list[str] = []
    if not key:
        return parts
    for segment in key.split(":"):
        if segment in ("", ".", "..") or "/" in segment or "\x00" in segment:
            raise InvalidKeyError(f"key {key!r} cannot be stored as a path")
        pieces = _pieces(segment)
        parts.extend(piece + "::" for piece in pieces[:-1])
        parts.append(pieces[-1] + ":")
    return parts


@functools.lru_cache(maxsize=4096)
def _file_path(key: str) -> tuple[tuple[str, ...], str]:
    """(directory components, file name) of a key (cached: this is on every hot path)."""
    parts = _components(key)
    if not parts:
        raise InvalidKeyError("empty key")
    return tuple(parts[:-1]), parts[-1][:-1]


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _etag(st: os.stat_result) -> str:
    return f"{st.st_ino:x}-{st.st_mtime_ns:x}-{st.st_size:x}"


def _parse_header(head: bytes) -> tuple[int, float | None]:
    """(header length, expires_at) of a file starting with ``head``."""
    if len(head) >= _HEADER.size and head.startswith(_MAGIC):
        _, expires_at = _HEADER.unpack_from(head)
        return _HEADER.size, None if math.isinf(expires_at) else expires_at
    return 0, None


class _Dirs:
    """Open directory descriptors from ``base`` down to one directory (closed on exit)."""

    __slots__ = ("fds", "names")

    def __init__(self, base_fd: int) -> None:
        self.fds = [base_fd]
        self.names: list[str] = []

    @property
    def fd(self) -> int:
        return self.fds[-1]

    def close(self) -> None:
        for fd in self.fds[1:]:
            os.close(fd)
        del self.fds[1:]

    def prune(self, marked: bool = False) -> None:
        """Remove the directories of this chain that are empty, deepest first; with
        ``marked`` also those holding nothing but a TTL marker."""
        while len(self.fds) > 1:
            os.close(self.fds.pop())
            if not _remove_dir(self.fds[-1], self.names.pop(), marked):
                break
        self.close()


def _remove_dir(parent_fd: int, name: str, marked: bool) -> bool:
    """Remove the directory ``name`` if it is empty (or, with ``marked``, holds only the
    TTL marker); True if it was removed."""
    try:
        os.rmdir(name, dir_fd=parent_fd)
        return True
    except OSError as exc:
        if not marked or exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            return False
    try:
        fd = os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
    except OSError:
        return False
    try:
        with os.scandir(fd) as entries:
            if [entry.name for entry in itertools.islice(entries, 2)] != [_TTL_MARK]:
                return False
        os.unlink(_TTL_MARK, dir_fd=fd)
        try:
            os.rmdir(name, dir_fd=parent_fd)
            return True
        except OSError:  # a writer came in meanwhile: its file may need the marker
            _mark(fd)
            return False
    finally:
        os.close(fd)


def _marked(dir_fd: int) -> bool:
    try:
        os.stat(_TTL_MARK, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def _mark(dir_fd: int) -> None:
    """Make sure the directory has a TTL marker (before a file with a TTL lands in it)."""
    os.close(os.open(_TTL_MARK, _TOUCH_FLAGS, 0o666, dir_fd=dir_fd))


class FSDriver(Driver):
    """Stores each key as a file under the directory ``base`` (created on first write).

    Args:
        base: the directory; relative paths are resolved against the current directory
            when the driver is created.
        read_only: refuse every write with :class:`~kvstorage.errors.ReadOnlyError`.
        fsync: fsync each written file and its directory before returning, so a write
            survives a power loss (slower). Without it writes are still atomic.

    See the module docstring for the file layout, the TTL header, etags and locking.
    """

    name = "fs"
    capabilities = Capabilities(batch=True, max_depth=True, conditions=True, watch=True)
    #: Temp files older than this many seconds are left over by a killed writer and are
    #: deleted by :meth:`sweep` and :meth:`clear`.
    stale_temp_after: float = 600.0

    def __init__(
        self, base: str | os.PathLike[str], *, read_only: bool = False, fsync: bool = False
    ):
        self.base = os.path.abspath(os.fspath(base))
        self.read_only = read_only
        self.fsync = fsync
        self._guard = threading.Lock()
        self._base_fd: int | None = None
        self._old_fds: list[int] = []  # closed on dispose (threads may still use them)
        self._lock_fds: dict[int, int] = {}
        self._stripes = [threading.Lock() for _ in range(_STRIPES)]

    @classmethod
    def from_url(cls, url: str) -> FSDriver:
        """Build from ``file:///abs/path`` or ``file://./relative/path``; options as query
        parameters: ``?read_only=1&fsync=1``."""
        parts = urlsplit(url)
        if parts.scheme != "file":
            raise ValueError(f"not a file:// URL: {url!r}")
        host = "" if parts.netloc == "localhost" else parts.netloc
        path = unquote(host + parts.path)
        if not path:
            raise ValueError(f"file:// URL without a path: {url!r}")
        query = parse_qs(parts.query)

        def flag(name: str) -> bool:
            return query.get(name, ["0"])[-1].lower() in {"1", "true", "yes", "on"}

        return cls(path, read_only=flag("read_only"), fsync=flag("fsync"))

    def __repr__(self) -> str:
        options = "".join(
            f", {name}=True" for name in ("read_only", "fsync") if getattr(self, name)
        )
        return f"FSDriver({self.base!r}{options})"

    # -- plumbing (everything below runs in a worker thread) ----------------------------

    async def _run(self, func: Callable[..., _T], *args: object) -> _T:
        return await anyio.to_thread.run_sync(func, *args)

    def _check_writable(self) -> None:
        if self.read_only:
            raise ReadOnlyError(f"FSDriver at {self.base!r} is read-only")

    def _base(self, create: bool) -> int | None:
        """The descriptor of the base directory (opened once), or None if it is missing."""
        fd = self._base_fd
        if fd is not None:
            return fd
        with self._guard:
            if self._base_fd is None:
                if create:
                    os.makedirs(self.base, exist_ok=True)
                try:
                    self._base_fd = os.open(self.base, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                except FileNotFoundError:
                    return None
            return self._base_fd

    def _forget_deleted_base(self) -> None:
        """Reopen (and recreate) the base directory next time if it was deleted."""
        with self._guard:
            fd = self._base_fd
            if fd is not None and os.fstat(fd).st_nlink == 0:
                self._old_fds += [fd, *self._lock_fds.values()]
                self._base_fd = None
                self._lock_fds.clear()

    def _refuse_link(self, dirs: _Dirs, name: str) -> DriverError:
        path = os.path.join(self.base, *dirs.names, name)
        return DriverError(
            f"{path!r} is a symbolic link or not a directory; FSDriver never follows links "
            "below its base directory",
            driver=self.name,
        )

    def _open_dirs(self, parts: Sequence[str], create: bool) -> _Dirs | None:
        """Open the directories ``parts`` below base without following links; None when
        one is missing (and ``create`` is false)."""
        base_fd = self._base(create)
        if base_fd is None:
            return None
        dirs = _Dirs(base_fd)
        try:
            for name in parts:
                try:
                    fd = os.open(name, _DIR_FLAGS, dir_fd=dirs.fd)
                except FileNotFoundError:
                    if not create:
                        dirs.close()
                        return None
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(name, dir_fd=dirs.fd)
                    fd = os.open(name, _DIR_FLAGS, dir_fd=dirs.fd)
                dirs.fds.append(fd)
                dirs.names.append(name)
        except OSError as exc:
            dirs.close()
            if exc.errno in _LINK_ERRORS:
                raise self._refuse_link(dirs, name) from exc
            if exc.errno == errno.ENOENT and create:
                raise _Retry from exc
            raise
        return dirs

    def _open_file(self, dirs: _Dirs, name: str) -> int | None:
        try:
            return os.open(name, _READ_FLAGS, dir_fd=dirs.fd)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno in _LINK_ERRORS:
                raise self._refuse_link(dirs, name) from exc
            raise

    @contextlib.contextmanager
    def _lock(self, key: str) -> Iterator[None]:
        """Hold the in-process and the cross-process lock for writing ``key``."""
        stripe = zlib.crc32(key.encode()) % _STRIPES
        with self._stripes[stripe]:
            fd = self._lock_fd(stripe)
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)

    def _lock_fd(self, stripe: int) -> int:
        fd = self._lock_fds.get(stripe)
        if fd is None:
            dirs = self._open_dirs([_LOCKS], create=True)
            assert dirs is not None
            try:
                fd = os.open(f"{stripe:02x}", _TOUCH_FLAGS, 0o666, dir_fd=dirs.fd)
            finally:
                dirs.close()
            self._lock_fds[stripe] = fd
        return fd

    # -- reading ------------------------------------------------------------------------

    def _read(self, key: str, full: bool) -> tuple[os.stat_result, bytes, int, float | None] | None:
        """(stat, data, header length, expires_at); ``data`` is only the header unless
        ``full``."""
        parts, name = _file_path(key)
        dirs = self._open_dirs(parts, create=False)
        if dirs is None:
            return None
        try:
            fd = self._open_file(dirs, name)
        finally:
            dirs.close()
        if fd is None:
            return None
        try:
            st = os.fstat(fd)
            if not stat_mode.S_ISREG(st.st_mode):
                raise DriverError(
                    f"{os.path.join(self.base, *dirs.names, name)!r} is not a regular file",
                    driver=self.name,
                )
            if full:
                data = os.read(fd, st.st_size + 1)
                while len(data) > st.st_size:  # grown by a tool writing in place
                    more = os.read(fd, 1 << 20)
                    if not more:
                        break
                    data += more
            else:
                data = os.read(fd, _HEADER.size)
        finally:
            os.close(fd)
        offset, expires_at = _parse_header(data)
        return st, data, offset, expires_at

    def _get(self, key: str) -> Record | None:
        found = self._read(key, full=True)
        if found is None:
            return None
        st, data, offset, expires_at = found
        value = data[offset:] if offset else data
        return Record(value, _etag(st), st.st_mtime_ns / 1e9, expires_at)

    def _get_many(self, keys: Sequence[str]) -> list[Record | None]:
        return [self._get(key) for key in keys]

    def _head(self, key: str) -> Stat | None:
        found = self._read(key, full=False)
        if found is None:
            return None
        st, _, offset, expires_at = found
        return Stat(st.st_size - offset, _etag(st), st.st_mtime_ns / 1e9, expires_at)

    def _current_etag(self, key: str) -> str | None:
        """The etag of the live entry at ``key`` (an expired one counts as absent)."""
        found = self._read(key, full=False)
        if found is None or is_expired(found[3]):
            return None
        return _etag(found[0])

    async def get(self, key: str) -> Record | None:
        return await self._run(self._get, key)

    async def get_many(self, keys: Sequence[str]) -> list[Record | None]:
        return await self._run(self._get_many, keys)

    async def head(self, key: str) -> Stat | None:
        return await self._run(self._head, key)

    # -- writing ------------------------------------------------------------------------

    def _store(self, key: str, value: bytes, expires_at: float | None) -> None:
        """Write ``value`` atomically (the caller holds the key's lock)."""
        parts, name = _file_path(key)
        header = b""
        if expires_at is not None or value[: len(_MAGIC)] == _MAGIC:
            header = _HEADER.pack(_MAGIC, math.inf if expires_at is None else expires_at)
        for _ in range(20):  # a concurrent clear may remove a directory we just opened
            try:
                dirs = self._open_dirs(parts, create=True)
                assert dirs is not None
                try:
                    self._replace(dirs.fd, name, header, value, expires_at is not None)
                finally:
                    dirs.close()
            except _Retry:
                self._forget_deleted_base()
                continue
            return
        raise DriverError(f"directory of {key!r} keeps disappearing", driver=self.name)

    def _replace(self, dir_fd: int, name: str, header: bytes, value: bytes, expiring: bool) -> None:
        temp = _TEMP + secrets.token_hex(8)
        try:
            fd = os.open(temp, _TEMP_FLAGS, 0o666, dir_fd=dir_fd)
        except FileNotFoundError as exc:  # the directory was removed meanwhile
            raise _Retry from exc
        try:
            try:
                _write_all(fd, header)
                _write_all(fd, value)
                now = time.time_ns()
                os.utime(fd, ns=(now, now))
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            if expiring:
                _mark(dir_fd)
            os.replace(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp, dir_fd=dir_fd)
            raise
        if self.fsync:
            os.fsync(dir_fd)

    def _set(
        self,
        key: str,
        value: bytes,
        expires_at: float | None,
        if_absent: bool,
        if_match: str | None,
    ) -> None:
        with self._lock(key):
            if if_absent or if_match is not None:
                etag = self._current_etag(key)
                check_condition(key, etag, if_absent=if_absent, if_match=if_match)
            self._store(key, value, expires_at)

    def _set_many(self, items: Sequence[tuple[str, bytes]], expires_at: float | None) -> None:
        for key, value in items:  # key by key: a long batch does not stall other writers
            with self._lock(key):
                self._store(key, value, expires_at)

    def _touch(self, key: str, expires_at: float | None) -> bool:
        with self._lock(key):
            record = self._get(key)
            if record is None or is_expired(record.expires_at):
                return False
            self._store(key, record.value, expires_at)
            return True

    async def set(
        self,
        key: str,
        value: bytes,
        *,
        expires_at: float | None = None,
        if_absent: bool = False,
        if_match: str | None = None,
    ) -> None:
        self._check_writable()
        await self._run(self._set, key, value, expires_at, if_absent, if_match)

    async def set_many(
        self, items: Sequence[tuple[str, bytes]], *, expires_at: float | None = None
    ) -> None:
        self._check_writable()
        if items:
            await self._run(self._set_many, items, expires_at)

    async def touch(self, key: str, *, expires_at: float | None) -> bool:
        self._check_writable()
        return await self._run(self._touch, key, expires_at)

    # -- removing -----------------------------------------------------------------------

    def _unlink(self, dirs: _Dirs, name: str) -> bool:
        """Delete a value file (the caller holds its lock); True if it was live."""
        fd = self._open_file(dirs, name)
        if fd is None:
            return False
        try:
            expires_at = _parse_header(os.read(fd, _HEADER.size))[1]
        finally:
            os.close(fd)
        try:
            os.unlink(name, dir_fd=dirs.fd)
        except FileNotFoundError:
            return False
        return not is_expired(expires_at)

    def _remove_many(self, keys: Sequence[str]) -> int:
        removed = 0
        for key in keys:
            parts, name = _file_path(key)
            with self._lock(key):
                dirs = self._open_dirs(parts, create=False)
                if dirs is None:
                    continue
                try:
                    removed += self._unlink(dirs, name)
                finally:
                    dirs.prune()
        return removed

    async def remove(self, key: str) -> bool:
        self._check_writable()
        return bool(await self._run(self._remove_many, [key]))

    async def remove_many(self, keys: Sequence[str]) -> int:
        self._check_writable()
        return await self._run(self._remove_many, keys) if keys else 0

    # -- listing, clearing, sweeping ----------------------------------------------------

    def _walk(
        self, base: str, max_depth: int | None, prune: bool
    ) -> Generator[tuple[_Dirs, str, str, bool], None, None]:
        """Yield ``(dirs, file name, key, may expire)`` for every value file under ``base``,
        depth first, with ``dirs`` open at the file's directory; ``may expire`` is false in
        directories without a TTL marker. With ``prune``, remove stale temp files and
        directories left empty."""
        parts = _components(base)
        root = self._open_dirs(parts, create=False)
        if root is None:
            return
        stale = time.time() - self.stale_temp_after
        # One frame per open directory: (entries, key prefix, depth of its files, marked).
        stack = [(os.scandir(root.fd), base + ":" if base else "", 0, _marked(root.fd))]
        try:
            while stack:
                entries, prefix, depth, marked = stack[-1]
                entry = next(entries, None)
                if entry is None:
                    entries.close()
                    stack.pop()
                    if stack:  # back from a subdirectory
                        name = root.names.pop()
                        os.close(root.fds.pop())
                        if prune:
                            _remove_dir(root.fd, name, marked)
                    continue
                name = entry.name
                if name[0] == ":":
                    if prune and name.startswith(_TEMP) and entry.is_file(follow_symlinks=False):
                        try:
                            if entry.stat(follow_symlinks=False).st_mtime < stale:
                                os.unlink(name, dir_fd=root.fd)
                        except OSError:
                            pass
                    continue
                if _FOREIGN.search(name):
                    continue
                if entry.is_dir(follow_symlinks=False):
                    if name.endswith("::") and ":" not in name[:-2]:
                        child_prefix, child_depth = prefix + name[:-2], depth
                    elif name.endswith(":") and ":" not in name[:-1]:
                        child_prefix, child_depth = prefix + name, depth + 1
                    else:
                        continue  # not ours
                    if max_depth is not None and child_depth > max_depth:
                        continue
                    try:
                        fd = os.open(name, _DIR_FLAGS, dir_fd=root.fd)
                    except OSError:
                        continue  # removed meanwhile
                    root.fds.append(fd)
                    root.names.append(name)
                    stack.append((os.scandir(fd), child_prefix, child_depth, _marked(fd)))
                elif ":" not in name and entry.is_file(follow_symlinks=False):
                    yield root, name, prefix + name, marked
        finally:
            for entries, *_ in stack:
                entries.close()
            if prune and root.names:
                root.prune(marked=True)
            root.close()

    def _live(self, dirs: _Dirs, name: str) -> bool:
        fd = self._open_file(dirs, name)
        if fd is None:
            return False
        try:
            return not is_expired(_parse_header(os.read(fd, _HEADER.size))[1])
        finally:
            os.close(fd)

    async def scan(
        self, base: str = "", *, max_depth: int | None = None
    ) -> AsyncGenerator[str, None]:
        walk = self._walk(base, max_depth, prune=False)

        def chunk() -> list[str]:
            keys = []
            for dirs, name, key, may_expire in walk:
                if not may_expire or self._live(dirs, name):
                    keys.append(key)
                    if len(keys) >= _CHUNK:
                        break
            return keys

        try:
            while keys := await self._run(chunk):
                for key in keys:
                    yield key
        finally:
            walk.close()

    def _clear(self, base: str, only_expired: bool) -> int:
        removed = 0
        for dirs, name, key, may_expire in self._walk(base, None, prune=True):
            if only_expired and not may_expire:
                continue
            with self._lock(key):
                if only_expired and self._live(dirs, name):
                    continue
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(name, dir_fd=dirs.fd)
                    removed += 1
        return removed

    async def clear(self, base: str = "") -> None:
        self._check_writable()
        await self._run(self._clear, base, False)

    async def sweep(self, base: str = "") -> int:
        self._check_writable()
        return await self._run(self._clear, base, True)

    # -- watching -----------------------------------------------------------------------

    async def watch(self, emit: EmitEvent) -> Callable[[], Awaitable[None]]:
        """Report changes made by any process under ``base`` (see :class:`_Watcher`)."""
        token = anyio.lowlevel.current_token()
        watcher = await self._run(_Watcher, self, emit, token)
        return watcher.stop

    def _changes(
        self, changes: Iterable[tuple[int, str]]
    ) -> list[tuple[Literal["update", "remove"], str]]:
        """Turn raw file events into key events, judged by what is on disk now (a batch of
        events is unordered): a live key is an update, a missing or expired one a remove.
        A new directory is listed in full, since files may have landed in it before the
        watch on it started."""
        keys: dict[str, None] = {}
        for change, path in changes:
            decoded = _decode_path(os.path.relpath(path, self.base))
            if decoded is None:
                continue
            key, is_dir = decoded
            if not is_dir:
                keys[key] = None
            elif change == 1:  # added
                keys.update((found, None) for found in self._scan_now(key))
        events: list[tuple[Literal["update", "remove"], str]] = []
        for key in keys:
            try:
                stat = self._head(key)
            except (OSError, KVStorageError):  # a link or a foreign file: not a key
                continue
            live = stat is not None and not is_expired(stat.expires_at)
            events.append(("update" if live else "remove", key))
        return events

    def _scan_now(self, base: str) -> list[str]:
        try:
            return [
                key
                for dirs, name, key, may_expire in self._walk(base, None, prune=False)
                if not may_expire or self._live(dirs, name)
            ]
        except (OSError, KVStorageError):
            return []

    async def dispose(self) -> None:
        with self._guard:
            fds = [*self._lock_fds.values(), *self._old_fds]
            self._lock_fds.clear()
            self._old_fds.clear()
            if self._base_fd is not None:
                fds.append(self._base_fd)
                self._base_fd = None
        for fd in fds:
            os.close(fd)


def _decode_path(path: str) -> tuple[str, bool] | None:
    """``(key, False)`` for a value file's path relative to base, ``(base key, True)`` for
    one of our directories, None for anything else (temp files, markers, foreign names)."""
    segments: list[str] = []
    piece = ""
    names = path.split(os.sep)
    for name in names:
        if not name or name[0] == ":" or name in (".", "..") or _FOREIGN.search(name):
            return None
        if name.endswith("::") and ":" not in name[:-2]:
            piece += name[:-2]
        elif name.endswith(":") and ":" not in name[:-1]:
            segments.append(piece + name[:-1])
            piece = ""
        elif ":" not in name and name is names[-1]:
            segments.append(piece + name)
            return ":".join(segments), False
        else:
            return None
    return ":".join(segments), True


class _Watcher:
    """Native watching with ``watchfiles`` (inotify, FSEvents, ...): a thread collects
    raw events in batches of up to 50 ms and hands key events to the event loop.

    The OS watch is set up before :meth:`FSDriver.watch` returns, so no later change is
    missed; a batch is reported after it was written, typically within 50-100 ms.
    """

    def __init__(self, driver: FSDriver, emit: EmitEvent, token: EventLoopToken) -> None:
        from watchfiles._rust_notify import RustNotify

        os.makedirs(driver.base, exist_ok=True)
        self._driver = driver
        self._emit = emit
        self._token = token
        self._stopping = threading.Event()
        # paths, debug, force_polling, poll_delay_ms, recursive, ignore_permission_denied
        self._notify = RustNotify([driver.base], False, False, 50, True, True)
        self._thread = threading.Thread(target=self._run, name="kvstorage-fs-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stopping.is_set():
                changes = self._notify.watch(50, 5, 500, self._stopping)
                if isinstance(changes, set) and changes:
                    events = self._driver._changes(changes)
                    if events and not self._stopping.is_set():
                        anyio.from_thread.run_sync(self._deliver, events, token=self._token)
        except RuntimeError:  # the event loop is gone
            pass
        except Exception:
            logger.exception("watching %s failed; no more events", self._driver.base)
        finally:
            self._notify.close()

    def _deliver(self, events: list[tuple[Literal["update", "remove"], str]]) -> None:
        if not self._stopping.is_set():
            for event, key in events:
                self._emit(event, key)

    async def stop(self) -> None:
        """Stop watching; no event is delivered after this returns."""
        self._stopping.set()
        await anyio.to_thread.run_sync(self._thread.join)


class _Retry(Exception):
    """A directory disappeared under a write (a concurrent clear): start over."""
