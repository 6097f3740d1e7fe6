"""Prometheus metrics for one casimg process, served at GET /metrics.

Counters are bumped where things happen: once per HTTP request (handlers.log_request) and once per
download outcome (the worker's hooks), with no Redis call. Gauges that need Redis or the disk (queue
depth, jobs by status, index sizes, blob store size) are computed only when /metrics is scraped, so the
hot path pays nothing for them. The blob store size comes from a walk of the blob tree in a thread; on a
large store that takes seconds, so a walk is reused long enough that walking takes at most
``DISK_WALK_DUTY`` of the time, and a scrape waits at most ``DISK_WALK_WAIT`` for one (then it answers
with the previous walk's figures).

Each process has its own registry (not prometheus_client's global one), so several apps in one process,
as in the tests, never mix their counts.
"""

from __future__ import annotations

import asyncio
import re
import time
from typing import Protocol

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from casimg import stats
from casimg.blobs import BlobStore
from casimg.index import Index
from casimg.queue import JobQueue
from casimg.worker import Worker

# The text format every Prometheus version reads (newer clients default to 1.0.0, which older servers refuse).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Requests range from sub-millisecond image reads to POST ?wait=60.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
DISK_WALK_DUTY = 0.1  # share of the time at most spent walking the blob tree: a 3 s walk is reused for 30 s
DISK_WALK_WAIT = 1.0  # seconds a scrape waits for a walk before answering with the last one's figures
REASON_CUT = re.compile(r" \(|: | '|\"")  # what follows is a detail (a size, a name) that would explode the labels
REASON_MAX = 40

prometheus_client.disable_created_metrics()  # the *_created series double the output and nobody reads them


def reason_label(reason: str) -> str:
    """A failure reason with its variable detail cut off, so the label has a small, fixed set of values.

    "too large (over 52428800 bytes)" -> "too large"; "truncated or corrupt image (...)" -> "truncated or
    corrupt image"; "HTTP 404" stays.
    """
    return REASON_CUT.split(reason, maxsplit=1)[0][:REASON_MAX]


class Scraped(Protocol):
    """What a scrape reads besides the counters: the services of the process (services.Services)."""

    index: Index
    queue: JobQueue
    blobs: BlobStore
    worker: Worker | None


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("casimg_http_requests", "HTTP requests answered, by route, method and status",
                                ["route", "method", "status"], registry=r)
        self.latency = Histogram("casimg_http_request_duration_seconds", "Time to answer an HTTP request",
                                 ["route", "method"], buckets=LATENCY_BUCKETS, registry=r)
        self.downloads = Counter(
            "casimg_downloads", "URLs finished by the workers of this process, by outcome "
            "(stored, deduplicated, exists, failed) and failure reason", ["outcome", "reason"], registry=r)
        self.downloaded_bytes = Counter("casimg_downloaded_bytes", "Bytes received from origins", registry=r)
        self.stored_bytes = Counter("casimg_stored_bytes", "Bytes of new content written to the blob store",
                                    registry=r)
        self.dedup_hits = Counter("casimg_dedup_hits", "New URLs whose content was stored already", registry=r)
        self.queue = Gauge("casimg_queue_entries", "Queue entries waiting to be read or in progress",
                           ["state"], registry=r)
        self.jobs = Gauge("casimg_jobs", "Unexpired jobs by status", ["status"], registry=r)
        self.in_flight = Gauge("casimg_downloads_in_flight", "Downloads running in this process", registry=r)
        self.urls = Gauge("casimg_urls", "URLs in the index", registry=r)
        self.blobs = Gauge("casimg_blobs", "Distinct contents referenced by the index", registry=r)
        self.store_bytes = Gauge("casimg_blob_store_bytes", "Bytes of the files in the blob store", registry=r)
        self.store_files = Gauge("casimg_blob_store_files", "Files in the blob store", registry=r)
        # labels() takes a lock and builds a tuple: look each combination up once.
        self._request_children: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}
        self._next_walk = 0.0
        self._walk: asyncio.Future[tuple[int, int, float]] | None = None
        self._scrape_lock = asyncio.Lock()

    # -- the hot path: no I/O ---------------------------------------------------------------------

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        key = (route, method, status)
        children = self._request_children.get(key)
        if children is None:
            children = (self.requests.labels(route, method, str(status)), self.latency.labels(route, method))
            self._request_children[key] = children
        children[0].inc()
        children[1].observe(seconds)

    def on_outcome(self, kind: str, reason: str) -> None:
        self.downloads.labels(kind, reason_label(reason)).inc()
        if kind == "deduplicated":
            self.dedup_hits.inc()

    def on_bytes(self, kind: str, size: int) -> None:
        (self.downloaded_bytes if kind == "downloaded" else self.stored_bytes).inc(size)

    # -- a scrape ---------------------------------------------------------------------------------

    async def render(self, services: Scraped) -> bytes:
        async with self._scrape_lock:
            await self._refresh(services)
            return prometheus_client.generate_latest(self.registry)

    async def _refresh(self, services: Scraped) -> None:
        urls, contents = await stats.index_sizes(services.index)
        depth = await services.queue.depth()
        jobs = await services.queue.count_by_status()
        self.urls.set(urls)
        self.blobs.set(contents)
        for state, count in depth.items():
            self.queue.labels(state).set(count)
        for status, count in jobs.items():
            self.jobs.labels(status).set(count)
        self.in_flight.set(services.worker.busy if services.worker is not None else 0)
        await self._refresh_usage(services)

    async def _refresh_usage(self, services: Scraped) -> None:
        """Walk the blob tree when the last walk is old enough; a walk still running is left to finish."""
        if self._walk is None and time.monotonic() >= self._next_walk:
            self._walk = asyncio.get_running_loop().run_in_executor(None, _timed_usage, services.blobs)
        if self._walk is None:
            return
        await asyncio.wait([self._walk], timeout=DISK_WALK_WAIT)
        if not self._walk.done():
            return
        walk, self._walk = self._walk, None
        try:
            files, size, took = walk.result()
        except OSError:
            self._next_walk = time.monotonic() + DISK_WALK_WAIT / DISK_WALK_DUTY
            return
        self._next_walk = time.monotonic() + took / DISK_WALK_DUTY
        self.store_files.set(files)
        self.store_bytes.set(size)


def _timed_usage(blobs: BlobStore) -> tuple[int, int, float]:
    started = time.monotonic()
    files, size = blobs.usage()
    return files, size, time.monotonic() - started
