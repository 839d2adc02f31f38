"""Serializers turn values into the bytes a driver stores, and back.

Two ship with kvstorage, both JSON encoded with msgspec (exact for integers of any size):

* ``json`` (the default) round-trips every JSON value exactly: ``None``, ``bool``, ``int``,
  finite ``float``, ``str``, ``list`` and ``dict`` with ``str`` keys. Tuples come back as
  lists. Anything else -- including NaN and infinities, which JSON cannot hold -- raises
  :class:`~kvstorage.errors.SerializationError` before anything is written.
* ``tagged`` also round-trips ``datetime``, ``date``, ``time``, ``timedelta``, ``Decimal``,
  ``UUID``, ``bytes``, ``set``, ``frozenset``, ``tuple``, non-finite floats and dicts with
  non-string keys, as small ``{"$kv": tag, "v": payload}`` objects.

Never pickle: stored data can never execute code when read.
"""

from __future__ import annotations

import base64
import math
import uuid
from collections.abc import Callable
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from typing import Any, Protocol, runtime_checkable

import msgspec

from .errors import SerializationError

__all__ = ["JSONSerializer", "Serializer", "TaggedSerializer", "get_serializer"]

_SCALARS = frozenset({str, int, bool, type(None)})
_TAG = "$kv"
_TAG_BYTES = b'"$kv"'
_encode = msgspec.json.encode
_decode = msgspec.json.decode


@runtime_checkable
class Serializer(Protocol):
    """Turns values into bytes and back. ``dumps`` raises
    :class:`~kvstorage.errors.SerializationError` for values it cannot round-trip, and
    ``loads`` for bytes it cannot read."""

    name: str

    def dumps(self, value: Any) -> bytes:
        """Serialize ``value``."""
        ...

    def loads(self, data: bytes) -> Any:
        """Deserialize ``data``."""
        ...


DECODE_ERRORS = (msgspec.DecodeError, RecursionError)
"""What :func:`fast_loads` may raise besides :class:`SerializationError`."""


def decode_error(exc: Exception) -> SerializationError:
    """The :class:`SerializationError` for one of :data:`DECODE_ERRORS`."""
    if isinstance(exc, RecursionError):
        return SerializationError("stored value is nested too deeply")
    return SerializationError(f"stored bytes are not valid JSON: {exc}")


def fast_loads(serializer: Serializer) -> Callable[[bytes], Any]:
    """``serializer.loads``, or for the JSON serializer msgspec's decoder itself (one
    Python call less per read), which raises :data:`DECODE_ERRORS` where ``loads``
    raises :class:`SerializationError`: for the core's hot path, which translates them
    with :func:`decode_error`."""
    return _decode if type(serializer) is JSONSerializer else serializer.loads


def _unsupported(value: Any, name: str) -> SerializationError:
    return SerializationError(
        f"cannot serialize {type(value).__name__} with the {name!r} serializer: {value!r:.80}"
    )


def _encoding_error(exc: Exception) -> SerializationError:
    if isinstance(exc, SerializationError):
        return exc
    if isinstance(exc, RecursionError):
        return SerializationError("value is nested too deeply")
    return SerializationError(str(exc))


def _check_json(value: Any) -> None:
    """Raise unless ``value`` is made only of JSON types (str keys, finite floats)."""
    kind = type(value)
    if kind is dict:
        for key, item in value.items():
            if type(key) is not str:
                raise SerializationError(f"dict keys must be str, not {type(key).__name__}")
            if type(item) not in _SCALARS:
                _check_json(item)
    elif kind is list or kind is tuple:
        for item in value:
            if type(item) not in _SCALARS:
                _check_json(item)
    elif kind is float:
        if not math.isfinite(value):
            raise SerializationError(f"JSON cannot hold the float {value!r}")
    elif isinstance(value, bool | str | int):
        pass  # subclasses (StrEnum, IntEnum) are stored as their base type
    elif isinstance(value, float):
        _check_json(float(value))
    elif isinstance(value, dict | list | tuple):
        _check_json(dict(value) if isinstance(value, dict) else list(value))
    else:
        raise _unsupported(value, "json")


class JSONSerializer:
    """Plain JSON, exact for every JSON value. The default serializer."""

    name = "json"

    def dumps(self, value: Any) -> bytes:
        """Serialize a JSON value; raise :class:`SerializationError` for anything else."""
        try:
            kind = type(value)
            if kind is dict:  # the common case, one level inlined (keys: no item tuples)
                for key in value:
                    if type(key) is not str or type(value[key]) not in _SCALARS:
                        _check_json(value)
                        break
            elif kind not in _SCALARS:
                _check_json(value)
            return _encode(value)
        except (TypeError, ValueError, OverflowError, RecursionError) as exc:
            raise _encoding_error(exc) from None

    def loads(self, data: bytes) -> Any:
        """Deserialize JSON bytes."""
        try:
            return _decode(data)
        except DECODE_ERRORS as exc:
            raise decode_error(exc) from None

    def __repr__(self) -> str:
        return "JSONSerializer()"


def _nonfinite(value: float) -> dict[str, Any]:
    return {_TAG: "float", "v": repr(value)}


