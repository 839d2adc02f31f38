"""Hostile cookies through SessionMiddleware (in-process ASGI): forged, truncated,
oversized and malformed IDs, repeated cookies, header injection, an ID from another app's
prefix, session fixation, and the ID leaking into responses or logs.

Every case must answer without a 5xx, read nothing from the storage for a value that is not
a well-formed ID, and never adopt a session the client did not legitimately receive.
"""

from __future__ import annotations

import base64
import logging
import re
import secrets
from collections.abc import AsyncIterator, Iterable
from typing import Any

import httpx
import pytest

from kvstorage import Storage, create_storage
from kvstorage.drivers import MemoryDriver
from sessions import SessionManager

from .reliability import record
from .sessions_support import CountingDriver, make_app

pytestmark = pytest.mark.anyio

SUBJECT = "sessions: hostile cookies"
READS = ("get", "get_many", "head", "scan")
#: The whole Set-Cookie the middleware may send: a generated ID and fixed attributes.
SET_COOKIE = re.compile(r"session=[A-Za-z0-9_-]{43}; Path=/; HttpOnly; Secure; SameSite=Lax")


@pytest.fixture
def driver() -> CountingDriver:
    return CountingDriver(MemoryDriver())


@pytest.fixture
async def storage(driver: CountingDriver) -> AsyncIterator[Storage]:
    store = create_storage(driver, serializer="tagged")
    yield store
    await store.dispose()


@pytest.fixture
def manager(storage: Storage) -> SessionManager:
    return SessionManager(storage)


@pytest.fixture
async def client(manager: SessionManager) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=make_app(manager))
    async with httpx.AsyncClient(transport=transport, base_url="https://testserver") as c:
        yield c


async def login(client: httpx.AsyncClient, user: str = "ann") -> str:
    """Start a session holding ``who=user``; return its ID (and forget the cookie)."""
    response = await client.post("/set", params={"who": user})
    [cookie] = response.headers.get_list("set-cookie")
    client.cookies.clear()
    return cookie.split(";")[0].removeprefix("session=")


def new_id(response: httpx.Response) -> str:
    """The ID the response hands out, checking the whole Set-Cookie header."""
    [cookie] = response.headers.get_list("set-cookie")
    assert SET_COOKIE.fullmatch(cookie), cookie
    return cookie.split(";")[0].removeprefix("session=")


async def try_cookie(
    client: httpx.AsyncClient, driver: CountingDriver, header: str | bytes, *, reads: int
) -> str:
    """Send ``header`` as the Cookie header: reading the session finds nothing (with exactly
    ``reads`` storage reads), and writing to it starts a new session; return its ID."""
    if isinstance(header, str):
        header = header.encode("latin-1")  # as a browser would send a non-ASCII cookie
    headers = {b"cookie": header}
    driver.ops.clear()
    response = await client.get("/get", params={"key": "who"}, headers=headers)
    assert response.status_code == 200, response.text
    assert response.json() == {"value": None}  # nobody's session was adopted
    assert response.headers.get_list("set-cookie") == []
    assert driver.count(*READS) == reads, driver.ops
    response = await client.post("/set", params={"who": "mallory"}, headers=headers)
    assert response.status_code == 200, response.text
    client.cookies.clear()
    return new_id(response)


async def try_values(
    client: httpx.AsyncClient,
    driver: CountingDriver,
    category: str,
    values: Iterable[str | bytes],
    *,
    reads: int = 0,
) -> int:
    """:func:`try_cookie` with ``session=<value>`` for each value; record how many."""
    tried = 0
    for value in values:
        header = b"session=" + value if isinstance(value, bytes) else f"session={value}"
        assert await try_cookie(client, driver, header, reads=reads) != value
        tried += 1
    record("hostile", SUBJECT, **{category: tried})
    return tried


