"""SessionManager and Session driven by hand (``open`` / ``commit``), on every driver of the
matrix (``make_driver``), wrapped in a counting driver to check when storage is touched."""

from __future__ import annotations

import logging
import os
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest

from kvstorage import SerializationError, Storage, create_storage
from kvstorage.drivers import MemoryDriver
from sessions import CookieOptions, Session, SessionManager
from sessions.store import handle_of

from .backends import DriverFactory
from .support.helpers import eventually
from .support.servers import free_port
from .support.sessions_support import CountingDriver

pytestmark = pytest.mark.anyio


@pytest.fixture
def driver(make_driver: DriverFactory) -> CountingDriver:
    return CountingDriver(make_driver())


@pytest.fixture
async def manager(driver: CountingDriver) -> AsyncIterator[SessionManager]:
    yield SessionManager(driver)


def cookie_id(headers: list[str], name: str = "__Host-session") -> str:
    assert len(headers) == 1, headers
    value = headers[0].split(";", 1)[0]
    assert value.startswith(f"{name}=")
    return value[len(name) + 1 :]


async def assert_ended(manager: SessionManager, sid: str) -> None:
    """Only an "ended" marker is left of the session ``sid``: no data, no user."""
    assert await manager.storage.get_keys(manager.prefix) == [f"session:{handle_of(sid)}"]
    marker = await manager.store.read(handle_of(sid))
    assert marker is not None and marker.ended and marker.data == {} and marker.user is None


async def new_session(manager: SessionManager, **values: object) -> str:
    session = manager.open(None)
    for key, value in values.items():
        await session.set(key, value)
    return cookie_id(await manager.commit(session), manager.cookie.name)


async def test_no_cookie_means_no_storage_io(manager: SessionManager, driver: CountingDriver):
    session = manager.open(None)
    assert await session.get("cart") is None
    assert await session.keys() == []
    assert not await session.has("cart")
    assert session.id is None
    assert await manager.commit(session) == []
    assert driver.ops == []


async def test_untouched_session_does_no_io(manager: SessionManager, driver: CountingDriver):
    sid = await new_session(manager, a=1)
    driver.ops.clear()
    session = manager.open(sid)
    assert await manager.commit(session) == []
    assert driver.ops == []


@pytest.mark.parametrize(
    "value", ["", "abc", "../../etc/passwd", "a" * 42, "a" * 44, "a" * 42 + "!", "a:b" * 14]
)
async def test_malformed_cookie_is_ignored_without_io(
    manager: SessionManager, driver: CountingDriver, value: str
):
    session = manager.open(value)
    assert await session.get("a") is None
    assert session.id is None
    assert driver.ops == []


async def test_first_write_sets_the_cookie_and_stores_one_item(
    manager: SessionManager, driver: CountingDriver
):
    session = manager.open(None)
    await session.set("cart", ["apple"])
    assert session.id is None
    headers = await manager.commit(session)
    sid = cookie_id(headers)
    assert SessionManager.is_valid_id(sid) and len(sid) >= 22  # >= 128 bits, URL-safe
    assert session.id == sid
    assert headers[0] == f"__Host-session={sid}; Path=/; HttpOnly; Secure; SameSite=Lax"
    assert await manager.storage.get_keys() == [f"session:{handle_of(sid)}"]
    # Reads on a later request never write and never set a cookie.
    driver.ops.clear()
    later = manager.open(sid)
    assert await later.get("cart") == ["apple"]
    assert await later.items() == [("cart", ["apple"])]
    assert later.id == sid
    assert await manager.commit(later) == []
    assert driver.writes == 0


async def test_ids_are_random_and_distinct(manager: SessionManager):
    ids = {await new_session(manager, n=i) for i in range(20)}
    assert len(ids) == 20


async def test_unknown_well_formed_id_is_never_adopted(
    manager: SessionManager, driver: CountingDriver
):
    planted = "A" * 43  # an attacker-chosen ID, well-formed but never issued
    session = manager.open(planted)
    assert await session.get("a") is None
    assert session.id is None
    await session.set("a", 1)
    sid = cookie_id(await manager.commit(session))
    assert sid != planted
    assert not await manager.storage.has_item(f"session:{handle_of(planted)}")
    assert await manager.open(sid).get("a") == 1


