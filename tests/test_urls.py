"""Secrets in storage URLs are shown as ``***`` (kvstorage.urls.redact_url)."""

from __future__ import annotations

import pytest

from kvstorage.drivers import from_url
from kvstorage.urls import redact_url


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:hunter2@127.0.0.1:6379/0?base=app", "redis://:***@127.0.0.1:6379/0?base=app"),
        ("redis://ada:hunter2@h:1/0", "redis://ada:***@h:1/0"),
        ("redis+cluster://ada:hunter2@h:1,h2:2", "redis+cluster://ada:***@h:1,h2:2"),
        ("postgresql://ada:hun%40ter2@h/db", "postgresql://ada:***@h/db"),
        ("redis://ada:hunter2@h:notaport/0", "redis://ada:***@h:notaport/0"),
        (
            "s3://b/p?aws_secret_access_key=hunter2&region=x",
            "s3://b/p?aws_secret_access_key=***&region=x",
        ),
        ("http://h/x?token=hunter2", "http://h/x?token=***"),
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("postgresql://ada@h/db", "postgresql://ada@h/db"),
        ("http://[::1/hunter2", "http://***"),
    ],
)
def test_redact_url_hides_every_secret_and_keeps_the_rest(url: str, shown: str) -> None:
    assert redact_url(url) == shown
    assert "hunter2" not in redact_url(url)


@pytest.mark.parametrize(
    "url",
    [
        "redis//:hunter2@127.0.0.1:6379/0",  # a typo in the scheme
        "xyz://ada:hunter2@h/db",
        "s3://bucket/p?aws_secret_access_key=hunter2&bogus=1",
        "s3://ada:hunter2@/p",
        "sqlite://ada:hunter2@h/x.db",
    ],
)
def test_bad_urls_never_echo_their_secrets(url: str) -> None:
    with pytest.raises(ValueError) as caught:
        from_url(url)
    assert "hunter2" not in str(caught.value)


@pytest.mark.parametrize(
    "url",
    [
        "memory://",
        "file://./.sessions",
        "file:///var/lib/app/sessions",
        "sqlite:///tmp/kv.db?table=kv",
        "redis://127.0.0.1:6379/0?base=app",
    ],
)
def test_urls_without_secrets_are_returned_unchanged(url: str) -> None:
    assert redact_url(url) == url
