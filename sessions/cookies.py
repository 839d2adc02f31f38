"""`CookieOptions`: the attributes of the session cookie, checked once at construction."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

__all__ = ["CookieOptions"]

# RFC 6265 cookie-name: an RFC 7230 token.
_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_EXPIRED = "Max-Age=0; Expires=Thu, 01 Jan 1970 00:00:00 GMT"


@dataclass(frozen=True, slots=True)
class CookieOptions:
    """How the session cookie is sent.

    The defaults follow OWASP: ``HttpOnly`` (always; it cannot be turned off),
    ``Secure``, ``SameSite=Lax``, ``Path=/``, no ``Domain`` and no ``Max-Age`` (a
    browser-session cookie; the server enforces the lifetime). Set ``secure=False`` only
    for local development over plain HTTP.

    A name starting with ``__Host-`` (recommended) makes the browser refuse the cookie
    unless it is ``Secure``, has ``Path=/`` and no ``Domain``; these are checked here.

    Raises:
        ValueError: an invalid name, ``httponly=False``, a ``__Host-``/``__Secure-``
            name without its required attributes, or ``samesite="none"`` without
            ``secure``.
    """

    name: str = "session"
    secure: bool = True
    httponly: bool = True
    samesite: Literal["lax", "strict", "none"] = "lax"
    path: str = "/"
    domain: str | None = None
    max_age: int | None = None
    """Seconds the browser keeps the cookie; None (default) until the browser closes."""

    def __post_init__(self) -> None:
        if not _TOKEN.match(self.name):
            raise ValueError(f"invalid cookie name {self.name!r}")
        if not self.httponly:
            raise ValueError("session cookies are always HttpOnly")
        if self.samesite not in ("lax", "strict", "none"):
            raise ValueError(f"samesite must be 'lax', 'strict' or 'none', not {self.samesite!r}")
        if self.samesite == "none" and not self.secure:
            raise ValueError("samesite='none' requires secure=True")
        if not self.path.startswith("/") or any(c in self.path for c in ";\r\n"):
            raise ValueError(f"invalid cookie path {self.path!r}")
        if self.domain is not None and not _TOKEN.match(self.domain):
            raise ValueError(f"invalid cookie domain {self.domain!r}")
        if self.max_age is not None and self.max_age <= 0:
            raise ValueError("max_age must be a positive number of seconds")
        if self.name.startswith(("__Host-", "__Secure-")) and not self.secure:
            raise ValueError(f"a cookie named {self.name!r} requires secure=True")
        if self.name.startswith("__Host-") and (self.path != "/" or self.domain is not None):
            raise ValueError(f"a cookie named {self.name!r} requires path='/' and no domain")

    def _attributes(self) -> str:
        parts = [f"Path={self.path}"]
        if self.domain is not None:
            parts.append(f"Domain={self.domain}")
        parts.append("HttpOnly")
        if self.secure:
            parts.append("Secure")
        parts.append(f"SameSite={self.samesite.capitalize()}")
        return "; ".join(parts)

    def set_header(self, value: str) -> str:
        """The ``Set-Cookie`` header value that stores ``value`` in the browser."""
        age = "" if self.max_age is None else f"; Max-Age={self.max_age}"
        return f"{self.name}={value}{age}; {self._attributes()}"

    def expire_header(self) -> str:
        """The ``Set-Cookie`` header value that deletes the cookie from the browser."""
        return f"{self.name}=; {_EXPIRED}; {self._attributes()}"
