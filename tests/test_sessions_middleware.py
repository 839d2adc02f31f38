"""SessionMiddleware under Starlette and FastAPI, through the in-process ASGI transport and
a real uvicorn server on a loopback port, on every driver of the matrix."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import anyio
import httpx
import pytest
from fastapi import Depends, FastAPI

from sessions import (
    CookieOptions,
    Session,
    SessionDep,
    SessionManager,
    SessionMiddleware,
    get_session,
)
from sessions.store import handle_of

from .backends import DriverFactory
from .support.helpers import eventually
from .support.sessions_support import CountingDriver, Gate, live_keys, make_app, serve

pytestmark = pytest.mark.anyio

#: These tests send the cookie by hand: a short name (the default is __Host-session).
SESSION_COOKIE = CookieOptions("session")


@pytest.fixture
def driver(make_driver: DriverFactory) -> CountingDriver:
    return CountingDriver(make_driver())


@pytest.fixture(params=["asgi", "uvicorn"])
def transport(request: pytest.FixtureRequest, anyio_backend_name: str) -> str:
    if request.param == "uvicorn" and anyio_backend_name != "asyncio":
        pytest.skip("uvicorn serves on asyncio only")
    kind: str = request.param
    return kind


@pytest.fixture
def manager(driver: CountingDriver, transport: str) -> SessionManager:
    # A real server here speaks plain HTTP: the cookie cannot be Secure there.
    return SessionManager(driver, cookie=CookieOptions("session", secure=transport == "asgi"))


@pytest.fixture
def gate() -> Gate:
    return Gate()


@pytest.fixture
async def client(
    manager: SessionManager, gate: Gate, transport: str
) -> AsyncIterator[httpx.AsyncClient]:
    app = make_app(manager, gate=gate)
    if transport == "asgi":
        asgi = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=asgi, base_url="https://testserver") as c:
            yield c
    else:
        async with serve(app) as url, httpx.AsyncClient(base_url=url) as c:
            yield c


def set_cookies(response: httpx.Response) -> list[str]:
    return response.headers.get_list("set-cookie")


async def test_request_without_session_use_does_no_io(
    client: httpx.AsyncClient, driver: CountingDriver
):
    response = await client.get("/nothing")
    assert response.status_code == 200
    assert set_cookies(response) == []
    assert "cache-control" not in response.headers
    assert (await client.get("/get", params={"key": "a"})).json() == {"value": None}
    assert driver.ops == []


async def test_cookie_set_on_first_write_then_reads_do_not_write(
    client: httpx.AsyncClient, driver: CountingDriver, manager: SessionManager
):
    response = await client.post("/set", params={"cart": "apple"})
    [cookie] = set_cookies(response)
    assert cookie.startswith("session=") and "HttpOnly" in cookie and "SameSite=Lax" in cookie
    assert response.headers["cache-control"] == "no-store"
    writes = driver.writes
    response = await client.get("/get", params={"key": "cart"})
    assert response.json() == {"value": "apple"}
    assert set_cookies(response) == [] and "cache-control" not in response.headers
    assert driver.writes == writes
    # A later write to the same session does not need to re-send the cookie.
    response = await client.post("/set", params={"size": "L"})
    assert set_cookies(response) == []
    items = (await client.get("/get")).json()["items"]
    assert items == {"cart": "apple", "size": "L"}
    assert len(await manager.storage.get_keys()) == 1


async def test_regenerate_and_destroy_over_http(client: httpx.AsyncClient, manager: SessionManager):
    await client.post("/set", params={"user": "ann"})
    old = (await client.get("/get")).json()["id"]
    response = await client.post("/regenerate")
    [cookie] = set_cookies(response)
    new = (await client.get("/get")).json()["id"]
    assert new != old and cookie.startswith(f"session={new};")
    assert (await client.get("/get", params={"key": "user"})).json() == {"value": "ann"}
    assert await live_keys(manager) == [f"session:{handle_of(new)}"]
    response = await client.post("/destroy")
    [cookie] = set_cookies(response)
    assert "Max-Age=0" in cookie
    assert "session" not in client.cookies
    assert await live_keys(manager) == []
    assert (await client.get("/get")).json() == {"items": {}, "id": None}


async def test_flash_over_http(client: httpx.AsyncClient):
    await client.post("/flash", params={"msg": "Saved!"})
    assert (await client.post("/pop_flash")).json() == {"msg": "Saved!"}
    assert (await client.post("/pop_flash")).json() == {"msg": None}


async def test_nothing_is_persisted_for_a_5xx_response(
    client: httpx.AsyncClient, manager: SessionManager
):
    response = await client.post("/fail")
    assert response.status_code == 500
    assert set_cookies(response) == []
    assert await manager.storage.get_keys() == []


async def test_persist_on_error_when_configured(driver: CountingDriver):
    manager = SessionManager(driver, cookie=SESSION_COOKIE)
    app = make_app(manager, persist_on_error=True)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="https://t") as client:
        response = await client.post("/fail")
        assert response.status_code == 500 and len(set_cookies(response)) == 1
        assert (await client.get("/get", params={"key": "failed"})).json() == {"value": "yes"}


async def test_change_after_headers_is_persisted_when_the_id_is_unchanged(
    client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
):
    # The late commit runs after the body went out: a real server may answer the next
    # request before it finishes, hence the bounded polls.
    with caplog.at_level(logging.WARNING, logger="sessions"):
        response = await client.post("/stream")  # a new session: its ID cannot be sent now
        assert response.text == "first chunk\nsecond chunk\n"
        assert set_cookies(response) == []

        async def warned() -> bool:
            return "response started" in caplog.text

        await eventually(warned)
    await client.post("/set", params={"a": "1"})
    await client.post("/stream")  # an existing session: saved after the body

    async def saved() -> bool:
        response = await client.get("/get", params={"key": "streamed"})
        return bool(response.json() == {"value": "yes"})

    await eventually(saved)


async def test_multiple_cookies_the_first_well_formed_wins(
    client: httpx.AsyncClient, manager: SessionManager
):
    await client.post("/set", params={"who": "me"})
    sid = (await client.get("/get")).json()["id"]
    client.cookies.clear()
    headers = {"cookie": f"session=not-an-id; session={sid}; session={'D' * 43}"}
    response = await client.get("/get", params={"key": "who"}, headers=headers)
    assert response.json() == {"value": "me"}


async def test_two_overlapping_requests_writing_different_keys_keep_both(
    client: httpx.AsyncClient, manager: SessionManager
):
    await client.post("/set", params={"start": "0"})
    results: dict[str, int] = {}

    async def call(me: str, other: str) -> None:
        response = await client.post("/overlap", params={"me": me, "wait": other})
        results[me] = response.status_code

    async with anyio.create_task_group() as group:  # both load before either writes
        group.start_soon(call, "a", "b")
        group.start_soon(call, "b", "a")
    assert results == {"a": 200, "b": 200}
    items = (await client.get("/get")).json()["items"]
    assert items == {"start": "0", "a": "written", "b": "written"}


async def test_write_racing_destroy_leaves_the_session_destroyed(
    client: httpx.AsyncClient, manager: SessionManager, gate: Gate
):
    await client.post("/set", params={"user": "ann"})
    sid = (await client.get("/get")).json()["id"]

    async def writer() -> None:  # loads, then waits until the logout has finished
        await client.post("/overlap", params={"me": "w", "wait": "logout", "after": "done"})

    async with anyio.create_task_group() as group:
        group.start_soon(writer)
        await gate["w-loaded"].wait()
        response = await client.post("/destroy")
        assert "Max-Age=0" in set_cookies(response)[0]
        gate["logout-done"].set()
    assert await live_keys(manager) == []
    assert "session" not in client.cookies
    response = await client.get("/get", headers={"cookie": f"session={sid}"})
    assert response.json() == {"items": {}, "id": None}


async def test_fastapi_dependency(driver: CountingDriver):
    api = FastAPI()

    @api.post("/visit")
    async def visit(session: Session = Depends(get_session)) -> dict[str, int]:  # noqa: B008
        count = await session.get("visits", 0) + 1
        await session.set("visits", count)
        return {"visits": count}

    @api.get("/peek")
    async def peek(session: SessionDep) -> dict[str, int]:
        return {"visits": await session.get("visits", 0)}

    api.add_middleware(SessionMiddleware, manager=SessionManager(driver, cookie=SESSION_COOKIE))
    transport = httpx.ASGITransport(app=api)
    async with httpx.AsyncClient(transport=transport, base_url="https://t") as client:
        assert (await client.post("/visit")).json() == {"visits": 1}
        assert (await client.post("/visit")).json() == {"visits": 2}
        assert (await client.get("/peek")).json() == {"visits": 2}


async def test_fastapi_dependency_without_middleware_is_a_clear_error():
    api = FastAPI()

    @api.get("/")
    async def view(session: SessionDep) -> dict[str, str]:
        return {}

    transport = httpx.ASGITransport(app=api, raise_app_exceptions=True)
    async with httpx.AsyncClient(transport=transport, base_url="https://t") as client:
        with pytest.raises(RuntimeError, match="SessionMiddleware"):
            await client.get("/")


async def test_plain_asgi_app_and_lifespan_passthrough(driver: CountingDriver):
    async def app(scope, receive, send):  # type: ignore[no-untyped-def]
        if scope["type"] == "lifespan":
            assert "session" not in scope
            return
        session = scope["session"]
        await session.set("n", await session.get("n", 0) + 1)
        body = str(await session.get("n")).encode()
        headers = [(b"cache-control", b"public, max-age=60")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    wrapped = SessionMiddleware(app, SessionManager(driver, cookie=SESSION_COOKIE))
    await wrapped({"type": "lifespan"}, None, None)  # type: ignore[arg-type]
    transport = httpx.ASGITransport(app=wrapped)
    async with httpx.AsyncClient(transport=transport, base_url="https://t") as client:
        first = await client.get("/")
        assert first.text == "1"
        # A response that sets the session cookie must not be cached, whatever the app said.
        assert first.headers.get_list("cache-control") == ["no-store"]
        second = await client.get("/")
        assert second.text == "2"
        assert second.headers.get_list("cache-control") == ["public, max-age=60"]


async def test_websocket_reads_and_writes_an_existing_session(driver: CountingDriver):
    manager = SessionManager(driver, cookie=SESSION_COOKIE)
    session = manager.open(None)
    await session.set("user", "ann")
    sid = (await manager.commit(session))[0].split(";")[0].removeprefix("session=")

    async def app(scope, receive, send):  # type: ignore[no-untyped-def]
        session = scope["session"]
        assert (await receive())["type"] == "websocket.connect"
        await send({"type": "websocket.accept"})
        await send({"type": "websocket.send", "text": await session.get("user")})
        await session.set("seen", True)  # after the handshake: saved when the app returns
        await send({"type": "websocket.close", "code": 1000})

    messages = [{"type": "websocket.connect"}]
    sent: list[dict[str, object]] = []

    async def receive() -> dict[str, object]:
        return messages.pop(0)

    async def send(message: dict[str, object]) -> None:
        sent.append(message)

    scope = {
        "type": "websocket",
        "path": "/ws",
        "headers": [(b"cookie", f"session={sid}".encode())],
    }
    await SessionMiddleware(app, manager)(scope, receive, send)
    assert [m["type"] for m in sent] == ["websocket.accept", "websocket.send", "websocket.close"]
    assert sent[1]["text"] == "ann"
    assert await manager.open(sid).items() == [("user", "ann"), ("seen", True)]
