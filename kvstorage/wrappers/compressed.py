"""CompressedDriver: zstd compression of large values (``zstandard``).

A compressed value is stored as a marker byte (``0x00``) followed by a zstd frame, whose
own magic number (``28 b5 2f fd``) comes next: reads decompress exactly the values that
start with those five bytes. Everything else -- values below ``min_size``, values that do
not shrink, and values written before the wrapper was added -- is stored and read back
unchanged. (A value that itself starts with the five bytes is always compressed, so it
cannot be mistaken for one that was.)
"""

from __future__ import annotations

import zstandard

from ..drivers.base import Driver
from ..errors import DriverError
from .base import TransformingDriver

__all__ = ["CompressedDriver"]

_MARKER = b"\x00"
_SIGNATURE = _MARKER + b"\x28\xb5\x2f\xfd"  # the marker, then the zstd frame magic


class CompressedDriver(TransformingDriver):
    """Compresses values of ``min_size`` bytes or more with zstd before ``inner`` stores
    them; decompresses on read.

    Args:
        inner: the driver that stores the bytes.
        min_size: values shorter than this are stored as they are (default 1 KiB).
        level: zstd compression level, up to 22 (default 3: fast, and most of the gain).

    A value is stored compressed only when that makes it smaller. Sizes reported by
    ``get_meta`` are those of the value, not of what is stored. Put compression inside
    encryption, ``EncryptedDriver(CompressedDriver(x), keys=...)``: encrypted bytes do not
    compress.
    """

    name = "compressed"

    def __init__(self, inner: Driver, *, min_size: int = 1024, level: int = 3) -> None:
        super().__init__(inner)
        if not isinstance(min_size, int) or isinstance(min_size, bool) or min_size < 0:
            raise ValueError(f"min_size must be an int >= 0, got {min_size!r}")
        if (
            not isinstance(level, int)
            or isinstance(level, bool)
            or not -(2**17) <= level <= zstandard.MAX_COMPRESSION_LEVEL
        ):
            raise ValueError(f"level must be an int up to {zstandard.MAX_COMPRESSION_LEVEL}")
        self.min_size = min_size
        self.level = level
        self._compressor = zstandard.ZstdCompressor(level=level)
        self._decompressor = zstandard.ZstdDecompressor()

    def __repr__(self) -> str:
        return f"CompressedDriver({self.inner!r}, min_size={self.min_size}, level={self.level})"

    def encode(self, key: str, value: bytes) -> bytes:
        ambiguous = value.startswith(_SIGNATURE)
        if len(value) < self.min_size and not ambiguous:
            return value
        packed = _MARKER + self._compressor.compress(value)
        return packed if ambiguous or len(packed) < len(value) else value

    def decode(self, key: str, stored: bytes) -> bytes:
        if not stored.startswith(_SIGNATURE):
            return stored
        try:
            return self._decompressor.decompress(memoryview(stored)[1:])
        except zstandard.ZstdError as exc:
            raise DriverError(f"value at {key!r} is corrupt: {exc}", driver=self.name) from exc