async def test_write_only_request_with_unknown_id_gets_a_new_id(manager: SessionManager):
    planted = "B" * 43
    session = manager.open(planted)
    await session.set("a", 1)  # never read in this request
    sid = cookie_id(await manager.commit(session))
    assert sid != planted
    assert await manager.storage.get_keys() == [f"session:{handle_of(sid)}"]


async def test_values_survive_with_the_tagged_serializer(manager: SessionManager):
    values = {
        "when": datetime(2024, 5, 1, 12, 30, tzinfo=UTC),
        "day": date(2024, 5, 1),
        "price": Decimal("19.99"),
        "uid": uuid.UUID(int=7),
        "blob": b"\x00\xff",
        "tags": {"a", "b"},
        "pair": (1, "x"),
        "nested": {"list": [1, 2.5, None, True], "text": "123"},
    }
    sid = await new_session(manager, **values)
    loaded = manager.open(sid)
    for key, value in values.items():
        assert await loaded.get(key) == value
        assert type(await loaded.get(key)) is type(value)


async def test_set_fails_fast_and_stores_a_copy(manager: SessionManager):
    session = manager.open(None)
    with pytest.raises(SerializationError):
        await session.set("bad", object())
    with pytest.raises(SerializationError):
        await session.flash("bad", lambda: None)
    cart = ["apple"]
    await session.set("cart", cart)
    cart.append("pear")  # mutating the original afterwards changes nothing
    assert await session.get("cart") == ["apple"]
    sid = cookie_id(await manager.commit(session))
    assert await manager.open(sid).get("cart") == ["apple"]
    assert not await manager.open(sid).has("bad")


async def test_bad_keys_are_rejected(manager: SessionManager):
    session = manager.open(None)
    with pytest.raises(ValueError):
        await session.set("", 1)
    with pytest.raises(TypeError):
        await session.set(1, 1)  # type: ignore[arg-type]


async def test_delete_clear_has_keys(manager: SessionManager, driver: CountingDriver):
    sid = await new_session(manager, a=1, b=2, c=3)
    session = manager.open(sid)
    await session.delete("a")
    await session.delete("missing")
    assert not await session.has("a")
    assert sorted(await session.keys()) == ["b", "c"]
    assert await manager.commit(session) == []  # same ID, no refresh due: no cookie
    assert sorted(await manager.open(sid).keys()) == ["b", "c"]
    session = manager.open(sid)
    await session.clear()
    await session.set("z", 26)
    await manager.commit(session)
    assert await manager.open(sid).items() == [("z", 26)]


async def test_delete_without_a_session_writes_nothing(
    manager: SessionManager, driver: CountingDriver
):
    session = manager.open(None)
    await session.delete("a")
    assert await manager.commit(session) == []
    assert driver.writes == 0


async def test_regenerate_keeps_data_writes_new_before_removing_old(
    manager: SessionManager, driver: CountingDriver
):
    old = await new_session(manager, user="ann", cart=["apple"])
    driver.ops.clear()
    session = manager.open(old)
    await session.regenerate()
    new = session.id
    assert new is not None and new != old
    headers = await manager.commit(session)
    assert cookie_id(headers) == new
    writes = [op for op in driver.ops if op[0] in ("set", "remove")]
    # the new version first, then the old one becomes a marker pointing at it
    assert writes == [("set", f"session:{handle_of(new)}"), ("set", f"session:{handle_of(old)}")]
    marker = await manager.store.read(handle_of(old))
    assert marker is not None and marker.moved_to == handle_of(new) and marker.data == {}
    assert await manager.open(old).get("user") is None
    assert await manager.open(new).items() == [("user", "ann"), ("cart", ["apple"])]


async def test_regenerate_of_a_new_session(manager: SessionManager):
    session = manager.open(None)
    await session.set("a", 1)
    await session.regenerate()
    sid = cookie_id(await manager.commit(session))
    assert await manager.open(sid).get("a") == 1


