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

import httpx
import pytest

from kvstorage import Storage, create_storage
from kvstorage.drivers import MemoryDriver
from sessions import CookieOptions, SessionManager
from sessions.store import handle_of

from .support.reliability import record
from .support.sessions_support import CountingDriver, live_keys, make_app

pytestmark = pytest.mark.anyio

READS = ("get", "get_many", "head", "scan")
#: The whole Set-Cookie the middleware may send: a generated ID and fixed attributes.
#: A cookie name without the ``__Host-`` prefix: the weaker case for cookie tossing.
SESSION_COOKIE = CookieOptions("session")
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
    return SessionManager(storage, cookie=SESSION_COOKIE)


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


def tally(category: str, cookies: int, storage_reads: int | None = None) -> None:
    """Record ``cookies`` hostile cookies of ``category`` tried (and the storage reads
    they caused, each asserted by the test)."""
    figures = {"cookies": cookies}
    if storage_reads is not None:
        figures["storage_reads"] = storage_reads
    record("hostile", f"sessions: {category}", **figures)


def check_headers(response: httpx.Response) -> None:
    """No 5xx, and nothing from the request was echoed into the response headers."""
    assert response.status_code < 500, response.text
    assert "x-injected" not in response.headers
    assert all(b"\r" not in v and b"\n" not in v for _, v in response.headers.raw)


def csrf_in(page: str) -> str:
    """The CSRF token of the first form on a page of the demo shop."""
    found = re.search(r'name="csrf" value="([^"]+)"', page)
    assert found is not None, page
    return found.group(1)


def new_id(response: httpx.Response) -> str:
    """The ID the response hands out, checking the whole Set-Cookie header."""
    [cookie] = response.headers.get_list("set-cookie")
    assert SET_COOKIE.fullmatch(cookie), cookie
    return cookie.split(";")[0].removeprefix("session=")


async def try_cookie(
    client: httpx.AsyncClient,
    driver: CountingDriver,
    header: str | bytes | list[bytes],
    *,
    reads: int,
) -> str:
    """Send ``header`` as the Cookie header (a list: several Cookie headers, as HTTP/2
    sends them): reading the session finds nothing (with exactly ``reads`` storage
    reads), and writing to it starts a new session; return its ID."""
    if isinstance(header, str):
        header = header.encode("latin-1")  # as a browser would send a non-ASCII cookie
    headers = [(b"cookie", value) for value in ([header] if isinstance(header, bytes) else header)]
    driver.ops.clear()
    response = await client.get("/get", params={"key": "who"}, headers=headers)
    check_headers(response)
    assert response.status_code == 200, response.text
    assert response.json() == {"value": None}  # nobody's session was adopted
    assert response.headers.get_list("set-cookie") == []
    assert driver.count(*READS) == reads, driver.ops
    response = await client.post("/set", params={"who": "mallory"}, headers=headers)
    check_headers(response)
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
    tally(category, tried, tried * reads)
    return tried


async def test_forged_well_formed_ids_are_read_once_and_never_adopted(
    client: httpx.AsyncClient, driver: CountingDriver, storage: Storage
) -> None:
    real = await login(client)
    forged = [secrets.token_urlsafe(32) for _ in range(50)]
    await try_values(client, driver, "forged well-formed IDs", forged, reads=1)
    keys = await storage.get_keys()
    assert f"session:{handle_of(real)}" in keys and len(keys) == 1 + len(forged)
    assert not any(key.removeprefix("session:") in {handle_of(f) for f in forged} for key in keys)


async def test_truncated_and_extended_ids_read_nothing(
    client: httpx.AsyncClient, driver: CountingDriver
) -> None:
    real = await login(client)
    cut = [real[:n] for n in (0, 1, 8, 21, 42)] + [real[1:], real + "A", real + real]
    await try_values(client, driver, "truncated or extended IDs", cut)


async def test_oversized_cookies_read_nothing(
    client: httpx.AsyncClient, driver: CountingDriver
) -> None:
    real = await login(client)
    huge = ["A" * 8 * 1024, "A" * 100 * 1024, real * 200, real + "x" * 100 * 1024]
    await try_values(client, driver, "oversized cookies (8-100 KB)", huge)


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
    await try_values(client, driver, "malformed values", malformed)


