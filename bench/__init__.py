"""casimg against the physical limit of this machine, measured side by side in one run.

    .venv/bin/python -m bench                    # the full run: 5,000 images, listing at 100k and 1M URLs
    .venv/bin/python -m bench --images 1000 --listing 100000 --duration 5     # a quicker one

Run it from the repository with the project's venv (``bash scripts/test`` makes it): it imports casimg,
aiohttp, Pillow and redis. It sets everything up itself in a temp directory (a generated image set, a
local origin, a Redis, the casimg servers, the reference servers), prints a markdown table and writes it
to BENCHMARKS.md with the machine's core count and the date. Every figure comes with the reference it is
compared to, measured in the same run, because absolute numbers on a shared machine drift; the ratios
are what count.

What it measures, a module each:

0. Validation cost per image and format: a full decode against casimg's two modes (CASIMG_VALIDATION).
1. Ingest (``ingest``): N distinct generated images (``corpus``: about 80% photo-like JPEG, 10% PNG, 10%
   WebP, 20-300 KB) from a local origin (``origin``: nginx when installed, else an aiohttp static
   server), spread over 8 loopback addresses so casimg's per-host limit (8) times the hosts makes its
   default download concurrency (64), submitted in one job and timed until the job is done. The limit
   (``references``): a plain aiohttp fetch-and-write of the same URLs at the same concurrency, with no
   validation, hashing or index. Beside it, the required work: the limit plus casimg's default
   validation, a SHA-256 and a shared syncfs per body, and nothing else.
2. The same with half the URLs pointing at content that another URL of the job also has.
3. Retrieval with wrk (``retrieval``; ``apt-get install wrk``): casimg's GET /api/image; a bare Tornado
   handler doing one Redis HGET and one file read (in a thread, as casimg must) with the same process
   count; nginx serving the same blob files from disk; and the nginx front (config/nginx.conf,
   CASIMG_ACCEL_REDIRECT).
4. Listing (``listing``): first page latency and a full walk with limit=1000 at each --listing size,
   Redis filled through casimg's own Index.store, over one kept-alive connection (and the first page
   with a new connection for each request, beside it).
5. Memory (``memory``): Redis bytes per indexed URL (INFO memory, about 80-character URLs, with
   metadata) and the service's RSS after the ingest.

Retrieval and the distinct ingest also run with one casimg process per core (``--multi``), beside the
default single process. ``report`` writes the table. Only loopback addresses are used. Tools: wrk for
retrieval (skipped with a note when absent), nginx optional (``apt-get install nginx wrk``).
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path


def spread(values: list[float], form: str = ".2f") -> str:
    """The median of `values` and their range, as the tables print them: "1.23 (1.01-1.40)"."""
    return f"{statistics.median(values):{form}} ({min(values):{form}}-{max(values):{form}})"


def env_of(parser: argparse.ArgumentParser, pairs: list[str]) -> dict[str, str]:
    """Options given as NAME=VALUE (an environment for a server under test), as a dict."""
    env = {}
    for pair in pairs:
        name, equals, value = pair.partition("=")
        if not equals or not name:
            parser.error(f"expected NAME=VALUE, got {pair!r}")
        env[name] = value
    return env


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def workspace(keep: bool, prefix: str = "casimg-bench-", directory: str | None = None) -> Iterator[Path]:
    """A temp directory for a run (in `directory`, default TMPDIR), removed at the end unless `keep`."""
    work = Path(tempfile.mkdtemp(prefix=prefix, dir=directory))
    work.chmod(0o755)
    try:
        yield work
    finally:
        if keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