async def test_destroy_removes_data_and_expires_cookie(
    manager: SessionManager, driver: CountingDriver
):
    sid = await new_session(manager, user="ann")
    session = manager.open(sid)
    await session.destroy()
    assert session.id is None
    headers = await manager.commit(session)
    assert headers == [
        "__Host-session=; Max-Age=0; Expires=Thu, 01 Jan 1970 00:00:00 GMT; "
        "Path=/; HttpOnly; Secure; SameSite=Lax"
    ]
    await assert_ended(manager, sid)
    assert await manager.open(sid).get("user") is None


async def test_writes_after_destroy_start_a_new_session(manager: SessionManager):
    sid = await new_session(manager, user="ann")
    session = manager.open(sid)
    await session.destroy()
    await session.set("theme", "dark")
    new = cookie_id(await manager.commit(session))
    assert new != sid
    assert await manager.open(new).items() == [("theme", "dark")]
    assert sorted(await manager.storage.get_keys()) == sorted(
        [f"session:{handle_of(new)}", f"session:{handle_of(sid)}"]  # the old one: a marker
    )
    assert not (await manager.store.read(handle_of(sid))).live  # type: ignore[union-attr]


async def test_flash_is_read_once_on_a_later_request(manager: SessionManager):
    session = manager.open(None)
    await session.flash("msg", "Saved!")
    sid = cookie_id(await manager.commit(session))
    second = manager.open(sid)
    assert await second.keys() == []  # flash values are not session keys
    assert await second.pop_flash("msg") == "Saved!"
    await manager.commit(second)
    third = manager.open(sid)
    assert await third.pop_flash("msg", "none") == "none"


async def test_absolute_ttl_is_enforced_and_given_to_the_storage(driver: CountingDriver):
    manager = SessionManager(driver, ttl=1.0)
    written = time.monotonic()
    sid = await new_session(manager, a=1)
    meta = await manager.storage.get_meta(f"session:{handle_of(sid)}")
    if time.monotonic() - written < 1.0:  # else a stall outlived the ttl: it may be gone
        assert meta is not None and meta.ttl is not None and 0 < meta.ttl <= 1.0

    async def gone() -> bool:
        return await manager.open(sid).get("a") is None

    await eventually(gone)
    assert await manager.storage.get_meta(f"session:{handle_of(sid)}") is None


async def test_idle_timeout_refreshes_at_most_once_per_fraction(driver: CountingDriver):
    manager = SessionManager(driver, idle_timeout=1.6, refresh_fraction=0.5)
    for _ in range(3):  # an attempt the machine stalled in (0.8 s or more) is made again
        if await _refreshes_once_per_fraction(manager, driver):
            return
    pytest.fail("the machine stalled for 0.8 s or more in each of three attempts")


async def _refreshes_once_per_fraction(manager: SessionManager, driver: CountingDriver) -> bool:
    """Check that an idle timeout of 1.6 s is refreshed once its first 0.8 s are over, and
    not before; False (and nothing more checked) once the machine stalled for 0.8 s or
    more where the check needs less: a session may then be due or gone early."""
    due = 0.8
    written = time.monotonic()  # the session's last write is no older than this
    sid = await new_session(manager, a=1)
    meta = await manager.storage.get_meta(f"session:{handle_of(sid)}")
    writes = driver.writes
    session = manager.open(sid)
    value = await session.get("a")
    headers = await manager.commit(session)
    if time.monotonic() - written >= due:
        return False
    assert meta is not None and meta.ttl is not None and 0 < meta.ttl <= 1.6
    assert value == 1
    assert headers == []  # fresh: no refresh, no write
    assert driver.writes == writes

    refreshed: list[str] = []
    # The session lives 0.8 s past ``read``: past its write + 0.8 s, and past each read
    # that found no refresh due (younger than 0.8 s).
    read = written + due

    async def refresh_happens() -> bool:
        nonlocal read
        previous, read = read, time.monotonic()
        reader = manager.open(sid)
        value = await reader.get("a")
        if value is None and time.monotonic() - previous >= due:  # it may be gone by now
            return True
        assert value == 1  # never expires while being read
        refreshed.extend(await manager.commit(reader))
        return bool(refreshed)

    await eventually(refresh_happens)
    if not refreshed:
        return False
    assert cookie_id(refreshed) == sid  # the cookie is re-sent with the refresh
    assert driver.writes == writes + 1  # exactly one write for all those reads
    session = manager.open(sid)
    value = await session.get("a")
    headers = await manager.commit(session)
    if time.monotonic() - read >= due:  # the refresh wrote after ``read``
        return False
    assert value == 1 and headers == []
    assert driver.writes == writes + 1

    async def expired() -> bool:
        return await manager.storage.get_meta(f"session:{handle_of(sid)}") is None

    await eventually(expired)
    assert await manager.open(sid).get("a") is None
    return True


