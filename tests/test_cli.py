"""The ``kvstorage`` command line, run as a child process (``python -m kvstorage``) against
file://, sqlite:/// and a real redis-server (plus s3 and http for dump/load): exit codes,
one-line errors without secrets, exact bytes through stdin/stdout, copies that keep every
remaining TTL and resume after a kill, and dump/load round trips."""

from __future__ import annotations

import importlib.metadata
import json
import os
import pty
import signal
import subprocess
import sys
import time
import tomllib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import anyio
import pytest

from kvstorage import Storage, create_storage
from kvstorage.drivers import HTTPDriver
from kvstorage.http import create_app

from .backends import IN_CI
from .support.helpers import ROOT
from .support.servers import RedisServer, asgi_server, free_port, kvstorage_server

pytestmark = pytest.mark.anyio

T = TypeVar("T")
KVSTORAGE = [sys.executable, "-m", "kvstorage"]
EVERY_BYTE = bytes(range(256)) * 3 + b"\r\n\x00"
SECRET = "hunter2-secret"


async def cli(
    *args: str, input: bytes = b"", env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[bytes]:
    """Run ``python -m kvstorage *args`` in the project root (so this checkout is used)."""
    with anyio.fail_after(120):
        return await anyio.run_process(
            [*KVSTORAGE, *args],
            input=input,
            check=False,
            cwd=ROOT,
            env={**os.environ, **(env or {})},
        )


def error_line(result: subprocess.CompletedProcess[bytes]) -> str:
    """The one line the command wrote to stderr (checked: one line, no traceback)."""
    err = result.stderr.decode()
    assert err.startswith("kvstorage: ") and err.count("\n") == 1, err
    assert "Traceback" not in err and SECRET not in err
    return err


async def on(url: str, work: Callable[[Storage], Awaitable[T]]) -> T:
    """Run ``work`` on a storage opened on ``url`` in this process."""
    storage = create_storage(url)
    try:
        return await work(storage)
    finally:
        await storage.dispose()


def unique() -> str:
    return f"kvt-{uuid.uuid4().hex[:12]}"


def local_url(kind: str, tmp_path: Path, redis: RedisServer | None = None) -> str:
    """A fresh, empty storage URL of ``kind``: file, sqlite or redis."""
    if kind == "file":
        return f"file://{tmp_path / unique()}"
    if kind == "sqlite":
        return f"sqlite:///{tmp_path / unique()}.db"
    assert redis is not None
    return f"{redis.url}?base={unique()}"


@pytest.fixture(params=["file", "sqlite", "redis"])
async def url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    redis = request.getfixturevalue("redis_server") if request.param == "redis" else None
    url = local_url(request.param, tmp_path, redis)
    yield url
    if redis is not None:
        await on(url, lambda s: s.clear())


# -- single items ------------------------------------------------------------------------


async def test_set_get_meta_rm_and_their_exit_codes(url: str) -> None:
    assert (
        await cli("set", url, "users:1", '{"name": "Ada", "n": 12345678901234567890}')
    ).returncode == 0
    got = await cli("get", url, "users/1")
    assert got.returncode == 0 and got.stderr == b""
    assert json.loads(got.stdout) == {"name": "Ada", "n": 12345678901234567890}

    missing = await cli("get", url, "users:2")
    assert missing.returncode == 1 and missing.stdout == b""
    assert "users:2" in error_line(missing)

    taken = await cli("set", url, "users:1", "1", "--if-absent")
    assert taken.returncode == 1
    assert "condition failed" in error_line(taken)
    assert json.loads((await cli("get", url, "users:1")).stdout)["name"] == "Ada"
    assert (await cli("set", url, "fresh", '"x"', "--if-absent")).returncode == 0

    assert (await cli("set", url, "users:1", '"short"', "--ttl", "120")).returncode == 0
    meta = json.loads((await cli("meta", url, "users:1")).stdout)
    assert meta["size"] == len(b'"short"') and meta["etag"]
    assert 115 < meta["ttl"] <= 120 and meta["expires_at"].endswith("+00:00")
    meta_missing = await cli("meta", url, "nope")
    assert meta_missing.returncode == 1 and meta_missing.stdout == b""

    partial = await cli("rm", url, "users:1", "nope")
    assert (partial.returncode, partial.stdout) == (1, b"1\n")
    assert (await cli("get", url, "users:1")).returncode == 1
    both = await cli("rm", url, "fresh")
    assert (both.returncode, both.stdout) == (0, b"1\n")


async def test_raw_bytes_are_exact_through_stdin_and_stdout(url: str) -> None:
    written = await cli("set", url, "blob", "-", "--raw", input=EVERY_BYTE)
    assert written.returncode == 0, written.stderr
    read = await cli("get", url, "blob", "--raw")
    assert read.returncode == 0 and read.stdout == EVERY_BYTE
    assert await on(url, lambda s: s.get_item_raw("blob")) == EVERY_BYTE

    as_json = await cli("get", url, "blob")
    assert as_json.returncode == 2 and "--raw" in error_line(as_json)

    json_from_stdin = await cli("set", url, "doc", "-", input=b'{"a": [1, 2.5, null]}\n')
    assert json_from_stdin.returncode == 0
    assert await on(url, lambda s: s.get_item("doc")) == {"a": [1, 2.5, None]}
    text = await cli("set", url, "text", "not json", "--raw")
    assert text.returncode == 0
    assert (await cli("get", url, "text", "--raw")).stdout == b"not json"


async def test_keys_max_depth_and_sweep(url: str) -> None:
    async def fill(storage: Storage) -> None:
        await storage.set_items({"a:1": 1, "a:b:2": 2, "a:b:c:3": 3, "z": 0})
        await storage.set_item("a:gone", 1, ttl=0.2)

    await on(url, fill)
    listed = await cli("keys", url, "a")
    assert listed.returncode == 0
    assert sorted(listed.stdout.decode().split()) in (
        ["a:1", "a:b:2", "a:b:c:3", "a:gone"],
        ["a:1", "a:b:2", "a:b:c:3"],  # already expired on a slow machine
    )
    shallow = await cli("keys", url, "a", "--max-depth", "0")
    assert sorted(shallow.stdout.decode().split()) in (["a:1", "a:gone"], ["a:1"])
    everything = await cli("keys", url)
    assert "z" in everything.stdout.decode().split()

    deadline = time.monotonic() + 5
    while await on(url, lambda s: s.has_item("a:gone")):
        assert time.monotonic() < deadline, "the item did not expire"
        await anyio.sleep(0.05)
    swept = await cli("sweep", url, "a")
    assert swept.returncode == 0
    # redis expires natively: nothing is left to sweep there
    assert swept.stdout == (b"0\n" if url.startswith("redis") else b"1\n")
    assert (await cli("sweep", url)).stdout == b"0\n"


# -- errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["frobnicate", f"redis://:{SECRET}@127.0.0.1:1/0"],
        [f"redis://:{SECRET}@127.0.0.1:1/0", "keys"],
        ["get", "memory://"],
        ["set", "memory://", "k", "1", "--ttl", "0"],
        ["set", "memory://", "k", "1", "--ttl", "soon"],
        ["keys", "memory://", "--max-depth", "-1"],
        ["get", "memory://", "a:..:b"],
        ["get", "memory://", "a\x01b"],
        ["set", "memory://", "k", "{not json"],
        ["get", f"nosuch://:{SECRET}@host/x", "k"],
        ["get", f"sqlite:///x.db?password={SECRET}&bogus=1", "k"],
        ["load", "memory://", "/nonexistent/dump.jsonl"],
        ["copy", "memory://", "memory://", "--base", "a", "--to", "a:b"],
    ],
    ids=lambda args: " ".join(args)[:40],
)
async def test_usage_errors_exit_2_with_one_line(args: list[str]) -> None:
    result = await cli(*args)
    assert result.returncode == 2, result.stderr
    error_line(result)


