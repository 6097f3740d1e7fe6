"""Download workers: read queue entries, fetch, validate, store, record the outcome.

One ``Worker`` per process runs up to ``download_concurrency`` entries at once. It is the same code in
``casimg serve`` (in-process, the default) and ``casimg worker`` (alone, beside other processes on the
same Redis and blob directory).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
import time
from collections.abc import Callable
from functools import partial

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from casimg.blobs import BlobStore
from casimg.config import Settings
from casimg.errors import DownloadFailed
from casimg.fetcher import Fetcher
from casimg.fsck import sweep
from casimg.index import Index, encode_meta
from casimg.lifecycle import store_blob
from casimg.queue import Entry, JobQueue
from casimg.validation import validate_image

log = logging.getLogger("casimg.worker")

READ_BLOCK_MS = 1000  # how long one XREADGROUP waits for new entries; also the stop latency
MAX_ATTEMPTS = 3  # one download plus two retries of a transient failure
RETRY_BASE = 0.5  # seconds before the first retry; doubled each time, with full jitter
RETRY_AFTER_CAP = 30.0  # an origin's Retry-After beyond this is not waited for
REDIS_RETRY = 1.0  # seconds between tries while Redis is away
REDIS_ERRORS = (RedisConnectionError, RedisTimeoutError)


def consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{os.urandom(3).hex()}"


class Worker:
    def __init__(
        self,
        settings: Settings,
        queue: JobQueue,
        index: Index,
        blobs: BlobStore,
        fetcher: Fetcher,
        on_outcome: Callable[[str, str], None] | None = None,
    ) -> None:
        self.settings = settings
        self.queue = queue
        self.index = index
        self.blobs = blobs
        self.fetcher = fetcher
        self.name = consumer_name()
        self.on_outcome = on_outcome or (lambda outcome, reason: None)
        self._slots = asyncio.Semaphore(settings.download_concurrency)
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = asyncio.Event()
        self._runner: asyncio.Task[None] | None = None
        self._heart: asyncio.Task[None] | None = None
        self._sweeper: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._runner = asyncio.ensure_future(self._run())
        self._heart = asyncio.ensure_future(self._heartbeat())
        if self.settings.sweep_interval > 0:
            self._sweeper = asyncio.ensure_future(self._sweep_periodically())

    async def stop(self, grace: float) -> None:
        """Stop reading; give in-flight downloads `grace` seconds, then return the rest to the queue."""
        self._stopping.set()
        if self._runner:
            with contextlib.suppress(asyncio.CancelledError, *REDIS_ERRORS):
                await self._runner
        if self._tasks:
            _, unfinished = await asyncio.wait(self._tasks, timeout=grace)
            for task in unfinished:
                task.cancel()
            await asyncio.gather(*unfinished, return_exceptions=True)
        for helper in (self._heart, self._sweeper):
            if helper:
                helper.cancel()
                await asyncio.gather(helper, return_exceptions=True)
        # Entries we did not finish stay pending under our name; without our heartbeat, the next worker
        # to look claims them at once instead of waiting for it to expire.
        with contextlib.suppress(*REDIS_ERRORS):
            await self.queue.retire(self.name)

    @property
    def busy(self) -> int:
        return len(self._tasks)

    async def _heartbeat(self) -> None:
        while True:
            with contextlib.suppress(*REDIS_ERRORS):
                await self.queue.heartbeat(self.name, self.settings.worker_heartbeat)
            await asyncio.sleep(self.settings.worker_heartbeat / 3)

    async def _sweep_periodically(self) -> None:
        interval = self.settings.sweep_interval
        while True:
            await asyncio.sleep(interval * random.uniform(0.5, 1.0))
            try:
                # One sweeper at a time across all workers; the lock expires with the interval.
                if await self.index.redis.set(self.index.keys.sweep_lock, self.name, nx=True, px=int(interval * 1000)):
                    done = await sweep(self.index, self.blobs, self.settings.tmp_grace)
                    log.info("sweep: %d file(s) cleared", len(done))
            except (*REDIS_ERRORS, OSError) as exc:
                log.warning("sweep skipped: %s", exc)

    async def _run(self) -> None:
        await self.queue.heartbeat(self.name, self.settings.worker_heartbeat)
        next_claim = 0.0
        while not self._stopping.is_set():
            try:
                await self._slots.acquire()
                self._slots.release()
                free = self.settings.download_concurrency - len(self._tasks)
                entries: list[Entry] = []
                if time.monotonic() >= next_claim:
                    next_claim = time.monotonic() + self.settings.worker_heartbeat / 2
                    entries = await self.queue.claim_from_dead(self.name, free)
                if not entries:
                    entries = await self.queue.read(self.name, free, READ_BLOCK_MS)
                for entry in entries:
                    await self._slots.acquire()
                    task = asyncio.ensure_future(self._process(entry))
                    self._tasks.add(task)
                    task.add_done_callback(self._finished)
            except REDIS_ERRORS as exc:
                log.warning("queue unavailable (%s); retrying in %.0f s", type(exc).__name__, REDIS_RETRY)
                await asyncio.sleep(REDIS_RETRY)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._slots.release()
        if not task.cancelled() and task.exception() is not None:
            log.error("download task failed", exc_info=task.exception())

    async def _process(self, entry: Entry) -> None:
        """Run one entry to a recorded outcome; Redis outages are waited out, never turned into failures."""
        while True:
            try:
                await self._attempt_all(entry)
                return
            except REDIS_ERRORS as exc:
                if self._stopping.is_set():
                    return  # stays pending; the next worker takes it
                log.warning("redis unavailable while storing %s (%s); retrying", entry.url, type(exc).__name__)
                await asyncio.sleep(REDIS_RETRY)

    async def _attempt_all(self, entry: Entry) -> None:
        known = await self.index.digest_of(entry.url)
        if known is not None:
            await self.index.complete(
                entry.job_id, entry.position, entry.entry_id, {"status": "exists", "sha256": known}, "existed"
            )
            self.on_outcome("exists", "")
            return
        attempt = 0
        while True:
            attempt += 1
            try:
                outcome = await self._download_and_store(entry, attempt)
            except DownloadFailed as failure:
                if failure.permanent or attempt >= MAX_ATTEMPTS or self._stopping.is_set():
                    log.info("failed %s: %s (attempts: %d)", entry.url, failure.reason, attempt)
                    await self.index.complete(
                        entry.job_id, entry.position, entry.entry_id,
                        {"status": "failed", "error": failure.reason, "attempts": attempt}, "failed",
                    )
                    self.on_outcome("failed", failure.reason)
                    return
                await asyncio.sleep(self._backoff(attempt, failure.retry_after))
                continue
            log.info("%s %s (attempts: %d)", outcome, entry.url, attempt)
            return

    @staticmethod
    def _backoff(attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, RETRY_AFTER_CAP)
        return random.uniform(0, RETRY_BASE * 2 ** (attempt - 1))

    async def _download_and_store(self, entry: Entry, attempt: int) -> str:
        try:
            return await self._download_and_store_unguarded(entry, attempt)
        except OSError as exc:
            # The data directory is unwritable or full: the URL fails, the service stays up.
            raise DownloadFailed(f"storage error: {exc.strerror or exc}", permanent=True) from None

    async def _download_and_store_unguarded(self, entry: Entry, attempt: int) -> str:
        downloaded = await self.fetcher.fetch(entry.url)
        try:
            info = await asyncio.get_running_loop().run_in_executor(
                None,
                partial(
                    validate_image,
                    downloaded.path,
                    max_pixels=self.settings.max_pixels,
                    allowed_formats=frozenset(f.upper() for f in self.settings.allowed_formats),
                    max_frames=self.settings.max_frames,
                    mode=self.settings.validation,
                ),
            )
        except BaseException:
            self.blobs.discard(downloaded.path)
            raise
        outcome = await store_blob(
            self.blobs, self.index, downloaded.path, entry.url, downloaded.sha256,
            encode_meta(downloaded.size, info),
            job_id=entry.job_id, position=entry.position, entry_id=entry.entry_id, attempts=attempt,
        )
        kind = "deduplicated" if outcome.deduplicated else outcome.outcome
        self.on_outcome(kind, "")
        return kind