async def test_concurrent_requests_writing_different_keys_keep_both(manager: SessionManager):
    sid = await new_session(manager, start=0)
    first, second = manager.open(sid), manager.open(sid)
    assert await first.get("start") == 0
    assert await second.get("start") == 0  # both loaded the same version
    await first.set("a", 1)
    await second.set("b", 2)
    await second.delete("start")
    assert await manager.commit(first) == []
    assert await manager.commit(second) == []  # conflict: re-read and re-applied
    assert sorted(await manager.open(sid).items()) == [("a", 1), ("b", 2)]


async def test_write_racing_destroy_does_not_bring_the_session_back(
    manager: SessionManager,
):
    sid = await new_session(manager, user="ann")
    writer, logout = manager.open(sid), manager.open(sid)
    assert await writer.get("user") == "ann"
    await logout.destroy()
    await manager.commit(logout)
    await writer.set("cart", ["apple"])
    [expired] = await manager.commit(writer)  # the client's ID is dead: forget it
    assert expired.startswith("__Host-session=; Max-Age=0;")
    await assert_ended(manager, sid)
    assert await manager.open(sid).get("user") is None


async def test_write_only_request_racing_destroy_cannot_revive_the_old_id(
    manager: SessionManager,
):
    sid = await new_session(manager, user="ann")
    writer, logout = manager.open(sid), manager.open(sid)
    await writer.set("cart", ["apple"])  # never read: it cannot tell destroyed from unknown
    await logout.destroy()
    await manager.commit(logout)
    new = cookie_id(await manager.commit(writer))
    assert new != sid
    assert await manager.open(sid).get("user") is None
    assert await manager.open(new).items() == [("cart", ["apple"])]  # no "user"


async def test_corrupt_data_starts_a_fresh_session_and_is_logged(
    manager: SessionManager, caplog: pytest.LogCaptureFixture
):
    sid = await new_session(manager, a=1)
    await manager.storage.set_item_raw(f"session:{handle_of(sid)}", b"\xff not json")
    with caplog.at_level(logging.WARNING, logger="sessions"):
        for _ in range(3):  # three requests with that cookie: reported once
            assert await manager.open(sid).get("a") is None
        session = manager.open(sid)
        assert await session.get("b") is None
    assert len(caplog.records) == 1 and "corrupt" in caplog.text
    assert sid not in caplog.text
    await session.set("b", 2)
    new = cookie_id(await manager.commit(session))
    assert new != sid and await manager.open(new).get("b") == 2


async def test_wrong_shape_is_corrupt_too(manager: SessionManager):
    sid = await new_session(manager, a=1)
    await manager.storage.set_item_raw(f"session:{handle_of(sid)}", b'{"d": [1, 2]}')
    assert await manager.open(sid).get("a") is None


async def test_session_ids_are_never_logged(
    driver: CountingDriver, caplog: pytest.LogCaptureFixture
):
    manager = SessionManager(driver, idle_timeout=60, refresh_fraction=0)
    with caplog.at_level(logging.DEBUG):
        sid = await new_session(manager, a=1)
        session = manager.open(sid)
        await session.regenerate()
        new = cookie_id(await manager.commit(session))
        session = manager.open(new)
        await session.destroy()
        await manager.commit(session)
    # Our loggers only: a client library may log its own parameters at DEBUG (aiosqlite
    # logs SQL arguments, which include keys); the README says so.
    ours = [r for r in caplog.records if r.name.split(".")[0] in ("sessions", "kvstorage")]
    assert ours  # the flow is logged (with fingerprints)
    text = "\n".join(record.getMessage() for record in ours)
    assert sid not in text and new not in text


