"""Prometheus metrics, served at GET /metrics: for every casimg process of a host at once under
``casimg serve`` and ``casimg worker``, for one process elsewhere (the tests' in-process apps).

Counters are bumped where things happen: once per HTTP request (handlers.log_request) and once per
download outcome (the worker's hooks), with no Redis call. Gauges that need Redis or the disk (queue
depth, jobs by status, index sizes, blob store size) describe the service, not a process: the process
that answers a scrape computes them then, so the hot path pays nothing for them. The blob store size
comes from a walk of the blob tree in a thread; on a large store that takes seconds, so a walk is reused
long enough that walking takes at most ``DISK_WALK_DUTY`` of the time, and a scrape waits at most
``DISK_WALK_WAIT`` for one (then it answers with the previous walk's figures).

Across processes (``Metrics.shared``): ``casimg serve --processes N`` and every ``casimg worker`` on the
same data dir and host write their counters and histograms into one directory,
``/dev/shm/casimg-metrics-<hash of the data dir's path>/<boot id>/`` (``shared_root``), with
prometheus_client's multiprocess mode (one memory-mapped file per process and type), and a scrape
of any of them sums the files. Chosen over one aggregated registry
(children sending counts to the parent, or to Redis) because the hot path stays a write to memory with
no message and no I/O, a process killed with -9 keeps what it counted (the pages belong to the file),
and a ``casimg worker``, which is nobody's child, joins by opening the directory.

Files are named by slot, not by pid: a process claims the lowest free slot (an flock on
``slot-N.lock``, held for its life and released by the kernel however it ends) and carries on that
slot's counts where its last holder left them. So the directory holds at most as many slots as
processes ever ran at once on the host; restarts add no file, lose no count and count nothing twice:
while any process of the data dir runs, totals never go back. The last process to stop cleanly removes
the data dir's directory, so the next start counts from zero, which Prometheus reads as a counter reset
(a process killed with -9 leaves it, and the next start carries on). The directory is per boot id:
processes of another host on a shared data dir (a worker elsewhere) keep their own, which their own
/metrics serves, and a reboot starts again from zero. When a process joins, the directories of earlier
boots, and those of data dirs that no longer exist (each names its data dir in ``data-dir``), are
removed unless a process holds a slot in them. Joining and that removal are one step each under an
flock on the data dir's directory, so a process never joins a directory being removed.

The one per-process gauge, downloads in flight, is in mode ``livesum``: each process publishes its
count every ``PUBLISH_INTERVAL``, and the gauge file of a slot whose holder is gone is removed
(``mark_process_dead``) by the holder as it stops, or after a crash by the next scrape.

Unshared, each ``Metrics`` has its own registry (not prometheus_client's global one), so several apps
in one process, as in the tests, never mix their counts.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import glob
import hashlib
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, values
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from casimg.index import Index
from casimg.queue import JobQueue
from casimg.schema import Outcome
from casimg.storage import Storage, StorageUnavailable
from casimg.worker import Worker

# The text format every Prometheus version reads (newer clients default to 1.0.0, which older servers refuse).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Requests range from sub-millisecond image reads to POST ?wait=60.
RENDER_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)  # a thumbnail to a 1,600-px AVIF
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
DISK_WALK_DUTY = 0.1  # share of the time at most spent walking the blob tree: a 3 s walk is reused for 30 s
DISK_WALK_WAIT = 1.0  # seconds a scrape waits for a walk before answering with the last one's figures
REASON_CUT = re.compile(r" \(|: | '|\"")  # what follows is a detail (a size, a name) that would explode the labels
REASON_MAX = 40
PUBLISH_INTERVAL = 1.0  # seconds: how old another process's in-flight count may be in a scrape
# Where the shared files go: a memory file system first. Not the data dir: there a full or read-only blob
# disk would take the counters down with it, and a process with it (a write to a memory-mapped page the
# disk has no room for is a SIGBUS), and a read-only remount would fail while the files are open.
RUNTIME_DIRS = (Path("/dev/shm"), Path(tempfile.gettempdir()))
SHARED_FILES = ("counter", "histogram", "gauge_livesum")  # the kinds of file a process writes (see SharedDir)
SHARED_PREFIX = "casimg-metrics-"
DATA_DIR_FILE = "data-dir"  # in each data dir's directory: its path, so that it can go when the data dir has gone
# A metric file starts with the 4-byte count of its used bytes, padded to 8 (prometheus_client.mmap_dict).
METRIC_FILE_HEADER = 8
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")  # the same for every process (and container) of one boot

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
    blobs: Storage
    worker: Worker | None


class Metrics:
    def __init__(self, shared: SharedDir | None = None) -> None:
        """Unshared: counts of this process in a registry of its own. Shared: counts in `shared`'s files,
        which this process must have joined (``Metrics.shared`` does both)."""
        self.shared_dir = shared
        self.registry = CollectorRegistry()
        # Shared counters are read back from the files by the collector, never from a registry.
        r = None if shared else self.registry
        self.requests = Counter("casimg_http_requests", "HTTP requests answered, by route, method and status",
                                ["route", "method", "status"], registry=r)
        self.latency = Histogram("casimg_http_request_duration_seconds", "Time to answer an HTTP request",
                                 ["route", "method"], buckets=LATENCY_BUCKETS, registry=r)
        self.downloads = Counter(
            "casimg_downloads", "URLs finished by the workers, by outcome "
            "(stored, deduplicated, exists, failed, cancelled) and failure reason", ["outcome", "reason"], registry=r)
        self.downloaded_bytes = Counter("casimg_downloaded_bytes", "Bytes received from origins", registry=r)
        self.stored_bytes = Counter("casimg_stored_bytes", "Bytes of new content written to the blob store",
                                    registry=r)
        self.dedup_hits = Counter("casimg_dedup_hits", "New URLs whose content was stored already", registry=r)
        self.renders = Counter("casimg_variant_renders", "Variants rendered (by this host's processes)", registry=r)
        self.variant_hits = Counter("casimg_variant_cache_hits", "Variant requests answered from a stored variant",
                                    registry=r)
        self.render_time = Histogram("casimg_variant_render_seconds", "Time to render a variant in the pool",
                                     buckets=RENDER_BUCKETS, registry=r)
        self.webhooks = Counter("casimg_webhook_deliveries", "Job callback POSTs by result: delivered (a 2xx), "
                                "retried (failed, tried again later), failed (given up)", ["result"], registry=r)
        self.in_flight = Gauge("casimg_downloads_in_flight", "Downloads running", registry=r,
                               multiprocess_mode="livesum")
        self.scraped = ScrapedGauges()
        self.registry.register(self.scraped)
        if shared is not None:
            SizedFilesCollector(self.registry, str(shared.path))
        # labels() takes a lock and builds a tuple: look each combination up once.
        self._request_children: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}
        self._next_walk = 0.0
        self._walk: asyncio.Future[tuple[int, int, float]] | None = None
        self._scrape_lock = asyncio.Lock()
        self._publisher: asyncio.Task[None] | None = None

    @classmethod
    def shared(cls, data_dir: str | Path) -> Metrics:
        """Metrics counted with every other process of this host on `data_dir` (see the module's docstring)."""
        return cls(SharedDir.join(data_dir))

    def start_publishing(self, worker: Worker) -> None:
        """Keep this process's in-flight count in its file, for scrapes answered by another process."""
        if self.shared_dir is not None:
            self._publisher = asyncio.create_task(self._publish(worker))

    async def _publish(self, worker: Worker) -> None:
        while True:
            self.in_flight.set(worker.busy)
            await asyncio.sleep(PUBLISH_INTERVAL)

    async def close(self) -> None:
        """At stop, after the worker: this process's in-flight gauge goes, its slot is free."""
        if self._publisher is not None:
            self._publisher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._publisher
        if self.shared_dir is not None:
            self.shared_dir.leave()

    # -- the hot path: no I/O ---------------------------------------------------------------------

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        key = (route, method, status)
        children = self._request_children.get(key)
        if children is None:
            children = (self.requests.labels(route, method, str(status)), self.latency.labels(route, method))
            self._request_children[key] = children
        children[0].inc()
        children[1].observe(seconds)

    def on_outcome(self, kind: Outcome, reason: str) -> None:
        self.downloads.labels(kind.value, reason_label(reason)).inc()
        if kind is Outcome.DEDUPLICATED:
            self.dedup_hits.inc()

    def on_render(self, seconds: float) -> None:
        self.renders.inc()
        self.render_time.observe(seconds)

    def on_variant_hit(self) -> None:
        self.variant_hits.inc()

    def on_webhook(self, result: str) -> None:
        self.webhooks.labels(result).inc()

    def on_bytes(self, kind: str, size: int) -> None:
        (self.downloaded_bytes if kind == "downloaded" else self.stored_bytes).inc(size)

    # -- a scrape ---------------------------------------------------------------------------------

    async def render(self, services: Scraped) -> bytes:
        async with self._scrape_lock:
            await self._refresh(services)
            # Reading the other processes' files is disk work: off the loop.
            return await asyncio.get_running_loop().run_in_executor(None, self._collect)

    def _collect(self) -> bytes:
        if self.shared_dir is not None:
            self.shared_dir.forget_dead()
        return prometheus_client.generate_latest(self.registry)

    async def _refresh(self, services: Scraped) -> None:
        urls, contents = await services.index.sizes()
        self.scraped.values["urls"] = urls
        self.scraped.values["blobs"] = contents
        self.scraped.queue = await services.queue.depth()
        self.scraped.jobs = await services.queue.count_by_status()
        self.in_flight.set(services.worker.busy if services.worker is not None else 0)
        await self._refresh_usage(services)

    async def _refresh_usage(self, services: Scraped) -> None:
        """Walk the blob tree when the last walk is old enough; a walk still running is left to finish."""
        if self._walk is None and time.monotonic() >= self._next_walk:
            self._walk = asyncio.ensure_future(_timed_usage(services.blobs))
        if self._walk is None:
            return
        await asyncio.wait([self._walk], timeout=DISK_WALK_WAIT)
        if not self._walk.done():
            return
        walk, self._walk = self._walk, None
        try:
            files, size, took = walk.result()
        except (OSError, StorageUnavailable):
            self._next_walk = time.monotonic() + DISK_WALK_WAIT / DISK_WALK_DUTY
            return
        self._next_walk = time.monotonic() + took / DISK_WALK_DUTY
        self.scraped.values["blob_store_files"] = files
        self.scraped.values["blob_store_bytes"] = size


async def _timed_usage(blobs: Storage) -> tuple[int, int, float]:
    started = time.monotonic()
    files, size = await blobs.usage()
    return files, size, time.monotonic() - started


class SizedFilesCollector(MultiProcessCollector):
    """prometheus_client's collector of every process's metric files, skipping the files too short to hold
    their header. A process creates its file empty and sizes it a moment later (and leaves it empty for
    good if it dies in between): read then, it raised struct.error and failed the whole scrape with a 500
    (seen in CI while a worker started). Such a file holds no sample yet."""

    def collect(self) -> Any:
        files = [path for path in glob.glob(os.path.join(self._path, "*.db")) if _has_header(path)]
        return self.merge(files, accumulate=True)


def _has_header(path: str) -> bool:
    try:
        return os.path.getsize(path) >= METRIC_FILE_HEADER
    except OSError:  # gone since the listing
        return False


class ScrapedGauges:
    """The gauges of the whole service, read from Redis and the disk by the process answering a scrape;
    never written to the shared files, so several processes never add them up."""

    HELP = {
        "urls": "URLs in the index",
        "blobs": "Distinct contents referenced by the index",
        "blob_store_bytes": "Bytes of the files in the blob store",
        "blob_store_files": "Files in the blob store",
    }

    def __init__(self) -> None:
        self.values: dict[str, float] = dict.fromkeys(self.HELP, 0)
        self.queue: dict[str, int] = {}
        self.jobs: dict[str, int] = {}

    def collect(self) -> Iterator[Metric]:
        queue = GaugeMetricFamily("casimg_queue_entries", "Queue entries waiting to be read or in progress",
                                  labels=["state"])
        for state, count in self.queue.items():
            queue.add_metric([state], count)
        jobs = GaugeMetricFamily("casimg_jobs", "Unexpired jobs by status", labels=["status"])
        for status, count in self.jobs.items():
            jobs.add_metric([status], count)
        yield queue
        yield jobs
        for name, text in self.HELP.items():
            yield GaugeMetricFamily("casimg_" + name, text, value=self.values[name])


class SharedDir:
    """The directory the casimg processes of one host count into, and this process's slot in it.

    Drawn::

        <shared root>/data-dir                     the data dir's real path (flock on <shared root>: join, removal)
        <shared root>/<boot id>/slot-0.lock         flock held by the slot's process while it runs
                                counter_0.db         its counters (and those of earlier holders)
                                histogram_0.db
                                gauge_livesum_0.db   its downloads in flight; removed when it stops
    """

    def __init__(self, path: Path, slot: int, lock_fd: int) -> None:
        self.path = path
        self.slot = slot
        self._lock_fd = lock_fd

    @classmethod
    def join(cls, data_dir: str | Path) -> SharedDir:
        """Claim a slot and switch prometheus_client to multiprocess mode for this process.

        Once per process: the mode is a setting of the prometheus_client module, which reads the
        directory from PROMETHEUS_MULTIPROC_DIR whenever it opens a file.
        """
        root = shared_root(data_dir)
        _remove_orphans(root.parent)
        with _locked_root(root):
            (root / DATA_DIR_FILE).write_text(str(Path(data_dir).resolve()))
            path = root / host_id()
            path.mkdir(mode=0o700, exist_ok=True)
            _remove_earlier_boots(root, path)
            slot, fd = _claim_slot(path)
            # Every file now, not at the first count of its kind, so a process that answers already has them all.
            for kind in SHARED_FILES:
                MmapedDict(str(path / f"{kind}_{slot}.db")).close()
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(path)
        name = str(slot)
        values.ValueClass = values.MultiProcessValue(lambda: name)
        return cls(path, slot, fd)

    def forget_dead(self) -> None:
        """Remove the in-flight gauges of slots whose process is gone (killed before it could)."""
        for lock in self.path.glob("slot-*.lock"):
            slot = int(lock.stem.removeprefix("slot-"))
            if slot == self.slot:
                continue
            with _slot_if_free(lock) as free:
                if free:
                    mark_process_dead(slot, str(self.path))

    def leave(self) -> None:
        """Give the slot up; the last process of the data dir to leave removes the directory."""
        mark_process_dead(self.slot, str(self.path))
        os.close(self._lock_fd)  # releases the flock: the next process to join may take the slot
        _remove_unless_held(self.path.parent)


def shared_root(data_dir: str | Path) -> Path:
    """The directory of the host's processes on `data_dir`, named by the data dir's real path."""
    name = SHARED_PREFIX + hashlib.sha256(str(Path(data_dir).resolve()).encode()).hexdigest()[:16]
    base = next((d for d in RUNTIME_DIRS if d.is_dir() and os.access(d, os.W_OK)), RUNTIME_DIRS[-1])
    return base / name


def host_id() -> str:
    """The kernel's boot id (one per host and boot, containers included); the host name where there is none."""
    try:
        return BOOT_ID.read_text().strip()
    except OSError:
        return socket.gethostname()


@contextlib.contextmanager
def _locked_root(root: Path) -> Iterator[None]:
    """`root`, created if need be, locked (flock on the directory) against a removal by the last process
    to leave (``_remove_unless_held``) while this one joins."""
    while True:
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:
            continue  # removed between the two calls: make it again
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if _same_file(fd, root):
                yield
                return
        finally:
            os.close(fd)
        # The lock was on a directory that the last process removed while this one waited: start again.


def _same_file(fd: int, path: Path) -> bool:
    try:
        found = path.stat()
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (found.st_dev, found.st_ino) == (held.st_dev, held.st_ino)


def _remove_unless_held(root: Path) -> None:
    """Remove `root` (a data dir's directory, every boot's) when no process holds a slot in it."""
    try:
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        if not _same_file(fd, root):
            return
        with contextlib.ExitStack() as held:
            if all(held.enter_context(_slot_if_free(lock)) for lock in root.glob("*/slot-*.lock")):
                shutil.rmtree(root, ignore_errors=True)
    finally:
        os.close(fd)


def _remove_orphans(base: Path) -> None:
    """Remove the directories of data dirs that no longer exist (a test's temporary one, say), unless a
    process still holds a slot there. A directory that does not name its data dir is left alone."""
    for root in base.glob(SHARED_PREFIX + "*"):
        try:
            data_dir = (root / DATA_DIR_FILE).read_text()
        except OSError:
            continue
        if data_dir and not Path(data_dir).exists():
            _remove_unless_held(root)


def _claim_slot(path: Path) -> tuple[int, int]:
    slot = 0
    while True:
        fd = os.open(path / f"slot-{slot}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            slot += 1
            continue
        return slot, fd


@contextlib.contextmanager
def _slot_if_free(lock: Path) -> Iterator[bool]:
    """Hold the slot's lock for the block if no process holds it (True), else do nothing (False)."""
    try:
        fd = os.open(lock, os.O_RDWR)
    except FileNotFoundError:
        yield False
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def _remove_earlier_boots(root: Path, current: Path) -> None:
    """The directories of other boot ids with no slot held: the host rebooted since they were written."""
    for other in root.iterdir():
        if other == current or not other.is_dir():
            continue
        with contextlib.ExitStack() as held:
            if all(held.enter_context(_slot_if_free(lock)) for lock in other.glob("slot-*.lock")):
                shutil.rmtree(other, ignore_errors=True)
