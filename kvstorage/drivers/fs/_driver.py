"""The :class:`FSDriver` class (the layout and its guarantees are described in the
package docstring)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import itertools
import os
import secrets
import stat as stat_mode
import threading
import time
import zlib
from collections.abc import AsyncGenerator, Awaitable, Callable, Generator, Iterator, Sequence
from typing import NamedTuple, TypeVar
from urllib.parse import parse_qs, unquote, urlsplit

import anyio.lowlevel
import anyio.to_thread

from ...errors import DriverError, ReadOnlyError
from ..base import Capabilities, Driver, EmitEvent, Record, Stat, check_condition, is_expired
from ._dirs import (
    DIR_FLAGS,
    LINK_ERRORS,
    TEMP_FLAGS,
    Dirs,
    NotRegularError,
    exchange,
    make_dir,
    mark,
    marked,
    open_beneath,
    open_marker,
    open_regular,
    remove_dir,
)
from ._layout import (
    HEADER,
    LOCKS,
    SELF,
    TEMP,
    TTL_MARK,
    Name,
    classify,
    components,
    decode_path,
    etag,
    file_path,
    header,
    joined_path,
    parse_header,
)
from ._watch import Watcher
from ._worker import WORKERS, Inline, WouldBlock, in_worker, on_loop

__all__ = ["FSDriver"]

_T = TypeVar("_T")

_STRIPES = 64  # lock files (and in-process locks) shared by all keys
_PENDING_PRUNES = 1024  # directories removes on the loop may leave for a worker to prune
_CHUNK = 512  # keys per worker-thread hop when listing
_KEYS_PER_TICK = 128  # keys a listing hands on per event-loop iteration (its lag < 1 ms)
_LAZY_LEVELS = 4  # listing reads deeper directories at once to bound open descriptors
_ATTEMPTS = 20  # of a write whose directories change under it


class _Retry(Exception):
    """A directory disappeared under a write (a concurrent clear): start over."""


class _NeedsDirectory(Exception):
    """The value file of ``key`` stands where a directory is needed (``key:...`` is
    being written): it must first move into the directory."""

    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


class _Frame(NamedTuple):
    """One directory being listed."""

    entries: Iterator[os.DirEntry[str]]
    handle: contextlib.AbstractContextManager[object] | None  # an open scandir
    prefix: str  # of the keys of its entries
    depth: int  # of its value files below the listed base
    marked: bool  # may hold files with a TTL header


def _current_umask() -> int:
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o077)  # no other way to read it
    os.umask(mask)
    return mask


def _write_all(fd: int, data: bytes) -> None:
    if not data:
        return
    written = os.write(fd, data)  # all of it, as a rule
    if written < len(data):
        view = memoryview(data)[written:]
        while view:
            view = view[os.write(fd, view) :]


class _TempNames:
    """Names for temp files: a random prefix per process (drawn again in a forked child)
    and a counter, instead of random bytes from the system for every write."""

    def __init__(self) -> None:
        self.renew()
        os.register_at_fork(after_in_child=self.renew)

    def renew(self) -> None:
        self._prefix = TEMP + secrets.token_hex(6) + "-"
        self._numbers = itertools.count()

    def __call__(self) -> str:
        return f"{self._prefix}{next(self._numbers):x}"


_temp_name = _TempNames()


class FSDriver(Driver):
    """Stores each key as a file under the directory ``base`` (created on first write):
    key ``a:b`` is the file ``<base>/a/b``.

    Args:
        base: the directory; relative paths are resolved against the current directory
            when the driver is created.
        read_only: refuse every write with :class:`~kvstorage.errors.ReadOnlyError`.
        fsync: fsync each written file and its directory before returning, so a write
            survives a power loss (slower). Without it writes are still atomic.
        file_mode: permissions of the files the driver creates, whatever the umask
            (default ``0o600``: only the owner can read them).
        dir_mode: permissions of the directories the driver creates (default ``0o700``).

    See the :mod:`kvstorage.drivers.fs` docstring for the layout, the TTL header, etags
    and locking.
    """

    name = "fs"
    capabilities = Capabilities(max_depth=True, conditions=True, watch=True)
    #: Temp files older than this many seconds are left over by a killed writer and are
    #: deleted by :meth:`sweep` and :meth:`clear`.
    stale_temp_after: float = 600.0

    def __init__(
        self,
        base: str | os.PathLike[str],
        *,
        read_only: bool = False,
        fsync: bool = False,
        file_mode: int = 0o600,
        dir_mode: int = 0o700,
    ):
        for name, mode in (("file_mode", file_mode), ("dir_mode", dir_mode)):
            if not isinstance(mode, int) or isinstance(mode, bool) or not 0 <= mode <= 0o7777:
                raise ValueError(f"{name} must be a permission number like 0o600, not {mode!r}")
        self.base = os.path.abspath(os.fspath(base))
        self.read_only = read_only
        self.fsync = fsync
        self.file_mode = file_mode
        self.dir_mode = dir_mode
        umask = _current_umask()
        self._chmod_files = bool(file_mode & umask)  # else the create mode is exact
        self._chmod_dirs = bool(dir_mode & umask)
        self._guard = threading.Lock()
        self._base_fd: int | None = None
        self._old_fds: list[int] = []  # closed on dispose (threads may still use them)
        self._lock_fds: dict[int, int] = {}
        self._stripes = [threading.Lock() for _ in range(_STRIPES)]
        self._inline = Inline()  # reads and removes of one key, once they prove fast
        # the directories of removes made on the loop, pruned by the next write
        self._pending_prunes: set[tuple[str, ...]] = set()

    @classmethod
    def from_url(cls, url: str) -> FSDriver:
        """Build from ``file:///abs/path`` or ``file://./relative/path``; options as query
        parameters: ``?read_only=1&fsync=1&file_mode=0640&dir_mode=0750``."""
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

        def mode(name: str, default: int) -> int:
            text = query.get(name, [""])[-1]
            try:
                return int(text, 8) if text else default
            except ValueError:
                raise ValueError(f"{name} must be octal like 0600, not {text!r}") from None

        return cls(
            path,
            read_only=flag("read_only"),
            fsync=flag("fsync"),
            file_mode=mode("file_mode", 0o600),
            dir_mode=mode("dir_mode", 0o700),
        )

    def __repr__(self) -> str:
        options = "".join(
            f", {name}=True" for name in ("read_only", "fsync") if getattr(self, name)
        )
        options += "".join(
            f", {name}={getattr(self, name):#o}"
            for name, default in (("file_mode", 0o600), ("dir_mode", 0o700))
            if getattr(self, name) != default
        )
        return f"FSDriver({self.base!r}{options})"

    # -- plumbing (everything below runs in a worker thread) ----------------------------

    async def _run(self, func: Callable[..., _T], *args: object) -> _T:
        """A batch or a listing chunk: one hop to a thread of its own."""
        return await anyio.to_thread.run_sync(func, *args)

    def _check_writable(self) -> None:
        if self.read_only:
            raise ReadOnlyError(f"FSDriver at {self.base!r} is read-only")

    def _make_base(self) -> None:
        missing = []
        path = self.base
        while not os.path.isdir(path) and path != os.path.dirname(path):
            missing.append(path)
            path = os.path.dirname(path)
        for path in reversed(missing):
            with contextlib.suppress(FileExistsError):
                os.mkdir(path, self.dir_mode)
                if self._chmod_dirs:
                    os.chmod(path, self.dir_mode)

    def _base(self, create: bool) -> int | None:
        """The descriptor of the base directory (opened once), or None if it is missing."""
        fd = self._base_fd
        if fd is not None:
            return fd
        with self._guard:
            if self._base_fd is None:
                if create:
                    self._make_base()
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

    def _refuse(self, dirs: Dirs, name: str, exc: OSError) -> DriverError:
        if isinstance(exc, NotRegularError) and exc.filename:
            name = exc.filename  # a lock file or a marker rather than the value
        path = os.path.join(self.base, *dirs.names, name)
        if isinstance(exc, NotRegularError):
            return DriverError(f"{path!r} is not a regular file", driver=self.name)
        return DriverError(
            f"{path!r} is a symbolic link or not a directory; FSDriver never follows links "
            "below its base directory",
            driver=self.name,
        )

    def _open_dirs(self, parts: Sequence[str], create: bool) -> Dirs | None:
        """Open the directories ``parts`` below base without following links; None when
        one is missing or is a value file (and ``create`` is false)."""
        base_fd = self._base(create)
        if base_fd is None:
            return None
        dirs = Dirs(base_fd)
        name = ""
        try:
            for index, name in enumerate(parts):
                try:
                    fd = os.open(name, DIR_FLAGS, dir_fd=dirs.fd)
                except FileNotFoundError:
                    if not create:
                        dirs.close()
                        return None
                    fd = make_dir(dirs.fd, name, self.dir_mode, self._chmod_dirs)
                except OSError as exc:
                    if exc.errno != errno.ENOTDIR or classify(name) is not Name.SEGMENT:
                        raise
                    if not self._is_file(dirs.fd, name):
                        raise
                    dirs.close()
                    if not create:
                        return None
                    decoded = decode_path(os.sep.join(parts[: index + 1]))
                    assert decoded is not None
                    raise _NeedsDirectory(decoded[0]) from None
                dirs.descend(name, fd)
        except OSError as exc:
            dirs.close()
            if exc.errno in LINK_ERRORS:
                raise self._refuse(dirs, name, exc) from exc
            if exc.errno == errno.ENOENT and create:
                raise _Retry from exc
            raise
        return dirs

    @staticmethod
    def _is_file(dir_fd: int, name: str) -> bool:
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        return stat_mode.S_ISREG(st.st_mode)

    def _open_value(self, dirs: Dirs, name: str) -> tuple[int, os.stat_result] | None:
        """Open a value file (or the value inside the directory ``name``) for reading."""
        try:
            return open_regular(dirs.fd, name)
        except OSError as exc:
            if isinstance(exc, NotRegularError) or exc.errno in LINK_ERRORS:
                raise self._refuse(dirs, name, exc) from exc
            raise

    @contextlib.contextmanager
    def _lock(self, key: str) -> Iterator[None]:
        """Hold the in-process and the cross-process lock for writing ``key``."""
        held = self._acquire(key)
        try:
            yield
        finally:
            self._release(held)

    def _acquire(self, key: str) -> tuple[int, int]:
        """Take the locks of ``key``; return its stripe and lock file (for
        :meth:`_release`). A worker thread does not wait for them: it raises
        :class:`WouldBlock` instead (so a lock held for long, by a stopped process say,
        never stalls the other keys' calls)."""
        stripe = zlib.crc32(key.encode()) % _STRIPES
        local = self._stripes[stripe]
        wait = not in_worker()
        if not local.acquire(blocking=wait):
            raise WouldBlock
        try:
            fd = self._lock_fd(stripe)
            fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            local.release()
            raise WouldBlock from None
        except BaseException:
            local.release()
            raise
        return stripe, fd

    def _release(self, held: tuple[int, int]) -> None:
        stripe, fd = held
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            self._stripes[stripe].release()

    def _lock_fd(self, stripe: int) -> int:
        fd = self._lock_fds.get(stripe)
        if fd is None:
            dirs = self._open_dirs([LOCKS], create=True)
            assert dirs is not None
            try:
                fd = open_marker(dirs.fd, f"{stripe:02x}", self.file_mode)
            except OSError as exc:
                raise self._refuse(dirs, f"{stripe:02x}", exc) from exc
            finally:
                dirs.close()
            if self._chmod_files:
                os.fchmod(fd, self.file_mode)
            self._lock_fds[stripe] = fd
        return fd

    def _locked(self, key: str, operation: Callable[[], _T]) -> _T:
        """Run ``operation`` holding the lock of ``key``, starting over when a concurrent
        clear removed its directory or when a value file must first become a directory
        (done holding only that file's lock: a thread never holds two key locks)."""
        for _ in range(_ATTEMPTS):
            try:
                held = self._acquire(key)
                try:
                    return operation()
                finally:
                    self._release(held)
                    if self._pending_prunes:
                        self._prune_pending()
            except _Retry:
                self._forget_deleted_base()
            except _NeedsDirectory as needed:
                with self._lock(needed.key):
                    self._make_directory(needed.key)
        raise DriverError(f"the directories of {key!r} keep changing", driver=self.name)

    def _make_directory(self, key: str) -> None:
        """Turn the value file of ``key`` into a directory holding that value (as
        :data:`SELF`), atomically for readers. The caller holds the lock of ``key``."""
        parts, name = file_path(key)
        dirs = self._open_dirs(parts, create=False)
        if dirs is None:
            return
        try:
            if not self._is_file(dirs.fd, name):
                return  # done meanwhile, or gone
            temp = TEMP + secrets.token_hex(8)
            fd = make_dir(dirs.fd, temp, self.dir_mode, self._chmod_dirs)
            try:
                os.link(name, SELF, src_dir_fd=dirs.fd, dst_dir_fd=fd, follow_symlinks=False)
                if marked(dirs.fd):  # the value may carry a TTL header
                    mark(fd, self.file_mode)
                try:
                    exchange(dirs.fd, temp, name)
                except OSError as exc:
                    if exc.errno not in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
                        raise
                    # No atomic exchange here: the key is briefly missing for readers.
                    os.unlink(name, dir_fd=dirs.fd)
                    os.rename(temp, name, src_dir_fd=dirs.fd, dst_dir_fd=dirs.fd)
                else:
                    os.unlink(temp, dir_fd=dirs.fd)  # the old file: one more link
            except BaseException:
                self._remove_temp(dirs.fd, temp)
                raise
            finally:
                os.close(fd)
        finally:
            dirs.close()

    @staticmethod
    def _remove_temp(dir_fd: int, name: str) -> None:
        """Delete a temp file or a temp directory left by :meth:`_make_directory`."""
        try:
            os.unlink(name, dir_fd=dir_fd)
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno not in (errno.EISDIR, errno.EPERM):
                return
        with contextlib.suppress(OSError):
            fd = os.open(name, DIR_FLAGS, dir_fd=dir_fd)
            try:
                for inner in (SELF, TTL_MARK):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(inner, dir_fd=fd)
            finally:
                os.close(fd)
            os.rmdir(name, dir_fd=dir_fd)

    # -- reading ------------------------------------------------------------------------

    def _open_key(self, key: str) -> tuple[int, os.stat_result] | None:
        """Open the value file of ``key`` for reading (None if missing): in one system
        call where the system can, else directory by directory."""
        parts, name = file_path(key)
        if parts:
            base_fd = self._base(create=False)
            if base_fd is None:
                return None
            try:
                fd = open_beneath(base_fd, joined_path(key))
            except FileNotFoundError:
                return None
            if fd is not None:
                st = os.fstat(fd)
                if stat_mode.S_ISREG(st.st_mode):
                    return fd, st
                os.close(fd)  # a directory holding the value, or something to refuse
        dirs = self._open_dirs(parts, create=False)
        if dirs is None:
            return None
        try:
            return self._open_value(dirs, name)
        finally:
            dirs.close()

    def _read(self, key: str, full: bool) -> tuple[os.stat_result, bytes, int, float | None] | None:
        """(stat, data, header length, expires_at); ``data`` is only the header unless
        ``full``."""
        found = self._open_key(key)
        if found is None:
            return None
        fd, st = found
        try:
            if full:
                data = os.read(fd, st.st_size + 1)
                while len(data) > st.st_size:  # grown by a tool writing in place
                    more = os.read(fd, 1 << 20)
                    if not more:
                        break
                    data += more
            else:
                data = os.read(fd, HEADER.size)
        finally:
            os.close(fd)
        offset, expires_at = parse_header(data)
        return st, data, offset, expires_at

    def _get(self, key: str) -> Record | None:
        found = self._read(key, full=True)
        if found is None:
            return None
        st, data, offset, expires_at = found
        value = data[offset:] if offset else data
        return Record(value, etag(st), st.st_mtime_ns / 1e9, expires_at)

    def _get_many(self, keys: Sequence[str]) -> list[Record | None]:
        return [self._get(key) for key in keys]

    def _head(self, key: str) -> Stat | None:
        found = self._read(key, full=False)
        if found is None:
            return None
        st, _, offset, expires_at = found
        return Stat(st.st_size - offset, etag(st), st.st_mtime_ns / 1e9, expires_at)

    def _current_etag(self, key: str) -> str | None:
        """The etag of the live entry at ``key`` (an expired one counts as absent)."""
        found = self._read(key, full=False)
        if found is None or is_expired(found[3]):
            return None
        return etag(found[0])

    async def get(self, key: str) -> Record | None:
        return await WORKERS.run(self._get, key, inline=self._inline)

    async def get_many(self, keys: Sequence[str]) -> list[Record | None]:
        return await self._run(self._get_many, keys)

    async def head(self, key: str) -> Stat | None:
        return await WORKERS.run(self._head, key, inline=self._inline)

    # -- writing ------------------------------------------------------------------------

    def _store(self, key: str, value: bytes, expires_at: float | None) -> str:
        """Write ``value`` atomically (the caller holds the key's lock); return its etag."""
        parts, name = file_path(key)
        dirs = self._open_dirs(parts, create=True)
        assert dirs is not None
        try:
            return self._replace(
                dirs, name, header(expires_at, value), value, expires_at is not None
            )
        finally:
            dirs.close()

    def _replace(self, dirs: Dirs, name: str, head: bytes, value: bytes, expiring: bool) -> str:
        """Write a new file and rename it to ``name``; return its etag."""
        dir_fd = dirs.fd
        temp = _temp_name()
        try:
            try:
                fd = os.open(temp, TEMP_FLAGS, self.file_mode, dir_fd=dir_fd)
            except FileExistsError:  # left by a killed process that drew the same prefix
                temp = TEMP + secrets.token_hex(8)
                fd = os.open(temp, TEMP_FLAGS, self.file_mode, dir_fd=dir_fd)
        except FileNotFoundError as exc:  # the directory was removed meanwhile
            raise _Retry from exc
        try:
            try:
                _write_all(fd, head)
                _write_all(fd, value)
                now = time.time_ns()
                os.utime(fd, ns=(now, now))
                if self._chmod_files:
                    os.fchmod(fd, self.file_mode)
                if self.fsync:
                    os.fsync(fd)
                written = etag(os.fstat(fd))  # a rename keeps inode, mtime and size
            finally:
                os.close(fd)
            if expiring:
                mark(dir_fd, self.file_mode)
            try:
                os.replace(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
                target_fd = dir_fd
            except IsADirectoryError:  # keys below this one exist: the value goes inside
                target_fd = os.open(name, DIR_FLAGS, dir_fd=dir_fd)
                try:
                    if expiring:
                        mark(target_fd, self.file_mode)
                    os.replace(temp, SELF, src_dir_fd=dir_fd, dst_dir_fd=target_fd)
                    if self.fsync:
                        os.fsync(target_fd)
                finally:
                    os.close(target_fd)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(temp, dir_fd=dir_fd)
            if isinstance(exc, NotRegularError) or exc.errno in LINK_ERRORS:
                raise self._refuse(dirs, name, exc) from exc
            raise
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp, dir_fd=dir_fd)
            raise
        if self.fsync:
            os.fsync(dir_fd)
        return written

    def _set(
        self,
        key: str,
        value: bytes,
        expires_at: float | None,
        if_absent: bool,
        if_match: str | None,
    ) -> str:
        def write() -> str:
            if if_absent or if_match is not None:
                current = self._current_etag(key)
                check_condition(key, current, if_absent=if_absent, if_match=if_match)
            return self._store(key, value, expires_at)

        return self._locked(key, write)

    def _set_many(self, items: Sequence[tuple[str, bytes]], expires_at: float | None) -> None:
        for key, value in items:  # key by key: a long batch does not stall other writers
            self._locked(key, functools.partial(self._store, key, value, expires_at))

    def _touch(self, key: str, expires_at: float | None) -> bool:
        def rewrite() -> bool:
            record = self._get(key)
            if record is None or is_expired(record.expires_at):
                return False
            self._store(key, record.value, expires_at)
            return True

        return self._locked(key, rewrite)

    async def set(
        self,
        key: str,
        value: bytes,
        *,
        expires_at: float | None = None,
        if_absent: bool = False,
        if_match: str | None = None,
    ) -> str:
        self._check_writable()
        return await WORKERS.run(self._set, key, value, expires_at, if_absent, if_match)

    async def set_many(
        self, items: Sequence[tuple[str, bytes]], *, expires_at: float | None = None
    ) -> None:
        self._check_writable()
        if items:
            await self._run(self._set_many, items, expires_at)

    async def touch(self, key: str, *, expires_at: float | None) -> bool:
        self._check_writable()
        return await WORKERS.run(self._touch, key, expires_at)

    # -- removing -----------------------------------------------------------------------

    def _unlink(self, dirs: Dirs, name: str) -> bool:
        """Delete a value (the caller holds its lock); True if it was live."""
        try:
            st = os.stat(name, dir_fd=dirs.fd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        if stat_mode.S_ISREG(st.st_mode) and not marked(dirs.fd):
            live = True  # no header to read: files with one are only in marked directories
        else:  # reads the header; refuses links and what is not a regular file
            found = self._liveness(dirs, name)
            if found is None:
                return False
            live = found
        try:
            try:
                os.unlink(name, dir_fd=dirs.fd)
            except OSError as exc:
                if exc.errno not in (errno.EISDIR, errno.EPERM):
                    raise
                # the value inside the directory `name`
                inner = os.open(name, DIR_FLAGS, dir_fd=dirs.fd)
                try:
                    os.unlink(SELF, dir_fd=inner)
                finally:
                    os.close(inner)
                remove_dir(dirs.fd, name, marked_too=True)
        except FileNotFoundError:
            return False
        return live

    def _remove_one(self, key: str) -> bool:
        parts, name = file_path(key)
        dirs = self._open_dirs(parts, create=False)
        if dirs is None:
            return False
        try:
            return self._unlink(dirs, name)
        finally:
            if on_loop():  # removing a directory that held many files takes milliseconds
                dirs.close()
                self._pending_prunes.add(tuple(parts))
            else:
                dirs.prune()
                if self._pending_prunes:
                    self._prune_pending()

    def _prune_pending(self) -> None:
        """(in a worker: after each write, remove made there, clear and sweep, and on
        dispose) Remove the directories that removes made on the event loop may have left
        empty: they leave that to a worker (see :meth:`_remove_one`)."""
        while self._pending_prunes:
            try:
                parts = self._pending_prunes.pop()
            except KeyError:  # another worker took the last one
                return
            with contextlib.suppress(OSError, DriverError):  # (a link there is left alone)
                dirs = self._open_dirs(parts, create=False)
                if dirs is not None:
                    dirs.prune()

    def _remove(self, key: str) -> bool:
        if on_loop() and len(self._pending_prunes) >= _PENDING_PRUNES:
            raise WouldBlock  # to a thread, which prunes them all
        held = self._acquire(key)  # (no _Retry or _NeedsDirectory here: nothing is created)
        try:
            return self._remove_one(key)
        finally:
            self._release(held)

    def _remove_many(self, keys: Sequence[str]) -> int:
        return sum(self._remove(key) for key in keys)

    async def remove(self, key: str) -> bool:
        self._check_writable()
        return await WORKERS.run(self._remove, key, inline=self._inline)

    async def remove_many(self, keys: Sequence[str]) -> int:
        self._check_writable()
        return await self._run(self._remove_many, keys) if keys else 0

    # -- listing, clearing, sweeping ----------------------------------------------------

    def _frame(self, dirs: Dirs, top: int, prefix: str, depth: int) -> _Frame:
        fd = dirs.fd
        scandir = os.scandir(fd)
        if len(dirs.names) - top < _LAZY_LEVELS:
            return _Frame(scandir, scandir, prefix, depth, marked(fd))
        with scandir:  # deep: read it at once, so its descriptor is not held
            entries = list(scandir)
        return _Frame(iter(entries), None, prefix, depth, marked(fd))

    def _walk(
        self, base: str, max_depth: int | None, prune: bool
    ) -> Generator[tuple[Dirs, str, str, bool], None, None]:
        """Yield ``(dirs, file name, key, may expire)`` for every value under ``base``,
        depth first, with ``dirs`` open at the file's directory; ``may expire`` is false in
        directories without a TTL marker. With ``prune``, remove stale temp files and
        directories left empty."""
        root = self._open_dirs(components(base), create=False)
        if root is None:
            return
        top = len(root.names)
        stale = time.time() - self.stale_temp_after
        stack = [self._frame(root, top, base + ":" if base else "", 0)]
        try:
            while stack:
                frame = stack[-1]
                entry = next(frame.entries, None)
                if entry is None:
                    if frame.handle is not None:
                        frame.handle.__exit__(None, None, None)
                    stack.pop()
                    if stack:  # back from a subdirectory
                        name = root.names[-1]
                        root.ascend()
                        if prune:
                            with contextlib.suppress(OSError):
                                remove_dir(root.fd, name, frame.marked)
                    continue
                name = entry.name
                kind = classify(name)
                if kind is Name.SELF:
                    if len(stack) > 1 and frame.prefix.endswith(":"):
                        yield root, name, frame.prefix[:-1], frame.marked
                elif kind is Name.OWN:
                    if prune and name.startswith(TEMP):
                        self._remove_stale(root.fd, name, stale)
                elif kind is not Name.FOREIGN and entry.is_dir(follow_symlinks=False):
                    if kind is Name.PIECE:
                        prefix, depth = frame.prefix + name[:-2], frame.depth
                    else:
                        prefix, depth = frame.prefix + name + ":", frame.depth + 1
                    try:
                        fd = os.open(name, DIR_FLAGS, dir_fd=root.fd)
                    except OSError:
                        continue  # removed meanwhile
                    root.descend(name, fd)
                    if max_depth is None or depth <= max_depth:
                        stack.append(self._frame(root, top, prefix, depth))
                        continue
                    try:  # too deep to list, but the directory's own value is not
                        if kind is Name.SEGMENT and self._is_file(root.fd, SELF):
                            yield root, SELF, prefix[:-1], marked(root.fd)
                    finally:
                        root.ascend()
                elif kind is Name.SEGMENT and entry.is_file(follow_symlinks=False):
                    yield root, name, frame.prefix + name, frame.marked
        finally:
            for frame in stack:
                if frame.handle is not None:
                    frame.handle.__exit__(None, None, None)
            if prune and root.names:
                root.prune(marked=True)
            root.close()

    def _remove_stale(self, dir_fd: int, name: str, stale: float) -> None:
        try:
            if os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mtime < stale:
                self._remove_temp(dir_fd, name)
        except OSError:
            pass

    def _liveness(self, dirs: Dirs, name: str) -> bool | None:
        """Whether the value is live (not expired); None when it is missing."""
        found = self._open_value(dirs, name)
        if found is None:
            return None
        fd = found[0]
        try:
            return not is_expired(parse_header(os.read(fd, HEADER.size))[1])
        finally:
            os.close(fd)

    async def scan(
        self, base: str = "", *, max_depth: int | None = None
    ) -> AsyncGenerator[str, None]:
        walk = self._walk(base, max_depth, prune=False)

        def chunk() -> list[str]:
            keys = []
            for dirs, name, key, may_expire in walk:
                if not may_expire or self._liveness(dirs, name):
                    keys.append(key)
                    if len(keys) >= _CHUNK:
                        break
            return keys

        try:
            while keys := await self._run(chunk):
                for index, key in enumerate(keys):
                    if index and not index % _KEYS_PER_TICK:
                        await anyio.lowlevel.checkpoint()
                    yield key
        finally:
            walk.close()

    def _clear(self, base: str, only_expired: bool) -> int:
        self._prune_pending()
        removed = 0
        for dirs, name, key, may_expire in self._walk(base, None, prune=True):
            if only_expired and not may_expire:
                continue
            with self._lock(key):
                if only_expired and self._liveness(dirs, name):
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
        """Report changes made by any process under ``base`` (see the package docstring)."""
        token = anyio.lowlevel.current_token()
        watcher = await self._run(self._start_watching, emit, token)
        return watcher.stop

    def _start_watching(self, emit: EmitEvent, token: anyio.lowlevel.EventLoopToken) -> Watcher:
        self._base(create=True)
        return Watcher(self.base, self._head, self._scan_now, emit, token)

    def _scan_now(self, base: str) -> list[str]:
        """The live keys under ``base`` now (for the watcher; errors give none)."""
        try:
            return [
                key
                for dirs, name, key, may_expire in self._walk(base, None, prune=False)
                if not may_expire or self._liveness(dirs, name)
            ]
        except (OSError, DriverError):
            return []

    async def dispose(self) -> None:
        if self._pending_prunes:
            await WORKERS.run(self._prune_pending)
        with self._guard:
            fds = [*self._lock_fds.values(), *self._old_fds]
            self._lock_fds.clear()
            self._old_fds.clear()
            if self._base_fd is not None:
                fds.append(self._base_fd)
                self._base_fd = None
        for fd in fds:
            os.close(fd)
