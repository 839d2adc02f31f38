"""Key normalization and validation, including property tests."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvstorage import InvalidKeyError, join_keys, normalize_base, normalize_key


@pytest.mark.parametrize(
    ("raw", "normalized"),
    [
        ("/users//42/", "users:42"),
        ("a/b/c", "a:b:c"),
        ("\\a\\b", "a:b"),
        ("::a::b::", "a:b"),
        ("a:b?x=1:c", "a:b?x=1:c"),
        ("?q", "?q"),
        ("  a  ", "  a  "),
        ("a%2Fb", "a%2Fb"),
        ("a..b", "a..b"),
        ("żółw:🐢", "żółw:🐢"),
    ],
)
def test_normalization(raw: str, normalized: str) -> None:
    assert normalize_key(raw) == normalized


@pytest.mark.parametrize(
    "bad", ["", ":", "/", "..", ".", "a/../b", "a:.:b", "a\x00", "\t", "a\x9fb", "\ud800"]
)
def test_rejected_keys(bad: str) -> None:
    with pytest.raises(InvalidKeyError):
        normalize_key(bad)


def test_length_limit_counts_utf8_bytes() -> None:
    assert normalize_key("a" * 1024) == "a" * 1024
    assert normalize_key("é" * 512) == "é" * 512
    with pytest.raises(InvalidKeyError, match="1024"):
        normalize_key("é" * 513)


def test_bases() -> None:
    assert normalize_base("") == ""
    assert normalize_base("/") == ""
    assert normalize_base("a:") == "a"
    assert join_keys("a", "", "b:c") == "a:b:c"
    with pytest.raises(InvalidKeyError):
        normalize_base(42)  # type: ignore[arg-type]
    assert issubclass(InvalidKeyError, ValueError)


segment = st.text(
    st.characters(blacklist_categories=("Cc", "Cs"), blacklist_characters=":/\\"), min_size=1
).filter(lambda s: s not in (".", ".."))


@given(st.lists(segment, min_size=1, max_size=6), st.sampled_from([":", "/", "\\", "//", ":/"]))
def test_property_segments_survive_any_separator(segments: list[str], sep: str) -> None:
    raw = sep + sep.join(segments) + sep
    if len(":".join(segments).encode()) > 1024:
        with pytest.raises(InvalidKeyError):
            normalize_key(raw)
        return
    key = normalize_key(raw)
    assert key == ":".join(segments)
    assert normalize_key(key) == key  # idempotent


@given(st.text())
def test_property_any_text_is_normal_or_rejected(text: str) -> None:
    try:
        key = normalize_base(text)
    except InvalidKeyError:
        return
    assert normalize_base(key) == key
    assert not key.startswith(":") and not key.endswith(":") and "::" not in key
    assert "/" not in key and "\\" not in key
    assert all(segment not in (".", "..") for segment in key.split(":"))
    assert all(ord(ch) >= 0xA0 or 0x20 <= ord(ch) < 0x7F for ch in key)
    assert len(key.encode()) <= 1024
