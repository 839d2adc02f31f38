"""The json and tagged serializers: exact round trips and clear errors."""

from __future__ import annotations

import enum
import math
import uuid
from datetime import UTC, date, datetime, time, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvstorage import JSONSerializer, SerializationError, TaggedSerializer, get_serializer

from .support.helpers import json_values

json_ser = JSONSerializer()
tagged = TaggedSerializer()


@given(json_values)
def test_property_json_round_trips_exactly(value: Any) -> None:
    assert json_ser.loads(json_ser.dumps(value)) == value


@given(json_values)
def test_property_tagged_reads_what_json_writes(value: Any) -> None:
    assert tagged.loads(json_ser.dumps(value)) == value
    assert tagged.loads(tagged.dumps(value)) == value


rich_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text()
    | st.binary()
    | st.datetimes()
    | st.datetimes(timezones=st.just(UTC))
    | st.dates()
    | st.times()
    | st.timedeltas()
    | st.decimals(allow_nan=False)
    | st.uuids(),
    lambda children: (
        st.lists(children, max_size=4)
        | st.tuples(children, children)
        | st.frozensets(st.integers() | st.text(), max_size=4)
        | st.sets(st.integers() | st.text(), max_size=4)
        | st.dictionaries(st.text(max_size=8) | st.integers(), children, max_size=4)
    ),
    max_leaves=20,
)


@given(rich_values)
def test_property_tagged_round_trips_rich_values(value: Any) -> None:
    got = tagged.loads(tagged.dumps(value))
    assert got == value
    assert type(got) is type(value)


def test_tagged_keeps_types_and_time_zones() -> None:
    value = {
        "naive": datetime(2024, 1, 2, 3, 4, 5, 6),
        "aware": datetime(2024, 1, 2, 3, 4, 5, tzinfo=timezone(timedelta(hours=5, minutes=30))),
        "t": time(1, 2, 3, 4),
        "d": date(2024, 2, 29),
        "td": timedelta(days=-3, microseconds=7),
        "dec": Decimal("1.10"),
        "nan": Decimal("NaN"),
        "u": uuid.UUID(int=1),
        "b": b"\x00\xff",
        "s": {1, 2},
        "fs": frozenset({"a"}),
        "tup": (1, (2,)),
        "inf": float("inf"),
        "$kv": "a user key that looks like a tag",
        7: "int key",
    }
    got = tagged.loads(tagged.dumps(value))
    assert got["aware"].utcoffset() == timedelta(hours=5, minutes=30)
    assert got["naive"].tzinfo is None
    assert str(got["dec"]) == "1.10"
    assert got["nan"].is_nan()
    assert math.isinf(got["inf"])
    assert got["tup"] == (1, (2,)) and isinstance(got["tup"][1], tuple)
    assert got["$kv"] == value["$kv"] and got[7] == "int key"
    assert {k: v for k, v in got.items() if k != "nan"} == {
        k: v for k, v in value.items() if k != "nan"
    }


class Color(enum.Enum):
    RED = "red"


class Level(enum.IntEnum):
    HIGH = 3


class Name(str, enum.Enum):  # noqa: UP042 - the pre-3.11 idiom must work too
    ADA = "ada"


@pytest.mark.parametrize(
    "value",
    [
        float("nan"),
        float("inf"),
        {1: 2},
        {"a": {None: 1}},
        date(2024, 1, 1),
        uuid.uuid4(),
        Decimal(1),
        b"x",
        {1},
        Color.RED,
        object(),
    ],
)
def test_json_rejects_what_it_cannot_round_trip(value: Any) -> None:
    with pytest.raises(SerializationError):
        json_ser.dumps(value)


@pytest.mark.parametrize("value", [Color.RED, object(), bytearray(b"x"), 1j])
def test_tagged_rejects_unknown_types(value: Any) -> None:
    with pytest.raises(SerializationError):
        tagged.dumps(value)


def test_subclasses_of_builtins_are_stored_as_their_base_type() -> None:
    assert json_ser.loads(json_ser.dumps([Level.HIGH, Name.ADA])) == [3, "ada"]
    assert tagged.loads(tagged.dumps([Level.HIGH, Name.ADA])) == [3, "ada"]


def test_deep_nesting_is_a_clean_error() -> None:
    deep: Any = []
    for _ in range(100_000):
        deep = [deep]
    with pytest.raises(SerializationError):
        json_ser.dumps(deep)
    with pytest.raises(SerializationError):
        tagged.dumps(deep)
    with pytest.raises(SerializationError):
        json_ser.loads(b"[" * 100_000 + b"]" * 100_000)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"{",
        b"\xff\xfe",
        b"NaN",
        b'{"$kv": "nope", "v": 1}',
        # tagged values whose type rejects what is stored (a corrupt or forged item)
        b'{"$kv": "timedelta", "v": [1e308, 0, 0]}',
        b'{"$kv": "timedelta", "v": [1]}',
        b'{"$kv": "decimal", "v": "not a number"}',
        b'{"$kv": "uuid", "v": "zzz"}',
        b'{"$kv": "datetime", "v": 5}',
        b'{"$kv": "bytes", "v": "***"}',
    ],
)
def test_undecodable_bytes_raise_serialization_error(data: bytes) -> None:
    with pytest.raises(SerializationError):
        tagged.loads(data)
    if b"$kv" not in data:
        with pytest.raises(SerializationError):
            json_ser.loads(data)


def test_get_serializer() -> None:
    assert get_serializer("json") is get_serializer("json")
    assert get_serializer(tagged) is tagged
    with pytest.raises(ValueError, match="json, tagged"):
        get_serializer("pickle")
    with pytest.raises(TypeError):
        get_serializer(object())  # type: ignore[arg-type]
    assert issubclass(SerializationError, TypeError)
