"""`CookieOptions`: the attributes of the session cookie, checked once at construction."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

__all__ = ["CookieOptions"]

# RFC 6265 cookie-name: an RFC 7230 token.
_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
# RFC 6265 path-value: any CHAR except CTLs or ";" (ASCII only, so it survives latin-1).
_PATH = re.compile(r"/[\x20-\x3a\x3c-\x7e]*")
_EXPIRED = "Max-Age=0; Expires=Thu, 01 Jan 1970 00:00:00 GMT"


@dataclass(frozen=True, slots=True)
class CookieOptions:
    """How the session cookie is sent.

    The defaults follow OWASP: ``HttpOnly`` (always; it cannot be turned off),
    ``Secure``, ``SameSite=Lax``, ``Path=/``, no ``Domain`` and no ``Max-Age`` (a
    browser-session cookie; the server enforces the lifetime). Set ``secure=False`` only
    for local development over plain HTTP.

    The default name is ``__Host-session`` when ``secure`` (the browser then refuses the
    cookie unless it is ``Secure``, has ``Path=/`` and no ``Domain``, so a sibling
    subdomain cannot plant or overwrite it), else ``session``. Those attributes are
    checked here for any ``__Host-`` name.

    Raises:
        ValueError: an invalid name, ``httponly=False``, a ``__Host-``/``__Secure-``
            name without its required attributes, or ``samesite="none"`` without
            ``secure``.
    """

    name: str = ""
    """The cookie's name; empty: the default (see above)."""
    secure: bool = True
    httponly: bool = True
    samesite: Literal["lax", "strict", "none"] = "lax"
    path: str = "/"
    domain: str | None = None
    max_age: int | None = None
    """Seconds the browser keeps the cookie; None (default) until the browser closes."""

    def __post_init__(self) -> None:
        if not self.name:
            object.__setattr__(self, "name", "__Host-session" if self.secure else "session")
        if not _TOKEN.match(self.name):
            raise ValueError(f"invalid cookie name {self.name!r}")
        if not self.httponly:
            raise ValueError("session cookies are always HttpOnly")
        if self.samesite not in ("lax", "strict", "none"):
            raise ValueError(f"samesite must be 'lax', 'strict' or 'none', not {self.samesite!r}")
        if self.samesite == "none" and not self.secure:
            raise ValueError("samesite='none' requires secure=True")
        if not _PATH.fullmatch(self.path):
            raise ValueError(
                f"invalid cookie path {self.path!r}: it must start with '/' and hold only "
                "printable ASCII characters other than ';'"
            )
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

    def set_header(self, value: str, *, max_age: float | None = None) -> str:
        """The ``Set-Cookie`` header value that stores ``value`` in the browser (for
        ``max_age`` seconds if given, else for :attr:`max_age`)."""
        if max_age is None:
            max_age = self.max_age
        age = "" if max_age is None else f"; Max-Age={max(1, int(max_age))}"
        return f"{self.name}={value}{age}; {self._attributes()}"

    def expire_header(self) -> str:
        """The ``Set-Cookie`` header value that deletes the cookie from the browser."""
        return f"{self.name}=; {_EXPIRED}; {self._attributes()}"