async def test_bad_dump_lines_exit_2_naming_the_line(tmp_path: Path) -> None:
    dump = tmp_path / "bad.jsonl"
    dump.write_bytes(b'{"key": "a", "value": "AA==", "ttl": null}\n{"key": "b"}\n')
    result = await cli("load", "memory://", str(dump))
    assert result.returncode == 2 and "line 2" in error_line(result)


async def test_unreachable_backends_exit_3_naming_them(tmp_path: Path) -> None:
    port = free_port()
    redis = await cli("get", f"redis://:{SECRET}@127.0.0.1:{port}/0", "k")
    assert redis.returncode == 3
    assert f"127.0.0.1:{port}" in error_line(redis)
    http = await cli("keys", f"http://:{SECRET}@127.0.0.1:{port}/base")
    assert http.returncode == 3
    assert f"http://127.0.0.1:{port}/base" in error_line(http)
    sqlite = await cli("keys", f"sqlite:///{tmp_path}/no/such/dir/kv.db")
    assert sqlite.returncode == 3
    error_line(sqlite)
    assert not (tmp_path / "no").exists()


async def test_debug_shows_the_traceback() -> None:
    result = await cli("--debug", "get", "redis://127.0.0.1:1/0", "k")
    assert result.returncode != 0
    assert b"Traceback" in result.stderr


