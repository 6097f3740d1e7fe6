"""The service's memory per process after an ingest, in its default deployment (one process per core).

    .venv/bin/python -m bench.rss --urls 10000 --images 3000

Submits `--urls` URLs in jobs of at most 10,000 to `casimg serve` with its default process count, on the
image set of `--images` images (URLs past the set's size name its images again, each with a query of its
own: distinct URLs, repeated content), and prints each process's RSS (VmRSS) and peak (VmHWM) before and
after. The parent of a forked deployment only waits and forwards signals; the figure that matters is the
largest child's. Only loopback addresses are used; writes nothing to the repository.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bench import log, workspace
from bench.corpus import make_images, set_directory
from bench.ingest import casimg_ingest
from bench.origin import image_urls, serve_image_set
from bench.procs import ROOT, Procs, is_filler, status_kib
from bench.stack import start_casimg, start_redis


def process_rss(pid: int) -> dict[int, tuple[int, int]]:
    """(VmRSS, VmHWM) in KiB of `pid` and of each process it forked."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return {p: (status_kib(p, "VmRSS"), status_kib(p, "VmHWM")) for p in [pid, *map(int, children)]}


def _role(pid: int) -> str:
    if not Path(f"/proc/{pid}").exists():
        return "gone"
    return "placeholder filler" if is_filler(pid) else "server"


def main() -> None:
    from casimg.config import usable_cores

    parser = argparse.ArgumentParser(prog="python -m bench.rss", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--urls", type=int, default=10_000, help="URLs ingested (default 10000)")
    parser.add_argument("--images", type=int, default=3000, help="distinct images of the set (default 3000)")
    parser.add_argument("--processes", type=int, default=usable_cores(), help="default: one per core")
    parser.add_argument("--cache", default=str(ROOT / ".bench-cache"), help="where the images are kept")
    args = parser.parse_args()
    cache = set_directory(Path(args.cache), args.images)
    files = make_images(cache, args.images)
    procs = Procs()
    with workspace(False, "casimg-rss-") as work:
        try:
            port, _ = serve_image_set(procs, work, cache)
            base, _, sizes = image_urls(port, files)
            urls = [base[n % len(base)] + (f"?copy={n // len(base)}" if n >= len(base) else "")
                    for n in range(args.urls)]
            sizes.update({url: sizes[url.split("?")[0]] for url in urls})
            _, redis_url = start_redis(procs, work / "redis", persistent=True)
            server = start_casimg(procs, work / "data", redis_url, processes=args.processes)
            before = process_rss(server.proc.pid)
            stored = 0
            for start in range(0, len(urls), 10_000):
                result = casimg_ingest(server, redis_url, urls[start:start + 10_000], sizes)
                stored += result.stored
                log(f"{start + len(urls[start:start + 10_000])} URLs: {result.per_second:.0f} images/s")
            after = process_rss(server.proc.pid)
            roles = {pid: _role(pid) for pid in after}  # while the processes still run
        finally:
            procs.stop_all()
    print(f"\n{args.urls:,} URLs ({stored:,} stored; {args.images:,} distinct images), casimg serve --processes "
          f"{args.processes}\n")
    print("| process | RSS at start MiB | RSS after MiB | peak MiB |")
    print("|---|---|---|---|")
    for pid, (rss, peak) in after.items():
        role = "parent" if pid == server.proc.pid and len(after) > 1 else roles[pid]
        print(f"| {role} {pid} | {before.get(pid, (0, 0))[0] / 1024:.0f} | {rss / 1024:.0f} | {peak / 1024:.0f} |")


if __name__ == "__main__":
    main()
