"""Mount routing rules (kvstorage._mounts), pure: no driver is ever called."""

from __future__ import annotations

import pytest

from kvstorage import get_serializer
from kvstorage._mounts import Group, MountPoint, MountTable
from kvstorage.drivers import MemoryDriver


def table(*bases: str) -> tuple[MountTable, dict[str, MountPoint]]:
    """A table with a root and a mount at each base; the drivers are never called."""
    mounts = MountTable()
    made = {}
    for base in ("", *bases):
        driver = MemoryDriver()  # routing never calls a driver
        point = MountPoint(base, base + ":" if base else "", driver, get_serializer("json"))
        mounts.add(point)
        made[base] = point
    return mounts, made


def test_the_longest_covering_base_wins_by_whole_segments() -> None:
    mounts, m = table("a", "a:b", "c")
    assert mounts.locate("a:b:x") == (m["a:b"], "x")
    assert mounts.locate("a:bc") == (m["a"], "bc")
    assert mounts.locate("ab") == (m[""], "ab")
    assert mounts.locate("a") == (m[""], "a")  # a base covers keys strictly below it
    assert mounts.mount_for_base("a") is m["a"]
    assert mounts.mount_for_base("a:b:z") is m["a:b"]
    assert [p.base for p in mounts.routes] == ["a:b", "a", "c", ""]


def test_without_mounts_the_root_takes_keys_unchanged() -> None:
    mounts, m = table()
    assert mounts.locate("x:y") == (m[""], "x:y")
    assert mounts.group(["x", "y"], "view:") == {m[""]: Group(["x", "y"], ["view:x", "view:y"])}


def test_slices_of_the_root_mask_every_nested_mount() -> None:
    mounts, _ = table("a", "a:b", "c")
    slices = mounts.slices("")
    assert [(s.mount.base, s.driver_base, s.masked, s.depth_offset) for s in slices] == [
        ("", "", ("a:b:", "a:", "c:"), 0),
        ("c", "", (), 1),
        ("a", "", ("b:",), 1),
        ("a:b", "", (), 2),
    ]
    root = slices[0]
    assert root.shows("ab") and root.shows("d:e")
    assert not root.shows("a:x") and not root.shows("c:y")


def test_slices_below_a_mount_and_below_a_plain_base() -> None:
    mounts, _ = table("a", "a:b")
    assert [(s.mount.base, s.driver_base, s.masked) for s in mounts.slices("a:x")] == [
        ("a", "x", ()),
    ]
    assert [(s.mount.base, s.driver_base, s.depth_offset) for s in mounts.slices("a")] == [
        ("a", "", 0),
        ("a:b", "", 1),
    ]
    assert [(s.mount.base, s.driver_base) for s in mounts.slices("z")] == [("", "z")]


def test_group_keeps_input_order_within_each_mount() -> None:
    mounts, m = table("a")
    groups = mounts.group(["a:1", "x", "a:2", "y"], "")
    assert groups == {
        m["a"]: Group(["a:1", "a:2"], ["1", "2"]),
        m[""]: Group(["x", "y"], ["x", "y"]),
    }
    viewed = mounts.group(["1", "2"], "a:")  # a view at "a": keys relative to it
    assert viewed == {m["a"]: Group(["1", "2"], ["1", "2"])}


def test_remove_takes_a_mount_out_of_routing() -> None:
    mounts, m = table("a")
    assert "a" in mounts and mounts.get("a") is m["a"]
    assert mounts.remove("a") is m["a"]
    assert "a" not in mounts
    assert mounts.locate("a:1") == (m[""], "a:1")
    with pytest.raises(KeyError):
        mounts.remove("a")


def test_located_keys_are_remembered_and_forgotten_when_mounts_change() -> None:
    mounts, m = table("a")
    assert mounts.locate_key("a:x") == ("a:x", m["a"], "x")
    assert mounts.located["a:x"] == ("a:x", m["a"], "x")
    nested = MountPoint("a:x", "a:x:", MemoryDriver(), get_serializer("json"))
    mounts.add(nested)
    assert mounts.located == {}  # a mount added later may own a remembered key
    mounts.locate_key("a:x:y")
    mounts.remove("a:x")
    assert mounts.located == {}
    assert mounts.locate_key("a:x:y") == ("a:x:y", m["a"], "x:y")


def test_the_located_cache_is_bounded() -> None:
    from kvstorage._mounts import LOCATED_CACHE_SIZE

    mounts, _ = table()
    for i in range(LOCATED_CACHE_SIZE + 10):
        mounts.locate_key(f"k{i}")
    assert 0 < len(mounts.located) <= LOCATED_CACHE_SIZE
