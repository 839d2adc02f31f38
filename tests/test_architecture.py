"""Structure rules of the packages, checked on their source (nothing is imported):

* no module imports a private name (or a name from a private module) that belongs to a
  package it is not part of: ``_x`` is visible inside the package that holds it;
* the import graph of module-level imports, including those under ``TYPE_CHECKING``, has
  no cycle;
* the core (``kvstorage`` outside its drivers) never imports a backend library (nor the
  libraries of the http and cli extras) when a module loads, each optional library of a
  driver wrapper is imported by that wrapper's module only, and the command line and the
  HTTP server work without the optional ones they do not need.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("kvstorage", "sessions")
BACKEND_LIBRARIES = {
    "redis",
    "aiosqlite",
    "aiobotocore",
    "botocore",
    "watchfiles",
    "aiofiles",
    "asyncpg",
    "httpx",  # the http extra: HTTPDriver ...
    "uvicorn",  # ... and `kvstorage serve`
    "rich",  # the cli extra: the progress bar of `kvstorage copy`
}
#: library -> the only module that may import it
WRAPPER_LIBRARIES = {
    "cryptography": "kvstorage.wrappers.encrypted",
    "zstandard": "kvstorage.wrappers.compressed",
    "opentelemetry": "kvstorage.wrappers.instrumented",
}


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


MODULES = _modules()


def _package_of(module: str) -> str:
    """The package a module belongs to (a package ``__init__`` belongs to itself)."""
    path = MODULES[module]
    return module if path.name == "__init__.py" else module.rpartition(".")[0]


def _module_level(tree: ast.Module) -> Iterator[ast.Import | ast.ImportFrom]:
    """Imports run when the module loads, including under ``if TYPE_CHECKING:``."""
    stack: list[ast.stmt] = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        elif isinstance(node, ast.If | ast.Try):
            stack += node.body + node.orelse
            if isinstance(node, ast.Try):
                stack += [stmt for handler in node.handlers for stmt in handler.body]


def _imports(module: str) -> Iterator[tuple[str, int]]:
    """(absolute dotted name imported, line) for each module-level import: a module, or
    ``module.name`` for ``from module import name``."""
    tree = ast.parse(MODULES[module].read_text())
    for node in _module_level(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
            continue
        if node.level:
            anchor = _package_of(module).split(".")
            anchor = anchor[: len(anchor) - node.level + 1]
            base = ".".join([*anchor, node.module] if node.module else anchor)
        else:
            base = node.module or ""
        for alias in node.names:
            yield (f"{base}.{alias.name}" if alias.name != "*" else base), node.lineno


def _target(name: str) -> str | None:
    """The project module an imported name loads: itself if it is a module, else the
    module that defines it."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


# Another library's internals used on purpose, each with a fallback when they change.
KNOWN_FOREIGN_INTERNALS = {
    # The Redis lane feeds replies to redis-py's own hiredis reader; without it (another
    # redis-py layout, no hiredis) _redis_wire takes redis-py's public path.
    "redis._parsers.hiredis",
}


def test_no_private_name_crosses_its_package() -> None:
    problems = []
    for module in MODULES:
        package = _package_of(module)
        for name, line in _imports(module):
            if name in KNOWN_FOREIGN_INTERNALS:
                continue
            parts = name.split(".")
            for index, part in enumerate(parts):
                if part.startswith("_") and not part.startswith("__"):
                    owner = ".".join(parts[:index])
                    if not (package == owner or package.startswith(owner + ".")):
                        problems.append(f"{MODULES[module].relative_to(ROOT)}:{line} {name}")
                    break
    assert problems == []


def test_the_import_graph_has_no_cycle() -> None:
    graph = {
        module: {t for name, _ in _imports(module) if (t := _target(name)) and t != module}
        for module in MODULES
    }
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(module: str) -> None:
        state[module] = "open"
        path.append(module)
        for successor in sorted(graph[module]):
            if state.get(successor) == "open":
                cycle = [*path[path.index(successor) :], successor]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if successor not in state:
                visit(successor)
        path.pop()
        state[module] = "done"

    for module in sorted(MODULES):
        if module not in state:
            visit(module)


def test_the_core_imports_no_backend_library() -> None:
    problems = []
    for module in MODULES:
        if module.startswith("kvstorage.drivers.") and module != "kvstorage.drivers.base":
            continue  # a driver module is where its backend library belongs
        for name, line in _imports(module):
            if name.split(".")[0] in BACKEND_LIBRARIES:
                problems.append(f"{MODULES[module].relative_to(ROOT)}:{line} {name}")
    assert problems == []


def test_each_wrapper_library_is_imported_by_its_wrapper_only() -> None:
    problems = [
        f"{MODULES[module].relative_to(ROOT)}:{line} {name}"
        for module in MODULES
        for name, line in _imports(module)
        if WRAPPER_LIBRARIES.get(name.split(".")[0], module) != module
    ]
    assert problems == []


def test_the_command_line_and_the_server_need_no_extra_library() -> None:
    """With httpx, uvicorn, rich and every backend library unimportable, the package, the
    HTTP app and the command line (on memory://) still load and run."""
    import subprocess
    import sys

    blocked = sorted(BACKEND_LIBRARIES)
    code = f"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ModuleNotFoundError(f"blocked: {{name}}", name=name)
sys.meta_path.insert(0, Block())
import kvstorage, kvstorage.http, kvstorage.cli
from kvstorage import create_storage
kvstorage.http.create_app(create_storage())
sys.exit(kvstorage.cli.main(["keys", "memory://"]))
"""
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True)
    assert result.returncode == 0, result.stderr.decode()
    missing = subprocess.run(
        [sys.executable, "-c", code.replace('"memory://"', '"http://127.0.0.1:1/"')],
        cwd=ROOT,
        capture_output=True,
    )
    assert missing.returncode == 3
    assert b"pip install 'kvstorage[http]'" in missing.stderr
