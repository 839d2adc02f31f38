"""`SessionStore`: where sessions live -- IDs, storage keys, the stored form of a session
and its conditional reads and writes. It knows nothing of requests, cookies or expiry
policy (that is :class:`~sessions.session.Session`'s and the manager's).

Stored form: one item per session at ``<prefix>:<id>``, the JSON object
``{"d": data, "f": flash values, "c": created, "a": last write}`` (times in Unix seconds)
in which every value is serialized with the ``tagged`` serializer.

Values stay serialized (``msgspec.Raw``) while a session is in memory: a request
decodes only the values it reads and re-encodes only those it sets.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
from msgspec import Raw

from kvstorage import (
    Driver,
    SerializationError,
    Storage,
    TaggedSerializer,
    create_storage,
    normalize_key,
)
from kvstorage.urls import redact_url

__all__ = ["DEFAULT_DIRECTORY", "SessionStore", "Stored", "fingerprint", "is_valid_id"]

logger = logging.getLogger("sessions")

#: Where sessions are kept when neither a storage nor ``$KVSTORAGE_URL`` is given.
DEFAULT_DIRECTORY = ".sessions"

#: ``secrets.token_urlsafe(32)``: 256 random bits as 43 URL-safe characters.
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


class _Document(msgspec.Struct):
    d: dict[str, Raw]
    f: dict[str, Raw]
    c: float
    a: float


_encode_document = msgspec.json.Encoder().encode
_decode_document = msgspec.json.Decoder(_Document).decode


@dataclass(frozen=True, slots=True)
class Stored:
    """One version of a session in the storage (values still serialized)."""

    data: dict[str, Raw]
    flash: dict[str, Raw]
    created: float
    accessed: float
    etag: str | None  # None after our own write (the storage does not return the new etag)


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
        prefix: sessions are stored at ``<prefix>:<id>``.
    """

    def __init__(
        self, storage: Storage | Driver | str | None = None, *, prefix: str = "session"
    ) -> None:
        self.prefix = normalize_key(prefix)
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

    def key(self, session_id: str) -> str:
        """The storage key of the session ``session_id``."""
        return f"{self.prefix}:{session_id}"

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

    async def read(self, session_id: str) -> Stored | None:
        """The session stored under ``session_id``, or None when there is none or its item
        is corrupt (logged once per session, and then treated as missing). Expiry is not
        checked here."""
        entry = await self.storage.get_entry_raw(self.key(session_id))
        if entry is None:
            return None
        try:
            document = _decode_document(entry.value)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            self._report_corrupt(session_id, exc)
            return None
        return Stored(document.d, document.f, document.c, document.a, entry.etag)

    async def write(
        self,
        session_id: str,
        stored: Stored,
        *,
        ttl: float | None,
        if_absent: bool = False,
        if_match: str | None = None,
    ) -> None:
        """Store ``stored`` (its ``etag`` is ignored) under ``session_id`` for ``ttl``
        seconds (None: no limit).

        Raises:
            ConditionFailedError: ``if_absent`` and a session exists, or ``if_match`` and
                the stored version has another etag (or is gone). Nothing was written.
        """
        raw = _encode_document(
            _Document(stored.data, stored.flash, stored.created, stored.accessed)
        )
        await self.storage.set_item_raw(
            self.key(session_id), raw, ttl=ttl, if_absent=if_absent, if_match=if_match
        )

    async def remove(self, session_id: str) -> None:
        """Delete the session ``session_id`` (no error when it is missing)."""
        await self.storage.remove_item(self.key(session_id))

    def _report_corrupt(self, session_id: str, exc: Exception) -> None:
        """Log corrupt data once per session (of the last 1024), not on every request."""
        reported = self._corrupt_reported
        if session_id in reported:
            return
        reported[session_id] = None
        if len(reported) > 1024:
            del reported[next(iter(reported))]
        logger.warning(
            "session %s: stored data is corrupt (%s); starting a new session",
            fingerprint(session_id),
            exc,
        )
