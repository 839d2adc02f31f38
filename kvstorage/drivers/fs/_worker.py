"""The worker threads of the fs driver: two long-lived threads run its short operations
(one key each) for asyncio callers, instead of one ``anyio.to_thread.run_sync`` hop per
call.

A call is queued for the workers; the calls queued while the workers are busy are taken
without waking anyone, and the results go back to the event loop in batches: a worker
wakes the loop once (a byte in a pipe the loop watches) for up to :data:`_BATCH`
results, or when it runs out of work, and each caller resumes within that delivery (not
one loop iteration later). So a hundred concurrent reads cost a few wake-ups of each
side, not a hundred hops, and the loop never waits on a file: it only resolves futures.
The primary worker waits for calls; the helper is called in only while the primary is
busy, so calls made one at a time wake one thread each (two threads waiting on one queue
would both wake).

A cancelled caller never leaves half an operation behind: a call not started yet never
runs, and one already running is waited for (as ``anyio.to_thread.run_sync`` does) before
the cancellation goes on. Callers on other event loops than asyncio (trio) take the plain
``anyio.to_thread.run_sync`` hop.

A hop costs 50 to 100 µs on a virtual machine (the kernel wakes an idle CPU on each side),
while reading or removing a cached file takes 10 to 40 µs. So a driver's short calls (one
key read or removed) run on the event loop's thread itself once its last
:data:`_FAST_IN_A_ROW` calls each took under :data:`_SLOW` (see :class:`Inline`), for at
most :data:`_WINDOW` of any one loop iteration: a few calls beyond that wait for the next
iteration, the others go to the workers. A call on the loop that takes longer than
:data:`_SLOW` sends the driver's calls back to the workers (and they come back only after
twice as many fast calls in a row). So a slow disk or a network file system keeps using
the workers, after at most one call held the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import anyio
import anyio.to_thread

__all__ = ["WORKERS", "Inline", "WouldBlock", "Workers", "in_worker", "on_loop"]

_T = TypeVar("_T")

_get_running_loop = asyncio._get_running_loop
_current_task = asyncio.current_task

_BATCH = 16  # results a worker holds back before it wakes the event loop
_SLOW = 1e-3  # seconds: a call slower than this stops a driver's calls on the loop
_FAST_IN_A_ROW = 16  # calls under _SLOW before they run on the loop (doubled after each
_MOST_IN_A_ROW = 4096  # slow call made on the loop, up to this)
_WINDOW = 0.3e-3  # seconds of one loop iteration that calls on the loop may take
_WAITING = 4  # callers that may wait for the next iteration's window (others: workers)

_clock = time.perf_counter


class WouldBlock(Exception):
    """Raised by an operation in a worker thread instead of waiting for a lock another
    thread or process holds: the call is then run again in a thread of its own, so it
    must be raised before the operation changed anything."""


_local = threading.local()


def in_worker() -> bool:
    """Whether this thread is a worker, or runs a call on the event loop (neither must
    wait for locks: see :class:`WouldBlock`)."""
    return getattr(_local, "worker", False)


def on_loop() -> bool:
    """Whether this call runs on the event loop's thread (so what may take long, like
    removing a directory that held many files, is better left to a worker)."""
    return getattr(_local, "on_loop", False)


class Inline:
    """How long one driver's short calls took lately, which decides whether its next one
    runs on the event loop's thread (see the module docstring). Every call made through
    :meth:`Workers.run` with it is timed, in a worker or on the loop; a driver keeps one
    for all the files it reaches (they are on one file system)."""

    __slots__ = ("fast", "needed")

    def __init__(self) -> None:
        self.fast = 0  # calls under _SLOW in a row
        self.needed = _FAST_IN_A_ROW

    @property
    def ready(self) -> bool:
        """Whether the next call may run on the loop."""
        return self.fast >= self.needed

    def timed(self, seconds: float) -> None:
        """Count one call that took ``seconds`` (from any thread: a lost update only
        delays a decision)."""
        if seconds < _SLOW:
            self.fast += 1
        else:
            if self.ready:  # held the loop: be slower to trust the next fast run
                self.needed = min(self.needed * 2, _MOST_IN_A_ROW)
            self.fast = 0


class _Inbox:
    """The results of one event loop's calls, handed back to it in batches.

    A worker wakes the loop by writing a byte into a pipe the loop watches (one system
    call on each side; ``call_soon_threadsafe`` costs the loop two reads of its own pipe,
    the second one failing, and more Python on both threads); on loops that cannot watch
    a descriptor, with ``call_soon_threadsafe``."""

    __slots__ = ("_done", "_fds", "_guard", "_loop", "_rung", "_waiting", "_window")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._done: deque[_Call[Any]] = deque()
        self._rung = False
        self._window: float | None = None  # when this iteration's first call on the loop began
        self._waiting = 0  # callers waiting for the next iteration to run on the loop
        self._guard = threading.Lock()  # a worker writes, or the pipe is closed
        self._fds: tuple[int, int] | None = None  # the pipe (read end, write end)
        read_fd, write_fd = os.pipe()
        try:
            os.set_blocking(read_fd, False)
            os.set_blocking(write_fd, False)
            loop.add_reader(read_fd, self._woken)
        except Exception:  # a loop that cannot watch descriptors
            os.close(read_fd)
            os.close(write_fd)
        else:
            self._fds = read_fd, write_fd

    def may_run_here(self) -> bool:
        """(loop thread) Whether a call may still run on the loop in this iteration."""
        if self._window is None:
            self._window = _clock()
            self._loop.call_soon(self._close_window)  # runs in the next iteration
            return True
        return _clock() - self._window < _WINDOW

    async def wait_to_run_here(self) -> bool:
        """(loop thread) Whether a call may run on the loop, in this iteration or, when
        this one had its share, in the next, if only a few callers wait for it (the others
        go to the workers: resuming many callers only to send most of them on would hold
        the loop for nothing)."""
        if self.may_run_here():
            return True
        if self._waiting >= _WAITING:
            return False
        self._waiting += 1
        try:
            await asyncio.sleep(0)
        finally:
            self._waiting -= 1
        return self.may_run_here()

    def _close_window(self) -> None:
        self._window = None

    def put(self, call: _Call[Any]) -> None:
        """(worker thread) Keep a finished call for the next delivery."""
        self._done.append(call)

    def ring(self) -> None:
        """(worker thread) Have the loop deliver the finished calls, unless it will."""
        if not self._rung:
            self._rung = True
            if not self._wake():  # the loop is closed: nobody waits for these
                self._done.clear()

    def _wake(self) -> bool:
        """(worker thread) Wake the loop; False if it is closed."""
        if self._fds is None:
            try:
                self._loop.call_soon_threadsafe(self._deliver)
            except RuntimeError:
                return False
            return True
        with self._guard:  # (a closed loop's pipe is closed when another loop starts)
            if self._fds is None:
                return False
            try:  # noqa: SIM105 (contextlib.suppress costs more, on every call)
                os.write(self._fds[1], b"\0")
            except BlockingIOError:  # full: the loop wakes anyway
                pass
        return True

    def _woken(self) -> None:
        """(loop thread) Empty the pipe (before the calls: a call kept after this writes
        again), deliver the finished calls."""
        fds = self._fds
        if fds is not None:
            try:  # noqa: SIM105 (contextlib.suppress costs more, on every call)
                os.read(fds[0], 4096)
            except BlockingIOError:  # nothing to read (woken spuriously)
                pass
        self._deliver()

    def _deliver(self) -> None:
        self._rung = False  # before draining: a call kept after this rings again
        done = self._done
        while done:
            done.popleft().finish()

    def close(self) -> None:
        """Close the pipe of a closed loop (which no longer watches it)."""
        with self._guard:
            self.forget()

    def forget(self) -> None:
        """Close the pipe without taking the guard (in a forked child, where the loop
        belongs to the parent and a worker of the parent may have held the guard)."""
        fds, self._fds = self._fds, None
        if fds is not None:
            os.close(fds[0])
            os.close(fds[1])


class _Future(asyncio.Future[_T]):
    """The future a caller awaits. When a worker's outcome is delivered, the task
    awaiting it resumes at once, in the same iteration of the event loop: with a plain
    future the loop would call it back in the next iteration, one more poll of the
    selector (and its Python) per call. Cancelling it resumes the task the usual way,
    from the loop."""

    __slots__ = ("_resume",)

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop=loop)
        self._resume: tuple[Callable[[Any], object], contextvars.Context] | None = None

    def add_done_callback(
        self, fn: Callable[[Any], object], *, context: contextvars.Context | None = None
    ) -> None:
        if self._resume is None and context is not None and not self.done():
            self._resume = fn, context  # the awaiting task's wake-up (with its context)
        else:
            super().add_done_callback(fn, context=context)

    def remove_done_callback(self, fn: Callable[[Any], object]) -> int:
        removed = 0
        if self._resume is not None and self._resume[0] == fn:
            self._resume, removed = None, 1
        return removed + super().remove_done_callback(fn)

    def cancel(self, msg: Any | None = None) -> bool:
        if not super().cancel(msg):
            return False
        resume, self._resume = self._resume, None
        if resume is not None:
            self.get_loop().call_soon(resume[0], self, context=resume[1])
        return True

    def deliver(self, result: object, error: BaseException | None) -> None:
        """(loop thread, in a callback of the loop: no task is running) Set the outcome
        and resume the awaiting task now."""
        if error is not None:
            self.set_exception(error)
        else:
            self.set_result(result)  # type: ignore[arg-type]
        resume, self._resume = self._resume, None
        if resume is not None:
            resume[1].run(resume[0], self)


class _Call(Generic[_T]):
    """One operation: queued, claimed by a worker (or by a cancelled caller, so it never
    runs), run (by :meth:`Workers._work`, keeping its result or exception), finished on
    the loop."""

    __slots__ = (
        "args",
        "error",
        "finished",
        "func",
        "future",
        "inbox",
        "inline",
        "result",
        "ticket",
        "waiter",
    )

    def __init__(
        self,
        func: Callable[..., _T],
        args: tuple[object, ...],
        future: _Future[_T],
        inbox: _Inbox,
        inline: Inline | None,
    ) -> None:
        self.func = func
        self.args = args
        self.future = future
        self.inbox = inbox
        self.inline = inline
        self.ticket = [None]  # whoever takes it decides whether the call runs
        self.result: _T | None = None
        self.error: BaseException | None = None
        self.finished = False
        self.waiter: asyncio.Future[None] | None = None  # of a cancelled caller

    def claim(self) -> bool:
        """Take the call's one ticket (atomic: ``list.pop`` holds the GIL throughout); True
        for whoever took it, the worker that is to run the call or the caller that
        cancelled it first."""
        try:
            self.ticket.pop()
        except IndexError:
            return False
        return True

    def finish(self) -> None:
        """(loop thread) Hand the outcome to the caller."""
        self.finished = True
        future = self.future
        if not future.done():
            error, self.error = self.error, None  # no reference cycle through the traceback
            future.deliver(self.result, error)
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)


class Workers:
    """A pool of ``count`` daemon threads, started on first use (and again in a forked
    child), shared by every :class:`~kvstorage.drivers.FSDriver` of the process."""

    def __init__(self, count: int) -> None:
        self.count = count
        self._queue: queue.SimpleQueue[_Call[Any]] = queue.SimpleQueue()
        self._guard = threading.Lock()
        self._started = False
        self._wanted = threading.Lock()  # released to call in a helper
        self._wanted.acquire()
        self._helping = True  # until a helper waits
        self._busy = False  # the primary worker runs a call
        self._inbox: tuple[asyncio.AbstractEventLoop, _Inbox] | None = None
        self._inboxes: dict[asyncio.AbstractEventLoop, _Inbox] = {}

    async def run(self, func: Callable[..., _T], *args: object, inline: Inline | None = None) -> _T:
        """``func(*args)`` in a worker thread (in a thread of its own if it raises
        :class:`WouldBlock`, and on event loops other than asyncio). With ``inline``, the
        call is timed, and it runs on the loop's thread when ``inline`` says the calls
        are fast (see the module docstring); it must then be short (one key)."""
        loop = _get_running_loop()
        if loop is None or _current_task(loop) is None:  # trio, or its guest mode
            return await anyio.to_thread.run_sync(func, *args)
        last = self._inbox
        inbox = last[1] if last is not None and last[0] is loop else self._inbox_of(loop)
        if inline is not None and inline.ready and await inbox.wait_to_run_here():
            started = _clock()
            _local.worker = _local.on_loop = True  # locks held elsewhere: WouldBlock
            try:
                return func(*args)
            except WouldBlock:
                pass
            finally:
                _local.worker = _local.on_loop = False
                inline.timed(_clock() - started)
            return await anyio.to_thread.run_sync(func, *args)
        future: _Future[_T] = _Future(loop)
        call = _Call(func, args, future, inbox, inline)
        if not self._started:
            self._start()
        if not self._helping and (self._busy or self._queue.qsize()):  # call in a helper
            self._helping = True
            with contextlib.suppress(RuntimeError):  # another loop's thread did
                self._wanted.release()
        self._queue.put(call)
        try:
            return await future
        except WouldBlock:
            return await anyio.to_thread.run_sync(func, *args)
        except asyncio.CancelledError:
            if call.claim():
                raise  # it never runs
            await self._outlive(call, loop)
            raise

    @staticmethod
    async def _outlive(call: _Call[Any], loop: asyncio.AbstractEventLoop) -> None:
        """Wait for a running call whose caller was cancelled, whatever cancels it."""
        with anyio.CancelScope(shield=True):
            while not call.finished:
                call.waiter = loop.create_future()
                with contextlib.suppress(asyncio.CancelledError):
                    await call.waiter

    def _inbox_of(self, loop: asyncio.AbstractEventLoop) -> _Inbox:
        with self._guard:
            inbox = self._inboxes.get(loop)
            if inbox is None:
                for old in [old for old in self._inboxes if old.is_closed()]:
                    self._inboxes.pop(old).close()
                inbox = self._inboxes[loop] = _Inbox(loop)
            self._inbox = (loop, inbox)
            return inbox

    def _start(self) -> None:
        with self._guard:
            if not self._started:
                for index in range(self.count):
                    threading.Thread(
                        target=self._work,
                        args=(index == 0,),
                        name=f"kvstorage-fs-{index}",
                        daemon=True,
                    ).start()
                self._started = True

    def _forked(self) -> None:
        """(in a forked child) The threads stayed behind: start afresh when needed."""
        self._queue = queue.SimpleQueue()
        self._guard = threading.Lock()
        self._wanted = threading.Lock()
        self._wanted.acquire()
        self._helping = True
        self._busy = False
        for inbox in self._inboxes.values():
            inbox.forget()
        self._inboxes.clear()
        self._inbox = None
        self._started = False

    def _work(self, primary: bool) -> None:
        """Run calls until the process ends. The primary worker waits for calls; the
        helpers wait to be called in (by a caller finding the primary busy or calls
        queued) and help until the queue is empty: calls one at a time wake one thread
        only, and a slow call does not hold up the next."""
        _local.worker = True
        get, empty = self._queue.get, self._queue.empty
        held: _Inbox | None = None  # of the finished calls its loop was not woken for
        count = 0
        while True:
            call = None
            if not empty():
                try:  # noqa: SIM105 (contextlib.suppress costs more, on every call)
                    call = get(block=False)
                except queue.Empty:  # the other worker took it
                    pass
            if call is None:
                if primary:
                    self._busy = False  # before ringing: the loop's next call finds it idle
                if held is not None:
                    held.ring()
                    held, count = None, 0
                if not primary:
                    self._helping = False
                    self._wanted.acquire()
                    continue
                call = get()
                self._busy = True
            if not call.claim():
                continue  # its caller was cancelled before it started
            started = _clock()
            try:
                call.result = call.func(*call.args)
            except BaseException as exc:
                call.error = exc
            if call.inline is not None:
                call.inline.timed(_clock() - started)
            inbox = call.inbox
            if held is not None and held is not inbox:
                held.ring()
                count = 0
            inbox.put(call)
            held = inbox
            count += 1
            if count >= _BATCH:
                held.ring()
                held, count = None, 0


WORKERS = Workers(2)
os.register_at_fork(after_in_child=WORKERS._forked)
