"""EncryptedDriver: AES-256-GCM encryption at rest, with key rotation (``cryptography``).

A stored value is ``version (1 byte) | key id (4) | nonce (12) | ciphertext | tag (16)``:
33 bytes more than the value. The key id is the start of a hash of the encryption key, so
reading picks the right key without trying each. The associated data is the version, the
key id and the driver-relative key the value is stored at: a value copied or renamed to
another key fails authentication, like a modified one, and never reads as that key's value.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from collections.abc import Sequence
from contextlib import aclosing

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ..drivers.base import Driver, Stat, is_expired
from ..errors import ConditionFailedError, DriverError
from .base import TransformingDriver

__all__ = ["Cipher", "EncryptedDriver"]

_VERSION = b"\x01"
_ID_SIZE = 4
_NONCE_SIZE = 12
_TAG_SIZE = 16
_HEADER = len(_VERSION) + _ID_SIZE
_OVERHEAD = _HEADER + _NONCE_SIZE + _TAG_SIZE
_KEY_SIZE = 32


class Cipher:
    """AES-256-GCM with key rotation, bound to the storage key a value is stored at: what
    :class:`EncryptedDriver` applies to every value, usable alone (the sessions package
    encrypts session data with it).

    Args:
        keys: the encryption keys, newest first: each 32 bytes, or those bytes in URL-safe
            base64 (a ``str``, as :meth:`EncryptedDriver.generate_key` returns). The first
            key encrypts; every key decrypts.

    Raises:
        TypeError, ValueError: ``keys`` is empty or holds a key of the wrong type or size
            (the message never shows a key).
    """

    def __init__(self, keys: Sequence[bytes | str]) -> None:
        secrets = _parse_keys(keys)
        self._ids = [_key_id(secret) for secret in secrets]
        self._ciphers = [AESGCM(secret) for secret in secrets]

    def __repr__(self) -> str:
        return f"Cipher(keys=<{len(self._ciphers)} hidden>)"

    @property
    def key_count(self) -> int:
        """How many keys it holds."""
        return len(self._ciphers)

    def encrypt(self, key: str, value: bytes) -> bytes:
        """``value`` sealed under the first key, bound to the storage ``key``."""
        header = _VERSION + self._ids[0]
        nonce = os.urandom(_NONCE_SIZE)
        sealed = self._ciphers[0].encrypt(nonce, value, header + key.encode())
        return header + nonce + sealed

    def decrypt(self, key: str, stored: bytes) -> bytes:
        """The value sealed in ``stored`` at the storage ``key``.

        Raises:
            DriverError: ``stored`` is not an encrypted value, was sealed with a key not
                given, was modified, or was sealed for another storage key.
        """
        if len(stored) < _OVERHEAD or stored[:1] != _VERSION:
            raise DriverError(f"value at {key!r} is not an encrypted value", driver="encrypted")
        key_id = stored[1:_HEADER]
        candidates = [c for i, c in zip(self._ids, self._ciphers, strict=True) if i == key_id]
        if not candidates:
            raise DriverError(
                f"value at {key!r} was encrypted with a key that is not among the keys given",
                driver="encrypted",
            )
        nonce = stored[_HEADER : _HEADER + _NONCE_SIZE]
        associated = stored[:_HEADER] + key.encode()
        for cipher in candidates:  # more than one only if two keys share an id
            try:
                return cipher.decrypt(
                    nonce, memoryview(stored)[_HEADER + _NONCE_SIZE :], associated
                )
            except InvalidTag:
                continue
        raise DriverError(
            f"value at {key!r} failed authentication: it was modified, or written at another key",
            driver="encrypted",
        )

    def is_current(self, stored: bytes) -> bool:
        """True when ``stored`` was sealed under the first key (nothing to rotate)."""
        return stored[1:_HEADER] == self._ids[0]


class EncryptedDriver(TransformingDriver):
    """Encrypts every value written to ``inner`` with AES-256-GCM; decrypts on read.

    Args:
        inner: the driver that stores the encrypted bytes.
        keys: the encryption keys, newest first: each 32 bytes, or those bytes in URL-safe
            base64 (a ``str``, as :meth:`generate_key` returns). The first key encrypts
            every write; every key decrypts. To rotate, put a new key first and keep the
            old ones until :meth:`rotate` has rewritten what they encrypted.

    Raises:
        TypeError, ValueError: ``keys`` is empty or holds a key of the wrong type or size
            (the message never shows a key).

    Reading a value that was modified, copied from another key, written with a key that is
    not in ``keys``, or never encrypted raises :class:`~kvstorage.errors.DriverError`.
    Keys, etags, expiry and sizes are not encrypted: listing and metadata work as before,
    and the stored size is the value's plus 33 bytes.
    """

    name = "encrypted"

    def __init__(self, inner: Driver, *, keys: Sequence[bytes | str]) -> None:
        super().__init__(inner)
        self._cipher = Cipher(keys)

    @staticmethod
    def generate_key() -> str:
        """A new random key, in URL-safe base64 (for configuration files and variables)."""
        return base64.urlsafe_b64encode(os.urandom(_KEY_SIZE)).decode("ascii")

    def __repr__(self) -> str:
        return f"EncryptedDriver({self.inner!r}, keys=<{self._cipher.key_count} hidden>)"

    def encode(self, key: str, value: bytes) -> bytes:
        return self._cipher.encrypt(key, value)

    def decode(self, key: str, stored: bytes) -> bytes:
        return self._cipher.decrypt(key, stored)

    async def head(self, key: str) -> Stat | None:
        stat = await self.inner.head(key)
        return None if stat is None else stat._replace(size=max(stat.size - _OVERHEAD, 0))

    async def rotate(self, base: str = "") -> int:
        """Rewrite under the first key every live value under ``base`` that another key
        encrypted; return how many were rewritten. Values keep their expiry; a value
        written meanwhile is left alone (it is under the first key already). Afterwards
        the old keys can be dropped.

        Raises:
            DriverError: a value cannot be decrypted (those listed before it are rewritten
                already: run it again once that value is dealt with).
        """
        async with aclosing(self.inner.scan(base)) as scanned:
            keys = [key async for key in scanned]  # listed first: writes may upset a scan
        rewritten = 0
        for key in keys:
            record = await self.inner.get(key)
            if record is None or is_expired(record.expires_at):
                continue
            if self._cipher.is_current(record.value):
                continue
            value = self.encode(key, self.decode(key, record.value))
            try:
                await self.inner.set(key, value, expires_at=record.expires_at, if_match=record.etag)
            except ConditionFailedError:
                continue
            rewritten += 1
        return rewritten


def _key_id(secret: bytes) -> bytes:
    return hashlib.sha256(b"kvstorage key id\x00" + secret).digest()[:_ID_SIZE]


def _parse_keys(keys: Sequence[bytes | str]) -> list[bytes]:
    """The raw 32-byte keys, newest first, without repeats. Errors never show a key."""
    if isinstance(keys, str | bytes | bytearray) or not isinstance(keys, Sequence):
        raise TypeError("keys must be a list of keys (newest first), not a single key")
    if not keys:
        raise ValueError("keys must hold at least one key")
    parsed: list[bytes] = []
    for number, key in enumerate(keys, 1):
        secret = _parse_key(key, f"key {number} of {len(keys)}")
        if secret not in parsed:
            parsed.append(secret)
    return parsed


def _parse_key(key: bytes | str, which: str) -> bytes:
    if isinstance(key, str):
        try:
            key = base64.b64decode(key + "=" * (-len(key) % 4), altchars=b"-_", validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(f"{which} is not URL-safe base64") from None
    elif isinstance(key, bytes | bytearray):
        key = bytes(key)
    else:
        raise TypeError(f"{which} must be bytes or a base64 str, not {type(key).__name__}")
    if len(key) != _KEY_SIZE:
        raise ValueError(f"{which} is {len(key)} bytes; AES-256 needs {_KEY_SIZE}")
    return key
