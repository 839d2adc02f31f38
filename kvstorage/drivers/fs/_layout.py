"""The name grammar of the fs layout, written once: how a key becomes path components,
how a directory entry reads back as a key, and the TTL header of a value file."""

from __future__ import annotations

import enum
import functools
import math
import os
import re
import struct

from ...errors import InvalidKeyError

MAGIC = b"\x00kvs\xffttl"
HEADER = struct.Struct("<8sd")  # magic, expires_at (+inf: no expiry)
NAME_LIMIT = 240  # bytes of a segment stored as one name (NAME_MAX is 255)
TEMP = ":tmp:"  # prefix of temp files and directories
TTL_MARK = ":ttl"  # in a directory that may hold files with a TTL header
LOCKS = ":locks"  # directory of the lock files, in base
SELF = ":value"  # the value of key `a` when `a` is also a directory

_NOT_NAMES = frozenset(("", ".", ".."))  # key segments that cannot be names

# Names no key segment can have: control characters, backslashes, and lone surrogates
# (bytes that are not UTF-8, as os.scandir returns them).
_FOREIGN = re.compile(r"[\x00-\x1f\x7f-\x9f\\\ud800-\udfff]")


class Name(enum.Enum):
    """What a directory entry is, by its name alone."""

    SEGMENT = 1  # a key segment: a value file, or a directory of keys below it
    PIECE = 2  # a directory holding the next piece of an over-long segment
    SELF = 3  # the value of the directory's own key
    OWN = 4  # the driver's own (temp files, markers, locks): never a key
    FOREIGN = 5  # a name no key can have: skipped


def classify(name: str) -> Name:
    """Classify one directory entry name (see :class:`Name`)."""
    if name[0] == ":":
        return Name.SELF if name == SELF else Name.OWN
    if _FOREIGN.search(name):
        return Name.FOREIGN
    if ":" in name:
        return Name.PIECE if name.endswith("::") and ":" not in name[:-2] else Name.FOREIGN
    return Name.SEGMENT


def _pieces(segment: str) -> list[str]:
    """Split a segment into names of at most ``NAME_LIMIT`` UTF-8 bytes (usually one)."""
    if len(segment) * 4 <= NAME_LIMIT:
        return [segment]
    data = segment.encode()
    if len(data) <= NAME_LIMIT:
        return [segment]
    pieces = []
    while data:
        cut = min(NAME_LIMIT, len(data))
        while cut < len(data) and data[cut] & 0xC0 == 0x80:  # not inside a character
            cut -= 1
        pieces.append(data[:cut].decode())
        data = data[cut:]
    return pieces


def components(key: str) -> list[str]:
    """The path components below base of a key or base: one name per segment, an
    over-long segment as ``<piece>::`` directories followed by its last piece."""
    if not key:
        return []
    segments = key.split(":")
    if (
        len(key) * 4 <= NAME_LIMIT  # every segment fits one name, whatever its characters
        and "/" not in key
        and "\x00" not in key
        and _NOT_NAMES.isdisjoint(segments)
    ):
        return segments  # the usual key, without the checks one segment at a time
    parts: list[str] = []
    for segment in segments:
        if segment in _NOT_NAMES or "/" in segment or "\x00" in segment:
            raise InvalidKeyError(f"key {key!r} cannot be stored as a path")
        pieces = _pieces(segment)
        parts.extend(piece + "::" for piece in pieces[:-1])
        parts.append(pieces[-1])
    return parts


@functools.lru_cache(maxsize=4096)
def file_path(key: str) -> tuple[tuple[str, ...], str]:
    """(directory components, file name) of a key (cached: this is on every hot path)."""
    parts = components(key)
    if not parts:
        raise InvalidKeyError("empty key")
    return tuple(parts[:-1]), parts[-1]


@functools.lru_cache(maxsize=4096)
def joined_path(key: str) -> bytes:
    """The path of a key's file below base, as one relative path (for
    :func:`~kvstorage.drivers.fs._dirs.open_beneath`)."""
    parts, name = file_path(key)
    return os.fsencode(os.sep.join((*parts, name)))


def decode_path(path: str) -> tuple[str, bool] | None:
    """The key of a path relative to base and whether the path ends inside an over-long
    segment (then the key is the base to rescan); None for anything that is not a key's
    path (temp files, markers, foreign names)."""
    segments: list[str] = []
    piece = ""
    names = path.split(os.sep)
    for index, name in enumerate(names):
        kind = classify(name) if name not in ("", ".", "..") else Name.FOREIGN
        if kind is Name.PIECE:
            piece += name[:-2]
        elif kind is Name.SEGMENT:
            segments.append(piece + name)
            piece = ""
        elif kind is Name.SELF and index == len(names) - 1 and segments and not piece:
            break
        else:
            return None
    return ":".join(segments), bool(piece)


def header(expires_at: float | None, value: bytes) -> bytes:
    """The header a value file needs: none for a value without TTL (unless the value
    itself starts with the magic bytes)."""
    if expires_at is None and value[: len(MAGIC)] != MAGIC:
        return b""
    return HEADER.pack(MAGIC, math.inf if expires_at is None else expires_at)


def parse_header(head: bytes) -> tuple[int, float | None]:
    """(header length, expires_at) of a file starting with ``head``."""
    if len(head) >= HEADER.size and head.startswith(MAGIC):
        _, expires_at = HEADER.unpack_from(head)
        return HEADER.size, None if math.isinf(expires_at) else expires_at
    return 0, None


def etag(st: os.stat_result) -> str:
    """``<inode>-<mtime ns>-<size>``: every write makes a new file with a fresh mtime."""
    return f"{st.st_ino:x}-{st.st_mtime_ns:x}-{st.st_size:x}"