async def test_forged_well_formed_ids_are_read_once_and_never_adopted(
    client: httpx.AsyncClient, driver: CountingDriver, storage: Storage
) -> None:
    real = await login(client)
    forged = [secrets.token_urlsafe(32) for _ in range(50)]
    await try_values(client, driver, "forged_ids", forged, reads=1)
    keys = await storage.get_keys()
    assert f"session:{real}" in keys and len(keys) == 1 + len(forged)
    assert not any(key.removeprefix("session:") in forged for key in keys)


async def test_truncated_and_extended_ids_read_nothing(
    client: httpx.AsyncClient, driver: CountingDriver
) -> None:
    real = await login(client)
    cut = [real[:n] for n in (0, 1, 8, 21, 42)] + [real[1:], real + "A", real + real]
    await try_values(client, driver, "truncated_or_extended_ids", cut)


async def test_oversized_cookies_read_nothing(
    client: httpx.AsyncClient, driver: CountingDriver
) -> None:
    real = await login(client)
    huge = ["A" * 8 * 1024, "A" * 100 * 1024, real * 200, real + "x" * 100 * 1024]
    await try_values(client, driver, "oversized_cookies", huge)


async def test_malformed_cookie_values_read_nothing(
    client: httpx.AsyncClient, driver: CountingDriver
) -> None:
    real = await login(client)
    malformed: list[str | bytes] = [
        f'"{real}"',  # RFC 6265 quoted form: not unquoted, not adopted
        real[:42] + "=",  # padded base64
        real[:42] + "+",  # the standard base64 alphabet
        real[:42] + "/",
        real[:42] + ".",
        real[:21] + " " + real[21:42],
        real[:21] + "\t" + real[22:],
        real[:42] + "\x00",
        "\x00" * 43,
        "%" + real[1:],
        "%41" * 14 + "A",  # 43 characters of percent-encoding
        real.replace(real[0], "%" + format(ord(real[0]), "02X"), 1),
        "é" * 43,  # non-ASCII, sent as latin-1
        ("ż" * 43).encode(),  # non-ASCII, sent as UTF-8 bytes
        ("🐢" + real[1:]).encode(),
        bytes(range(128, 171)),  # 43 bytes that are not ASCII
        real[:20] + ";" + real[20:],  # the semicolon splits it into two cookies
        real[:20] + "," + real[21:],
        real[:42] + "\\",
        "=" + real,
        "session=" + real,
        "<script>alert(1)</script>",
        "' OR 1=1 --",
        "../../../../etc/passwd",
        "*",
        "session:" + real,  # the storage key form
    ]
    await try_values(client, driver, "malformed_values", malformed)


async def test_many_cookies_with_the_same_name(
    client: httpx.AsyncClient, driver: CountingDriver
) -> None:
    real = await login(client)
    junk = "; ".join(f"session=junk{i}" for i in range(1000))
    await try_cookie(client, driver, junk, reads=0)  # 1000 malformed ones: no read at all
    # The first well-formed one wins, with one read; the real one after it is not tried.
    forged = secrets.token_urlsafe(32)
    await try_cookie(client, driver, f"{junk}; session={forged}; session={real}", reads=1)
    # With the real one first, it loads with one read, whatever follows.
    driver.ops.clear()
    header = f"session=junk; other=1; session={real}; {junk}; session={forged}"
    response = await client.get("/get", params={"key": "who"}, headers={"cookie": header})
    assert response.json() == {"value": "ann"}
    assert driver.count(*READS) == 1
    record("hostile", SUBJECT, repeated_cookie_headers=3, repeated_cookies=3 * 1000 + 5)


