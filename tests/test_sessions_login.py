"""Sessions for login flows, through the ASGI app on every driver of the matrix: expiry
by default, cleanup, IDs never stored, CSRF defences, users and their devices, the ID in a
header, "remember me", and no commit that brings back a session that was ended."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import AsyncIterator
from datetime import timedelta

import httpx
import pytest

from kvstorage import create_storage
from sessions import CookieOptions, SessionManager
from sessions.store import handle_of

from .backends import DriverFactory
from .support.helpers import eventually
from .support.sessions_support import CountingDriver, Gate, live_keys, make_app

pytestmark = pytest.mark.anyio

ORIGIN = "https://testserver"
COOKIE = "__Host-session"


@pytest.fixture
def driver(make_driver: DriverFactory) -> CountingDriver:
    return CountingDriver(make_driver())


@pytest.fixture
async def manager(driver: CountingDriver) -> AsyncIterator[SessionManager]:
    made = SessionManager(driver)
    yield made
    await made.dispose()


@pytest.fixture
def gate() -> Gate:
    return Gate()


def client_for(manager: SessionManager, gate: Gate | None = None) -> httpx.AsyncClient:
    """A browser: its own cookie jar, same-origin requests."""
    transport = httpx.ASGITransport(app=make_app(manager, gate=gate))
    return httpx.AsyncClient(transport=transport, base_url=ORIGIN)


@pytest.fixture
async def client(manager: SessionManager, gate: Gate) -> AsyncIterator[httpx.AsyncClient]:
    async with client_for(manager, gate) as made:
        yield made


def set_cookie(response: httpx.Response) -> str:
    [value] = response.headers.get_list("set-cookie")
    return value


def cookie_value(response: httpx.Response) -> str:
    return set_cookie(response).split(";", 1)[0].split("=", 1)[1]


async def login(client: httpx.AsyncClient, user: str, **params: str) -> str:
    """Log ``client`` in as ``user``; return its new session ID."""
    response = await client.post("/login", params={"user": user, **params})
    assert response.status_code == 200, response.text
    return cookie_value(response)


async def who(client: httpx.AsyncClient) -> str | None:
    user: str | None = (await client.get("/me")).json()["user"]
    return user


# -- expiry and cleanup ----------------------------------------------------------------


async def test_sessions_expire_after_14_days_unless_ttl_none_is_explicit(
    driver: CountingDriver, client: httpx.AsyncClient, manager: SessionManager
) -> None:
    assert manager.ttl == timedelta(days=14).total_seconds()
    sid = await login(client, "ann")
    meta = await manager.storage.get_meta(f"session:{handle_of(sid)}")
    assert meta is not None and meta.ttl is not None
    assert 14 * 86400 - 60 < meta.ttl <= 14 * 86400
    forever = SessionManager(create_storage(driver, serializer="tagged"), ttl=None)
    session = forever.open(None)
    await session.set("a", 1)
    [header] = await forever.commit(session)
    other = header.split(";")[0].split("=", 1)[1]
    meta = await forever.storage.get_meta(f"session:{handle_of(other)}")
    assert meta is not None and meta.ttl is None


async def test_expired_sessions_are_swept_after_a_later_request(driver: CountingDriver) -> None:
    manager = SessionManager(driver, ttl=0.5, sweep_interval=0.05)
    async with client_for(manager) as client:
        ids = []
        for user in ("ann", "bob", "cy"):
            client.cookies.clear()
            ids.append(await login(client, user))

        async def all_expired() -> bool:
            return all([await manager.open(sid).get("x", "gone") == "gone" for sid in ids])

        await eventually(all_expired, within=10)
        client.cookies.clear()

        async def swept() -> bool:
            await client.get("/nothing")  # any request may run the sweep afterwards
            return await manager.storage.sweep() == 0 and not await manager.storage.get_keys()

        await eventually(swept, within=10)
    await manager.dispose()


# -- no resurrection -------------------------------------------------------------------


async def test_a_login_in_flight_cannot_undo_a_logout(
    client: httpx.AsyncClient, manager: SessionManager, gate: Gate
) -> None:
    sid = await login(client, "ann")
    import anyio

    async def slow_login() -> httpx.Response:
        return await client.post(
            "/overlap",
            params={"me": "w", "wait": "logout", "after": "done", "action": "regenerate"},
        )

    responses: list[httpx.Response] = []
    async with anyio.create_task_group() as group:

        async def run() -> None:
            responses.append(await slow_login())

        group.start_soon(run)
        await gate["w-loaded"].wait()
        response = await client.post("/destroy")
        assert "Max-Age=0" in set_cookie(response)
        gate["logout-done"].set()
    [late] = responses
    assert "Max-Age=0" in set_cookie(late)  # the regenerated session never came to be
    assert await live_keys(manager) == []
    client.cookies.set(COOKIE, sid)
    assert await who(client) is None


async def test_a_logout_with_the_old_id_ends_the_regenerated_session(
    manager: SessionManager,
) -> None:
    async with client_for(manager) as device:
        old = await login(device, "ann")
        device.cookies.clear()
        device.cookies.set(COOKIE, old)
        response = await device.post("/regenerate")
        new = cookie_value(response)
        # A tab that still has the old ID logs out.
        async with client_for(manager) as tab:
            tab.cookies.set(COOKIE, old)
            assert "Max-Age=0" in set_cookie(await tab.post("/destroy"))
        assert await who(device) is None
        assert new not in str(await live_keys(manager))
        assert await live_keys(manager) == []


# -- IDs at rest -----------------------------------------------------------------------


async def test_no_session_id_is_stored_logged_or_raised(
    manager: SessionManager, caplog: pytest.LogCaptureFixture
) -> None:
    ids: list[str] = []
    with caplog.at_level(logging.DEBUG):
        async with client_for(manager) as ann, client_for(manager) as bob:
            ids.append(await login(ann, "ann"))
            ids.append(await login(bob, "bob", remember="1"))
            await ann.post("/set", params={"cart": "apple"})
            await ann.post("/flash", params={"msg": "hi"})
            ids.append(cookie_value(await ann.post("/regenerate")))
            await ann.get("/csrf")
            await ann.get("/devices")
            ids.append(await login(bob, "bob"))
            await bob.post("/destroy")
    storage = manager.storage
    keys = await storage.get_keys()
    assert keys and any(key.startswith("session-user:") for key in keys)
    stored = b"".join([await storage.get_item_raw(key) or b"" for key in keys])
    for sid in ids:
        assert sid not in " ".join(keys) and sid.encode() not in stored
        assert sid not in caplog.text
    assert all(re.fullmatch(r"[A-Za-z0-9_-]{43}", key.rsplit(":", 1)[1]) for key in keys)


# -- CSRF ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {"origin": "https://evil.example"},
        {"origin": "null"},
        {"origin": "https://shop.testserver"},
        {"sec-fetch-site": "cross-site"},
        {"sec-fetch-site": "same-site"},  # a sibling subdomain
    ],
)
async def test_cross_site_writes_are_refused_before_the_app_runs(
    client: httpx.AsyncClient, manager: SessionManager, headers: dict[str, str]
) -> None:
    response = await client.post("/login", params={"user": "mallory"}, headers=headers)
    assert response.status_code == 403
    assert "set-cookie" not in response.headers
    assert await manager.storage.get_keys() == []
    assert (await client.get("/me", headers=headers)).status_code == 200  # reads pass
    ok = {"origin": ORIGIN, "sec-fetch-site": "same-origin"}
    assert (await client.post("/login", params={"user": "ann"}, headers=ok)).status_code == 200


async def test_origin_check_can_be_turned_off(manager: SessionManager) -> None:
    from sessions import SessionMiddleware

    app = make_app(manager)
    app.user_middleware.clear()
    app.add_middleware(SessionMiddleware, manager=manager, check_origin=False)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=ORIGIN) as c:
        response = await c.post("/set", params={"a": "1"}, headers={"origin": "https://x.io"})
        assert response.status_code == 200


async def test_csrf_token_is_checked_and_rotated_by_login(client: httpx.AsyncClient) -> None:
    token = (await client.get("/csrf")).json()["token"]
    assert (await client.get("/csrf")).json()["token"] == token  # stable within a session
    assert (await client.post("/form", data={"csrf": "forged"})).status_code == 403
    assert (await client.post("/form", data={})).status_code == 403
    assert (await client.post("/form", data={"csrf": token})).status_code == 200
    await login(client, "ann")
    fresh = (await client.get("/csrf")).json()["token"]
    assert fresh != token
    assert (await client.post("/form", data={"csrf": token})).status_code == 403
    assert (await client.post("/form", data={"csrf": fresh})).status_code == 200


# -- responses -------------------------------------------------------------------------


async def test_vary_cookie_on_responses_that_used_the_session(client: httpx.AsyncClient) -> None:
    assert "vary" not in (await client.get("/nothing")).headers
    await login(client, "ann")
    assert "Cookie" in (await client.get("/me")).headers["vary"]
    assert "vary" not in (await client.get("/nothing")).headers


async def test_the_default_cookie_is_host_prefixed(client: httpx.AsyncClient) -> None:
    response = await client.post("/login", params={"user": "ann"})
    assert set_cookie(response).startswith(f"{COOKIE}=")
    assert CookieOptions(secure=False).name == "session"


@pytest.mark.parametrize("path", ["/a\x00b", "/caf\u00e9", "/\u2603", "/a;b", "/a\r\n"])
def test_cookie_paths_that_would_break_every_response_are_refused(path: str) -> None:
    with pytest.raises(ValueError, match="path"):
        CookieOptions(path=path, name="sid")


@pytest.mark.parametrize(
    "tagged",
    [
        b'{"$kv": "timedelta", "v": [1e308, 0, 0]}',
        b'{"$kv": "decimal", "v": "not a number"}',
        b'{"$kv": "uuid", "v": "zzz"}',
    ],
)
async def test_a_corrupt_stored_value_reads_as_missing_not_a_500(
    client: httpx.AsyncClient, manager: SessionManager, tagged: bytes
) -> None:
    sid = await login(client, "ann")
    await client.post("/set", params={"ok": "1"})
    key = f"session:{handle_of(sid)}"
    raw = await manager.storage.get_item_raw(key)
    assert raw is not None
    await manager.storage.set_item_raw(
        key, raw.replace(b'"d":{', b'"d":{"bad":' + tagged + b",", 1)
    )
    response = await client.get("/get", params={"key": "bad"})
    assert response.status_code == 200 and response.json() == {"value": None}
    assert (await client.get("/get", params={"key": "ok"})).json() == {"value": "1"}


async def test_login_restarts_the_absolute_lifetime(
    client: httpx.AsyncClient, manager: SessionManager
) -> None:
    await client.post("/set", params={"cart": "apple"})  # an anonymous session...
    anonymous = client.cookies[COOKIE]
    handle = handle_of(anonymous)
    stored = await manager.store.read(handle)
    assert stored is not None
    old = stored.created - (manager.ttl or 0) + 60  # ...with one minute left
    await manager.store.write(
        handle,
        type(stored)(stored.data, stored.flash, old, stored.accessed, None),
        ttl=60,
    )
    sid = await login(client, "ann")
    meta = await manager.storage.get_meta(f"session:{handle_of(sid)}")
    assert meta is not None and meta.ttl is not None and meta.ttl > 14 * 86400 - 60
    assert (await client.get("/get", params={"key": "cart"})).json() == {"value": "apple"}


# -- users and their devices -----------------------------------------------------------


async def test_your_devices_and_signing_one_out(manager: SessionManager) -> None:
    async with client_for(manager) as laptop, client_for(manager) as phone:
        await login(laptop, "ann", device="laptop")
        await login(phone, "ann", device="phone")
        async with client_for(manager) as other:
            await login(other, "bob", device="desktop")
        devices = (await laptop.get("/devices")).json()
        assert [d["meta"] for d in devices] == [{"device": "laptop"}, {"device": "phone"}]
        phone_handle = devices[1]["handle"]
        assert phone.cookies[COOKIE] not in str(devices)  # handles, never IDs
        assert (await laptop.post("/revoke", params={"handle": phone_handle})).json() == {
            "ended": True
        }
        assert await who(phone) is None  # anonymous on its next request
        assert await who(laptop) == "ann"
        assert [d["meta"] for d in (await laptop.get("/devices")).json()] == [{"device": "laptop"}]
        with pytest.raises(ValueError):
            await manager.revoke("not a handle")


async def test_log_out_everywhere_keeps_the_current_device(manager: SessionManager) -> None:
    async with (
        client_for(manager) as one,
        client_for(manager) as two,
        client_for(manager) as three,
        client_for(manager) as bob,
    ):
        for client in (one, two, three):
            await login(client, "ann")
        await login(bob, "bob")
        assert (await one.post("/logout_everywhere")).json() == {"ended": 2}
        assert [await who(c) for c in (one, two, three, bob)] == ["ann", None, None, "bob"]
        assert len(await manager.sessions_of("ann")) == 1
        assert await manager.revoke_user("ann") == 1
        assert await who(one) is None and await manager.sessions_of("ann") == []


async def test_the_user_index_is_written_before_the_session(
    client: httpx.AsyncClient, driver: CountingDriver
) -> None:
    driver.ops.clear()
    sid = await login(client, "ann")
    writes = [key for op, key in driver.ops if op == "set"]
    index = [i for i, key in enumerate(writes) if key.startswith("session-user:")]
    session = writes.index(f"session:{handle_of(sid)}")
    assert index and index[0] < session


async def test_sessions_of_reads_one_user_without_scanning(
    manager: SessionManager, driver: CountingDriver
) -> None:
    async with client_for(manager) as ann:
        await login(ann, "ann")
    for _ in range(20):
        session = manager.open(None)
        await session.set("anonymous", 1)
        await manager.commit(session)
    driver.ops.clear()
    [info] = await manager.sessions_of("ann")
    assert driver.count("scan") == 0  # one read of the user's index, one of the session
    assert driver.count("get", "get_many", "head") == 2
    assert info.expires_at is not None and info.expires_at > time.time() + 13 * 86400


# -- the ID in a header, and "remember me" ---------------------------------------------


async def test_the_session_id_in_a_header(driver: CountingDriver) -> None:
    manager = SessionManager(driver, cookie=None, header="X-Session")
    async with client_for(manager) as api:
        response = await api.post("/login", params={"user": "ann"})
        assert "set-cookie" not in response.headers
        sid = response.headers["x-session"]
        assert manager.is_valid_id(sid)
        assert (await api.get("/me")).json() == {"user": None}  # no cookie: anonymous
        assert (await api.get("/me", headers={"x-session": sid})).json() == {"user": "ann"}
        response = await api.post("/destroy", headers={"x-session": sid})
        assert response.headers["x-session"] == ""
        assert (await api.get("/me", headers={"x-session": sid})).json() == {"user": None}
    with pytest.raises(ValueError, match="header"):
        SessionManager(driver, cookie=None)


async def test_remember_me_keeps_the_cookie_across_browser_restarts(
    client: httpx.AsyncClient, manager: SessionManager
) -> None:
    response = await client.post("/login", params={"user": "ann"})
    assert "max-age" not in set_cookie(response).lower()  # a browser-session cookie
    response = await client.post("/login", params={"user": "ann", "remember": "1"})
    age = re.search(r"Max-Age=(\d+)", set_cookie(response))
    assert age is not None and 30 * 86400 - 60 < int(age.group(1)) <= 30 * 86400
    meta = await manager.storage.get_meta(f"session:{handle_of(cookie_value(response))}")
    assert meta is not None and meta.ttl is not None and meta.ttl > 29 * 86400


# -- encryption at rest ----------------------------------------------------------------


async def test_session_data_is_encrypted_at_rest_and_keys_rotate(
    driver: CountingDriver, caplog: pytest.LogCaptureFixture
) -> None:
    from kvstorage.wrappers import EncryptedDriver

    old, new = EncryptedDriver.generate_key(), EncryptedDriver.generate_key()
    storage = create_storage(driver, serializer="tagged")
    manager = SessionManager(storage, encryption_keys=[old])
    async with client_for(manager) as client:
        sid = await login(client, "ann-the-user")
        await client.post("/set", params={"cart": "secret-apple"})
    stored = b"".join([await storage.get_item_raw(key) or b"" for key in await storage.get_keys()])
    assert stored and b"secret-apple" not in stored and b"ann-the-user" not in stored
    # rotation: the new key first, the old one still accepted; a write moves it to the new
    rotated = SessionManager(storage, encryption_keys=[new, old])
    session = rotated.open(sid)
    assert await session.get("cart") == "secret-apple" and session.user_id == "ann-the-user"
    await session.set("seen", 1)
    await rotated.commit(session)
    only_new = SessionManager(storage, encryption_keys=[new])
    assert await only_new.open(sid).get("cart") == "secret-apple"
    # a store read with the wrong key: a fresh session and one log line, never a 500
    with caplog.at_level(logging.WARNING, logger="sessions"):
        assert await SessionManager(storage, encryption_keys=[old]).open(sid).get("cart") is None
    assert "corrupt" in caplog.text and sid not in caplog.text
    with pytest.raises(ValueError):
        SessionManager(storage, encryption_keys=["too short"])
