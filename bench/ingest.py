"""Scenarios 1 and 2, the ingest: one job of N URLs submitted to casimg and timed until it is done,
between runs of the references (the limit and the required work); first with distinct images, then
with half the URLs naming content another URL of the job also has. Beside them, what a body costs to
validate and a file costs to create on this machine."""

from __future__ import annotations

import json
import os
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import redis
from PIL import Image

from bench import log
from bench.corpus import EXT
from bench.memory import service_rss_kib
from bench.procs import Procs
from bench.references import IngestResult, mean_result, reference_run, required_work_fetch
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
class Distinct:
    """Scenario 1: the references and casimg on distinct images. `server` (on the Redis at `redis_url`)
    still runs, holding the images that retrieval reads."""

    limit: IngestResult
    required_work: IngestResult
    casimg: IngestResult
    multi: IngestResult | None  # casimg serve --processes --multi, when that is more than --processes
    rss_start_kib: int
    rss_kib: int
    server: Casimg
    redis_url: str


def distinct(procs: Procs, work: Path, urls: list[str], sizes: dict[str, int], processes: int,
             multi: int) -> Distinct:
    """Scenario 1 with `processes` casimg processes, and again with `multi` when that is more."""
    # The references take seconds and move with the machine's load: they run before and after casimg,
    # in mirrored order (limit, required work, casimg, required work, limit), after one untimed fetch
    # that brings the origin's files into the page cache.
    log("1. ingest: warming the origin up (untimed)")
    reference_run(work, urls)
    log("1. ingest: plain aiohttp fetch-and-write (the limit)")
    limits = [reference_run(work, urls)]
    log("1. ingest: the limit with casimg's required work (validation, SHA-256, syncfs)")
    required = [reference_run(work, urls, required_work_fetch)]
    _, redis_url = start_redis(procs, work / "redis1", persistent=True)
    log("1. ingest: casimg")
    server = start_casimg(procs, work / "data1", redis_url, processes=processes)
    rss_start = service_rss_kib(server.proc)
    ingest = casimg_ingest(server, redis_url, urls, sizes)
    rss = service_rss_kib(server.proc)
    log("1. ingest: the required work again")
    required.append(reference_run(work, urls, required_work_fetch))
    log("1. ingest: the limit again")
    limits.append(reference_run(work, urls))

    # 1b. The same with casimg serve --processes (one per core).
    several: IngestResult | None = None
    if multi > processes:
        _, redis_multi = start_redis(procs, work / "redis-multi", persistent=True)
        log(f"1. ingest: casimg --processes {multi}")
        server_multi = start_casimg(procs, work / "data-multi", redis_multi, processes=multi)
        several = casimg_ingest(server_multi, redis_multi, urls, sizes)
        procs.stop(server_multi.proc)
    return Distinct(mean_result(limits), mean_result(required), ingest, several, rss_start, rss, server, redis_url)


def duplicates(procs: Procs, work: Path, urls: list[str], sizes: dict[str, int],
               processes: int) -> tuple[IngestResult, IngestResult]:
    """Scenario 2: (the limit, casimg) on a job whose second half repeats the first half's content."""
    log("2. ingest with duplicates: the limit")
    limits = [reference_run(work, urls)]
    _, redis_url = start_redis(procs, work / "redis2", persistent=True)
    log("2. ingest with duplicates: casimg")
    server = start_casimg(procs, work / "data2", redis_url, processes=processes)
    ingest = casimg_ingest(server, redis_url, urls, sizes)
    procs.stop(server.proc)
    log("2. ingest with duplicates: the limit again")
    limits.append(reference_run(work, urls))
    return mean_result(limits), ingest