async def _raw_request(app: Any, cookie: bytes) -> tuple[int, list[tuple[bytes, bytes]]]:
    """Call the ASGI app directly with a Cookie header httpx would refuse to send."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "https",
        "path": "/set",
        "raw_path": b"/set",
        "query_string": b"who=mallory",
        "root_path": "",
        "headers": [(b"host", b"testserver"), (b"cookie", cookie)],
        "client": ("127.0.0.1", 1),
        "server": ("testserver", 443),
    }
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    start = sent[0]
    return start["status"], list(start.get("headers", []))


async def test_header_injection_characters_are_never_echoed(
    manager: SessionManager, driver: CountingDriver
) -> None:
    app = make_app(manager)
    real = secrets.token_urlsafe(32)
    injections = [
        f"{real}\r\nSet-Cookie: session=evil",
        f"{real}\r\nX-Injected: 1",
        "x\r\n\r\n<html>body</html>",
        f"{real}\nX-Injected: 1",
        f"{real}\rX-Injected: 1",
        f"{real[:42]}\n",
        "\r\n" * 50,
    ]
    for value in injections:
        driver.ops.clear()
        status, headers = await _raw_request(app, b"session=" + value.encode())
        assert status == 200
        assert driver.count(*READS) == 0  # a well-formed ID followed by junk is junk
        names = [name for name, _ in headers]
        assert b"x-injected" not in names
        cookies = [v.decode("latin-1") for name, v in headers if name == b"set-cookie"]
        assert len(cookies) == 1 and SET_COOKIE.fullmatch(cookies[0]), cookies
        assert real not in cookies[0]
        assert all(b"\r" not in v and b"\n" not in v for _, v in headers)
    record("hostile", SUBJECT, header_injection=len(injections))


async def test_an_id_from_another_prefix_is_not_adopted(
    client: httpx.AsyncClient, driver: CountingDriver, storage: Storage
) -> None:
    other = SessionManager(storage, prefix="other")
    session = other.open(None)
    await session.set("who", "admin of the other app")
    [cookie] = await other.commit(session)
    foreign = cookie.split(";")[0].removeprefix("session=")
    assert await storage.get_keys() == [f"other:{foreign}"]
    issued = await try_cookie(client, driver, f"session={foreign}", reads=1)
    assert issued != foreign
    assert driver.ops[0] == ("get", f"session:{foreign}")  # only under its own prefix
    assert await other.open(foreign).get("who") == "admin of the other app"  # untouched
    assert sorted(await storage.get_keys()) == sorted([f"other:{foreign}", f"session:{issued}"])
    record("hostile", SUBJECT, foreign_prefix_ids=1)


def cookie(session_id: str) -> dict[str, str]:
    """An explicit Cookie header (the attacker's planted cookie, or the victim's own)."""
    return {"cookie": f"session={session_id}"}


async def test_fixation_with_an_unknown_attacker_chosen_id(
    client: httpx.AsyncClient, driver: CountingDriver, storage: Storage
) -> None:
    chosen = "A" * 21 + "ttacker" + "B" * 15  # well-formed, never issued by the server
    assert SessionManager.is_valid_id(chosen)
    # The victim's browser carries the planted cookie when the app writes to the session.
    response = await client.post("/set", params={"who": "victim"}, headers=cookie(chosen))
    assert response.status_code == 200
    assert ("get", f"session:{chosen}") in driver.ops  # it was looked up...
    victim = new_id(response)
    assert victim != chosen  # ...and not adopted
    response = await client.get("/get", params={"key": "who"}, headers=cookie(victim))
    assert response.json() == {"value": "victim"}
    # The attacker, presenting the planted ID, gets nothing.
    response = await client.get("/get", params={"key": "who"}, headers=cookie(chosen))
    assert response.json() == {"value": None}
    assert await storage.get_keys() == [f"session:{victim}"]
    record("hostile", SUBJECT, fixation_attempts=1)


async def test_fixation_with_the_attackers_own_session_in_the_demo_shop(
    storage: Storage,
) -> None:
    from examples.shop import create_app

    shop = create_app(SessionManager(storage))
    transport = httpx.ASGITransport(app=shop)
    async with httpx.AsyncClient(transport=transport, base_url="https://shop") as client:
        # The attacker gets a real session (a failed login leaves a flash message)...
        response = await client.post("/login", data={"user": "x", "password": "wrong"})
        planted = new_id(response)
        client.cookies.clear()
        assert await storage.get_keys() == [f"session:{planted}"]
        # ...and plants its ID in the victim's browser, who then logs in.
        login = {"user": "victim", "password": "demo"}
        response = await client.post("/login", data=login, headers=cookie(planted))
        assert response.status_code == 303
        issued = new_id(response)
        assert issued != planted  # login regenerates the ID
        client.cookies.clear()
        assert "Hello, victim!" in (await client.get("/", headers=cookie(issued))).text
        page = (await client.get("/", headers=cookie(planted))).text  # the attacker
        assert "victim" not in page and 'id="login"' in page
    assert await storage.get_keys() == [f"session:{issued}"]  # the planted session is gone
    record("hostile", SUBJECT, fixation_attempts=1)


async def test_the_id_never_leaks_except_in_set_cookie(
    storage: Storage, caplog: pytest.LogCaptureFixture
) -> None:
    from examples.shop import create_app

    shop = create_app(SessionManager(storage, idle_timeout=1800))
    transport = httpx.ASGITransport(app=shop)
    responses: list[httpx.Response] = []
    with caplog.at_level(logging.DEBUG):
        async with httpx.AsyncClient(
            transport=transport, base_url="https://shop", follow_redirects=True
        ) as client:
            responses.append(await client.post("/login", data={"user": "x", "password": "no"}))
            responses.append(await client.post("/login", data={"user": "ann", "password": "demo"}))
            responses.append(await client.post("/cart", data={"product": "fig"}))
            assert "Hello, ann!" in responses[-1].text and "<li>Fig</li>" in responses[-1].text
            responses.append(await client.get("/"))
            responses.append(await client.post("/logout"))
            assert 'id="login"' in responses[-1].text
    every = [r for response in responses for r in (*response.history, response)]
    ids = {
        cookie.split(";")[0].removeprefix("session=")
        for r in every
        for cookie in r.headers.get_list("set-cookie")
    } - {""}
    assert len(ids) == 2  # the anonymous session (a flash), then the logged-in one
    for r in every:
        assert r.status_code < 500
        for sid in ids:
            assert sid.encode() not in r.content
            for name, value in r.headers.multi_items():
                assert name == "set-cookie" or sid not in value, name
    for sid in ids:
        assert sid not in caplog.text  # logs carry a salted fingerprint, never the ID
    assert "session" in caplog.text  # (something was logged at all)
    record("hostile", SUBJECT, responses_checked_for_id_leaks=len(every))


async def test_id_entropy() -> None:
    manager = SessionManager(MemoryDriver())
    ids = []
    for _ in range(10_000):
        session = manager.open(None)
        await session.set("n", 1)
        [cookie] = await manager.commit(session)
        ids.append(cookie.split(";")[0].removeprefix("session="))
    await manager.dispose()
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"[A-Za-z0-9_-]{43}", i) and SessionManager.is_valid_id(i) for i in ids)
    raw = [base64.urlsafe_b64decode(i + "=") for i in ids]
    bits = {len(r) * 8 for r in raw}
    assert bits == {256}
    # Every one of the 256 bit positions is set in about half the IDs (10,000 samples:
    # the standard deviation is 0.005, so 0.45-0.55 is ten of them).
    for position in range(256):
        ones = sum(r[position // 8] >> (position % 8) & 1 for r in raw)
        assert 0.45 < ones / len(raw) < 0.55, position
    record(
        "hostile",
        "sessions: ID entropy",
        id_length_chars=43,
        alphabet="URL-safe base64 (64 symbols)",
        entropy_bits=256,
        ids_generated=len(ids),
        distinct=len(set(ids)),
        guesses_per_hit_with_1e6_live_sessions=float(2**256 / 1e6),
    )