# -- copy --------------------------------------------------------------------------------


async def fill_for_copy(storage: Storage) -> dict[str, bytes]:
    """Items of every kind a copy must keep: plain values, a batch sharing one expiry, items
    with their own TTL each, raw bytes. Returns {key: raw bytes}."""
    await storage.set_items({f"plain:{i}": {"i": i, "pad": "x" * (i % 50)} for i in range(1200)})
    await storage.set_items({f"shared:{i}": i for i in range(300)}, ttl=500)
    for i in range(150):
        await storage.set_item(f"own:{i}", [i], ttl=100 + i * 7.25)
    await storage.set_item_raw("raw:all", EVERY_BYTE)
    await storage.set_item_raw("raw:empty", b"", ttl=300)
    keys = await storage.get_keys()
    return {k: e.value for k, e in (await storage.get_entries_raw(keys)).items() if e}


async def assert_same_items(src: Storage, dst: Storage, rename: Callable[[str], str]) -> int:
    """Every item of ``src`` is in ``dst`` (under ``rename(key)``) with the same bytes and
    the same remaining TTL within 1 s; returns how many were compared."""
    keys = await src.get_keys()
    compared = 0
    for start in range(0, len(keys), 1000):
        chunk = keys[start : start + 1000]
        ours = await src.get_entries_raw(chunk)
        theirs = await dst.get_entries_raw([rename(k) for k in chunk])
        for key in chunk:
            mine, copied = ours[key], theirs[rename(key)]
            assert mine is not None and copied is not None, key
            assert copied.value == mine.value, key
            mine_at, copied_at = mine.meta.expires_at, copied.meta.expires_at
            if mine_at is None:
                assert copied_at is None, key
            else:  # the same expiry time: the same remaining TTL
                assert copied_at is not None, key
                assert abs((copied_at - mine_at).total_seconds()) < 1.0, key
            compared += 1
    return compared


@pytest.mark.parametrize(
    ("source", "target"), [("sqlite", "redis"), ("file", "sqlite"), ("redis", "file")]
)
async def test_copy_keeps_bytes_and_remaining_ttls(
    source: str, target: str, tmp_path: Path, redis_server: RedisServer
) -> None:
    src_url = local_url(source, tmp_path, redis_server)
    dst_url = local_url(target, tmp_path, redis_server)
    src, dst = create_storage(src_url), create_storage(dst_url)
    try:
        items = await fill_for_copy(src)
        result = await cli("copy", src_url, dst_url)
        assert result.returncode == 0, result.stderr
        assert result.stdout == f"copied {len(items)}, skipped 0, failed 0\n".encode()
        assert result.stderr == b""  # no progress bar in a pipe
        assert await assert_same_items(src, dst, lambda k: k) == len(items)
        assert len(await dst.get_keys()) == len(items)
    finally:
        for storage in (src, dst):
            await storage.clear()
            await storage.dispose()


