"""`python -m benchmarks`: the standard workload on every driver, beside the raw client
and the peers, measured in the same run.

    python -m benchmarks                       # memory, fs, sqlite (no server needed)
    python -m benchmarks --drivers all --quick # + redis, s3, postgres, http on servers it starts
    python -m benchmarks --json out.json --plot out.png
    python -m benchmarks --wrappers --drivers none  # only the driver wrappers' overhead
    python -m benchmarks --cache --drivers none     # only the cache workload (on Redis)
    python -m benchmarks --loop uvloop --drivers redis  # the Python targets on uvloop
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import tempfile
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import anyio
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from kvstorage import Storage, create_storage
from tests.support.servers import kvstorage_server, moto_server, postgres_server, redis_server

from . import cache, targets, unstorage, wrappers
from .loops import LOOPS, run_on
from .report import lag, pivot, ratio
from .targets import Target
from .workload import OPERATIONS, Row, best_rounds, run_scaling, run_workload

LOCAL = ["memory", "fs", "sqlite"]
ALL = [*LOCAL, "redis", "s3", "postgres", "http"]
NODE_PEERS = {"memory", "fs", "redis", "http"}
console = Console(stderr=True)


class Context:
    """What the per-driver set-ups need: a scratch directory and server addresses."""

    def __init__(
        self,
        tmp: Path,
        redis_url: str | None,
        s3_url: str | None,
        postgres_url: str | None = None,
        http_url: str | None = None,
    ) -> None:
        self.tmp = tmp
        self.redis_url = redis_url
        self.s3_url = s3_url
        self.postgres_url = postgres_url
        self.http_url = http_url

    def path(self, name: str) -> Path:
        """A fresh path under the scratch directory."""
        return self.tmp / f"{name}-{uuid.uuid4().hex[:8]}"


Setup = tuple[Callable[[], Storage], list[Callable[[], Awaitable[Target | None]]]]


async def _const(target: Target | None) -> Target | None:
    return target


def setup_driver(name: str, ctx: Context) -> Setup:
    """(factory of our storage, factories of the comparison targets) for ``name``."""
    from kvstorage import drivers

    if name == "memory":
        return create_storage, [
            lambda: _const(targets.raw_memory()),
            lambda: _const(targets.raw_memory_stdlib()),
            lambda: _const(targets.peer_aiocache_memory()),
            lambda: _const(targets.peer_pkv_memory()),
        ]
    if name == "fs":
        return lambda: create_storage(drivers.FSDriver(ctx.path("fs"))), [
            lambda: _const(targets.raw_fs(ctx.path("raw-fs"))),
            lambda: _const(targets.peer_pkv_disk(ctx.path("pkv-disk"))),
        ]
    if name == "sqlite":
        return lambda: create_storage(drivers.SQLiteDriver(ctx.path("kv.db"))), [
            lambda: targets.raw_sqlite(ctx.path("raw.db")),
        ]
    if name == "redis":
        url = ctx.redis_url
        if url is None:
            raise LookupError("redis-server is not installed")
        return lambda: create_storage(drivers.RedisDriver(url, base=uuid.uuid4().hex[:8])), [
            lambda: _const(targets.raw_redis(url)),
            lambda: _const(targets.peer_aiocache_redis(url)),
            lambda: _const(targets.peer_pkv_redis(url)),
        ]
    if name == "s3":
        endpoint = ctx.s3_url
        if endpoint is None:
            raise LookupError("moto[server] is not installed")
        bucket = f"bench-{uuid.uuid4().hex[:8]}"
        os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
        os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")

        def ours() -> Storage:
            driver = drivers.S3Driver(bucket, endpoint_url=endpoint, region="us-east-1")
            return create_storage(driver)

        return ours, [lambda: targets.raw_s3(endpoint, bucket)]
    if name == "postgres":
        dsn = ctx.postgres_url
        if dsn is None:
            raise LookupError("PostgreSQL (initdb, postgres) is not installed")
        table = f"bench_{uuid.uuid4().hex[:12]}"
        return lambda: create_storage(drivers.PostgresDriver(dsn, table=table)), [
            lambda: targets.raw_postgres(dsn),
        ]
    if name == "http":
        server = ctx.http_url
        if server is None:
            raise LookupError("the http extra (httpx, uvicorn) is not installed")
        return lambda: create_storage(drivers.HTTPDriver(f"{server}/{uuid.uuid4().hex[:8]}")), [
            lambda: _const(targets.raw_http(f"{server}/{uuid.uuid4().hex[:8]}")),
        ]
    raise ValueError(f"unknown driver {name!r}; known: {', '.join(ALL)}")


@contextlib.contextmanager
def http_server() -> Iterator[str | None]:
    """``kvstorage serve memory://`` in a child process (None without the http extra)."""
    try:
        import httpx  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        yield None
        return
    with kvstorage_server("memory://") as url:
        yield url


