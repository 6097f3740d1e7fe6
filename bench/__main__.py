"""`python -m bench [options]`: run every scenario in one go and write the table (see bench/__init__.py).

Run it with the project's venv, from the repository: ``.venv/bin/python -m bench --help``.
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import UTC, datetime
from pathlib import Path

try:
    import bench
    from bench import log, workspace
    from bench.corpus import make_images, set_directory
    from bench.img2dataset_ref import ensure_installed
    from bench.ingest import file_creation_cost, ingest_rounds, validation_costs
    from bench.listing import listing
    from bench.origin import image_urls, run_origin, serve_image_set
    from bench.procs import ROOT, Procs
    from bench.references import run_bare
    from bench.report import Results, render, splice
    from bench.retrieval import retrieval
except ModuleNotFoundError as missing:  # a python without the project installed
    sys.exit(f"python -m bench needs {missing.name}: run it with the project's venv, `.venv/bin/python -m bench` "
             "(`bash scripts/test` creates it)")


def run(args: argparse.Namespace) -> str:
    """Every scenario in one run: the ingest first, into a fresh workspace; retrieval against the images
    it stored, while its server still runs; the ingest with duplicates; the listing last, on a Redis of
    its own. Returns the markdown table."""
    procs = Procs()
    load_before = os.getloadavg()[0]
    started_at = datetime.now(UTC)
    cache = set_directory(Path(args.cache), args.images)
    log(f"image set: {cache}")
    files = make_images(cache, args.images)
    os.sync()  # nothing written before the run is left for the run's own flushes to write
    with workspace(args.keep) as work:
        try:
            origin_port, origin_kind = serve_image_set(procs, work, cache)
            log(f"origin: {origin_kind} on port {origin_port}")
            urls, dup_urls, sizes = image_urls(origin_port, files)

            log("1. validation cost per image")
            validation = validation_costs(cache, files)
            create_us = file_creation_cost(work)
            log(f"  creating a file in the workspace: {create_us:.0f} µs")

            img2dataset = None if args.no_img2dataset else ensure_installed(Path(args.cache))
            first = ingest_rounds(procs, work, urls, dup_urls, sizes, args.multi, args.rounds, img2dataset)
            read = retrieval(procs, work, first.server, first.redis_url, processes=args.processes,
                             multi=args.multi, urls=args.retrieval_urls, duration=args.duration,
                             connections=args.connections, repeat=args.repeat)
            procs.stop(first.server.proc)
            rows = listing(procs, work, args.listing)
        finally:
            procs.stop_all()
    return render(args, Results(started_at, load_before, os.getloadavg()[0], files, origin_kind, create_us,
                                validation, first, read, rows))


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=bench.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=5000, help="distinct images to ingest (default 5000)")
    parser.add_argument("--listing", default="100000,1000000",
                        help="comma-separated index sizes for the listing and memory figures "
                             "(default 100000,1000000; 0 skips them)")
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk run (default 10)")
    parser.add_argument("--connections", type=int, default=64, help="wrk connections (default 64)")
    parser.add_argument("--retrieval-urls", type=int, default=1000, help="stored URLs wrk cycles through")
    parser.add_argument("--processes", type=int, default=1, help="casimg (and bare handler) processes (default 1)")
    parser.add_argument("--multi", type=int, default=os.cpu_count() or 1,
                        help="casimg's default deployment (serve --processes auto: the core count); the ingest "
                             "and retrieval also run with this many processes (1 turns it off)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="rounds of wrk runs over the servers of a retrieval comparison, medians (default 3)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="interleaved rounds of every ingest configuration, medians (default 3)")
    parser.add_argument("--no-img2dataset", action="store_true",
                        help="leave img2dataset out (else it is installed from PyPI under --cache, once)")
    parser.add_argument("--cache", default=str(ROOT / ".bench-cache"), help="where the generated images are kept")
    parser.add_argument("--output", default=str(ROOT / "BENCHMARKS.md"),
                        help="markdown file written (default BENCHMARKS.md)")
    parser.add_argument("--keep", action="store_true", help="keep the temp directory (logs, data) for inspection")
    args = parser.parse_args(argv)
    args.listing = sorted(int(n) for n in args.listing.split(",") if n.strip() and int(n) > 0)
    return args


def main(argv: list[str]) -> None:
    # The servers the run starts as its own children: the aiohttp origin and the bare handler.
    if argv[:1] == ["_origin"]:
        run_origin(int(argv[1]), argv[2])
        return
    if argv[:1] in (["_bare"], ["_threaded"]):
        run_bare(int(argv[1]), argv[2], argv[3], int(argv[4]), minimal=argv[0] == "_bare")
        return
    args = parse(argv)
    table = run(args)
    print(table)
    output = Path(args.output)
    output.write_text(splice(output.read_text() if output.exists() else "", table))
    log(f"wrote {args.output}")


if __name__ == "__main__":
    main(sys.argv[1:])
