"""Ingest, side by side: this checkout's casimg against another checkout's, in interleaved rounds.

    git worktree add ../casimg-before HEAD~1          # the code to compare against
    .venv/bin/python -m bench.ingest_ab --other ../casimg-before
    .venv/bin/python -m bench.ingest_ab --other ../casimg-before --rounds 4 --workspace /dev/shm
    .venv/bin/python -m bench.ingest_ab --other . --other-env CASIMG_ROBOTS_TXT=false   # one setting's cost

What a change to the ingest path did, when one run of the benchmark (`python -m bench`) cannot tell: a
single ingest moves 10-40% from run to run on a shared machine, more than most changes gain. Here the
limit (the plain aiohttp fetch-and-write of bench.references) runs first and after every round. Each
round runs both casimgs twice, "this" and "other", in the order this-other-other-this, so that a drift
over the round (the file system filling up, say) weighs on both alike. Each casimg gets a fresh Redis and data
directory, and reports its images/s and CPU per image (its process and the processes it forked).
Both run on this checkout's .venv: the comparison is of the casimg code, not of dependencies.

Nothing is deleted until the end: on an ext4 without a journal, files created soon after thousands
were deleted cost several times as much (see bench.ingest.file_creation_cost). `--workspace /dev/shm`
takes the disk out altogether (no durability cost, no inode allocator), which leaves the CPU a change
saves.
Only loopback addresses are used. Prints a markdown table; writes nothing to the repository.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import redis

from bench import env_of, log, workspace
from bench.corpus import make_images, set_directory
from bench.ingest import casimg_ingest, file_creation_cost
from bench.origin import image_urls, serve_image_set
from bench.procs import ROOT, Procs, tree_cpu
from bench.references import reference_run
from bench.stack import start_casimg, start_redis

PLACEHOLDER_TODO = "casimg:placeholder-todo"  # schema.KeySpace.placeholder_todo under the bench's prefix
PLACEHOLDERS_MATCH = "casimg:placeholder:*"
PLACEHOLDER_WAIT = 600.0  # seconds the placeholders may take to follow an ingest before the bench goes on


def one_ingest(procs: Procs, work: Path, label: str, checkout: Path, urls: list[str],
               sizes: dict[str, int], processes: int, env: dict[str, str] | None = None
               ) -> tuple[float, float, float, float, int]:
    """(images/s, CPU ms per image, seconds from the ingest's end until the placeholder queue was empty,
    CPU ms per image by then, placeholders stored) of one ingest of `urls` by `checkout`'s casimg, on its
    own Redis and data directory, with `env` added to its environment."""
    # PYTHONSAFEPATH: `python -m` would put the working directory ahead of PYTHONPATH, and run whichever
    # casimg/ the script was started beside.
    environment = {**(env or {}), "PYTHONPATH": str(checkout), "PYTHONSAFEPATH": "1"}
    redis_proc, redis_url = start_redis(procs, work / f"redis-{label}", persistent=True)
    server = start_casimg(procs, work / f"data-{label}", redis_url, processes=processes,
                                extra_env=environment)
    before = tree_cpu(server.proc.pid)
    result = casimg_ingest(server, redis_url, urls, sizes)
    ended = time.monotonic()
    cpu_ms = (tree_cpu(server.proc.pid) - before) / len(urls) * 1000
    # Placeholders made after the store (casimg/filler.py) follow the ingest: how long until the last.
    client = redis.Redis.from_url(redis_url)
    while client.zcard(PLACEHOLDER_TODO) and time.monotonic() - ended < PLACEHOLDER_WAIT:
        time.sleep(0.05)
    filled_after = time.monotonic() - ended
    cpu_filled_ms = (tree_cpu(server.proc.pid) - before) / len(urls) * 1000
    made = sum(client.hlen(key) for key in client.scan_iter(PLACEHOLDERS_MATCH, count=1000))
    client.close()
    procs.stop(server.proc)
    procs.stop(redis_proc)
    if result.stored != len(urls):
        sys.exit(f"{label}: {result.stored} of {len(urls)} stored, failures: {result.failures}")
    os.sync()
    return result.per_second, cpu_ms, filled_after, cpu_filled_ms, made


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.ingest_ab", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--other", required=True, help="the other checkout (its casimg/ is what it runs)")
    parser.add_argument("--rounds", type=int, default=2,
                        help="rounds of this-other-other-this, the limit after each (default 2)")
    parser.add_argument("--images", type=int, default=5000, help="distinct images (default 5000)")
    parser.add_argument("--processes", type=int, default=1, help="casimg serve --processes (default 1)")
    parser.add_argument("--duplicates", action="store_true",
                        help="the job whose second half repeats the first half's content under other URLs")
    parser.add_argument("--workspace", default=None, help="where the run's temp directory goes (default: TMPDIR)")
    parser.add_argument("--this-env", action="append", default=[], metavar="NAME=VALUE",
                        help="an environment variable for this checkout's casimg (repeatable)")
    parser.add_argument("--other-env", action="append", default=[], metavar="NAME=VALUE",
                        help="an environment variable for the other casimg (repeatable): with --other ., "
                             "what a setting costs")
    parser.add_argument("--cache", default=str(ROOT / ".bench-cache"), help="where the images are kept")
    args = parser.parse_args()
    other = Path(args.other).resolve()
    if not (other / "casimg" / "__init__.py").exists():
        sys.exit(f"{other} has no casimg/ package")

    checkouts = {"this": ROOT, "other": other}
    envs = {"this": env_of(parser, args.this_env), "other": env_of(parser, args.other_env)}
    cache = set_directory(Path(args.cache), args.images)
    files = make_images(cache, args.images)
    procs = Procs()
    rates: dict[str, list[float]] = {"this": [], "other": []}
    cpu: dict[str, list[float]] = {"this": [], "other": []}
    filled: dict[str, list[float]] = {"this": [], "other": []}
    cpu_filled: dict[str, list[float]] = {"this": [], "other": []}
    made: dict[str, list[int]] = {"this": [], "other": []}
    limits: list[float] = []
    with workspace(False, "casimg-ab-", args.workspace) as work:
        try:
            port, origin = serve_image_set(procs, work, cache)
            urls, dup_urls, sizes = image_urls(port, files)
            if args.duplicates:
                urls = dup_urls
            log(f"origin: {origin}; workspace {work}; creating a file: {file_creation_cost(work):.0f} µs")

            def limit() -> None:
                limits.append(reference_run(work, urls).per_second)
                log(f"limit: {limits[-1]:.0f} images/s")

            limit()
            for round_number in range(args.rounds):
                for turn, label in enumerate(("this", "other", "other", "this")):
                    rate, cpu_ms, after, cpu_all, count = one_ingest(
                        procs, work, f"{label}-{round_number}-{turn}", checkouts[label], urls, sizes,
                        args.processes, envs[label])
                    rates[label].append(rate)
                    cpu[label].append(cpu_ms)
                    filled[label].append(after)
                    cpu_filled[label].append(cpu_all)
                    made[label].append(count)
                    log(f"round {round_number + 1}, {label}: {rate:.0f} images/s, {cpu_ms:.2f} ms CPU per image; "
                        f"{count} placeholders, the last {after:.1f} s after the ingest, {cpu_all:.2f} ms CPU "
                        "per image by then")
                limit()
        finally:
            procs.stop_all()

    limit_mean = statistics.mean(limits)
    print(f"\n{args.images:,} images, {args.rounds} rounds, casimg processes {args.processes}, "
          f"limit {limit_mean:.0f} images/s (runs: {', '.join(f'{x:.0f}' for x in limits)})\n")
    print("| casimg | images/s per round | mean | median | of the limit | CPU ms per image (median) "
          "| placeholders | last placeholder after the ingest (s, median) | CPU ms per image with them (median) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for label, path in checkouts.items():
        mean = statistics.mean(rates[label])
        extra = " ".join(f"{name}={value}" for name, value in envs[label].items())
        print(f"| {label} ({path}{', ' + extra if extra else ''}) | {', '.join(f'{x:.0f}' for x in rates[label])} | "
              f"{mean:.0f} | {statistics.median(rates[label]):.0f} | {mean / limit_mean:.2f} | "
              f"{statistics.median(cpu[label]):.2f} | {min(made[label])} | {statistics.median(filled[label]):.1f} | "
              f"{statistics.median(cpu_filled[label]):.2f} |")


if __name__ == "__main__":
    main()
