"""A tiny shop on server-side sessions: log in, fill a cart, log out.

Run it with ``python -m uvicorn examples.shop:app`` and open http://127.0.0.1:8000.
Sessions live in ``./.sessions`` (the fs driver) unless ``KVSTORAGE_URL`` names another
storage, e.g. ``KVSTORAGE_URL=redis://127.0.0.1:6379/0?base=shop``.

What it shows: the session is only created when something is written (the login page
sets no cookie), ``regenerate()`` on login (against session fixation), ``destroy()`` on
logout, and a flash message that survives exactly one redirect.
"""

from __future__ import annotations

from html import escape
from urllib.parse import parse_qs

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Route

from sessions import CookieOptions, Session, SessionManager, SessionMiddleware

PRODUCTS = {"apple": "Apple", "pear": "Pear", "fig": "Fig"}
PASSWORD = "demo"  # every user name works with this password

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>Shop</title></head>
<body>
<h1>Shop</h1>
{flash}
{body}
</body></html>"""

LOGIN = """<form method="post" action="/login">
<label>User <input name="user" id="user" required></label>
<label>Password <input name="password" id="password" type="password" required></label>
<button type="submit" id="login">Log in</button>
</form>
<p>Any user name, password <code>demo</code>.</p>"""

SHOP = """<p id="hello">Hello, {user}!</p>
<form method="post" action="/logout"><button type="submit" id="logout">Log out</button></form>
<h2>Products</h2>
{products}
<h2>Cart</h2>
<ul id="cart">{cart}</ul>"""

PRODUCT = """<form method="post" action="/cart">
<input type="hidden" name="product" value="{key}">{name}
<button type="submit" id="add-{key}">Add</button></form>"""


async def form(request: Request) -> dict[str, str]:
    """The posted form fields (urlencoded), without needing python-multipart."""
    fields = parse_qs((await request.body()).decode(), keep_blank_values=True)
    return {key: values[0] for key, values in fields.items()}


def session_of(request: Request) -> Session:
    session: Session = request.scope["session"]
    return session


async def home(request: Request) -> Response:
    session = session_of(request)
    message = await session.pop_flash("message")
    flash = f'<p id="flash">{escape(message)}</p>' if message else ""
    user = await session.get("user")
    if user is None:
        return HTMLResponse(PAGE.format(flash=flash, body=LOGIN))
    cart = await session.get("cart", [])
    body = SHOP.format(
        user=escape(user),
        products="".join(PRODUCT.format(key=k, name=n) for k, n in PRODUCTS.items()),
        cart="".join(f"<li>{escape(PRODUCTS[item])}</li>" for item in cart),
    )
    return HTMLResponse(PAGE.format(flash=flash, body=body))


async def login(request: Request) -> Response:
    fields = await form(request)
    session = session_of(request)
    user = fields.get("user", "").strip()
    if not user or fields.get("password") != PASSWORD:
        await session.flash("message", "Wrong user name or password.")
        return RedirectResponse("/", status_code=303)
    await session.regenerate()  # a new ID for the new privilege level
    await session.set("user", user)
    await session.flash("message", f"Welcome, {user}.")
    return RedirectResponse("/", status_code=303)


async def add_to_cart(request: Request) -> Response:
    session = session_of(request)
    product = (await form(request)).get("product", "")
    if await session.get("user") is None or product not in PRODUCTS:
        return RedirectResponse("/", status_code=303)
    cart = await session.get("cart", [])
    await session.set("cart", [*cart, product])
    return RedirectResponse("/", status_code=303)


async def logout(request: Request) -> Response:
    await session_of(request).destroy()
    return RedirectResponse("/", status_code=303)


def create_app(manager: SessionManager | None = None) -> Starlette:
    """The shop app; sessions in ``manager`` (default: ``$KVSTORAGE_URL`` or ``./.sessions``)."""
    if manager is None:
        # Plain HTTP on localhost for the demo; keep secure=True (the default) behind HTTPS.
        manager = SessionManager(idle_timeout=1800, cookie=CookieOptions(secure=False))
    routes = [
        Route("/", home),
        Route("/login", login, methods=["POST"]),
        Route("/cart", add_to_cart, methods=["POST"]),
        Route("/logout", logout, methods=["POST"]),
    ]
    app = Starlette(routes=routes)
    app.add_middleware(SessionMiddleware, manager=manager)
    return app


app = create_app()
