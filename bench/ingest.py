"""Scenarios 1 and 2, the ingest: one job of N URLs submitted to casimg and timed until it is done, in
interleaved rounds with the references (the limit, the required work and img2dataset) at one process
and at casimg's default process count; with distinct images, and with half the URLs naming content
another URL of the job also has. Beside them, what a body costs to validate and a file costs to create
on this machine."""

from __future__ import annotations

import json
import os
import statistics
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import redis
from PIL import Image

from bench import log
from bench.corpus import EXT
from bench.img2dataset_ref import VERSION as IMG2DATASET_VERSION
from bench.memory import service_rss_kib
from bench.origin import CONCURRENCY
from bench.procs import Procs, confine, own_cpu, tree_cpu
from bench.references import IngestResult, reference_run, required_work_fetch
from bench.stack import Casimg, start_casimg, start_redis


def casimg_ingest(server: Casimg, redis_url: str, urls: list[str], sizes: dict[str, int]) -> IngestResult:
    """Submit the URLs in one job and time it until the job is done (polled in Redis, not over HTTP)."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    body = json.dumps({"image_urls": urls}).encode()
    request = urllib.request.Request(f"{server.base}/api/images", data=body, method="POST",
                                     headers={"X-API-Key": server.key, "Content-Type": "application/json"})
    started = time.monotonic()
    with urllib.request.urlopen(request) as response:
        job_id = json.loads(response.read())["job_id"]
    while client.hget(f"casimg:job:{job_id}", "status") != "done":
        time.sleep(0.02)
    seconds = time.monotonic() - started
    info = client.hgetall(f"casimg:job:{job_id}")
    failures = [v for v in client.hvals(f"casimg:job:{job_id}:results") if '"failed"' in v][:5]
    return IngestResult(seconds, len(urls), sum(sizes[u] for u in urls), int(info["stored"]),
                        int(info["existed"]), int(info["failed"]), failures)


def file_creation_cost(directory: Path, count: int = 300) -> float:
    """Microseconds to create one empty file in a new directory under `directory`: a fact of the file
    system that the ingest pays for every blob (one new inode each, and a new fan-out directory for most
    blobs of a fresh store). On an ext4 without a journal it swings tenfold with how many files were
    deleted shortly before, so the table prints it beside the ingest figures. The files are left in
    place: deleting them would slow what creates files next."""
    probe = directory / "create-probe"
    probe.mkdir()
    started = time.perf_counter()
    for number in range(count):
        os.close(os.open(probe / f"f{number}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    return (time.perf_counter() - started) / count * 1e6


def validation_costs(directory: Path, files: list[tuple[str, int]], per_format: int = 200) -> list[tuple[str, ...]]:
    """ms per image of each check, per format, over a sample of the set: full decode, casimg's two modes."""
    from casimg.validation import validate_image

    def full_decode(path: Path) -> None:
        with Image.open(path) as image:
            image.load()

    checks = [("full decode (load)", full_decode),
              ("casimg decode mode", lambda p: validate_image(p, max_pixels=10**9, mode="decode")),
              ("casimg structure mode (default)", lambda p: validate_image(p, max_pixels=10**9, mode="structure"))]
    rows = []
    for fmt, ext in EXT.items():
        paths = [directory / name for name, _ in files if name.endswith("." + ext)][:per_format]
        if not paths:
            continue
        cells = []
        for _, check in checks:
            for path in paths[:5]:  # warm the page cache and Pillow's plugins
                check(path)
            started = time.perf_counter()
            for path in paths:
                check(path)
            cells.append(f"{(time.perf_counter() - started) / len(paths) * 1000:.2f}")
        rows.append((fmt, str(len(paths)), *cells))
    return rows


@dataclass
class Series:
    """One configuration's runs over the rounds of the ingest scenario: images/s of each run."""

    name: str
    rates: list[float] = field(default_factory=list)
    images: int = 0
    bytes: int = 0
    stored: int = 0
    failed: int = 0
    failures: list[str] = field(default_factory=list)
    reported: list[float] = field(default_factory=list)  # img2dataset's own images/s, for its rows
    cpu_ms: list[float] = field(default_factory=list)  # CPU per image of each run

    @property
    def median(self) -> float:
        return statistics.median(self.rates) if self.rates else float("nan")

    def add(self, result: IngestResult) -> None:
        self.rates.append(result.per_second)
        self.cpu_ms.append(result.cpu_ms_per_image)
        self.images, self.bytes = result.images, result.bytes
        self.stored, self.failed = self.stored + result.stored, self.failed + result.failed
        self.failures += result.failures[: 5 - len(self.failures)]


