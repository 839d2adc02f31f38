"""Driver wrappers: drivers around another driver, so they mount anywhere and stack, and
keep the inner driver's expiry, etags and conditions, batches, listing and watching.

====================== ===================================================== ==============
class                  does                                                  extra
====================== ===================================================== ==============
``EncryptedDriver``    AES-256-GCM at rest, key rotation                     ``encryption``
``CompressedDriver``   zstd above a size; small and older values unchanged   ``compression``
``InstrumentedDriver`` OpenTelemetry spans and metrics                       ``otel``
====================== ===================================================== ==============

Each class loads its library on first use, so ``import kvstorage.wrappers`` needs none.
:class:`WrapperDriver` and :class:`TransformingDriver` are the base classes for writing
another wrapper.

>>> from kvstorage.drivers import MemoryDriver
>>> from kvstorage.wrappers import CompressedDriver, EncryptedDriver
>>> key = EncryptedDriver.generate_key()
>>> driver = EncryptedDriver(CompressedDriver(MemoryDriver()), keys=[key])
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .base import TransformingDriver, WrapperDriver

if TYPE_CHECKING:  # for type checkers only: at run time each class loads on first use
    from .compressed import CompressedDriver as CompressedDriver
    from .encrypted import EncryptedDriver as EncryptedDriver
    from .instrumented import InstrumentedDriver as InstrumentedDriver

#: class name -> (module in this package, the pip extra that installs its library)
_LAZY = {
    "EncryptedDriver": ("encrypted", "encryption"),
    "CompressedDriver": ("compressed", "compression"),
    "InstrumentedDriver": ("instrumented", "otel"),
}

__all__ = [*_LAZY, "TransformingDriver", "WrapperDriver"]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, extra = _LAZY[name]
    try:
        loaded = importlib.import_module(f"{__name__}.{module}")
    except ModuleNotFoundError as exc:
        raise ImportError(f"{name} needs {exc.name!r}: pip install 'kvstorage[{extra}]'") from exc
    return getattr(loaded, name)
