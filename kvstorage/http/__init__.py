"""Serve a storage over HTTP, wire-compatible with unstorage's storage server.

>>> from kvstorage import create_storage
>>> from kvstorage.http import create_app
>>> app = create_app(create_storage(), token="s3cret")   # any ASGI server: uvicorn app ...

The protocol (unstorage's, plus etags, conditions, TTL, a batch read and a token):

=================================  =============================================================
request                            answer
=================================  =============================================================
``GET /a/b``                       the value of ``a:b``: ``application/json`` when the stored
                                   bytes are JSON, else ``text/plain`` (UTF-8) or
                                   ``application/octet-stream``; ``Accept:
                                   application/octet-stream`` always gets the exact bytes.
                                   ``ETag``, ``Last-Modified``, ``X-TTL`` (seconds left) and
                                   ``X-Expires-At`` (the same as a Unix time);
                                   ``If-None-Match: <etag>`` -> 304. 404 when missing.
``HEAD /a/b``                      200 or 404, the same headers, ``Content-Length`` = size
``PUT /a/b``                       write the body: ``application/octet-stream`` and JSON bodies
                                   are stored as they are, other text as a JSON string (what
                                   unstorage's ``setItem`` sends for a string). ``X-TTL:
                                   <seconds>`` or ``X-Expires-At: <Unix time>`` (which
                                   wins); ``If-None-Match: *`` (only if absent) or
                                   ``If-Match: <etag>`` / ``*`` -> 412 when false, nothing
                                   written
``DELETE /a/b``                    remove; ``X-Removed: 1`` when it held a value, else ``0``
``GET /a/`` (or ``/a:``, ``/``)    the keys under ``a`` as a JSON array (``/`` separators, one
                                   key a line, streamed); ``?max_depth=N``
``DELETE /a/``                     remove every key ``GET /a/`` lists
``POST /a/``                       batch read: body ``{"keys": ["x", "y:z"], "encoding":
                                   "json"}`` (keys relative to the base) -> a JSON array in
                                   the same order, ``null`` or ``{"key", "etag", "ttl",
                                   "expires_at", "mtime", "value"}`` (``"base64"``
                                   instead of ``"value"`` for bytes that are not JSON,
                                   or for every item with ``"encoding": "base64"``)
=================================  =============================================================

Paths are relative to the app's ASGI ``root_path`` (so it can be mounted under a prefix,
``Mount("/kv", app)``), percent-decoded as UTF-8 and normalized like any key; ``..``,
``%2e%2e``, control characters (``%00``) and keys over 1024 bytes are answered 400 before
the storage is asked.
With ``token``, every request needs ``Authorization: Bearer <token>`` (else 401, compared
in constant time). ``read_only=True`` answers writes 405. Bodies over ``max_body`` bytes are
answered 413. Errors are JSON ``{"status", "statusText", "message"}``; a failed condition is
412, a backend that cannot be reached 503. Every response carries ``X-KVStorage: 1``.
"""

from __future__ import annotations

from ..storage import Storage
from ._app import ASGIApp, Receive, Scope, Send, StorageApp

__all__ = ["ASGIApp", "Receive", "Scope", "Send", "StorageApp", "create_app"]


def create_app(
    storage: Storage,
    *,
    token: str | None = None,
    read_only: bool = False,
    max_body: int = 16 * 2**20,
) -> StorageApp:
    """Return an ASGI app serving ``storage`` with the protocol above.

    Args:
        token: require ``Authorization: Bearer <token>`` on every request.
        read_only: answer ``PUT`` and ``DELETE`` with 405.
        max_body: the largest request body accepted, in bytes (413 beyond).

    The app never disposes ``storage``; serve it with any ASGI server (``uvicorn``, or
    ``kvstorage serve URL`` from the command line).
    """
    return StorageApp(storage, token=token, read_only=read_only, max_body=max_body)