@dataclass
class Ingest:
    """Scenarios 1 and 2 over interleaved rounds: every Series by its key (see `ingest_rounds`), the RSS
    of the first one-process casimg, and the server and Redis of the last one-process distinct ingest,
    still running, holding the images that retrieval reads."""

    series: dict[str, Series]
    processes: int
    rss_start_kib: int
    rss_kib: int
    server: Casimg
    redis_url: str


def ingest_rounds(procs: Procs, work: Path, urls: list[str], dup_urls: list[str], sizes: dict[str, int],
                  processes: int, rounds: int, img2dataset: Path | None) -> Ingest:
    """Every configuration of the ingest, in `rounds` rounds, each round in the reverse order of the one
    before, so that a drift in the machine's load weighs on all alike; after one untimed fetch that brings
    the origin's files into the page cache. `processes` is casimg's default deployment (serve's
    --processes auto: one per core); the references and img2dataset run at 1 and at `processes`."""
    from bench.img2dataset_ref import img2dataset_run

    counts = [1] + ([processes] if processes > 1 else [])
    runs: list[tuple[str, str, Callable[[int], IngestResult]]] = []
    for count in counts:
        runs.append((f"limit@{count}", f"limit: aiohttp fetch + write, {count} process(es)",
                     lambda n, c=count: reference_run(work, urls, processes=c)))
        runs.append((f"required@{count}",
                     f"required work: the limit + validation, SHA-256, syncfs, {count} process(es)",
                     lambda n, c=count: reference_run(work, urls, required_work_fetch, processes=c)))
        if img2dataset is not None:
            def i2d(n: int, c: int = count) -> IngestResult:
                done = img2dataset_run(img2dataset, work, urls, c, CONCURRENCY * c, f"{c}-{n}")
                series[f"img2dataset@{c}"].reported.append(done.reported_per_second)
                return IngestResult(done.seconds, done.images, sum(sizes[u] for u in urls),
                                    stored=round(done.success * done.images), cpu_seconds=done.cpu_seconds)
            runs.append((f"img2dataset@{count}", f"img2dataset {IMG2DATASET_VERSION}, {count} process(es) x "
                         f"{CONCURRENCY} threads, no re-encoding", i2d))
        runs.append((f"casimg@{count}", f"casimg serve --processes {count}, distinct"
                     + (" (default deployment)" if count == processes else ""),
                     lambda n, c=count: casimg_run(procs, work, f"{c}-{n}", urls, sizes, c)))
        runs.append((f"casimg-dup@{count}", f"casimg serve --processes {count}, half duplicates",
                     lambda n, c=count: casimg_run(procs, work, f"dup-{c}-{n}", dup_urls, sizes, c)))
    series = {key: Series(name) for key, name, _ in runs}
    log("1. ingest: warming the origin up (untimed)")
    reference_run(work, urls)
    for number in range(rounds):
        for key, name, run in runs if number % 2 == 0 else runs[::-1]:
            log(f"1-2. ingest, round {number + 1} of {rounds}: {name}")
            series[key].add(run(number))
            log(f"  {series[key].rates[-1]:.0f} images/s")
    # The one-process casimg again, for the memory figures and the retrieval that reads its images.
    _, redis_url = start_redis(procs, work / "redis-kept", persistent=True)
    server = start_casimg(procs, work / "data-kept", redis_url, processes=1)
    rss_start = service_rss_kib(server.proc)
    casimg_ingest(server, redis_url, urls, sizes)
    return Ingest(series, processes, rss_start, service_rss_kib(server.proc), server, redis_url)


def casimg_run(procs: Procs, work: Path, label: str, urls: list[str], sizes: dict[str, int],
               processes: int, *, env: dict[str, str] | None = None,
               redis_cpus: set[int] | None = None) -> IngestResult:
    """One job of `urls` on a fresh casimg with `processes` processes, its own Redis and data directory,
    `env` added to casimg's environment, and its Redis confined to `redis_cpus` if given."""
    redis_proc, redis_url = start_redis(procs, work / f"redis-{label}", persistent=True)
    if redis_cpus:
        confine(redis_proc.pid, redis_cpus)
    server = start_casimg(procs, work / f"data-{label}", redis_url, processes=processes, extra_env=env)
    try:
        before, redis_before = tree_cpu(server.proc.pid), own_cpu(redis_proc.pid)
        result = casimg_ingest(server, redis_url, urls, sizes)
        result.cpu_seconds = tree_cpu(server.proc.pid) - before
        result.redis_cpu_seconds = own_cpu(redis_proc.pid) - redis_before
        return result
    finally:
        procs.stop(server.proc)
        procs.stop(redis_proc)
        os.sync()