async def test_many_cookies_with_the_same_name(
    client: httpx.AsyncClient, driver: CountingDriver
) -> None:
    real = await login(client)
    forged = secrets.token_urlsafe(32)
    junk = "; ".join(f"session=junk{i}" for i in range(1000))
    hostile: list[str | list[bytes]] = [
        junk,  # 1000 malformed ones: no read at all
        # The first well-formed one wins, with one read; the real one after it is not tried.
        f"{junk}; session={forged}; session={real}",
        [b"session=junk", f"session={forged}".encode(), f"session={real}".encode()],
    ]
    reads = 0
    for header in hostile:
        expected = 0 if header is junk else 1
        await try_cookie(client, driver, header, reads=expected)
        reads += expected
    # With the real one first, it loads with one read, whatever follows.
    loads: list[str | list[bytes]] = [
        f"session=junk; other=1; session={real}; {junk}; session={forged}",
        [b"session=", b"other=1; session=junk", f"session={real}".encode(), junk.encode()],
    ]
    for header in loads:
        driver.ops.clear()
        values = [header.encode()] if isinstance(header, str) else header
        headers = [(b"cookie", value) for value in values]
        response = await client.get("/get", params={"key": "who"}, headers=headers)
        assert response.json() == {"value": "ann"}
        assert driver.count(*READS) == 1
        reads += 1
    sent = [str(h) for h in (*hostile, *loads)]
    tally("one name repeated", sum(h.count("session=") for h in sent), reads)


async def test_lookalike_cookie_names_are_ignored(
    client: httpx.AsyncClient, driver: CountingDriver
) -> None:
    real = await login(client)
    names = ["SESSION", "Session", "session_", "xsession", "__Host-session", "sessio", "ses sion"]
    for name in names:
        await try_cookie(client, driver, f"{name}={real}", reads=0)
    tally("lookalike cookie names", len(names), 0)


async def test_header_injection_characters_are_never_echoed(
    client: httpx.AsyncClient, driver: CountingDriver
) -> None:
    real = await login(client)
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
        issued = await try_cookie(client, driver, f"session={value}", reads=0)
        assert issued != real  # new_id() checked the whole Set-Cookie header
    tally("CR/LF header injection", len(injections), 0)


async def test_an_id_from_another_prefix_is_not_adopted(
    client: httpx.AsyncClient, driver: CountingDriver, storage: Storage
) -> None:
    other = SessionManager(storage, prefix="other", cookie=SESSION_COOKIE)
    session = other.open(None)
    await session.set("who", "admin of the other app")
    [cookie] = await other.commit(session)
    foreign = cookie.split(";")[0].removeprefix("session=")
    assert await storage.get_keys() == [f"other:{handle_of(foreign)}"]
    issued = await try_cookie(client, driver, f"session={foreign}", reads=1)
    assert issued != foreign
    assert driver.ops[0] == ("get", f"session:{handle_of(foreign)}")  # only under its own prefix
    assert await other.open(foreign).get("who") == "admin of the other app"  # untouched
    assert sorted(await storage.get_keys()) == sorted(
        [f"other:{handle_of(foreign)}", f"session:{handle_of(issued)}"]
    )
    tally("ID of another app's prefix", 1, 1)


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
    assert ("get", f"session:{handle_of(chosen)}") in driver.ops  # it was looked up...
    victim = new_id(response)
    assert victim != chosen  # ...and not adopted
    response = await client.get("/get", params={"key": "who"}, headers=cookie(victim))
    assert response.json() == {"value": "victim"}
    # The attacker, presenting the planted ID, gets nothing.
    response = await client.get("/get", params={"key": "who"}, headers=cookie(chosen))
    assert response.json() == {"value": None}
    assert await storage.get_keys() == [f"session:{handle_of(victim)}"]
    tally("fixation (attacker-chosen ID)", 1)


