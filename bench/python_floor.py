"""The least Python a stored URL costs casimg's process beyond the required work, on this machine.

    .venv/bin/python -m bench.python_floor                  # 20,000 of each, a redis-server started here
    .venv/bin/python -m bench.python_floor --count 50000

The required work (bench.references.required_work_fetch) downloads, validates, hashes and flushes a body.
A service that keeps what it stored, and says so, adds per URL at least: the step that indexes it and
records the job's result (one Redis script, batched with the other calls of the loop turn, as
casimg.batching.ScriptBatcher sends them on casimg's own client, services.connect_redis), the URL's log
line, its counter, and the task the URL runs in; and, once per batch of URLs, the read of the queue.

Each is measured here alone, with casimg's own code where it has one, as the CPU of this process (every
thread) per operation, and of it the user time: a process whose cores are to spare is bound by the time
it holds the GIL, which system calls mostly release. Redis runs in a process of its own and its CPU is
not counted (bench.parts measures it, about 0.1 ms per image).

Beside the required work's CPU per image (the ingest table's column), the sum says how near 0.9 of the
required work's rate any implementation on this stack can come: at 0.9 a service may spend 1/0.9 - 1 =
11% more than the required work, for all of its own work and Redis's together.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import platform
import resource
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from bench import log
from bench.procs import Procs, start_redis_server

BATCH = 64  # URLs in flight at once, as casimg's default download concurrency
STORE_KEYS = 9  # the store script's KEYS and ARGV counts (casimg/lua/store.lua)
STORE_ARGS = 13
URL = "http://127.0.0.1:8081/images/0001234.jpg"
DIGEST = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"


Cost = tuple[float, float]  # CPU µs per operation: user, system


def cpu() -> Cost:
    usage = resource.getrusage(resource.RUSAGE_SELF)  # to the microsecond (os.times counts clock ticks)
    return usage.ru_utime, usage.ru_stime


def per_op(spent: Cost, operations: int) -> Cost:
    return spent[0] / operations * 1e6, spent[1] / operations * 1e6


async def per_op_us(count: int, batch: Callable[[int], Awaitable[None]]) -> Cost:
    """CPU µs per operation of `batch(n)`, which does n operations, run in batches of BATCH."""
    await batch(min(count // 10, 2000))  # warm up
    started = cpu()
    done = 0
    while done < count:
        await batch(BATCH)
        done += BATCH
    ended = cpu()
    return per_op((ended[0] - started[0], ended[1] - started[1]), done)


async def measure(count: int, redis_url: str, log_path: Path) -> list[tuple[str, Cost]]:
    from casimg.batching import ScriptBatcher
    from casimg.cli import setup_logging
    from casimg.metrics import Metrics
    from casimg.schema import Outcome
    from casimg.services import connect_redis
    from casimg.worker import _log_outcome

    client = connect_redis(redis_url, BATCH + 64)  # casimg's client: hiredis packing, decoded replies
    script = client.register_script("return {ARGV[1], ARGV[2], 0}")
    batcher = ScriptBatcher(client)
    keys = [f"casimg:key:{number}" for number in range(STORE_KEYS)]
    args = [URL, DIGEST, "123456 640 480 jpeg", str(int(time.time() * 1000)), "1-0", "workers", URL, "1", "",
            "casimg:recent:", "casimg:placeholder-todo", "casimg:placeholder:", "2026-12-04T00:00:00Z"]
    assert len(args) == STORE_ARGS

    async def store_calls(n: int) -> None:
        await asyncio.gather(*(batcher.call(script, keys, args) for _ in range(n)))

    stream, group = "floor:queue", "workers"
    await client.delete(stream)
    await client.xgroup_create(stream, group, id="0", mkstream=True)
    fields = {"url": URL, "job": "0123456789abcdef", "owner": "k1", "n": "17"}

    async def queue_reads(count: int) -> Cost:
        """CPU µs per entry of reading 64 at a time, the stream filled beforehand (untimed)."""
        user = system = 0.0
        done = 0
        while done < count:
            async with client.pipeline(transaction=False) as pipe:
                for _ in range(BATCH):
                    pipe.xadd(stream, fields)
                await pipe.execute()
            started = cpu()
            read = await client.xreadgroup(group, "floor", {stream: ">"}, count=BATCH)
            ended = cpu()
            user, system = user + ended[0] - started[0], system + ended[1] - started[1]
            assert sum(len(entries) for _, entries in read) == BATCH
            done += BATCH
            await client.xtrim(stream, maxlen=0)
        return per_op((user, system), done)

    setup_logging("text")
    with log_path.open("w") as sink:
        logging.getLogger().handlers[0].setStream(sink)  # type: ignore[attr-defined]

        async def log_lines(n: int) -> None:
            for _ in range(n):
                _log_outcome(Outcome.STORED, URL, 1)

        metrics = Metrics()

        async def counters(n: int) -> None:
            for _ in range(n):
                metrics.on_outcome(Outcome.STORED, "")

        async def nothing() -> None:
            await asyncio.sleep(0)

        async def tasks(n: int) -> None:
            await asyncio.gather(*(asyncio.ensure_future(nothing()) for _ in range(n)))

        rows = [("the index step: one store script through ScriptBatcher, 64 a loop turn",
                 await per_op_us(count, store_calls))]
        await queue_reads(min(count // 10, 2000))  # warm up
        rows.append(("the queue's read: its share of one XREADGROUP of 64 entries", await queue_reads(count)))
        rows += [("the log line (casimg's text format, to a file)", await per_op_us(count, log_lines)),
                 ("the counter (Metrics.on_outcome)", await per_op_us(count, counters)),
                 ("a task per URL (ensure_future, one await, gathered)", await per_op_us(count, tasks))]
        logging.getLogger().handlers.clear()
    await client.delete(stream)
    await client.aclose()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.python_floor", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=20000, help="operations of each case (default 20000)")
    args = parser.parse_args()
    procs = Procs()
    with tempfile.TemporaryDirectory(prefix="casimg-floor-") as temp:
        try:
            work = Path(temp)
            procs.add(start_redis_server(work, "--appendonly", "no", new_session=True))
            log(f"redis-server on {work / 'redis.sock'}; {args.count} operations a case")
            rows = asyncio.run(measure(args.count, f"unix://{work / 'redis.sock'}", work / "casimg.log"))
        finally:
            procs.stop_all()
    load = os.getloadavg()[0]
    print(f"\n{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} cores, Python "
          f"{platform.python_version()}, load average {load:.2f}. `python -m bench.python_floor --count {args.count}`; "
          "CPU µs of this process per operation (Redis's own CPU not counted).\n")
    print("| per stored URL | CPU µs | of which user (the most of it that can hold the GIL) |\n|---|---|---|")
    for name, (user, system) in rows:
        print(f"| {name} | {user + system:.1f} | {user:.1f} |")
    user = sum(cost[0] for _, cost in rows)
    total = user + sum(cost[1] for _, cost in rows)
    print(f"| **the floor: their sum** | **{total:.1f}** | **{user:.1f}** |")

if __name__ == "__main__":
    sys.exit(main())