async def test_copy_base_to_skip_existing_and_dry_run(tmp_path: Path) -> None:
    src_url, dst_url = local_url("sqlite", tmp_path), local_url("file", tmp_path)
    src, dst = create_storage(src_url), create_storage(dst_url)
    try:
        await src.set_items({"s:1": 1, "s:2": 2, "s:deep:3": 3, "other": 0})
        await dst.set_item("moved:2", "kept")

        dry = await cli("copy", src_url, dst_url, "--base", "s", "--to", "moved", "--dry-run")
        assert dry.stdout == b"would copy 3, skipped 0, failed 0\n"
        assert await dst.get_keys() == ["moved:2"]
        dry_skip = await cli(
            "copy", src_url, dst_url, "--base", "s", "--to", "moved", "--dry-run", "--skip-existing"
        )
        assert dry_skip.stdout == b"would copy 2, skipped 1, failed 0\n"

        result = await cli(
            "copy", src_url, dst_url, "--base", "s", "--to", "moved", "--skip-existing"
        )
        assert result.returncode == 0 and result.stdout == b"copied 2, skipped 1, failed 0\n"
        assert await dst.get_items(["moved:1", "moved:2", "moved:deep:3"]) == {
            "moved:1": 1,
            "moved:2": "kept",
            "moved:deep:3": 3,
        }
        overwrite = await cli("copy", src_url, dst_url, "--base", "s")
        assert overwrite.stdout == b"copied 3, skipped 0, failed 0\n"
        assert sorted(await dst.get_keys("s")) == ["s:1", "s:2", "s:deep:3"]
    finally:
        await src.dispose()
        await dst.dispose()


def _run_on_a_terminal(args: list[str]) -> tuple[int, bytes, bytes]:
    """Run the command with stderr on a pseudo-terminal; (status, stdout, terminal output)."""
    leader, follower = pty.openpty()
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "120"}
    with subprocess.Popen(
        [*KVSTORAGE, *args], stdout=subprocess.PIPE, stderr=follower, cwd=ROOT, env=env
    ) as process:
        os.close(follower)
        shown = b""
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            shown += chunk
        assert process.stdout is not None
        out = process.stdout.read()
        status = process.wait(60)
    os.close(leader)
    return status, out, shown


async def test_copy_shows_a_progress_bar_on_a_terminal_only(tmp_path: Path) -> None:
    src_url, dst_url = local_url("sqlite", tmp_path), local_url("sqlite", tmp_path)
    await on(src_url, lambda s: s.set_items({f"k:{i}": i for i in range(3000)}))
    status, out, shown = await anyio.to_thread.run_sync(
        _run_on_a_terminal, ["copy", src_url, dst_url]
    )
    assert status == 0 and out == b"copied 3000, skipped 0, failed 0\n"
    assert b"copying" in shown and "━".encode() in shown and b"3,000 done" in shown
    piped = await cli("copy", src_url, dst_url)
    assert piped.returncode == 0 and piped.stderr == b""