async def test_fixation_with_the_attackers_own_session_in_the_demo_shop(
    storage: Storage,
) -> None:
    from examples.shop import create_app

    manager = SessionManager(storage, cookie=SESSION_COOKIE)
    shop = create_app(manager)
    transport = httpx.ASGITransport(app=shop)
    async with httpx.AsyncClient(transport=transport, base_url="https://shop") as client:
        # The attacker gets a real session (the login form holds its CSRF token)...
        page = await client.get("/")
        planted = new_id(page)
        attempt = {"user": "x", "password": "wrong", "csrf": csrf_in(page.text)}
        await client.post("/login", data=attempt)
        client.cookies.clear()
        assert await live_keys(manager) == [f"session:{handle_of(planted)}"]
        # ...and plants its ID in the victim's browser, who then logs in.
        page = await client.get("/", headers=cookie(planted))
        login = {"user": "victim", "password": "demo", "csrf": csrf_in(page.text)}
        response = await client.post("/login", data=login, headers=cookie(planted))
        assert response.status_code == 303
        issued = new_id(response)
        assert issued != planted  # login regenerates the ID
        client.cookies.clear()
        assert "Hello, victim!" in (await client.get("/", headers=cookie(issued))).text
        page = await client.get("/", headers=cookie(planted))  # the attacker
        assert "victim" not in page.text and 'id="login"' in page.text
        assert new_id(page) != planted  # a fresh anonymous session, not the planted one
    # The planted ID now holds only a marker (so a request still running with it cannot
    # bring it back), never a session.
    marker = await manager.store.read(handle_of(planted))
    assert marker is not None and not marker.live and marker.data == {}
    assert f"session:{handle_of(issued)}" in await live_keys(manager)
    tally("fixation (attacker-chosen ID)", 1)


async def test_the_id_never_leaks_except_in_set_cookie(
    storage: Storage, caplog: pytest.LogCaptureFixture
) -> None:
    from examples.shop import create_app

    shop = create_app(SessionManager(storage, idle_timeout=1800, cookie=SESSION_COOKIE))
    transport = httpx.ASGITransport(app=shop)
    responses: list[httpx.Response] = []
    with caplog.at_level(logging.DEBUG):
        async with httpx.AsyncClient(
            transport=transport, base_url="https://shop", follow_redirects=True
        ) as client:

            async def post(path: str, **fields: str) -> None:
                token = csrf_in(responses[-1].text)
                responses.append(await client.post(path, data={**fields, "csrf": token}))

            responses.append(await client.get("/"))
            await post("/login", user="x", password="no")
            await post("/login", user="ann", password="demo")
            await post("/cart", product="fig")
            assert "Hello, ann!" in responses[-1].text and "<li>Fig</li>" in responses[-1].text
            responses.append(await client.get("/devices"))
            await post("/logout")
            assert 'id="login"' in responses[-1].text
    every = [r for response in responses for r in (*response.history, response)]
    ids = {
        cookie.split(";")[0].removeprefix("session=")
        for r in every
        for cookie in r.headers.get_list("set-cookie")
    } - {""}
    # the anonymous session (the login form's CSRF token), the logged-in one, and a new
    # anonymous one after logout (its login form)
    assert len(ids) == 3
    for r in every:
        assert r.status_code < 500
        for sid in ids:
            assert sid.encode() not in r.content
            for name, value in r.headers.multi_items():
                assert name == "set-cookie" or sid not in value, name
    for sid in ids:
        assert sid not in caplog.text  # logs carry a salted fingerprint, never the ID
    assert "session" in caplog.text  # (something was logged at all)
    record("hostile", "sessions: ID leaks (demo shop)", responses_checked=len(every))


async def test_id_entropy() -> None:
    manager = SessionManager(MemoryDriver())
    ids = []
    for _ in range(10_000):
        session = manager.open(None)
        await session.set("n", 1)
        [cookie] = await manager.commit(session)
        ids.append(cookie.split(";")[0].split("=", 1)[1])
    await manager.dispose()
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"[A-Za-z0-9_-]{43}", i) and SessionManager.is_valid_id(i) for i in ids)
    raw = [base64.urlsafe_b64decode(i + "=") for i in ids]
    [bits] = {len(r) * 8 for r in raw}  # every ID carries the same number of random bits
    assert bits == 256
    # Every one of the 256 bit positions is set in about half the IDs (10,000 samples:
    # the standard deviation is 0.005, so 0.45-0.55 is ten of them).
    for position in range(256):
        ones = sum(r[position // 8] >> (position % 8) & 1 for r in raw)
        assert 0.45 < ones / len(raw) < 0.55, position
    record(
        "hostile",
        "sessions: ID entropy",
        entropy_bits=bits,
        ids_generated=len(ids),
        distinct=len(set(ids)),
    )