_TAG_ENCODERS: dict[type, Callable[[Any], Any]] = {
    datetime: lambda v: {_TAG: "datetime", "v": v.isoformat()},
    date: lambda v: {_TAG: "date", "v": v.isoformat()},
    time: lambda v: {_TAG: "time", "v": v.isoformat()},
    timedelta: lambda v: {_TAG: "timedelta", "v": [v.days, v.seconds, v.microseconds]},
    Decimal: lambda v: {_TAG: "decimal", "v": str(v)},
    uuid.UUID: lambda v: {_TAG: "uuid", "v": str(v)},
    bytes: lambda v: {_TAG: "bytes", "v": base64.b64encode(v).decode("ascii")},
    tuple: lambda v: {_TAG: "tuple", "v": [_tag(x) for x in v]},
    set: lambda v: {_TAG: "set", "v": [_tag(x) for x in v]},
    frozenset: lambda v: {_TAG: "frozenset", "v": [_tag(x) for x in v]},
}

_TAG_DECODERS: dict[str, Callable[[Any], Any]] = {
    "datetime": datetime.fromisoformat,
    "date": date.fromisoformat,
    "time": time.fromisoformat,
    "timedelta": lambda v: timedelta(days=v[0], seconds=v[1], microseconds=v[2]),
    "decimal": Decimal,
    "uuid": uuid.UUID,
    "bytes": lambda v: base64.b64decode(v, validate=True),
    "tuple": lambda v: tuple(_untag(x) for x in v),
    "set": lambda v: {_untag(x) for x in v},
    "frozenset": lambda v: frozenset(_untag(x) for x in v),
    "float": float,
    "map": lambda v: {_untag(k): _untag(x) for k, x in v},
}


_EXACT: dict[type, Callable[[Any], Any]] = {
    str: str.__str__,
    int: int.__int__,
    float: float.__float__,
    dict: dict,
    list: list,
}


def _tag(value: Any) -> Any:
    kind = type(value)
    if kind in _SCALARS:
        return value
    if kind is dict:
        if _TAG in value or any(type(k) is not str for k in value):
            return {_TAG: "map", "v": [[_tag(k), _tag(x)] for k, x in value.items()]}
        return {k: x if type(x) in _SCALARS else _tag(x) for k, x in value.items()}
    if kind is list:
        return [x if type(x) in _SCALARS else _tag(x) for x in value]
    if kind is float:
        return value if math.isfinite(value) else _nonfinite(value)
    encoder = _TAG_ENCODERS.get(kind)
    if encoder is not None:
        return encoder(value)
    # Subclasses (StrEnum, IntEnum, OrderedDict, ...) are stored as their base type.
    for base, encoder in _TAG_ENCODERS.items():
        if isinstance(value, base):
            return encoder(value)
    for base, exact in _EXACT.items():
        if isinstance(value, base):
            return _tag(exact(value))
    raise _unsupported(value, "tagged")


def _untag(value: Any) -> Any:
    kind = type(value)
    if kind is list:
        return [_untag(x) for x in value]
    if kind is dict:
        tag = value.get(_TAG)
        if tag is None:
            return {k: _untag(x) for k, x in value.items()}
        decoder = _TAG_DECODERS.get(tag) if isinstance(tag, str) else None
        if decoder is None:
            raise SerializationError(f"unknown tag {tag!r} in stored value")
        return decoder(value["v"])
    return value


class TaggedSerializer:
    """JSON with tags for the Python types JSON lacks (see the module docstring)."""

    name = "tagged"

    def dumps(self, value: Any) -> bytes:
        """Serialize ``value``; raise :class:`SerializationError` for unsupported types."""
        try:
            return _encode(_tag(value))
        except (TypeError, ValueError, OverflowError, RecursionError) as exc:
            raise _encoding_error(exc) from None

    def loads(self, data: bytes) -> Any:
        """Deserialize bytes written by :meth:`dumps` (or plain JSON)."""
        try:
            value = _decode(data)
            return _untag(value) if _TAG_BYTES in data else value
        except SerializationError:
            raise
        except (msgspec.DecodeError, RecursionError) as exc:
            raise SerializationError(f"stored bytes are not valid tagged JSON: {exc}") from None
        except Exception as exc:  # a tagged value its type rejects (overflow, bad digits...)
            raise SerializationError(f"a stored tagged value is invalid: {exc!r:.200}") from None

    def __repr__(self) -> str:
        return "TaggedSerializer()"


_BUILTIN: dict[str, Serializer] = {"json": JSONSerializer(), "tagged": TaggedSerializer()}


def get_serializer(serializer: str | Serializer) -> Serializer:
    """Return the serializer named ``"json"`` or ``"tagged"``, or ``serializer`` itself."""
    if isinstance(serializer, str):
        try:
            return _BUILTIN[serializer]
        except KeyError:
            raise ValueError(
                f"unknown serializer {serializer!r}; known: {', '.join(_BUILTIN)}"
            ) from None
    if not isinstance(serializer, Serializer):
        raise TypeError(f"{serializer!r} has no dumps/loads")
    return serializer
