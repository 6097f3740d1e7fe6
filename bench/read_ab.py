"""Reads, side by side: casimg's GET /api/image (this checkout, and another checkout's with --other)
beside the minimal handler and the previous, threaded reference, in interleaved wrk rounds.

    .venv/bin/python -m bench.read_ab                                # this casimg against the references
    .venv/bin/python -m bench.read_ab --other ../casimg-before --rounds 5

What a change to the read path did, when the full run (`python -m bench`) cannot tell: every server runs
at once over the same Redis and blob files, and each round runs wrk against each of them in turn, the
order rotating by one every round, so a drift in the machine's load weighs on all alike. Prints the
median requests/s of each with its range, and each casimg's ratio to the minimal handler; writes nothing
to the repository. Only loopback addresses are used; needs wrk (`apt-get install wrk`).
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import sys
import urllib.parse
from pathlib import Path

from bench import log, workspace
from bench.corpus import make_images, set_directory
from bench.ingest import casimg_ingest
from bench.origin import image_urls, serve_image_set
from bench.procs import ROOT, Procs, free_port, wait_http
from bench.retrieval import SAMPLE_SEED, indexed_urls, run_wrk
from bench.stack import start_casimg, start_redis


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.read_ab", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--other", default=None, help="another checkout whose casimg/ runs beside this one")
    parser.add_argument("--rounds", type=int, default=3, help="rounds over all servers (default 3)")
    parser.add_argument("--images", type=int, default=1000, help="images stored and read (default 1000)")
    parser.add_argument("--processes", type=int, default=1, help="processes of every server (default 1)")
    parser.add_argument("--duration", type=int, default=5, help="seconds per wrk run (default 5)")
    parser.add_argument("--connections", type=int, default=64, help="wrk connections (default 64)")
    parser.add_argument("--cache", default=str(ROOT / ".bench-cache"), help="where the images are kept")
    args = parser.parse_args()
    if not shutil.which("wrk"):
        sys.exit("wrk is not installed (`apt-get install wrk`)")
    checkouts = {"this": ROOT}
    if args.other:
        checkouts["other"] = Path(args.other).resolve()
    cache = set_directory(Path(args.cache), args.images)
    files = make_images(cache, args.images)
    procs = Procs()
    runs: dict[str, list[float]] = {}
    with workspace(False, "casimg-read-ab-") as work:
        try:
            port, _ = serve_image_set(procs, work, cache)
            urls, _, sizes = image_urls(port, files)
            _, redis_url = start_redis(procs, work / "redis", persistent=True)
            loader = start_casimg(procs, work / "data", redis_url)
            casimg_ingest(loader, redis_url, urls, sizes)
            procs.stop(loader.proc)
            stored = indexed_urls(redis_url)
            sample = random.Random(SAMPLE_SEED).sample(sorted(stored), len(stored))
            paths = ["/api/image?url=" + urllib.parse.quote(u, safe="") for u in sample]
            targets: dict[str, tuple[str, str | None]] = {}
            for label, checkout in checkouts.items():
                server = start_casimg(procs, work / "data", redis_url, workers=False, processes=args.processes,
                                      extra_env={"PYTHONPATH": str(checkout), "PYTHONSAFEPATH": "1"})
                targets[f"casimg ({label})"] = (server.base, server.key)
            for kind, command in (("minimal", "_bare"), ("threaded", "_threaded")):
                bare_port = free_port()
                procs.start([sys.executable, "-m", "bench", command, str(bare_port), redis_url,
                             str(work / "data" / "blobs"), str(args.processes)], work / f"{kind}.log")
                wait_http(f"http://127.0.0.1:{bare_port}/healthz")
                targets[kind] = (f"http://127.0.0.1:{bare_port}", None)
            names = list(targets)
            runs = {name: [] for name in names}
            for number in range(args.rounds):
                for name in names[number % len(names):] + names[:number % len(names)]:
                    base, key = targets[name]
                    runs[name].append(run_wrk(work, base, paths, key, args.duration, args.connections).rps)
                    log(f"round {number + 1}, {name}: {runs[name][-1]:.0f} requests/s")
        finally:
            procs.stop_all()
    minimal = statistics.median(runs["minimal"])
    print(f"\n{len(paths):,} stored images, wrk -t2 -c{args.connections} -d{args.duration}s, {args.rounds} rounds, "
          f"{args.processes} process(es) each\n")
    print("| server | requests/s per round | median | of the minimal handler (range over rounds) |")
    print("|---|---|---|---|")
    for name, rates in runs.items():
        ratios = [rate / base for rate, base in zip(rates, runs["minimal"], strict=True)]
        print(f"| {name} | {', '.join(f'{r:.0f}' for r in rates)} | {statistics.median(rates):.0f} | "
              f"{statistics.median(rates) / minimal:.2f} ({min(ratios):.2f}-{max(ratios):.2f}) |")


if __name__ == "__main__":
    main()
