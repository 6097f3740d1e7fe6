"""GET /api/image, side by side: casimg servers of several checkouts or settings on one stored set, wrk
against each in interleaved rounds.

    .venv/bin/python -m bench.get_ab --variant before=../casimg-before --variant this=.
    .venv/bin/python -m bench.get_ab --variant off=. --variant on=.,OTEL_TRACES_EXPORTER=otlp,...

One casimg (this checkout) ingests the set first; then every variant serves it (no workers) from the same
Redis and data directory, all at once, and the wrk runs go round them in a rotating order, --rounds times,
so that a drift in the machine's load weighs on all alike. Prints the median requests/s of each variant
with its spread (lowest, highest), the median p50 and p99 latencies, and the server's CPU per request.
Only loopback addresses are used.
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
from bench.procs import ROOT, Procs, tree_cpu
from bench.retrieval import SAMPLE_SEED, WrkResult, indexed_urls, run_wrk
from bench.stack import start_casimg, start_redis


def variant(text: str) -> tuple[str, Path, dict[str, str]]:
    """label=checkout[,NAME=VALUE...]"""
    label, _, rest = text.partition("=")
    checkout, *pairs = rest.split(",")
    env = dict(pair.split("=", 1) for pair in pairs)
    path = Path(checkout or ".").resolve()
    if not label or not (path / "casimg" / "__init__.py").exists():
        raise argparse.ArgumentTypeError(f"expected label=checkout[,NAME=VALUE...] with a casimg/ in it: {text!r}")
    return label, path, env


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.get_ab", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", type=variant, action="append", required=True,
                        help="label=checkout[,NAME=VALUE...] (repeat: two or more)")
    parser.add_argument("--rounds", type=int, default=5, help="wrk runs per variant (default 5)")
    parser.add_argument("--duration", type=int, default=5, help="seconds per wrk run (default 5)")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections (default 32)")
    parser.add_argument("--images", type=int, default=1000, help="distinct images stored (default 1000)")
    parser.add_argument("--workspace", default=None, help="where the run's temp directory goes (default: TMPDIR)")
    parser.add_argument("--cache", default=str(ROOT / ".bench-cache"), help="where the images are kept")
    args = parser.parse_args()
    if not shutil.which("wrk"):
        sys.exit("wrk is not installed (`apt-get install wrk`)")
    cache = set_directory(Path(args.cache), args.images)
    files = make_images(cache, args.images)
    procs = Procs()
    runs: dict[str, list[WrkResult]] = {label: [] for label, _, _ in args.variant}
    cpu: dict[str, list[float]] = {label: [] for label, _, _ in args.variant}
    with workspace(False, "casimg-get-ab-", args.workspace) as work:
        try:
            port, _ = serve_image_set(procs, work, cache)
            urls, _, sizes = image_urls(port, files)
            _, redis_url = start_redis(procs, work / "redis", persistent=False)
            loader = start_casimg(procs, work / "data", redis_url)
            result = casimg_ingest(loader, redis_url, urls, sizes)
            procs.stop(loader.proc)
            log(f"stored {result.stored} images")
            stored = sorted(indexed_urls(redis_url))
            paths = ["/api/image?url=" + urllib.parse.quote(u, safe="")
                     for u in random.Random(SAMPLE_SEED).sample(stored, min(len(stored), 500))]
            servers = {label: start_casimg(procs, work / "data", redis_url, workers=False, extra_env={
                **env, "PYTHONPATH": str(checkout), "PYTHONSAFEPATH": "1"}) for label, checkout, env in args.variant}
            labels = list(servers)
            for round_number in range(args.rounds):
                turn = labels[round_number % len(labels):] + labels[:round_number % len(labels)]
                for label in turn:
                    server = servers[label]
                    before = tree_cpu(server.proc.pid)
                    runs[label].append(run_wrk(work, server.base, paths, server.key, args.duration, args.connections))
                    # CPU per request: steadier than the rate on a shared machine (wrk's own CPU is not in it)
                    cpu[label].append((tree_cpu(server.proc.pid) - before) * 1000
                                      / max(1.0, runs[label][-1].rps * args.duration))
                    log(f"round {round_number + 1}, {label}: {runs[label][-1].rps:.0f} requests/s, "
                        f"{cpu[label][-1]:.2f} ms CPU per request")
        finally:
            procs.stop_all()

    print(f"\nGET /api/image, {args.rounds} rounds of {args.duration} s, {args.connections} connections, "
          f"1 process each\n")
    print("| variant | requests/s median (lowest-highest) | p50 ms | p99 ms | errors | CPU ms per request (median) |")
    print("|---|---|---|---|---|---|")
    for label, checkout, env in args.variant:
        rps = [r.rps for r in runs[label]]
        extra = " ".join(f"{k}={v}" for k, v in env.items())
        print(f"| {label} ({checkout}{', ' + extra if extra else ''}) | {statistics.median(rps):.0f} "
              f"({min(rps):.0f}-{max(rps):.0f}) | {statistics.median(r.p50_ms for r in runs[label]):.2f} | "
              f"{statistics.median(r.p99_ms for r in runs[label]):.2f} | {sum(r.errors for r in runs[label])} | "
              f"{statistics.median(cpu[label]):.3f} |")


if __name__ == "__main__":
    main()