async def test_prefix_and_host_cookie(driver: CountingDriver):
    manager = SessionManager(driver, prefix="shop:sessions", cookie=CookieOptions("__Host-sid"))
    sid = await new_session(manager, a=1)
    assert await manager.storage.get_keys() == [f"shop:sessions:{handle_of(sid)}"]
    session = manager.open(sid)
    await session.regenerate()
    headers = await manager.commit(session)
    assert cookie_id(headers, "__Host-sid") == session.id
    assert "; Secure" in headers[0] and "; Path=/;" in headers[0] and "Domain" not in headers[0]


async def test_json_storage_view_works_with_tagged_values(storage: Storage):
    """A user's storage with the default json serializer: values still round-trip and
    concurrent writers still both win (the session serializes itself: get_entry_raw)."""
    from kvstorage import prefix_storage

    manager = SessionManager(prefix_storage(storage, "app"))
    sid = await new_session(manager, when=date(2024, 1, 2), n=0)
    assert await manager.open(sid).get("when") == date(2024, 1, 2)
    first, second = manager.open(sid), manager.open(sid)
    assert await first.get("n") == 0 and await second.get("n") == 0
    await first.set("a", 1)
    await second.set("b", 2)
    await manager.commit(first)
    await manager.commit(second)
    assert sorted(await manager.open(sid).keys()) == ["a", "b", "n", "when"]
    assert await storage.get_keys() == [f"app:session:{handle_of(sid)}"]


def test_cookie_options_are_checked():
    CookieOptions("__Host-session")
    CookieOptions(secure=False)
    with pytest.raises(ValueError, match="HttpOnly"):
        CookieOptions(httponly=False)
    with pytest.raises(ValueError, match="secure"):
        CookieOptions("__Host-session", secure=False)
    with pytest.raises(ValueError, match="path"):
        CookieOptions("__Host-session", path="/app")
    with pytest.raises(ValueError, match="domain"):
        CookieOptions("__Host-session", domain="example.com")
    with pytest.raises(ValueError, match="secure"):
        CookieOptions("__Secure-session", secure=False)
    with pytest.raises(ValueError, match="samesite"):
        CookieOptions(samesite="none", secure=False)
    with pytest.raises(ValueError, match="name"):
        CookieOptions("bad name")
    header = CookieOptions(secure=False, samesite="strict", max_age=60).set_header("x")
    assert header == "session=x; Max-Age=60; Path=/; HttpOnly; SameSite=Strict"


def test_manager_options_are_checked():
    with pytest.raises(ValueError):
        SessionManager(MemoryDriver(), ttl=0)
    with pytest.raises(ValueError):
        SessionManager(MemoryDriver(), idle_timeout=timedelta(seconds=-1))
    with pytest.raises(ValueError):
        SessionManager(MemoryDriver(), refresh_fraction=1)


async def test_default_storage_from_environment(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    monkeypatch.setenv("KVSTORAGE_URL", "memory://")
    manager = SessionManager()
    with caplog.at_level(logging.INFO, logger="sessions"):
        assert isinstance(manager.storage.get_mount().driver, MemoryDriver)
        assert manager.storage is manager.storage
    assert caplog.text.count("memory://") == 1  # logged once
    sid = await new_session(manager, a=1)
    assert await manager.open(sid).get("a") == 1
    await manager.dispose()


async def test_default_storage_log_line_hides_the_password(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    # A closed port: the line is logged when the storage is created, before connecting.
    monkeypatch.setenv("KVSTORAGE_URL", f"redis://:s3cret@127.0.0.1:{free_port()}/0")
    manager = SessionManager()
    with caplog.at_level(logging.INFO, logger="sessions"):
        manager.storage  # noqa: B018
    await manager.dispose()
    assert "sessions are stored in redis://:***@127.0.0.1:" in caplog.text
    assert "s3cret" not in caplog.text


def test_default_storage_is_fs_in_dot_sessions(monkeypatch: pytest.MonkeyPatch, tmp_path):
    monkeypatch.delenv("KVSTORAGE_URL", raising=False)
    monkeypatch.chdir(tmp_path)
    manager = SessionManager()
    storage = manager.storage
    assert type(storage.get_mount().driver).__name__ == "FSDriver"
    assert stat.S_IMODE((tmp_path / ".sessions").stat().st_mode) == 0o700  # created private


def default_manager_in(directory: Path, monkeypatch: pytest.MonkeyPatch) -> SessionManager:
    """A manager with the default storage, run from the parent of ``directory``."""
    monkeypatch.delenv("KVSTORAGE_URL", raising=False)
    monkeypatch.chdir(directory.parent)
    return SessionManager()


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o702], ids=oct)
async def test_default_directory_writable_by_others_is_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, mode: int
):
    directory = tmp_path / ".sessions"
    directory.mkdir()
    directory.chmod(mode)
    manager = default_manager_in(directory, monkeypatch)
    session = manager.open(None)
    await session.set("a", 1)
    with pytest.raises(PermissionError, match="group or others may write") as raised:
        await manager.commit(session)
    assert str(directory.resolve()) in str(raised.value)
    assert list(directory.iterdir()) == []  # nothing was written there


