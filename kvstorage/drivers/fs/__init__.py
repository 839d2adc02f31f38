"""FSDriver: one file per key in a plain directory tree. Runs on any anyio backend
(asyncio, trio); needs a POSIX system (Linux, macOS: ``fcntl.flock``, ``dir_fd`` support).

Layout
------
The folder is a plain folder, the layout every file tool expects: key segments are
directories, the last one a file holding the value::

    key "users:42"      ->  <base>/users/42
    key "a:b:c"         ->  <base>/a/b/c

A folder written by other tools (``docs/readme.txt``) lists as ``docs:readme.txt`` and
reads back its exact bytes. Keys ``a`` and ``a:b`` can both exist (unstorage fails there
with ``ENOTDIR``): while ``a`` is also a directory, the value of ``a`` lives inside it, in
the reserved file ``<base>/a/:value``. Writing ``a:b`` when ``a`` is a file moves the
value into the directory atomically (readers see it throughout), and it stays there until
the directory is removed. A segment longer than 240 UTF-8 bytes (file names are limited
to 255) is split into pieces stored as nested directories named ``<piece>::``; listing
joins them back. Names that *start* with ``:`` are the driver's own (temp files, TTL
markers, ``:value``, the ``:locks`` directory) and are never listed as keys; names no key
can have (with a ``:``, a backslash or a control character) are skipped. ``remove``
deletes directories it leaves empty; ``clear`` and ``sweep`` also delete directories
holding nothing but a TTL marker.

Permissions: directories the driver creates are ``0700`` and files ``0600``, whatever the
umask (``file_mode=``/``dir_mode=`` change it), so other local accounts can neither read
values nor take the lock files.

Values, expiry and etags
------------------------
A value written without TTL is stored as exactly its bytes. A value written with a TTL
starts with a 16-byte header (8 magic bytes ``\\x00kvs\\xffttl`` and the expiry as a
little-endian float64), so the expiry is atomic with the value, survives restarts and is
seen by other processes. A value written without TTL that happens to start with the magic
bytes also gets a header (with "no expiry"), so every value reads back exactly.

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
A write goes to a temp file ``:tmp:<random per process>-<counter>`` in the target
directory (random bytes instead, should that name be taken), is optionally fsynced
(``fsync=True``, which also syncs the directory) and is moved into place with
``os.replace``: readers see the old or the new value, never a torn one, even if the writer
is killed. Temp files left by a killed writer are never listed; :meth:`FSDriver.sweep` and
:meth:`FSDriver.clear` delete those older than :attr:`FSDriver.stale_temp_after` seconds.

Every write (conditional or not, ``remove`` and ``clear`` included) holds an exclusive
``fcntl.flock`` on one of 64 lock files in ``<base>/:locks`` (chosen by a hash of the key)
plus an in-process lock, so conditions are atomic against every writer in every process
that uses the same base directory. Reads take no lock. A thread never holds two key locks:
moving the value of ``a`` into its directory is done holding only the lock of ``a``.

Safety
------
Paths are opened relative to the base directory one component at a time with
``O_NOFOLLOW``: the driver never follows a symbolic link below ``base`` (a link raises
:class:`~kvstorage.errors.DriverError` naming the path; listing skips links), so no key
can reach outside ``base``. Only regular files are read, and lock files and markers are
opened without blocking: a FIFO or device planted in the tree is an error, never a hang.
One operation holds at most a few dozen descriptors however deep the key (upper
directories are reopened when needed), so deep keys cannot exhaust the process's limit.

Watching
--------
``storage.watch()`` uses native file watching (``watchfiles``: inotify, FSEvents, ...), so
it reports changes made by every process and by other tools, not only by this storage.
Events arrive in batches, typically 50-100 ms after the write; within a batch the events
of one key collapse into one, judged by what is on disk when the batch is read (a live
key is an ``"update"``, a deleted or expired one a ``"remove"``). Temp files, markers and
directories never produce events. Expiry itself produces no event.

Threads
-------
No file is touched on the event loop. On asyncio, calls on one key (``get``, ``head``,
``set``, ``remove``, ``touch``) run in two worker threads shared by the process
(``_worker``): a primary one, and a helper called in while the primary is busy. The calls
made while the workers are busy are taken without waking a thread each, and results go
back to the loop in batches (a worker wakes it through a pipe it watches, and each caller
resumes within the delivery), so a hundred concurrent reads cost a few wake-ups, not a
hundred thread hops. A worker never waits for a key's lock (held by another process, say): that
call moves to a thread of its own, so the other keys' calls go on. A cancelled caller
never leaves half an operation: a call not started never runs, a running one is waited
for. Batches, listing chunks, ``clear`` and ``sweep`` take one ``anyio.to_thread`` hop
each, and on trio every call does. On Linux a read below the top level opens its file with
one ``openat2`` call (refusing links, staying beneath base) instead of directory by
directory.

Expiry is not native: expired files are invisible but stay on disk until
:meth:`FSDriver.sweep` (``storage.sweep()``) deletes them.

Modules: ``_layout`` (the name grammar and the TTL header), ``_dirs`` (descriptor
plumbing), ``_driver`` (:class:`FSDriver`), ``_watch`` (the watcher thread), ``_worker``
(the worker threads).
"""

from ._driver import FSDriver

__all__ = ["FSDriver"]
