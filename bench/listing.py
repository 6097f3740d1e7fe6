"""Scenarios 4 and 5, the listing and the index's memory: Redis filled through casimg's own Index.store
to each size, then the first page and a full walk timed over HTTP, and Redis's bytes per URL read."""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import json
import re
import statistics
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench import log
from bench.memory import index_memory, redis_used_memory
from bench.procs import Procs
from bench.stack import Casimg, start_casimg, start_redis

LIST_URL_LENGTH = 80
FILL_IN_FLIGHT = 256  # Index.store calls in flight while filling Redis for the listing measurements
FILL_CHUNK = 20_000  # Index.store calls gathered at once
PAGE_SAMPLES, PAGE_1000_SAMPLES = 50, 10  # timed requests of each first page, after 5 untimed ones


def list_url(number: int) -> str:
    head = f"https://images.example.com/photos/2026/11/{number:09d}/"
    tail = "-original.jpg"
    filler = hashlib.sha256(str(number).encode()).hexdigest()
    return head + filler[: LIST_URL_LENGTH - len(head) - len(tail)] + tail


async def fill_index(redis_url: str, start: int, stop: int) -> None:
    """Index URLs start..stop-1 through casimg's Index.store, each with its own digest and metadata."""
    import redis.asyncio as aioredis

    from casimg.index import BlobMeta, Index
    from casimg.schema import KeySpace
    from casimg.services import connect_redis

    client: aioredis.Redis = connect_redis(redis_url, FILL_IN_FLIGHT + 8)
    index = Index(client, KeySpace("casimg:"))
    slots = asyncio.Semaphore(FILL_IN_FLIGHT)

    async def one(number: int) -> None:
        async with slots:
            digest = hashlib.sha256(number.to_bytes(8, "big")).hexdigest()
            width = 640 + number % 1400
            meta = BlobMeta(size=20_000 + number % 280_000, content_type="image/jpeg", width=width,
                            height=width * 3 // 4)
            await index.store(list_url(number), digest, meta)

    for chunk in range(start, stop, FILL_CHUNK):
        await asyncio.gather(*(one(n) for n in range(chunk, min(stop, chunk + FILL_CHUNK))))
        if (chunk - start) % 200_000 == 0 and chunk > start:
            log(f"  indexed {chunk:,}")
    await client.aclose()


def http_get(url: str, key: str) -> tuple[bytes, dict[str, str]]:
    request = urllib.request.Request(url, headers={"X-API-Key": key})
    with urllib.request.urlopen(request) as response:
        return response.read(), dict(response.headers)


@dataclass(frozen=True)
class ListingTimes:
    first_ms: float  # first page (limit 100), p50, over one kept-alive connection
    first_new_connection_ms: float  # the same with a new connection for each request (urllib)
    first_1000_ms: float  # first page with limit=1000, p50, kept alive
    walk_seconds: float  # every page with limit=1000, following the Link headers, kept alive


def p50_ms(*calls: Callable[[], object], times: int) -> list[float]:
    """p50 of each call; the calls alternate, so that each meets the machine in the same state (on a VM,
    what ran just before moves a millisecond's latency by a third)."""
    for call in calls:  # untimed: the first answers of a fresh process are slower
        for _ in range(5):
            call()
    samples: list[list[float]] = [[] for _ in calls]
    for _ in range(times):
        for call, taken in zip(calls, samples, strict=True):
            started = time.perf_counter()
            call()
            taken.append((time.perf_counter() - started) * 1000)
    return [statistics.median(taken) for taken in samples]


def measure_listing(server: Casimg, expected: int) -> ListingTimes:
    """The listing's latencies over HTTP.

    Measured over one kept-alive connection, as wrk measures retrieval and as a client walking the
    pages does: a new connection per request adds the TCP handshake and urllib's own setup, the
    client's cost (about 0.5 ms on a 2-core VM, against 0.6 ms for all of /healthz). The first page is
    also timed that way, for comparison with runs before.
    """
    connection = http.client.HTTPConnection("127.0.0.1", server.port)
    headers = {"X-API-Key": server.key}

    def get(target: str) -> tuple[bytes, str | None]:
        connection.request("GET", target, headers=headers)
        response = connection.getresponse()
        body = response.read()
        if response.status != 200:
            raise RuntimeError(f"GET {target}: HTTP {response.status}")
        return body, response.getheader("Link")

    try:
        first, first_new = p50_ms(lambda: get("/api/images"),
                                  lambda: http_get(f"{server.base}/api/images", server.key), times=PAGE_SAMPLES)
        [first_1000] = p50_ms(lambda: get("/api/images?limit=1000"), times=PAGE_1000_SAMPLES)
        started = time.perf_counter()
        target: str | None = "/api/images?limit=1000"
        seen = 0
        while target:
            body, link = get(target)
            seen += len(json.loads(body))
            # A reference to resolve against the page asked for (a query-only one, from casimg).
            reference = re.match(r"<([^>]+)>", link).group(1) if link else None  # type: ignore[union-attr]
            target = urllib.parse.urljoin(target, reference) if reference else None
        walk = time.perf_counter() - started
    finally:
        connection.close()
    if seen != expected:
        raise RuntimeError(f"the walk returned {seen} images, expected {expected}")
    return ListingTimes(first, first_new, first_1000, walk)


@dataclass(frozen=True)
class ListingRow:
    """One index size: the listing's times, Redis bytes per URL, and those of each key family."""

    size: int
    times: ListingTimes
    per_url: float
    breakdown: dict[str, float]


def listing(procs: Procs, work: Path, sizes: list[int]) -> list[ListingRow]:
    """Each of `sizes` (ascending) in turn: one Redis, filled further for each, a casimg to read it."""
    rows: list[ListingRow] = []
    redis_proc, redis_url = start_redis(procs, work / "redis3", persistent=False)
    base_memory = redis_used_memory(redis_url)
    filled = 0
    for size in sizes:
        log(f"4. listing: filling the index to {size:,} URLs through Index.store")
        fill_started = time.monotonic()
        asyncio.run(fill_index(redis_url, filled, size))
        log(f"  filled in {time.monotonic() - fill_started:.0f} s")
        filled = size
        per_url = (redis_used_memory(redis_url) - base_memory) / size
        breakdown = index_memory(redis_url, size)
        lister = start_casimg(procs, work / f"data-list-{size}", redis_url, workers=False)
        times = measure_listing(lister, size)
        procs.stop(lister.proc)
        rows.append(ListingRow(size, times, per_url, breakdown))
    procs.stop(redis_proc)
    return rows
