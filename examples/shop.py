"""A small shop on server-side sessions: log in (with "remember me"), fill a cart, see
your devices and sign one out, log out everywhere, log out.

Run it with ``python -m uvicorn examples.shop:app`` and open http://127.0.0.1:8000.
Sessions live in ``./.sessions`` (the fs driver) unless ``KVSTORAGE_URL`` names another
storage, e.g. ``KVSTORAGE_URL=redis://127.0.0.1:6379/0?base=shop``.

What it shows: ``regenerate()`` and ``set_user()`` on login (against session fixation,
and so the session appears among the user's devices), ``set_expiry(persistent=True)``
for "remember me", ``sessions_of()`` / ``revoke()`` / ``revoke_user()`` for the devices
page, a CSRF token in every form (``csrf_token()`` / ``verify_csrf()``; the middleware
also refuses cross-site posts), ``destroy()`` on logout, and a flash message that
survives exactly one redirect.
"""

from __future__ import annotations

import time
from datetime import timedelta
from html import escape
from urllib.parse import parse_qs

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Route

from sessions import CookieOptions, Session, SessionManager, SessionMiddleware

PRODUCTS = {"apple": "Apple", "pear": "Pear", "fig": "Fig"}
PASSWORD = "demo"  # every user name works with this password
REMEMBER = timedelta(days=30)

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>Shop</title></head>
<body>
<h1>Shop</h1>
{flash}
{body}
</body></html>"""

LOGIN = """<form method="post" action="/login">
<input type="hidden" name="csrf" value="{csrf}">
<label>User <input name="user" id="user" required></label>
<label>Password <input name="password" id="password" type="password" required></label>
<label><input type="checkbox" name="remember" value="1" id="remember"> Remember me</label>
<button type="submit" id="login">Log in</button>
</form>
<p>Any user name, password <code>demo</code>.</p>"""

SHOP = """<p id="hello">Hello, {user}!</p>
<p><a href="/devices" id="devices">Your devices</a></p>
<form method="post" action="/logout"><input type="hidden" name="csrf" value="{csrf}">
<button type="submit" id="logout">Log out</button></form>
<h2>Products</h2>
{products}
<h2>Cart</h2>
<ul id="cart">{cart}</ul>"""

PRODUCT = """<form method="post" action="/cart"><input type="hidden" name="csrf" value="{csrf}">
<input type="hidden" name="product" value="{key}">{name}
<button type="submit" id="add-{key}">Add</button></form>"""

DEVICES = """<p><a href="/" id="back">Back to the shop</a></p>
<table id="sessions">{rows}</table>
<form method="post" action="/logout-everywhere"><input type="hidden" name="csrf" value="{csrf}">
<button type="submit" id="logout-everywhere">Log out everywhere else</button></form>"""

DEVICE = """<tr><td class="device">{device}</td><td>since {since}</td><td>{current}</td>
<td><form method="post" action="/devices/revoke">
<input type="hidden" name="csrf" value="{csrf}"><input type="hidden" name="handle" value="{handle}">
<button type="submit" class="sign-out" id="sign-out-{index}">Sign out</button></form></td></tr>"""


async def form(request: Request) -> dict[str, str]:
    """The posted form fields (urlencoded), without needing python-multipart."""
    fields = parse_qs((await request.body()).decode(), keep_blank_values=True)
    return {key: values[0] for key, values in fields.items()}


def session_of(request: Request) -> Session:
    session: Session = request.scope["session"]
    return session


def manager_of(request: Request) -> SessionManager:
    manager: SessionManager = request.app.state.manager
    return manager


def back(to: str = "/") -> Response:
    return RedirectResponse(to, status_code=303)


async def checked_form(request: Request) -> dict[str, str] | None:
    """The posted fields, or None when the CSRF token is missing or wrong."""
    fields = await form(request)
    return fields if await session_of(request).verify_csrf(fields.get("csrf")) else None


async def home(request: Request) -> Response:
    session = session_of(request)
    message = await session.pop_flash("message")
    flash = f'<p id="flash">{escape(message)}</p>' if message else ""
    csrf = await session.csrf_token()
    if session.user_id is None:
        return HTMLResponse(PAGE.format(flash=flash, body=LOGIN.format(csrf=csrf)))
    cart = await session.get("cart", [])
    body = SHOP.format(
        user=escape(session.user_id),
        csrf=csrf,
        products="".join(PRODUCT.format(key=k, name=n, csrf=csrf) for k, n in PRODUCTS.items()),
        cart="".join(f"<li>{escape(PRODUCTS[item])}</li>" for item in cart),
    )
    return HTMLResponse(PAGE.format(flash=flash, body=body))


async def login(request: Request) -> Response:
    session = session_of(request)
    fields = await checked_form(request)
    if fields is None:
        await session.flash("message", "The form expired; please try again.")
        return back()
    user = fields.get("user", "").strip()
    if not user or fields.get("password") != PASSWORD:
        await session.flash("message", "Wrong user name or password.")
        return back()
    await session.regenerate()  # a new ID (and CSRF token) for the new privilege level
    agent = request.headers.get("user-agent", "unknown browser")[:80]
    await session.set_user(user, meta={"device": agent, "since": time.time()})
    if fields.get("remember") == "1":
        await session.set_expiry(ttl=REMEMBER, persistent=True)
    await session.flash("message", f"Welcome, {user}.")
    return back()


async def add_to_cart(request: Request) -> Response:
    session = session_of(request)
    fields = await checked_form(request)
    product = (fields or {}).get("product", "")
    if session.user_id is None or product not in PRODUCTS:
        return back()
    cart = await session.get("cart", [])
    await session.set("cart", [*cart, product])
    return back()


async def devices(request: Request) -> Response:
    session = session_of(request)
    csrf = await session.csrf_token()
    if session.user_id is None:
        return back()
    rows = []
    for index, info in enumerate(await manager_of(request).sessions_of(session.user_id)):
        meta = info.meta or {}
        current = "this device" if info.handle == session.handle else ""
        rows.append(
            DEVICE.format(
                device=escape(str(meta.get("device", "?"))),
                since=time.strftime("%Y-%m-%d %H:%M", time.localtime(info.created)),
                current=current,
                csrf=csrf,
                handle=escape(info.handle),
                index=index,
            )
        )
    return HTMLResponse(PAGE.format(flash="", body=DEVICES.format(rows="".join(rows), csrf=csrf)))


async def revoke(request: Request) -> Response:
    session = session_of(request)
    fields = await checked_form(request)
    await session.has("user")  # loads the session: user_id is known after
    if fields is None or session.user_id is None:
        return back()
    manager = manager_of(request)
    handle = fields.get("handle", "")
    mine = {info.handle for info in await manager.sessions_of(session.user_id)}
    if handle in mine:  # only the user's own sessions
        await manager.revoke(handle)
    return back(to="/devices")


async def logout_everywhere(request: Request) -> Response:
    session = session_of(request)
    fields = await checked_form(request)
    if fields is not None and session.user_id is not None:
        ended = await manager_of(request).revoke_user(session.user_id, keep=session)
        await session.flash("message", f"Signed out {ended} other session(s).")
    return back()


async def logout(request: Request) -> Response:
    session = session_of(request)
    if await checked_form(request) is not None:
        await session.destroy()
    return back()


def create_app(manager: SessionManager | None = None) -> Starlette:
    """The shop app; sessions in ``manager`` (default: ``$KVSTORAGE_URL`` or ``./.sessions``)."""
    if manager is None:
        # Plain HTTP on localhost for the demo; keep secure=True (the default) behind HTTPS.
        manager = SessionManager(idle_timeout=1800, cookie=CookieOptions(secure=False))
    routes = [
        Route("/", home),
        Route("/login", login, methods=["POST"]),
        Route("/cart", add_to_cart, methods=["POST"]),
        Route("/devices", devices),
        Route("/devices/revoke", revoke, methods=["POST"]),
        Route("/logout-everywhere", logout_everywhere, methods=["POST"]),
        Route("/logout", logout, methods=["POST"]),
    ]
    app = Starlette(routes=routes)
    app.state.manager = manager
    app.add_middleware(SessionMiddleware, manager=manager)
    return app


app = create_app()