@pytest.mark.slow
async def test_copy_killed_midway_resumes_with_skip_existing(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    from redis import Redis

    count = 40_000
    src_url = local_url("sqlite", tmp_path)
    dst_url = f"redis://127.0.0.1:{redis_server.port}/9?base={unique()}"
    raw = Redis(port=redis_server.port, db=9)
    assert raw.dbsize() == 0  # db 9 is this test's alone

    async def fill(storage: Storage) -> None:
        await storage.set_items({f"k:{i:05}": {"i": i} for i in range(count // 2)})
        for start in range(count // 2, count, 500):  # own expiry each: single writes
            for i in range(start, start + 500):
                await storage.set_item_raw(f"k:{i:05}", b"%d" % i, ttl=3600 + i / 100)

    await on(src_url, fill)
    command = [*KVSTORAGE, "copy", src_url, dst_url]
    async with await anyio.open_process(command, cwd=ROOT) as copying:
        deadline = time.monotonic() + 60
        while raw.dbsize() < count // 4:
            assert copying.returncode is None, "the copy ended before it could be killed"
            assert time.monotonic() < deadline
            await anyio.sleep(0.002)
        copying.send_signal(signal.SIGKILL)
        with anyio.fail_after(10):
            assert await copying.wait() == -signal.SIGKILL
    copied = raw.dbsize()
    assert 0 < copied < count, copied

    resumed = await cli("copy", src_url, dst_url, "--skip-existing")
    assert resumed.returncode == 0, resumed.stderr
    summary = resumed.stdout.decode()
    assert summary == f"copied {count - copied}, skipped {copied}, failed 0\n"
    src, dst = create_storage(src_url), create_storage(dst_url)
    try:
        assert await assert_same_items(src, dst, lambda k: k) == count
    finally:
        await dst.clear()
        await src.dispose()
        await dst.dispose()
    raw.close()


# -- dump and load -----------------------------------------------------------------------


@pytest.fixture(params=["file", "sqlite", "redis", "s3", "http"])
def dump_urls(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[tuple[str, str, dict[str, str]]]:
    """(source URL, target URL, environment) of one driver; http serves a memory storage."""
    kind = request.param
    env: dict[str, str] = {}
    if kind in ("file", "sqlite", "redis"):
        redis = request.getfixturevalue("redis_server") if kind == "redis" else None
        yield local_url(kind, tmp_path, redis), local_url(kind, tmp_path, redis), env
    elif kind == "s3":
        endpoint = request.getfixturevalue("s3_endpoint")
        bucket = request.getfixturevalue("s3_bucket")
        query = f"?endpoint_url={endpoint}&region=us-east-1"
        env = {name: os.environ[name] for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
        yield f"s3://{bucket}/a{query}", f"s3://{bucket}/b{query}", env
    else:
        env = {"KVSTORAGE_TOKEN": SECRET}
        with asgi_server(create_app(create_storage(), token=SECRET)) as server:
            yield f"{server}/a", f"{server}/b", env


async def test_dump_and_load_round_trip_every_driver(
    dump_urls: tuple[str, str, dict[str, str]], tmp_path: Path
) -> None:
    src_url, dst_url, env = dump_urls
    token = env.get("KVSTORAGE_TOKEN")

    def opened(url: str) -> Storage:
        return create_storage(HTTPDriver(url, token=token) if token else url)

    src, dst = opened(src_url), opened(dst_url)
    try:
        await src.set_items({f"v:{i}": {"i": i, "s": "ż" * i} for i in range(30)})
        await src.set_item_raw("raw", EVERY_BYTE, ttl=900)
        await src.set_items({f"t:{i}": i for i in range(5)}, ttl=300)
        dump_file = tmp_path / "dump.jsonl"
        dumped = await cli("dump", src_url, "-o", str(dump_file), env=env)
        assert dumped.returncode == 0, dumped.stderr
        lines = [json.loads(line) for line in dump_file.read_text().splitlines()]
        assert len(lines) == 36 and {"key", "value", "ttl", "expires_at"} == set(lines[0])

        loaded = await cli("load", dst_url, str(dump_file), env=env)
        assert loaded.returncode == 0, loaded.stderr
        assert loaded.stdout == b"loaded 36, skipped 0, failed 0\n"
        assert await assert_same_items(src, dst, lambda k: k) == 36

        piped = await cli("dump", src_url, "v", env=env)
        again = await cli("load", dst_url, "--to", "copy", input=piped.stdout, env=env)
        assert again.stdout == b"loaded 30, skipped 0, failed 0\n"
        assert await dst.get_item("copy:v:7") == {"i": 7, "s": "ż" * 7}
    finally:
        for storage in (src, dst):
            await storage.clear()
            await storage.dispose()


# -- serve -------------------------------------------------------------------------------


@pytest.fixture
def served() -> Iterator[str]:
    """``kvstorage serve memory://`` as a child process (token :data:`SECRET`); its URL.
    (``kvstorage_server`` checks the "serving ..." line and that SIGTERM ends it with 0.)"""
    with kvstorage_server("memory://", token=SECRET) as url:
        yield url


async def test_serve_and_use_over_http(url: str) -> None:
    with kvstorage_server(url, token=SECRET) as served:
        await use_over_http(served)
    assert await on(url, lambda s: s.get_item("a:b")) == {"x": 1}  # written through


async def use_over_http(served: str) -> None:
    env = {"KVSTORAGE_TOKEN": SECRET}
    before = time.monotonic()  # each command below is a new process: seconds on a busy machine
    assert (await cli("set", served, "a:b", '{"x": 1}', "--ttl", "60", env=env)).returncode == 0
    got = await cli("get", f"{served}/a", "b", env=env)
    assert json.loads(got.stdout) == {"x": 1}
    assert (await cli("keys", served, env=env)).stdout == b"a:b\n"
    meta = json.loads((await cli("meta", served, "a:b", env=env)).stdout)
    assert 60 - (time.monotonic() - before) - 0.1 < meta["ttl"] <= 60
    refused = await cli("get", served, "a:b")
    assert refused.returncode == 3 and "token" in error_line(refused)
    wrong = await cli("get", f"http://:wrong-{SECRET}@{served[7:]}", "a:b")
    assert wrong.returncode == 3 and "wrong" not in error_line(wrong)


async def test_served_requests_do_not_wait_for_delayed_acks(served: str) -> None:
    """Small answers go out at once (TCP_NODELAY): most of 100 requests one after the other
    take well under the 40 ms a delayed ACK costs each of them (about 2 ms; a stall of the
    machine slows a few, not half of them)."""
    store = create_storage(HTTPDriver(served, token=SECRET))
    await store.set_item("k", 1)
    seconds = []
    for _ in range(50):
        for call in (lambda: store.get_item("k"), lambda: store.set_item("k", 2)):
            started = time.perf_counter()
            await call()
            seconds.append(time.perf_counter() - started)
    median = sorted(seconds)[len(seconds) // 2]
    assert median < 0.02, f"median request {median * 1000:.1f} ms"
    await store.dispose()


async def test_serve_read_only_and_busy_port(tmp_path: Path) -> None:
    db = local_url("sqlite", tmp_path)
    await on(db, lambda s: s.set_item("k", 1))
    port = free_port()
    serve = [*KVSTORAGE, "serve", db, "--port", str(port), "--read-only"]
    async with await anyio.open_process(serve, cwd=ROOT) as server:
        assert server.stderr is not None
        with anyio.fail_after(30):  # the line comes once the socket listens
            assert b"(read-only)" in await server.stderr.receive()
        url = f"http://127.0.0.1:{port}"
        assert json.loads((await cli("get", url, "k")).stdout) == 1
        refused = await cli("set", url, "k", "2")
        assert refused.returncode == 3 and "read-only" in error_line(refused)
        busy = await cli("serve", "memory://", "--port", str(port))
        assert busy.returncode == 3 and str(port) in error_line(busy)
        server.send_signal(signal.SIGINT)
        with anyio.fail_after(10):
            assert await server.wait() == 0
    assert await on(db, lambda s: s.get_item("k")) == 1


# -- the console script ------------------------------------------------------------------


def test_the_console_script_is_declared() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, name = scripts["kvstorage"].partition(":")
    assert (module, name) == ("kvstorage.cli", "main")
    from kvstorage.cli import main

    assert main(["keys", "memory://"]) == 0


def test_the_installed_console_script_runs(tmp_path: Path) -> None:
    """The ``kvstorage`` executable pip made, when the installed package is this checkout
    (CI's fresh install); another checkout's install cannot have it."""
    direct = importlib.metadata.distribution("kvstorage").read_text("direct_url.json") or "{}"
    installed = json.loads(direct).get("url", "")
    if installed != ROOT.as_uri():
        if IN_CI and not installed:
            pytest.fail("kvstorage is not installed from this checkout")
        pytest.skip(f"the installed kvstorage is another checkout ({installed})")
    script = Path(sys.executable).with_name("kvstorage")
    assert script.exists(), f"no console script at {script}"
    result = subprocess.run([script, "keys", f"file://{tmp_path}"], capture_output=True, timeout=60)
    assert (result.returncode, result.stdout, result.stderr) == (0, b"", b"")
