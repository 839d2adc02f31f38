"""Descriptor plumbing of the fs driver: every path below base is opened one component
at a time relative to its parent with ``O_NOFOLLOW``, so no symbolic link is ever
followed, and no operation holds more than a bounded number of descriptors however deep
the key. Only regular files are opened as values, never blocking (a FIFO or a device
planted in the tree is refused)."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import itertools
import os
import stat as stat_mode

from ._layout import SELF, TTL_MARK

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
TEMP_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
# Markers and lock files: created if missing, opened without blocking (even on a FIFO).
TOUCH_FLAGS = os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
LINK_ERRORS = (errno.ELOOP, errno.ENOTDIR)
MAX_OPEN = 8  # directory descriptors one chain keeps open (upper ones are reopened)


class NotRegularError(OSError):
    """A value, lock or marker path holds something other than a regular file."""


class Dirs:
    """The chain of directories from base down to one directory (``names`` below base).

    At most :data:`MAX_OPEN` descriptors stay open: when the chain is deeper, the upper
    ones are closed and reopened component by component when they are needed again."""

    __slots__ = ("_fds", "base_fd", "names")

    def __init__(self, base_fd: int) -> None:
        self.base_fd = base_fd
        self.names: list[str] = []
        self._fds: dict[int, int] = {}  # level (1 = first directory below base) -> fd

    @property
    def fd(self) -> int:
        """The descriptor of the deepest directory."""
        return self.fd_at(len(self.names))

    def fd_at(self, level: int) -> int:
        """The descriptor of the directory ``level`` components below base."""
        if level == 0:
            return self.base_fd
        fd = self._fds.get(level)
        if fd is not None:
            return fd
        start = max((known for known in self._fds if known < level), default=0)
        fd, owned = self.fd_at(start), False
        for name in self.names[start:level]:
            child = os.open(name, DIR_FLAGS, dir_fd=fd)
            if owned:
                os.close(fd)
            fd, owned = child, True
        self._keep(level, fd)
        return fd

    def _keep(self, level: int, fd: int) -> None:
        self._fds[level] = fd
        if len(self._fds) > MAX_OPEN:
            os.close(self._fds.pop(min(known for known in self._fds if known != level)))

    def descend(self, name: str, fd: int) -> None:
        """Add the directory ``name`` (opened as ``fd``, now owned by the chain)."""
        self.names.append(name)
        self._keep(len(self.names), fd)

    def ascend(self) -> None:
        """Drop the deepest directory from the chain."""
        fd = self._fds.pop(len(self.names), None)
        if fd is not None:
            os.close(fd)
        self.names.pop()

    def close(self) -> None:
        """Close every descriptor the chain holds (base stays open)."""
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def prune(self, marked: bool = False) -> None:
        """Remove the directories of this chain that are empty, deepest first; with
        ``marked`` also those holding nothing but a TTL marker. Closes the chain."""
        try:
            while self.names:
                name = self.names[-1]
                self.ascend()
                if not remove_dir(self.fd, name, marked):
                    break
        except OSError:  # an upper directory went away meanwhile
            pass
        finally:
            self.close()


def make_dir(parent_fd: int, name: str, mode: int, chmod: bool) -> int:
    """Open the directory ``name``, creating it with ``mode`` if missing (``chmod``:
    the umask would strip bits of ``mode``, so set them explicitly)."""
    try:
        os.mkdir(name, mode, dir_fd=parent_fd)
    except FileExistsError:
        return os.open(name, DIR_FLAGS, dir_fd=parent_fd)
    fd = os.open(name, DIR_FLAGS, dir_fd=parent_fd)
    if chmod:
        os.fchmod(fd, mode)
    return fd


def open_regular(dir_fd: int, name: str) -> tuple[int, os.stat_result] | None:
    """Open the value file ``name`` for reading (None if missing). A directory stands for
    the value inside it (:data:`SELF`); anything but a regular file raises
    :class:`NotRegularError`; a link raises ``OSError(ELOOP)``."""
    try:
        fd = os.open(name, READ_FLAGS, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    try:
        st = os.fstat(fd)
        if stat_mode.S_ISDIR(st.st_mode):
            inner = open_regular(fd, SELF)
            os.close(fd)
            return inner
        if not stat_mode.S_ISREG(st.st_mode):
            raise NotRegularError(errno.EINVAL, "not a regular file", name)
    except BaseException:
        with contextlib.suppress(OSError):
            os.close(fd)
        raise
    return fd, st


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


# RESOLVE_NO_MAGICLINKS | RESOLVE_NO_SYMLINKS | RESOLVE_BENEATH
_READ_HOW = _OpenHow(READ_FLAGS, 0, 0x02 | 0x04 | 0x08)
_SYS_OPENAT2 = 437  # the same number on every Linux architecture


def _find_syscall() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    if os.uname().sysname != "Linux":
        return None
    try:
        func = ctypes.CDLL(None, use_errno=True).syscall
    except (OSError, AttributeError):
        return None
    func.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_size_t]
    func.restype = ctypes.c_long
    return func


_syscall = _find_syscall()


def open_beneath(dir_fd: int, path: bytes) -> int | None:
    """Open the file at the relative ``path`` (several components) below ``dir_fd`` for
    reading in one system call (Linux ``openat2``), failing rather than following any
    link. Raises ``FileNotFoundError`` when a component is missing; returns None when it
    cannot tell (a link, a component that is not a directory, no ``openat2`` here): then
    open it component by component, which says why."""
    global _syscall
    syscall = _syscall
    if syscall is None:
        return None
    fd = syscall(_SYS_OPENAT2, dir_fd, path, ctypes.byref(_READ_HOW), ctypes.sizeof(_READ_HOW))
    if fd >= 0:
        return int(fd)
    code = ctypes.get_errno()
    if code == errno.ENOENT:
        raise FileNotFoundError(code, os.strerror(code))
    if code in (errno.ENOSYS, errno.EPERM):  # an old kernel, or a sandbox refusing it
        _syscall = None
    return None


def open_marker(dir_fd: int, name: str, mode: int) -> int:
    """Open (creating if missing) a lock file or marker; never blocks."""
    fd = os.open(name, TOUCH_FLAGS, mode, dir_fd=dir_fd)
    if not stat_mode.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise NotRegularError(errno.EINVAL, "not a regular file", name)
    return fd


def marked(dir_fd: int) -> bool:
    """Whether the directory may hold files with a TTL header."""
    return os.access(TTL_MARK, os.F_OK, dir_fd=dir_fd, follow_symlinks=False)


def mark(dir_fd: int, mode: int) -> None:
    """Make sure the directory has a TTL marker (before a file with a TTL lands in it)."""
    os.close(open_marker(dir_fd, TTL_MARK, mode))


def remove_dir(parent_fd: int, name: str, marked_too: bool) -> bool:
    """Remove the directory ``name`` if it is empty (or, with ``marked_too``, holds only
    the TTL marker); True if it was removed."""
    try:
        os.rmdir(name, dir_fd=parent_fd)
        return True
    except OSError as exc:
        if not marked_too or exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            return False
    try:
        fd = os.open(name, DIR_FLAGS, dir_fd=parent_fd)
    except OSError:
        return False
    try:
        with os.scandir(fd) as entries:
            if [entry.name for entry in itertools.islice(entries, 2)] != [TTL_MARK]:
                return False
        os.unlink(TTL_MARK, dir_fd=fd)
        try:
            os.rmdir(name, dir_fd=parent_fd)
            return True
        except OSError:  # a writer came in meanwhile: its file may need the marker
            with contextlib.suppress(OSError):
                os.close(os.open(TTL_MARK, TOUCH_FLAGS, 0o600, dir_fd=fd))
            return False
    finally:
        os.close(fd)


def _find_swap() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    # Linux renameat2(RENAME_EXCHANGE=2), macOS renameatx_np(RENAME_SWAP=2).
    func = getattr(libc, "renameat2", None) or getattr(libc, "renameatx_np", None)
    if func is not None:
        func.argtypes = [
            ctypes.c_int,
            ctypes.c_char_p,
            ctypes.c_int,
            ctypes.c_char_p,
            ctypes.c_uint,
        ]
        func.restype = ctypes.c_int
    return func


_SWAP = _find_swap()


def exchange(dir_fd: int, first: str, second: str) -> None:
    """Atomically swap two entries of one directory (a readers sees one or the other,
    never neither). Raises ``OSError(ENOSYS)`` where the system cannot."""
    if _SWAP is None:
        raise OSError(errno.ENOSYS, "atomic exchange is not supported")
    if _SWAP(dir_fd, os.fsencode(first), dir_fd, os.fsencode(second), 2) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