async def bench_copy(quick: bool, redis_url: str | None, tmp: Path) -> list[Row]:
    """``kvstorage copy`` SQLite -> Redis at scale (needs redis-server)."""
    if redis_url is None:
        return []
    from . import copy as copy_bench

    sizes = [20_000] if quick else [100_000, 1_000_000]
    return await copy_bench.run(sizes, redis_url, tmp)


async def bench_wrappers(redis_url: str | None, n: int) -> list[Row]:
    """Each driver wrapper against its bare driver, on memory and (with a server) Redis;
    memory with 5 N keys (its chunks are short: more of them)."""
    from kvstorage import drivers

    made: dict[str, tuple[Callable[[], drivers.Driver], int]] = {
        "memory": (drivers.MemoryDriver, max(5 * n, 20_000))
    }
    if redis_url is not None:
        made["redis"] = (lambda: drivers.RedisDriver(redis_url, base=uuid.uuid4().hex[:8]), n)
    console.print(f"wrappers: {', '.join(made)} ...")
    return await wrappers.run(made)


def scaling_sizes(name: str, quick: bool) -> list[int]:
    """Key counts of the listing scaling run for ``name`` (none for s3 and http)."""
    if name in ("s3", "http"):
        return []
    if quick:
        return [10_000]
    return [10_000, 100_000] if name == "fs" else [10_000, 100_000, 1_000_000]


