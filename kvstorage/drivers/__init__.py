"""The built-in drivers, imported lazily: ``import kvstorage`` needs no backend library,
and ``from kvstorage.drivers import RedisDriver`` needs only ``redis``.

=================  ========================  ===============================================
class              URL                       extra
=================  ========================  ===============================================
``MemoryDriver``   ``memory://``             (none)
``FSDriver``       ``file:///abs``,          ``fs``
                   ``file://./rel``
``SQLiteDriver``   ``sqlite:///rel.db``,     ``sqlite``
                   ``sqlite:////abs.db``,
                   ``sqlite://:memory:``
``RedisDriver``    ``redis://h:p/db?base=``, ``redis``
                   ``rediss://``,
                   ``redis+cluster://h:p,h:p``
``S3Driver``       ``s3://bucket/prefix``    ``s3``
=================  ========================  ===============================================
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ..driver import Driver

if TYPE_CHECKING:
    from .fs import FSDriver
    from .memory import MemoryDriver
    from .redis import RedisDriver
    from .s3 import S3Driver
    from .sqlite import SQLiteDriver

__all__ = ["FSDriver", "MemoryDriver", "RedisDriver", "S3Driver", "SQLiteDriver", "from_url"]

# class name -> (module, extra that installs its client library)
_CLASSES: dict[str, tuple[str, str]] = {
    "MemoryDriver": ("memory", ""),
    "FSDriver": ("fs", "fs"),
    "SQLiteDriver": ("sqlite", "sqlite"),
    "RedisDriver": ("redis", "redis"),
    "S3Driver": ("s3", "s3"),
}
_SCHEMES: dict[str, str] = {
    "memory": "MemoryDriver",
    "file": "FSDriver",
    "sqlite": "SQLiteDriver",
    "redis": "RedisDriver",
    "rediss": "RedisDriver",
    "redis+cluster": "RedisDriver",
    "s3": "S3Driver",
}


def _load(class_name: str) -> type[Driver]:
    module_name, extra = _CLASSES[class_name]
    try:
        module = importlib.import_module(f"{__name__}.{module_name}")
    except ModuleNotFoundError as exc:
        raise ImportError(
            f"{class_name} needs {exc.name!r}: pip install 'kvstorage[{extra}]'"
        ) from exc
    driver_class: type[Driver] = getattr(module, class_name)
    return driver_class


def __getattr__(name: str) -> Any:
    if name in _CLASSES:
        return _load(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def from_url(url: str) -> Driver:
    """Build a driver from a URL (see the table above).

    Raises:
        ValueError: the scheme is unknown (the message names the known ones).
    """
    scheme = url.partition("://")[0].lower() if "://" in url else ""
    class_name = _SCHEMES.get(scheme)
    if class_name is None:  # the URL itself is not shown: it may hold a password
        known = ", ".join(f"{s}://" for s in _SCHEMES)
        given = f"scheme {scheme + '://'!r}" if scheme else "a URL without scheme://"
        raise ValueError(f"unknown storage URL: {given}; known schemes: {known}")
    return _load(class_name).from_url(url)
