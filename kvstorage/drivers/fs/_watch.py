"""Native watching of an fs base with ``watchfiles`` (inotify, FSEvents, ...)."""

from __future__ import annotations

import logging
import os
import stat as stat_mode
import threading
from collections.abc import Callable, Iterable
from typing import Literal

import anyio.from_thread
import anyio.to_thread
from anyio.lowlevel import EventLoopToken

from ...errors import KVStorageError
from ..base import EmitEvent, Stat, is_expired
from ._layout import decode_path

logger = logging.getLogger("kvstorage")

_ADDED = 1  # watchfiles' Change.added
_Event = tuple[Literal["update", "remove"], str]


def _is_dir(path: str) -> bool:
    try:
        return stat_mode.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


class Watcher:
    """A thread collects raw file events in batches of up to 50 ms and hands key events
    to the event loop.

    The OS watch is set up before the constructor returns, so no later change is missed;
    a batch is reported after it was written, typically within 50-100 ms. Events are
    judged by what is on disk when the batch is read (a batch is unordered): a live key is
    an ``"update"``, a missing or expired one a ``"remove"``. Directories produce no event
    of their own (the watcher remembers which paths are directories, since a deleted one
    cannot be told from a deleted file); a new directory is listed in full, since files
    may have landed in it before the watch on it started.
    """

    def __init__(
        self,
        base: str,
        head: Callable[[str], Stat | None],
        scan: Callable[[str], list[str]],
        emit: EmitEvent,
        token: EventLoopToken,
    ) -> None:
        from watchfiles._rust_notify import RustNotify

        self._base = base
        self._head = head
        self._scan = scan
        self._emit = emit
        self._token = token
        self._stopping = threading.Event()
        # paths, debug, force_polling, poll_delay_ms, recursive, ignore_permission_denied
        self._notify = RustNotify([base], False, False, 50, True, True)
        self._dirs = set(self._subdirectories(base))
        self._thread = threading.Thread(target=self._run, name="kvstorage-fs-watch", daemon=True)
        self._thread.start()

    def _subdirectories(self, path: str) -> list[str]:
        return [
            os.path.relpath(os.path.join(parent, name), self._base)
            for parent, names, _ in os.walk(path)
            for name in names
        ]

    def _run(self) -> None:
        try:
            while not self._stopping.is_set():
                changes = self._notify.watch(50, 5, 500, self._stopping)
                if isinstance(changes, set) and changes:
                    events = self._events(changes)
                    if events and not self._stopping.is_set():
                        anyio.from_thread.run_sync(self._deliver, events, token=self._token)
        except RuntimeError:  # the event loop is gone
            pass
        except Exception:
            logger.exception("watching %s failed; no more events", self._base)
        finally:
            self._notify.close()

    def _events(self, changes: Iterable[tuple[int, str]]) -> list[_Event]:
        keys: dict[str, None] = {}
        for change, path in changes:
            relative = os.path.relpath(path, self._base)
            decoded = decode_path(relative)
            if decoded is None:
                continue
            key, partial = decoded
            if partial or _is_dir(path):
                self._dirs.add(relative)
                if change == _ADDED:  # its subdirectories may predate their watches
                    self._dirs.update(self._subdirectories(path))
                    keys.update((found, None) for found in self._scan(key))
            elif relative in self._dirs:  # a directory that is gone
                self._dirs.discard(relative)
            else:
                keys[key] = None
        events: list[_Event] = []
        for key in keys:
            try:
                stat = self._head(key)
            except (OSError, KVStorageError):  # a link or a foreign file: not a key
                continue
            live = stat is not None and not is_expired(stat.expires_at)
            events.append(("update" if live else "remove", key))
        return events

    def _deliver(self, events: list[_Event]) -> None:
        if not self._stopping.is_set():
            for event, key in events:
                self._emit(event, key)

    async def stop(self) -> None:
        """Stop watching; no event is delivered after this returns."""
        self._stopping.set()
        await anyio.to_thread.run_sync(self._thread.join)