async def bench_driver(
    name: str,
    ctx: Context,
    n: int,
    quick: bool,
    scaling: bool,
    skip_node: bool,
    rounds: int,
    progress: Progress,
) -> list[Row]:
    """Run the workload for one driver on ours, the raw client and the peers: ``rounds``
    times, the targets taking turns in each round, keeping each target's best round per
    operation (so a burst of load on this machine during one target's turn does not skew
    the ratios)."""
    try:
        make_storage, others = setup_driver(name, ctx)
        storage = make_storage()
    except (LookupError, ImportError, NotImplementedError) as exc:
        console.print(f"[yellow]skipping {name}: {exc}[/yellow]")
        return []
    count = max(n // 20, 50) if name == "s3" else n  # moto serves ~100 requests/s
    compared: list[Target] = [targets.ours("kvstorage", storage)]
    for make in others:
        target = await make()
        if target is not None:
            compared.append(target)
    sizes = scaling_sizes(name, quick) if scaling else []
    scaled = [target for target in compared if target.iter_keys is not None]
    # Beside a raw baseline, the scaling run too takes turns for several rounds (best kept).
    scaling_rounds = rounds if len(scaled) > 1 else 1
    total = rounds * len(compared) * len(OPERATIONS)
    total += 2 * len(sizes) * len(scaled) * scaling_rounds
    task = progress.add_task(name, total=total)

    def step() -> None:
        progress.advance(task)
        progress.refresh()

    rows: list[Row] = []
    try:
        for _ in range(rounds):
            for target in compared:
                rows += await run_workload(name, target, count, step)
        rows = best_rounds(rows)
        if name in NODE_PEERS and not skip_node:
            where = {
                "fs": str(ctx.path("unstorage-fs")),
                "redis": ctx.redis_url or "",
                "http": ctx.http_url or "",  # its base URL is the server's root
            }
            node_rows, problem = await unstorage.run(name, count, where.get(name, ""))
            if problem:
                console.print(f"[yellow]unstorage peer skipped: {problem}[/yellow]")
            rows += node_rows
        scaled_rows: list[Row] = []
        for size in sizes:
            for _ in range(scaling_rounds):
                scaled_rows += await run_scaling(name, scaled, size, step)
        rows += best_rounds(scaled_rows)
    finally:
        for target in compared:
            if target.kind != "ours":
                await target.close()
        await storage.dispose()
    return rows


async def bench_sessions(
    quick: bool, redis_url: str | None, postgres_url: str | None = None
) -> list[Row]:
    """The session middleware benchmark (skipped without Starlette or starsessions)."""
    try:
        from . import sessions as session_bench
    except ImportError:
        return []
    return await session_bench.run(quick=quick, redis_url=redis_url, postgres_url=postgres_url)


def render(rows: list[Row]) -> None:
    """Print one table per driver: ops/s of each target and our ratio to it."""
    lines = pivot(rows)
    for driver in dict.fromkeys(line.driver for line in lines):
        mine = [line for line in lines if line.driver == driver]
        names = list(dict.fromkeys(name for line in mine for name in line.others))
        peaks = any(line.ours.peak_mb is not None for line in mine)
        lags = any(line.ours.lag_ms is not None for line in mine)
        table = Table(title=f"{driver} (ops/s; batches and listing count keys)")
        table.add_column("operation")
        table.add_column("kvstorage", justify="right")
        if lags:
            table.add_column("loop lag p99/max ms", justify="right")
        for name in names:
            table.add_column(name, justify="right")
            table.add_column("ours/" + name.split()[0], justify="right")
        if peaks:
            table.add_column("peak MiB", justify="right")
        for line in mine:
            cells = [line.operation, f"{line.ours.ops:,.0f}"]
            if lags:
                cells.append(lag(line.ours))
            for name in names:
                other = line.others.get(name)
                cells += [
                    f"{other.ops:,.0f}" if other else "",
                    ratio(line.ours, other),
                ]
            if peaks:
                peak = line.ours.peak_mb
                cells.append("" if peak is None else f"{peak:.1f}")
            table.add_row(*cells)
        Console(width=200).print(table)


def plot(rows: list[Row], path: str) -> None:
    """Write a PNG bar chart of ops/s per driver and operation (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workload = [row for row in rows if row.operation in OPERATIONS]
    drivers = list(dict.fromkeys(row.driver for row in workload))
    fig, axes = plt.subplots(len(drivers), 1, figsize=(11, 3.2 * len(drivers)), squeeze=False)
    for ax, driver in zip(axes[:, 0], drivers, strict=True):
        mine = [row for row in workload if row.driver == driver]
        names = list(dict.fromkeys(row.target for row in mine))
        width = 0.8 / len(names)
        for index, name in enumerate(names):
            values = [
                next((r.ops for r in mine if r.target == name and r.operation == op), 0)
                for op in OPERATIONS
            ]
            xs = [i + index * width for i in range(len(OPERATIONS))]
            ax.bar(xs, values, width, label=name)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(OPERATIONS))], OPERATIONS)
        ax.set_yscale("log")
        ax.set_ylabel("ops/s")
        ax.set_title(driver)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def machine() -> str:
    """One line describing this machine."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return (
        f"Python {platform.python_version()}, {os.cpu_count()} cores ({cpu}), {platform.system()}"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line's options."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--drivers", default=",".join(LOCAL), help="comma list, or 'all'")
    parser.add_argument("-n", type=int, default=None, help="keys per operation (default 10000)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="small run: N=2,000, short scaling run (about a minute with all drivers)",
    )
    parser.add_argument("--no-scaling", action="store_true", help="skip the listing scaling run")
    parser.add_argument("--no-node", action="store_true", help="skip unstorage under Node.js")
    parser.add_argument("--no-sessions", action="store_true", help="skip the sessions benchmark")
    parser.add_argument(
        "--wrappers",
        action="store_true",
        help="also measure each driver wrapper's overhead against its bare driver, on memory "
        "and redis (in the same run)",
    )
    parser.add_argument(
        "--cache",
        action="store_true",
        help="also run the cache workload on Redis: Zipf reads through TieredDriver vs Redis "
        "alone, hot-key reads, staleness across processes, cached vs aiocache",
    )
    parser.add_argument(
        "--no-copy", action="store_true", help="skip `kvstorage copy` sqlite -> redis"
    )
    parser.add_argument(
        "--rounds", type=int, default=None, help="rounds per driver, best kept (default 3)"
    )
    parser.add_argument("--json", metavar="PATH", help="write the raw figures as JSON")
    parser.add_argument("--plot", metavar="PATH", help="write a PNG bar chart")
    parser.add_argument(
        "--loop",
        choices=LOOPS,
        default="asyncio",
        help="event loop of the Python targets (uvloop: the `fast` extra); default asyncio",
    )
    return parser.parse_args(argv)


async def main(args: argparse.Namespace) -> int:
    names = ALL if args.drivers == "all" else [d.strip() for d in args.drivers.split(",") if d]
    names = [] if names == ["none"] else names
    n = args.n or (2_000 if args.quick else 10_000)
    rounds = args.rounds or 3
    console.print(
        f"[bold]kvstorage benchmarks[/bold] N={n}, best of {rounds} on {machine()}, "
        f"event loop: {args.loop}"
    )
    rows: list[Row] = []
    wrapper_rows: list[Row] = []
    cache_report: cache.CacheReport | None = None
    with contextlib.ExitStack() as stack, tempfile.TemporaryDirectory() as tmp:
        needs_redis = "redis" in names or args.wrappers or args.cache
        redis_url = stack.enter_context(redis_server()) if needs_redis else None
        s3_url = stack.enter_context(moto_server()) if "s3" in names else None
        pg_url = stack.enter_context(postgres_server()) if "postgres" in names else None
        http_url = stack.enter_context(http_server()) if "http" in names else None
        ctx = Context(Path(tmp), redis_url, s3_url, pg_url, http_url)
        # Redrawn when a step ends, not by a thread of its own: that thread's drawing holds
        # the GIL and would show up in the loop lag of whatever runs meanwhile.
        progress = Progress(
            TextColumn("{task.description:>8}"),
            BarColumn(),
            TimeElapsedColumn(),
            console=console,
            auto_refresh=False,
        )
        with progress:
            for name in names:
                rows += await bench_driver(
                    name,
                    ctx,
                    n,
                    args.quick,
                    not args.no_scaling,
                    args.no_node,
                    rounds,
                    progress,
                )
            if args.wrappers:
                wrapper_rows = await bench_wrappers(redis_url, n)
        if args.cache:
            if redis_url is None:
                console.print("[yellow]skipping the cache workload: no redis-server[/yellow]")
            else:
                cache_report = await cache.run(redis_url, quick=args.quick, console=console)
        if not args.no_sessions:
            rows += await bench_sessions(args.quick, redis_url, pg_url)
        if not args.no_copy and "sqlite" in names:
            rows += await bench_copy(args.quick, redis_url, Path(tmp))
    render(rows)
    wrappers.render(wrapper_rows, Console(width=200))
    if cache_report is not None:
        cache.render(cache_report, Console(width=200))
    if args.json:
        payload = {
            "machine": machine(),
            "loop": args.loop,
            "n": n,
            "rounds": rounds,
            "rows": [row.as_dict() for row in rows],
            "wrappers": [row.as_dict() for row in wrapper_rows],
        }
        if cache_report is not None:
            payload["cache"] = cache_report.as_dict()
        await anyio.Path(args.json).write_text(json.dumps(payload, indent=2))
    if args.plot:
        plot(rows, args.plot)
    return 0


def cli(argv: list[str] | None = None) -> int:
    """``python -m benchmarks``: parse the options and run on the chosen event loop."""
    args = parse_args(argv)
    return run_on(args.loop, main(args))


if __name__ == "__main__":
    sys.exit(cli())
