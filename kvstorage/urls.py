"""Storage URLs shown to people: the one place that hides the secrets in them.

A password or token in a URL never reaches a ``repr``, a log line or an exception message;
every driver, the sessions package and the command line show URLs through
:func:`redact_url`.
"""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

__all__ = ["redact_url"]

#: Query parameters whose values are secrets (matched case-insensitively, as substrings).
_SECRET_PARAMETERS = ("password", "passwd", "secret", "token", "credential", "key")


def redact_url(url: str) -> str:
    """Return ``url`` with its password and secret query values replaced by ``***``.

    ``redis://user:pw@host:6379/0`` becomes ``redis://user:***@host:6379/0``; a query
    value such as ``?token=...`` or ``?aws_secret_access_key=...`` becomes ``***`` too.
    Several hosts (``redis+cluster://:pw@h1:1,h2:2``) are fine; whatever cannot be parsed
    as a URL at all is cut to its scheme, so a malformed URL is never echoed whole.

    >>> redact_url("redis://:hunter2@127.0.0.1:6379/0?base=app")
    'redis://:***@127.0.0.1:6379/0?base=app'
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        scheme = url.partition("://")[0] if "://" in url else ""
        return f"{scheme}://***" if scheme else "***"
    netloc = parts.netloc
    userinfo, at, hosts = netloc.rpartition("@")
    if at and ":" in userinfo:  # parsed by hand: a cluster URL lists several host:port
        netloc = f"{userinfo.partition(':')[0]}:***@{hosts}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(_is_secret(name) for name, _ in pairs):
            query = urlencode(
                [(name, "***" if _is_secret(name) else value) for name, value in pairs],
                safe="*",
            )
    if netloc == parts.netloc and query == parts.query:
        return url  # nothing to hide (urlunsplit would also turn ``memory://`` into ``memory:``)
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def _is_secret(name: str) -> bool:
    lowered = name.lower()
    return any(word in lowered for word in _SECRET_PARAMETERS)