async def test_private_default_directory_is_used(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    directory = tmp_path / ".sessions"
    directory.mkdir()
    directory.chmod(0o700)
    manager = default_manager_in(directory, monkeypatch)
    sid = await new_session(manager, a=1)
    assert await manager.open(sid).get("a") == 1
    assert list(directory.iterdir()) != []
    await manager.dispose()


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a directory away needs root")
def test_default_directory_of_another_user_is_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):
    directory = tmp_path / ".sessions"
    directory.mkdir(mode=0o700)
    os.chown(directory, 65534, 65534)
    manager = default_manager_in(directory, monkeypatch)
    with pytest.raises(PermissionError, match="belongs to user id 65534") as raised:
        manager.storage  # noqa: B018
    assert str(directory.resolve()) in str(raised.value)


def test_sessions_imports_no_web_framework():
    code = (
        "import sys, sessions; "
        "assert not {'starlette', 'fastapi'} & set(sys.modules), sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_session_repr_has_no_id():
    manager = SessionManager(create_storage())
    session: Session = manager.open("C" * 43)
    assert "C" * 43 not in repr(session)


async def test_reads_return_copies(manager: SessionManager):
    sid = await new_session(manager, cart=["apple"])
    session = manager.open(sid)
    cart = await session.get("cart")
    cart.append("pear")  # changing what was read changes nothing until set() again
    assert await session.get("cart") == ["apple"]
    await session.set("cart", cart)
    await manager.commit(session)
    assert await manager.open(sid).get("cart") == ["apple", "pear"]


async def test_a_corrupt_value_reads_as_missing_and_is_logged(
    manager: SessionManager, caplog: pytest.LogCaptureFixture
):
    sid = await new_session(manager, ok=1)
    document = b'{"d": {"ok": 1, "bad": {"$kv": "nope", "v": 1}}, "f": {}, "c": 1e10, "a": 1e10}'
    await manager.storage.set_item_raw(f"session:{handle_of(sid)}", document)
    session = manager.open(sid)
    with caplog.at_level(logging.WARNING, logger="sessions"):
        assert await session.get("bad", "default") == "default"
    assert await session.get("ok") == 1
    assert "corrupt" in caplog.text and sid not in caplog.text


async def test_open_takes_the_first_well_formed_of_several_values(manager: SessionManager):
    sid = await new_session(manager, a=1)
    session = manager.open(["", "not-an-id", sid, "E" * 43])
    assert await session.get("a") == 1 and session.id == sid


async def test_commit_after_headers_keeps_an_id_change_for_later(
    manager: SessionManager, caplog: pytest.LogCaptureFixture
):
    sid = await new_session(manager, user="ann")
    session = manager.open(sid)
    await session.regenerate()
    with caplog.at_level(logging.WARNING, logger="sessions"):
        assert await manager.commit(session, headers_sent=True) == []
    assert "response started" in caplog.text
    assert await manager.open(sid).get("user") == "ann"  # the old ID still works
    later = manager.open(sid)
    await later.set("theme", "dark")  # same ID: saved even after the headers
    assert await manager.commit(later, headers_sent=True) == []
    assert await manager.open(sid).get("theme") == "dark"
