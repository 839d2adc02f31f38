"""`SessionStore`: where sessions live -- IDs, storage keys, the stored form of a session
and its conditional reads and writes, and the per-user index. It knows nothing of
requests, cookies or expiry policy (that is :class:`~sessions.session.Session`'s and the
manager's).

IDs are never stored. A session lives at ``<prefix>:<handle>`` where the handle is the
SHA-256 of its ID (unpadded URL-safe base64, 43 characters), so a listing, a dump, a
backup or an error message of the storage holds no usable session ID. Its item is the JSON
object ``{"d": data, "f": flash values, "c": created, "a": last write, ...}`` (times in
Unix seconds; values serialized with the ``tagged`` serializer; optional fields for the
user, the CSRF token and per-session limits). A session that ended (destroyed, revoked) or
moved to a new ID (regenerated) leaves a small marker for a grace period, so no request
still running with the old version can bring it back.

A session bound to a user is also recorded in that user's index, one item per user at
``<prefix>-user:<user hash>`` (handle -> when the session ends at the latest), written
before the session itself: finding one user's sessions is one read, never a scan.

Values stay serialized (``msgspec.Raw``) while a session is in memory: a request
decodes only the values it reads and re-encodes only those it sets.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import logging
import os
import re
import secrets
import stat
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
from msgspec import Raw

from kvstorage import (
    ConditionFailedError,
    Driver,
    DriverError,
    SerializationError,
    Storage,
    TaggedSerializer,
    create_storage,
    normalize_key,
)
from kvstorage.retry import backoff

if TYPE_CHECKING:
    from kvstorage.wrappers import Cipher
from kvstorage.urls import redact_url

__all__ = [
    "DEFAULT_DIRECTORY",
    "GRACE",
    "SessionStore",
    "Stored",
    "fingerprint",
    "handle_of",
    "is_valid_handle",
    "is_valid_id",
]

logger = logging.getLogger("sessions")

#: Where sessions are kept when neither a storage nor ``$KVSTORAGE_URL`` is given.
DEFAULT_DIRECTORY = ".sessions"
#: Seconds the marker of an ended or moved session is kept.
GRACE = 3600.0

#: ``secrets.token_urlsafe(32)``: 256 random bits as 43 URL-safe characters; handles have
#: the same form.
_ID = re.compile(r"[A-Za-z0-9_-]{43}")
_SALT = secrets.token_bytes(16)
_serializer = TaggedSerializer()


def fingerprint(session_id: str) -> str:
    """A short salted hash of ``session_id`` for logs (the salt changes per process), so
    log lines about one session can be matched without the ID ever being written."""
    return hashlib.blake2s(session_id.encode(), key=_SALT, digest_size=4).hexdigest()


def is_valid_id(value: str) -> bool:
    """True when ``value`` has the form of a session ID (says nothing about whether such a
    session exists)."""
    return _ID.fullmatch(value) is not None


#: Handles and IDs have the same form.
is_valid_handle = is_valid_id


def _digest(data: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


@functools.lru_cache(maxsize=4096)
def handle_of(session_id: str) -> str:
    """The handle of a session: the SHA-256 of its ID in unpadded URL-safe base64. What
    the storage and :meth:`SessionManager.sessions_of` show instead of the ID. (Cached:
    the IDs of active sessions come back on every request.)"""
    return _digest(session_id.encode("ascii"))


class _Document(msgspec.Struct, omit_defaults=True):
    d: dict[str, Raw] = {}
    f: dict[str, Raw] = {}
    c: float = 0.0
    a: float = 0.0
    u: str | None = None  # the bound user
    um: dict[str, Any] | None = None  # what the app said about this session of the user
    t: str | None = None  # the CSRF token
    x: tuple[float | None, float | None] | None = None  # this session's (ttl, idle timeout)
    p: bool = False  # persistent cookie
    z: bool = False  # ended: a marker, not a session
    n: str | None = None  # moved: the handle of the regenerated session


_encode_document = msgspec.json.Encoder().encode
_decode_document = msgspec.json.Decoder(_Document).decode
_encode_index = msgspec.json.Encoder().encode
_decode_index = msgspec.json.Decoder(dict[str, float | None]).decode
_INDEX_GRACE = 60.0  # seconds an emptied user index is kept


class Stored(msgspec.Struct, frozen=True):
    """One version of a session in the storage (values still serialized). A struct:
    sessions build one or two per request, and a struct is the cheapest record to build
    (a named tuple of twelve fields costs four times as much)."""

    data: dict[str, Raw]
    flash: dict[str, Raw]
    created: float
    accessed: float
    etag: str | None  # None after our own write (the storage does not return the new etag)
    user: str | None = None
    user_meta: dict[str, Any] | None = None
    csrf: str | None = None
    limits: tuple[float | None, float | None] | None = None
    """This session's own (ttl, idle timeout), set by ``set_expiry``; None: the manager's."""
    persistent: bool = False
    ended: bool = False
    """A marker left by an ended session (destroyed or revoked)."""
    moved_to: str | None = None
    """A marker left by a regenerated session: the handle it moved to."""

    @property
    def live(self) -> bool:
        """True for a session, False for a marker."""
        return not self.ended and self.moved_to is None


def _check_private_directory(path: Path) -> None:
    """Create the directory ``path`` with mode 0700 if it is missing; otherwise make sure
    nobody but this process's user can change what is in it.

    Raises:
        PermissionError: ``path`` belongs to another user, or group or others may write
            to it (they could plant, replace or delete sessions).
        FileExistsError: ``path`` exists and is not a directory.
    """
    path.mkdir(mode=0o700, exist_ok=True)
    info = path.stat()
    where = path.resolve()
    if os.name != "posix":
        return
    if info.st_uid != os.geteuid():
        raise PermissionError(
            f"refusing to keep sessions in {where}: it belongs to user id {info.st_uid}, "
            f"not to this process's user (id {os.geteuid()}); remove it or pass a storage "
            "to SessionManager"
        )
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise PermissionError(
            f"refusing to keep sessions in {where}: group or others may write to it "
            f"(mode {stat.S_IMODE(info.st_mode):o}); run 'chmod 700 {where}' or pass a "
            "storage to SessionManager"
        )


def _default_storage() -> Storage:
    """The storage named by ``$KVSTORAGE_URL``, else an ``FSDriver`` in a private
    :data:`DEFAULT_DIRECTORY` of the working directory; logs which one."""
    url = os.environ.get("KVSTORAGE_URL")
    if not url:
        _check_private_directory(Path(DEFAULT_DIRECTORY))
        url = f"file://./{DEFAULT_DIRECTORY}"
    logger.info("sessions are stored in %s", redact_url(url))
    return create_storage(url, serializer="tagged")


class SessionStore:
    """The sessions of one storage under one key prefix.

    Args:
        storage: a :class:`~kvstorage.Storage` (or ``prefix_storage`` view), a driver, or
            a driver URL. Default: the URL in ``$KVSTORAGE_URL`` if set, else an
            ``FSDriver`` at ``./.sessions``, created on first use (mode 0700) and refused
            when another user owns it or group or others may write to it.
        prefix: sessions are stored at ``<prefix>:<handle>``.
        encryption_keys: encrypt each stored session with AES-256-GCM under the first of
            these keys (newest first; every key decrypts: rotate by putting a new key
            first). Needs ``pip install 'kvstorage[encryption]'``.
    """

    def __init__(
        self,
        storage: Storage | Driver | str | None = None,
        *,
        prefix: str = "session",
        encryption_keys: Sequence[bytes | str] | None = None,
    ) -> None:
        self.prefix = normalize_key(prefix)
        self._cipher: Cipher | None = None
        if encryption_keys is not None:
            from kvstorage.wrappers import Cipher  # needs the "encryption" extra

            self._cipher = Cipher(encryption_keys)
        self._owns_storage = not isinstance(storage, Storage)
        self._corrupt_reported: dict[str, None] = {}
        if storage is None or isinstance(storage, Storage):
            self._storage = storage
        else:
            self._storage = create_storage(storage, serializer="tagged")

    def __repr__(self) -> str:
        return f"<SessionStore prefix={self.prefix!r} storage={self._storage!r}>"

    @property
    def storage(self) -> Storage:
        """The storage holding the sessions (the default one is created on first use).

        Raises:
            PermissionError: the default directory is not private (see the class).
        """
        if self._storage is None:
            self._storage = _default_storage()
        return self._storage

    async def dispose(self) -> None:
        """Close the storage if this store created it (not one it was given)."""
        if self._owns_storage and self._storage is not None:
            await self._storage.dispose()

    # -- IDs and keys -------------------------------------------------------------------

    @staticmethod
    def new_id() -> str:
        """A fresh random session ID (256 bits, URL-safe)."""
        return secrets.token_urlsafe(32)

    def key(self, handle: str) -> str:
        """The storage key of the session with ``handle`` (see :func:`handle_of`)."""
        return f"{self.prefix}:{handle}"

    @property
    def index_prefix(self) -> str:
        """The base under which the per-user index lives."""
        return f"{self.prefix}-user"

    # -- values -------------------------------------------------------------------------

    @staticmethod
    def encode(value: Any) -> Raw:
        """``value`` serialized with the ``tagged`` serializer.

        Raises:
            SerializationError: the serializer cannot store ``value``.
        """
        return Raw(_serializer.dumps(value))

    @staticmethod
    def decode(raw: Raw, key: str, default: Any) -> Any:
        """The value serialized in ``raw`` (stored at ``key``), or ``default`` when it
        cannot be decoded (logged)."""
        try:
            return _serializer.loads(bytes(raw))
        except SerializationError as exc:
            logger.warning("session value %r is corrupt (%s); ignored", key, exc)
            return default

    # -- items --------------------------------------------------------------------------

    async def read(self, handle: str) -> Stored | None:
        """The session (or marker) stored under ``handle``, or None when there is none or
        its item is corrupt (logged once per session, and then treated as missing). Expiry
        is not checked here."""
        key = self.key(handle)
        entry = await self.storage.get_entry_raw(key)
        if entry is None:
            return None
        try:
            raw = entry.value if self._cipher is None else self._cipher.decrypt(key, entry.value)
            doc = _decode_document(raw)
        except (msgspec.DecodeError, msgspec.ValidationError, DriverError) as exc:
            self._report_corrupt(handle, exc)
            return None
        return Stored(
            doc.d, doc.f, doc.c, doc.a, entry.etag, doc.u, doc.um, doc.t, doc.x, doc.p,
            doc.z, doc.n,
        )  # fmt: skip

    async def write(
        self,
        handle: str,
        stored: Stored,
        *,
        ttl: float | None,
        if_absent: bool = False,
        if_match: str | None = None,
    ) -> None:
        """Store ``stored`` (its ``etag`` is ignored) under ``handle`` for ``ttl`` seconds
        (None: no limit).

        Raises:
            ConditionFailedError: ``if_absent`` and a session exists, or ``if_match`` and
                the stored version has another etag (or is gone). Nothing was written.
        """
        doc = _Document(
            stored.data, stored.flash, stored.created, stored.accessed, stored.user,
            stored.user_meta, stored.csrf, stored.limits, stored.persistent, stored.ended,
            stored.moved_to,
        )  # fmt: skip
        key, raw = self.key(handle), _encode_document(doc)
        if self._cipher is not None:
            raw = self._cipher.encrypt(key, raw)
        await self.storage.set_item_raw(key, raw, ttl=ttl, if_absent=if_absent, if_match=if_match)

    async def end(self, handle: str, *, if_match: str | None = None) -> None:
        """Replace the session ``handle`` by an "ended" marker (kept :data:`GRACE`
        seconds): no later write conditioned on its old version, and no creation of that
        handle, can succeed.

        Raises:
            ConditionFailedError: ``if_match`` and the stored version has another etag.
        """
        await self.write(
            handle, Stored({}, {}, 0.0, 0.0, None, ended=True), ttl=GRACE, if_match=if_match
        )

    async def move(self, handle: str, to: str, *, if_match: str) -> None:
        """Replace the session ``handle`` by a marker pointing at ``to`` (its regenerated
        handle), kept :data:`GRACE` seconds, if its version is still ``if_match``.

        Raises:
            ConditionFailedError: the stored version has another etag (or is gone).
        """
        await self.write(
            handle, Stored({}, {}, 0.0, 0.0, None, moved_to=to), ttl=GRACE, if_match=if_match
        )

    async def kill(self, handle: str) -> Stored | None:
        """End the session ``handle`` and whatever it was regenerated into, whatever
        request is running on them (see the module docstring); return the version that was
        live, if any. Its index entry is removed."""
        while True:
            current = await self.read(handle)
            if current is None or current.ended:
                return None
            if current.moved_to is not None:  # end where it went too (even if not there yet)
                moved = await self.kill(current.moved_to)
                await self.end(current.moved_to)
                return moved
            try:
                await self.end(handle, if_match=current.etag)
            except ConditionFailedError:
                continue  # written meanwhile: read it again
            if current.user is not None:
                await self.unbind(current.user, handle)
            return current

    # -- the per-user index -------------------------------------------------------------

    def _user_key(self, user_id: str) -> str:
        return f"{self.index_prefix}:{_digest(b'user:' + user_id.encode())}"

    async def _read_index(self, key: str) -> tuple[dict[str, float | None], str | None]:
        """The live entries of one user's index (handle -> when the session ends at the
        latest) and the etag to write it back (None: missing)."""
        entry = await self.storage.get_entry_raw(key)
        if entry is None:
            return {}, None
        try:
            index = _decode_index(entry.value)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            self._report_corrupt(key, exc)
            index = {}
        now = time.time()
        return {h: end for h, end in index.items() if end is None or end > now}, entry.etag

    async def _change_index(self, key: str, change: Callable[[dict[str, Any]], None]) -> None:
        """Apply ``change`` to the user index stored at ``key`` with a conditional write
        (re-read and re-applied when another request wrote it meanwhile)."""
        for attempt in range(100):
            index, etag = await self._read_index(key)
            change(index)
            ends = list(index.values())
            if not ends and etag is None:
                return
            ttl: float | None = _INDEX_GRACE  # an empty index goes away by itself
            if ends:
                ttl = None if None in ends else max(e for e in ends if e is not None) - time.time()
            try:
                await self.storage.set_item_raw(
                    key, _encode_index(index), ttl=ttl, if_absent=etag is None, if_match=etag
                )
            except ConditionFailedError:
                await backoff(attempt)
                continue
            return
        raise ConditionFailedError("the user's session index kept changing")

    async def bind(self, user_id: str, handle: str, *, ttl: float | None) -> None:
        """Record that the session ``handle`` belongs to ``user_id``, for ``ttl`` seconds
        (at least as long as the session may live; None: no limit)."""
        end = None if ttl is None else time.time() + ttl

        def add(index: dict[str, Any]) -> None:
            index[handle] = end

        await self._change_index(self._user_key(user_id), add)

    async def unbind(self, user_id: str, *handles: str) -> None:
        """Forget that the sessions ``handles`` belong to ``user_id``."""
        await self.prune_index(self._user_key(user_id), list(handles))

    async def handles_of(self, user_id: str) -> list[str]:
        """The handles of every session recorded for ``user_id`` (one read: one item per
        user, whatever the number of sessions stored; some may have ended)."""
        index, _ = await self._read_index(self._user_key(user_id))
        return list(index)

    async def index_entries(self) -> list[tuple[str, list[str]]]:
        """``(index key, handles)`` of every user (for cleanup: this lists them all)."""
        found = []
        async for key in self.storage.iter_keys(self.index_prefix):
            index, _ = await self._read_index(key)
            found.append((key, list(index)))
        return found

    async def prune_index(self, key: str, dead: list[str]) -> None:
        """Drop the entries ``dead`` from the index stored at ``key`` (found by
        :meth:`index_entries`)."""

        def drop(index: dict[str, Any]) -> None:
            for handle in dead:
                index.pop(handle, None)

        await self._change_index(key, drop)

    def _report_corrupt(self, handle: str, exc: Exception) -> None:
        """Log corrupt data once per session (of the last 1024), not on every request."""
        reported = self._corrupt_reported
        if handle in reported:
            return
        reported[handle] = None
        if len(reported) > 1024:
            del reported[next(iter(reported))]
        logger.warning(
            "session %s: stored data is corrupt (%s); starting a new session",
            fingerprint(handle),
            exc,
        )
