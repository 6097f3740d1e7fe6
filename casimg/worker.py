"""Download workers: read queue entries, fetch, validate, store, record the outcome.

One ``Worker`` per process runs up to ``download_concurrency`` downloads at once. It is the same code in
``casimg serve`` (in-process, the default) and ``casimg worker`` (alone, beside other processes on the
same Redis and blob directory).

An entry goes through two stages, each with its own bound, so that storing one image overlaps the
downloads of the next ones instead of holding their connection slot:

1. download: a slot of ``download_concurrency`` is held from the queue read until the body is in, but
   not while the URL waits to be retried, nor while it waits for its origin: its rate or cool-down
   (``_wait_for_origin``), or a turn under the caps per address and domain (``_Lent``); past a bound on
   a key's entries waiting so, its queue is read no further meanwhile (FairSlots.step_away).
   Slots are shared between API keys by scheduler.FairSlots: the worker reads from each key's stream
   only what that key may take, so one key's backlog or slow URLs cannot keep another key's first URL
   waiting for more than about a queue read. It reads up to ``READ_AHEAD`` x ``download_concurrency``
   entries beyond its free slots, which wait for one: a queue read takes about as long as a download
   from a fast origin;
2. store: up to ``STORE_DEPTH`` x ``download_concurrency`` bodies at once are validated, written and
   linked in (one trip to a thread each); then, holding no bytes in memory (on the file store; an object
   store's commit keeps the body's place), up to ``FINISH_DEPTH`` x ``download_concurrency`` of them
   are made durable together (one ``FlushGroup`` flush for all of them), indexed (one Redis pipeline
   for the stores of a loop turn) and settled (one trip to a thread for them). Each step takes its
   place before it gives the last one back, so when storing falls behind, downloading waits, and the
   bytes held in memory stay bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import hashlib
import logging
import os
import random
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from redis.exceptions import ResponseError

from casimg import tracing
from casimg.batching import ThreadBatcher
from casimg.config import Settings
from casimg.errors import REDIS_ERRORS, DownloadFailed
from casimg.fetcher import Downloaded, Fetcher
from casimg.fsck import sweep
from casimg.index import BlobMeta, Index
from casimg.lifecycle import store_blob
from casimg.logtext import clip
from casimg.politeness import COOLING_STATUSES, OriginPace, origin_of
from casimg.queue import Entry, JobQueue
from casimg.scheduler import FairSlots
from casimg.schema import Outcome
from casimg.storage import Storage, StorageUnavailable
from casimg.storage.active import ActiveStore
from casimg.storage.file import FileStore, FlushGroup
from casimg.validation import ImageInfo, validator
from casimg.webhooks import Deliverer

log = logging.getLogger("casimg.worker")

READ_BLOCK_MS = 1000  # how long one XREADGROUP waits for new entries; also the stop latency
# An idle worker blocks on the queues of the keys it knows, and on the wake stream, which a key it does not
# know yet (the first job of a key in an hour) wakes (queue.JobQueue.wait_for_entries). Between two waits
# it looks at the list of keys again, so a wake that went to another worker costs this one no more than
# IDLE_BLOCK_MS: a new key's first entry once waited up to READ_BLOCK_MS (BENCHMARKS.md, "Figures behind
# design choices"). Five round trips a second when idle.
IDLE_BLOCK_MS = 200
# A busy worker reuses the list of keys with queued entries for this long, and looks into the queues of
# keys holding no slot (newcomers) at most this often while its other slots are all taken: a round trip
# on every slot given back slowed the ingest of a single key (BENCHMARKS.md). A new key waits that
# much longer for its first read, a fraction of a second.
OWNERS_REFRESH = 0.5
PROBE_INTERVAL = 0.1
MAX_ATTEMPTS = 3  # one download plus two retries of a transient failure
# A URL whose processing ended with its worker this many times fails instead of going to the next one: a
# file that crashes the process (a decoder bug, say) must not take down every worker in turn, for ever.
MAX_DELIVERIES = 5
# Bodies being stored at once, per download slot. A store waits for a flush of the disk (tens of ms) and a
# Redis step, several times a download's own time on a fast origin: with one place per slot, the stores
# in progress would cap the ingest at a few hundred images a second.
STORE_DEPTH = 2
# Stores past their bytes (the temp file is written) being made durable, indexed and settled, per
# download slot. They hold no body, only a task and a temp file, so more of them may wait for the flush
# and the Redis step; while they held a body's place, those waits (tens of ms, under load) kept the
# places full and the downloads waiting for them (BENCHMARKS.md, "Figures behind design choices").
FINISH_DEPTH = 4
# Queue entries read beyond the free download slots, per slot, to wait for one. On a busy loop, a queue
# read and the batch lookup that follows take about as long as a download from a fast origin: a reader
# that asked only for the slots free when it began kept most of them idle (BENCHMARKS.md, "Figures
# behind design choices"). They are pending under this worker's name, as any entry it reads.
READ_AHEAD = 1
# A URL's attempts together may download for this many times the fetch timeout. One timeout is often a
# passing stall (a server restarting, a lost connection), so it is worth one more try, but a second full
# timeout would hold a slot twice as long as the operator set: a URL that timed out once is tried again
# with what is left, half a fetch timeout at most. A quick transient failure (a 503 in milliseconds)
# leaves nearly all of it. Slot time per URL is bounded by RETRY_BUDGET x fetch_timeout in total.
RETRY_BUDGET = 1.5
RETRY_BASE = 0.5  # seconds before the first retry; doubled each time, with full jitter
RETRY_AFTER_CAP = 30.0  # an origin's Retry-After beyond this is not waited for
HELPER_STOP_TIMEOUT = 5.0  # seconds stop() waits for the heartbeat and sweep loops before cancelling them
REDIS_RETRY = 1.0  # seconds between tries while Redis is away
# Entries of one key that may wait for their origin (its rate, its cool-down, a turn under the caps)
# without a slot, per slot (FairSlots.step_away): enough that a slow or paced origin's backlog does not
# keep the key's slots from its other origins, few enough to bound the entries read ahead (each waits as
# a task, pending under this worker's name). Past AWAY_KEYS times that from all keys together, a further
# one counts as an entry waiting for a slot.
AWAY_PER_SLOT = 4
AWAY_KEYS = 2
# Validations of recent contents kept for their repeats (digest -> ImageInfo, about 300 bytes each, about
# 1 MB): checking a repeat again was a sizeable part of what it cost (BENCHMARKS.md, "Figures behind
# design choices"). Per process: with several, only the process that checked the first copy skips it.
VALIDATED_KEPT = 4096
COOLING_REASONS = frozenset(f"HTTP {status}" for status in COOLING_STATUSES)


class _Lookup(enum.Enum):
    """What the batch lookup says of an entry besides its digest."""

    UNCHECKED = enum.auto()
    CANCELLED = enum.auto()


# An entry's `known` digest when the batch lookup failed (apart from None, "not indexed"): its task asks again.
UNCHECKED = _Lookup.UNCHECKED
# ... and when its job was cancelled: its task only takes it off the queue (the cancel wrote its result).
CANCELLED = _Lookup.CANCELLED
Known = str | _Lookup | None


def _log_outcome(outcome: Outcome, url: str, attempts: int, reason: str = "") -> None:
    """The one log line per finished URL: stored, deduplicated, exists or failed."""
    if tracing.enabled:
        tracing.annotate({"casimg.outcome": outcome.value, "casimg.attempts": attempts, "casimg.reason": reason})
    url = clip(url)
    fields = {"event": "download", "outcome": outcome.value, "url": url, "attempts": attempts}
    if reason:
        fields["reason"] = reason
        log.info("failed %s: %s (attempts: %d)", url, reason, attempts, extra={"fields": fields})
    elif attempts:
        log.info("%s %s (attempts: %d)", outcome, url, attempts, extra={"fields": fields})
    else:
        log.info("%s %s (already indexed)", outcome, url, extra={"fields": fields})


def consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{os.urandom(3).hex()}"


class Worker:
    def __init__(
        self,
        settings: Settings,
        queue: JobQueue,
        index: Index,
        blobs: Storage,
        fetcher: Fetcher,
        on_outcome: Callable[[Outcome, str], None] | None = None,
        on_bytes: Callable[[str, int], None] | None = None,
        pace: OriginPace | None = None,
        webhooks: Deliverer | None = None,
        stores: ActiveStore | None = None,
    ) -> None:
        self.settings = settings
        self.queue = queue
        self.index = index
        self.blobs = blobs
        # The active store record (storage/active.py): each store asks it which driver to write, and
        # which second one during a migration. Without it, `blobs` is the only store.
        self.stores = stores
        self.fetcher = fetcher
        # The file driver links blobs in without an fsync each and makes a batch durable with one syncfs; an
        # object store's commit is durable when it returns.
        # (one per blob directory: after a store migration the active store may be another)
        self._flushers: dict[Path, FlushGroup] = {}
        # The last file step of each store (blobs.settle), for all the stores of a loop turn in one trip to
        # a thread of its own: behind the blocking pool's validations, it would hold their store places.
        self._settle_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="casimg-settle")
        self._settler = ThreadBatcher(self._settle_thread)
        self._validate = validator(settings)
        self._validated: dict[str, ImageInfo] = {}  # digest -> its bytes' validation (_remember_valid)
        self.name = consumer_name()
        self.on_outcome = on_outcome or (lambda outcome, reason: None)
        # ("downloaded", size) for every body received, ("stored", size) for each new content written.
        self.on_bytes = on_bytes or (lambda kind, size: None)
        away = int(AWAY_PER_SLOT * settings.download_concurrency)
        self._slots = FairSlots(settings.download_concurrency, ahead=READ_AHEAD * settings.download_concurrency,
                                away_per_key=away, away_bound=AWAY_KEYS * away)
        self.pace = pace
        self.webhooks = webhooks
        self._owners: list[str] = [""]
        self._owners_read = float("-inf")  # time.monotonic() of the last read of the owners list
        self._probed = float("-inf")  # ... and of the last read of newcomers' queues alone
        self._storing = asyncio.Semaphore(STORE_DEPTH * settings.download_concurrency)
        self._finishing = asyncio.Semaphore(FINISH_DEPTH * settings.download_concurrency)
        self._cancel_asks: dict[str, asyncio.Future[bool]] = {}  # job id -> its question of this turn (_is_cancelled)
        self._questions: set[asyncio.Task[bool]] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._held: set[tuple[str, str]] = set()  # (owner, entry id) of the entries in self._tasks
        self._stopping = asyncio.Event()
        self._runner: asyncio.Task[None] | None = None
        self._heart: asyncio.Task[None] | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._hooks: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._runner = asyncio.ensure_future(self._run())
        self._heart = asyncio.ensure_future(self._heartbeat())
        if self.settings.sweep_interval > 0:
            self._sweeper = asyncio.ensure_future(self._sweep_periodically())
        if self.webhooks is not None:
            self._hooks = asyncio.ensure_future(self.webhooks.run(self._stopping))

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
        for question in list(self._questions):  # left by askers cancelled above
            question.cancel()
        # The helpers end on their own once they see _stopping. Cancelling alone is not enough: redis-py
        # can swallow a cancellation that lands inside a command, and the loop would go on for ever.
        # A callback cut off here stays claimed until its lease ends; then another process delivers it.
        helpers = {helper for helper in (self._heart, self._sweeper, self._hooks) if helper is not None}
        if helpers:
            _, stuck = await asyncio.wait(helpers, timeout=HELPER_STOP_TIMEOUT)
            for helper in stuck:
                helper.cancel()
            await asyncio.gather(*helpers, return_exceptions=True)
        # Entries we did not finish stay pending under our name; without our heartbeat, the next worker
        # to look claims them at once instead of waiting for it to expire.
        with contextlib.suppress(*REDIS_ERRORS):
            await self.queue.retire(self.name)
        for flusher in self._flushers.values():
            flusher.close()
        # A task cancelled above may have handed its settle to the thread already: let it finish (a few
        # system calls each). `serve --processes` children end with os._exit, which joins no thread.
        await asyncio.to_thread(self._settle_thread.shutdown, wait=True)

    @property
    def busy(self) -> int:
        """Entries in progress: downloading, or being stored."""
        return len(self._tasks)

    async def _sleep_unless_stopping(self, seconds: float) -> bool:
        """Sleep `seconds`, or less if the worker stops meanwhile; True while the worker goes on."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)
        return not self._stopping.is_set()

    async def _heartbeat(self) -> None:
        while not self._stopping.is_set():
            with contextlib.suppress(*REDIS_ERRORS):
                await self.queue.heartbeat(self.name, self.settings.worker_heartbeat)
            await self._sleep_unless_stopping(self.settings.worker_heartbeat / 3)

    async def _sweep_periodically(self) -> None:
        interval = self.settings.sweep_interval
        while await self._sleep_unless_stopping(interval * random.uniform(0.5, 1.0)):
            try:
                # One sweeper at a time across all workers; the lock expires with the interval.
                if await self.index.take_sweep_lock(self.name, interval):
                    active = self.stores.active if self.stores is not None else self.blobs
                    done = await sweep(self.index, active, self.settings.tmp_grace)
                    log.info("sweep: %d file(s) cleared", len(done))
            except (*REDIS_ERRORS, OSError, StorageUnavailable) as exc:
                log.warning("sweep skipped: %s", exc)

    async def _run(self) -> None:
        await self.queue.heartbeat(self.name, self.settings.worker_heartbeat)
        next_claim = 0.0
        while not self._stopping.is_set():
            try:
                if self._slots.readable <= 0:
                    await self._slots.changed(READ_BLOCK_MS / 1000)
                    continue
                entries: list[Entry] = []
                if time.monotonic() >= next_claim:
                    next_claim = time.monotonic() + self.settings.worker_heartbeat / 2
                    await self.queue.forget_idle_owners()
                    await self.queue.tidy_wake_readers(self.name)
                    await self.queue.resume_enqueuing()  # jobs whose submitter died while queueing them
                    # (entries held now: none is added while this runs, as only this loop adds them; and
                    # nothing that can fail comes between the claim and the tasks it starts)
                    entries = await self.queue.claim_unattended(self.name, self._slots.readable, set(self._held))
                if not entries:
                    entries = await self._read_fairly()
                if self._stopping.is_set():
                    break  # what was just read or claimed stays pending under our name; stop() retires it
                known = await self._indexed_already(entries)
                for entry, digest in zip(entries, known, strict=True):
                    slot = _Slot(self._slots, entry.owner)
                    slot.try_take()  # planned for, as a rule; else (a claimed entry) it waits in its task
                    task = asyncio.ensure_future(self._process(entry, digest, slot))
                    self._tasks.add(task)
                    held = (entry.owner, entry.entry_id)
                    self._held.add(held)
                    task.add_done_callback(functools.partial(self._finished, held))
            except REDIS_ERRORS as exc:
                log.warning("queue unavailable (%s); retrying in %.0f s", type(exc).__name__, REDIS_RETRY)
                # A read or claim that failed may have run in Redis all the same, its reply lost: the
                # entries it took are pending under our name, and no other worker takes them while our
                # heartbeat lives. The claim that comes first once Redis answers takes them back.
                next_claim = 0.0
                await asyncio.sleep(REDIS_RETRY)
            except ResponseError as exc:
                # Redis answers, but the queue is not as we left it: it came back without its data and the
                # consumer group is gone. Stopping here would be for good, while the heartbeat kept saying
                # this worker is alive, so nothing would ever take its entries over: recreate and go on.
                log.warning("queue error (%s); recreating the consumer group", exc)
                with contextlib.suppress(*REDIS_ERRORS, ResponseError):
                    await self.queue.ensure_group()
                await asyncio.sleep(REDIS_RETRY)
            except Exception:
                # A defect here would end the reading for good while the heartbeat goes on saying this
                # worker is alive: log it and read on.
                log.exception("worker loop error; reading on in %.0f s", REDIS_RETRY)
                await asyncio.sleep(REDIS_RETRY)

    async def _read_fairly(self) -> list[Entry]:
        """New entries, as many from each key's stream as FairSlots plans for it.

        A key's queue that stops being empty adds an entry to the wake stream, read with the streams: the
        worker that gets it reads the key on its next turn, busy or idle, not after OWNERS_REFRESH (the
        others find it on their next look at the list of keys).
        When none of the planned streams has anything: if a key was left out for want of slots, wait for
        a slot to come free (blocking on the streams instead would leave slots idle for up to a second
        under a busy key); else wait up to IDLE_BLOCK_MS for the first new entry of any planned stream, or
        for the wake stream's.
        """
        now = time.monotonic()
        if now - self._owners_read >= OWNERS_REFRESH:
            self._owners, self._owners_read = await self.queue.owners(), now
        owners = self._owners
        wanted = self._slots.plan(owners)
        if now - self._probed < PROBE_INTERVAL:  # the newcomers' queues were looked into a moment ago
            wanted = {owner: count for owner, count in wanted.items() if self._slots.load(owner)}
            if not wanted:
                await self._slots.changed(PROBE_INTERVAL - (now - self._probed))
                return []
        else:
            self._probed = now
        entries, woken = await self.queue.read_waking(self.name, wanted)
        if woken:  # a key's queue stopped being empty: if the key is new here, the next turn reads it
            self._owners_read = self._probed = float("-inf")
        if entries or woken:
            return entries
        # (a key held back for its entries away waits for its origin, not for a slot)
        if not wanted or any(owner not in wanted for owner in owners
                             if self._slots.load(owner) and not self._slots.held_back(owner)):
            await self._slots.changed(READ_BLOCK_MS / 1000)
            return []
        self._owners_read = float("-inf")  # a key that submits while we wait is looked for right after
        entries, woken = await self.queue.wait_for_entries(self.name, list(wanted), IDLE_BLOCK_MS)
        if woken:  # as above
            self._probed = float("-inf")
        return entries

    async def _indexed_already(self, entries: list[Entry]) -> list[Known]:
        """The digest of each entry's URL if it is indexed already (it is not fetched again), else None;
        CANCELLED for the entries of a cancelled job.

        One round trip for the batch, which also asks whether the entries' jobs are cancelled. The entries
        are read and pending under this worker's name: should Redis fail now, each task asks for its own
        URL once Redis is back (UNCHECKED), rather than the entries being dropped here and left pending
        for ever behind a live heartbeat.
        """
        if not entries:
            return []
        jobs = list(dict.fromkeys(entry.job_id for entry in entries))
        try:
            known, flags = await self.index.digests_and_fields(
                [entry.url for entry in entries], [(self.queue.keys.job(job_id), "cancelled") for job_id in jobs])
        except (*REDIS_ERRORS, ValueError):  # ValueError: a URL Redis cannot encode; its own task fails it
            return [UNCHECKED] * len(entries)
        cancelled = {job_id for job_id, flag in zip(jobs, flags, strict=True) if flag}
        return [CANCELLED if entry.job_id in cancelled else digest
                for entry, digest in zip(entries, known, strict=True)]

    def _finished(self, held: tuple[str, str], task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._held.discard(held)
        if not task.cancelled() and task.exception() is not None:
            log.error("download task failed", exc_info=task.exception())

    async def _process(self, entry: Entry, known: Known, slot: _Slot) -> None:
        """Run one entry to a recorded outcome; Redis outages are waited out, never turned into failures.

        `known` is the digest the URL was indexed with when the entry was read, None if it was not, and
        UNCHECKED if that could not be asked. Traced as a trace of its own, linked to the job's submit
        (tracing.py).
        """
        attributes = {"url.full": entry.url, "casimg.job_id": entry.job_id, "casimg.position": entry.position,
                      "casimg.deliveries": entry.deliveries} if tracing.enabled else None
        with tracing.span("casimg.process", attributes, link=entry.traceparent):
            await self._process_entry(entry, known, slot)

    async def _process_entry(self, entry: Entry, known: Known, slot: _Slot) -> None:
        try:
            while True:
                try:
                    await self._attempt_all(entry, known, slot)
                    return
                except _Stopped:
                    return  # stays pending; the next worker takes it
                except REDIS_ERRORS as exc:
                    if self._stopping.is_set():
                        return  # stays pending; the next worker takes it
                    log.warning("redis unavailable while storing %s (%s); retrying", clip(entry.url),
                                type(exc).__name__)
                    await asyncio.sleep(REDIS_RETRY)
                except Exception as exc:
                    # A defect met by this one URL (an input nobody foresaw): it fails with a reason and is
                    # acknowledged, so its job ends and its key's in-flight count goes down, and the next
                    # worker does not meet it again after a restart. Logged once, here, with its traceback.
                    log.exception("unexpected error on %s", clip(entry.url))
                    slot.give_back()
                    await self._fail_for_good(entry, f"internal error ({type(exc).__name__})")
                    return
        finally:
            slot.give_back()

    async def _fail_for_good(self, entry: Entry, reason: str) -> None:
        """Record a failure, waiting out Redis outages; only a stopping worker leaves it pending."""
        while True:
            try:
                await self._fail(entry, reason, 1)
                return
            except REDIS_ERRORS:
                if self._stopping.is_set():
                    return
                await asyncio.sleep(REDIS_RETRY)

    async def _attempt_all(self, entry: Entry, known: Known, slot: _Slot) -> None:
        # If none was free at the read (an entry read ahead), or a Redis outage sent a download back to the
        # start. The read's lookup said whether the job was cancelled then; one that waited asks again
        # (until it has an answer), and one that waited into a stop is left to the next worker.
        await slot.take()
        if slot.waited and self._stopping.is_set():
            raise _Stopped
        if entry.deliveries > MAX_DELIVERIES:
            await self._fail(entry, f"abandoned: {entry.deliveries - 1} workers stopped while on it", 0)
            return
        if known is not CANCELLED and slot.waited:
            known = CANCELLED if await self._is_cancelled(entry.job_id) else known
            slot.waited = False
        if known is CANCELLED:
            await self._drop_cancelled(entry)
            return
        if known is UNCHECKED:
            known = await self.index.digest_of(entry.url)
        if known is not None:
            detail: dict[str, object] = {"sha256": known}
            record = await self.index.lookup(entry.url)  # the result's width and height
            if record is not None and record.sha256 == known:
                detail.update(width=record.width, height=record.height)
            await self.index.complete(
                entry.job_id, entry.position, entry.entry_id, Outcome.EXISTS, detail, owner=entry.owner,
            )
            _log_outcome(Outcome.EXISTS, entry.url, 0)
            self.on_outcome(Outcome.EXISTS, "")
            return
        attempt = 0
        budget = RETRY_BUDGET * self.settings.fetch_timeout  # seconds of download left over all attempts
        while True:
            attempt += 1
            await slot.take()
            if attempt > 1 and await self.queue.is_cancelled(entry.job_id):  # cancelled while it waited to retry
                await self._drop_cancelled(entry)
                return
            await self._wait_for_origin(entry.url, slot)
            started = time.monotonic()
            lent = _Lent(self, slot)  # while the download waits for a turn at its origin
            try:
                downloaded = await self.fetcher.fetch(entry.url, min(budget, self.settings.fetch_timeout), lent)
            except DownloadFailed as failure:
                budget -= time.monotonic() - started - lent.waited
                cooled = await self._cool_origin(entry.url, failure)
                if failure.permanent or attempt >= MAX_ATTEMPTS or budget <= 0:
                    await self._fail(entry, failure.reason, attempt)
                    return
                # A retry that a stop would cut short is left to the next worker, as a download the stop
                # cancels is: the URL stays pending instead of failing because this worker went away.
                if self._stopping.is_set():
                    raise _Stopped from None
                slot.give_back()  # no slot is held while waiting to retry: others download meanwhile
                if cooled:
                    continue  # the next attempt waits for the origin's cool-down, stepped away
                if not await self._sleep_unless_stopping(self._backoff(attempt, failure.retry_after)):
                    raise _Stopped from None
                continue
            break
        self.on_bytes("downloaded", downloaded.size)
        places = _Places(self._storing, self._finishing)
        try:
            await places.body.take()
            slot.give_back()
            try:
                outcome = await self._store(entry, downloaded, attempt, places)
            except DownloadFailed as failure:  # not an image, or the disk refused it: no retry helps
                await self._fail(entry, failure.reason, attempt)
                return
        finally:
            places.give_back()
        _log_outcome(outcome, entry.url, attempt)

    async def _is_cancelled(self, job_id: str) -> bool:
        """Whether `job_id` is cancelled now. The entries that ask during one turn of the loop share one
        question per job, sent after the turn: a cancel that returned before an entry asked is seen."""
        asked = self._cancel_asks.get(job_id)
        if asked is None:
            loop = asyncio.get_running_loop()
            asked = self._cancel_asks[job_id] = loop.create_future()
            # Its askers may all be gone (cancelled at a stop) when a Redis error comes back: not an
            # error to log for the question itself, each asker handles its own.
            asked.add_done_callback(lambda done: done.cancelled() or done.exception())
            loop.call_soon(self._ask_cancelled, job_id, asked)
        return await asyncio.shield(asked)

    def _ask_cancelled(self, job_id: str, asked: asyncio.Future[bool]) -> None:
        del self._cancel_asks[job_id]  # whoever asks from now on gets a question of its own
        question = asyncio.ensure_future(self.queue.is_cancelled(job_id))
        self._questions.add(question)  # the loop keeps only weak references to tasks

        def answer(done: asyncio.Future[bool]) -> None:
            self._questions.discard(question)
            if done.cancelled():
                asked.cancel()
            elif done.exception() is not None:
                asked.set_exception(done.exception())  # type: ignore[arg-type]
            else:
                asked.set_result(done.result())

        question.add_done_callback(answer)

    async def _wait_for_origin(self, url: str, slot: _Slot) -> None:
        """Return once `url`'s origin may be asked (its rate and cool-down, politeness.OriginPace).

        While it waits, the entry steps away: it gives its slot back (and stays pending under this
        worker's name), so other keys and origins download meanwhile (FairSlots.step_away, which also
        bounds how far the reader runs ahead of such entries).
        """
        origin = origin_of(url) if self.pace is not None else None
        if self.pace is None or origin is None or await self.pace.try_now(origin) <= 0:
            return
        slot.step_away()
        went_on = await self.pace.turn(origin, self._sleep_unless_stopping)
        if not went_on:
            raise _Stopped
        await slot.take()
        if self._stopping.is_set():
            raise _Stopped

    async def _cool_origin(self, url: str, failure: DownloadFailed) -> bool:
        """After a 429 or 503, cool the URL's whole origin down for every worker; True if it now cools."""
        if self.pace is None or failure.reason not in COOLING_REASONS:
            return False
        origin = origin_of(url)
        return origin is not None and await self.pace.cool(origin, failure.retry_after) > 0

    async def _drop_cancelled(self, entry: Entry) -> None:
        """An entry of a cancelled job leaves the queue; its result ("failed: cancelled") is the cancel's."""
        await self.index.complete(entry.job_id, entry.position, entry.entry_id, Outcome.CANCELLED, {},
                                  owner=entry.owner)
        self.on_outcome(Outcome.CANCELLED, "")

    async def _fail(self, entry: Entry, reason: str, attempts: int) -> None:
        _log_outcome(Outcome.FAILED, entry.url, attempts, reason)
        await self.index.complete(
            entry.job_id, entry.position, entry.entry_id,
            Outcome.FAILED, {"error": reason, "attempts": attempts}, owner=entry.owner,
        )
        self.on_outcome(Outcome.FAILED, reason)

    @staticmethod
    def _backoff(attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, RETRY_AFTER_CAP)
        return random.uniform(0, RETRY_BASE * 2 ** (attempt - 1))

    def _store_pair(self) -> contextlib.AbstractContextManager[tuple[Storage, Storage | None]]:
        """(the store to write, a migration's target to write as well), held for one store's duration."""
        return self.stores.storing() if self.stores is not None else contextlib.nullcontext((self.blobs, None))

    def _flusher_for(self, blobs: Storage) -> FlushGroup | None:
        if not isinstance(blobs, FileStore):
            return None
        if blobs.root not in self._flushers:
            self._flushers[blobs.root] = FlushGroup(blobs.root)
        return self._flushers[blobs.root]

    async def _store(self, entry: Entry, downloaded: Downloaded, attempt: int, places: _Places) -> Outcome:
        try:
            with self._store_pair() as (blobs, target):
                return await self._store_unguarded(entry, downloaded, attempt, places, blobs, target)
        except OSError as exc:
            # The data directory is unwritable or full: the URL fails, the service stays up.
            raise DownloadFailed(f"storage error: {exc.strerror or exc}", permanent=True) from None
        except StorageUnavailable as exc:  # the object store refused or did not answer, after its retries
            raise DownloadFailed(f"storage error: {exc}", permanent=True) from None

    async def _store_unguarded(self, entry: Entry, downloaded: Downloaded, attempt: int, places: _Places,
                               blobs: Storage, target: Storage | None) -> Outcome:
        try:
            with tracing.leaf("casimg.validate"):
                tmp, digest, info = await asyncio.get_running_loop().run_in_executor(
                    None, self._stage, downloaded, blobs)
        except BaseException:
            downloaded.discard()
            raise
        self._remember_valid(digest, info)
        if isinstance(blobs, FileStore) and target is None:
            # The bytes are in the blob's file now: the body leaves memory, and its place goes to the next
            # download once this store has one among those finishing. An object store's commit (or a
            # migration target's) reads the temp file back, up to a body's size, so it keeps the place.
            downloaded.data = None
            try:
                await places.finish.take()
            except BaseException:
                blobs.discard(tmp)  # a cancelled store: the linked blob, unindexed, is an orphan for the sweep
                raise
            places.body.give_back()
        with tracing.span("casimg.store"):
            flusher = self._flusher_for(blobs)
            try:
                if flusher is not None:
                    await flusher.flush()
                if target is not None:  # a migration's target gets the bytes before the index step
                    await target.commit(tmp, digest, info.content_type)
            except BaseException:
                blobs.discard(tmp)  # the linked blob, unindexed, is an orphan for the sweep
                raise
            meta = BlobMeta(downloaded.size, info.content_type, info.width, info.height)
            outcome = await store_blob(
                blobs, self.index, tmp, entry.url, digest, meta,
                linked=flusher is not None, run=self._settler.call, job_id=entry.job_id,
                position=entry.position, entry_id=entry.entry_id, attempts=attempt, owner=entry.owner,
            )
        kind = outcome.kind
        if kind is Outcome.STORED:
            self.on_bytes("stored", downloaded.size)
        self.on_outcome(kind, "")
        return kind

    def _remember_valid(self, digest: str, info: ImageInfo) -> None:
        """Keep what validating `digest`'s bytes found, for their repeats (on the loop; _stage reads it in
        threads). The same bytes under the same settings validate the same: a repeat skips the check."""
        if digest not in self._validated and len(self._validated) >= VALIDATED_KEPT:
            del self._validated[next(iter(self._validated))]  # the oldest
        self._validated[digest] = info

    def _stage(self, downloaded: Downloaded, blobs: Storage) -> tuple[Path, str, ImageInfo]:
        """In a worker thread: validate the body, write it to a temp file, link it in (the file driver's
        store step 1; an object store's commit follows in store_blob). Its placeholder is made later, by
        a filler (filler.py).

        One trip to a thread per download: each trip costs a hand-off of the GIL both ways, and the
        GIL traffic of 64 downloads weighed on the ingest's CPU when each step had its own (BENCHMARKS.md).
        A loop turn's bodies in one trip to each of two threads instead cut the loop's lag, but halved
        the ingest when the filesystem was slow to create files: two threads then could not keep up.
        """
        if downloaded.data is not None:
            # Hashed first: bytes this process validated already (a repeat) are not validated again.
            digest = hashlib.sha256(downloaded.data).hexdigest()
            info = self._validated.get(digest) or self._validate(downloaded.data)
            # Content the store holds already (the same image under another URL): no bytes are written
            # and no file made, which was most of what a repeat cost (BENCHMARKS.md).
            tmp = blobs.temp_link_to(digest) if isinstance(blobs, FileStore) else None
            if tmp is not None:
                return tmp, digest, info
            tmp, digest = blobs.write_temp(downloaded.data, digest)
        else:
            assert downloaded.path is not None and downloaded.sha256 is not None
            info = self._validate(downloaded.path)
            tmp, digest = downloaded.path, downloaded.sha256
        if not isinstance(blobs, FileStore):
            return tmp, digest, info
        blobs.link_in_or_discard(tmp, digest, sync=False)  # made durable by the flush that follows
        return tmp, digest, info


class _Lent:
    """An entry's download slot, lent to others while its download waits for a turn at its origin (the
    caps per address and domain, scheduler.OriginCaps; see fetcher.Aside): the entry steps away
    (FairSlots.step_away), as it does while it waits for its origin's rate (``_wait_for_origin``).

    Once its turn comes, the entry waits for a slot holding it, ahead of its key's other waiting entries
    (between keys, FairSlots shares the slots as always). No entry waits for a turn while it holds a
    slot, so the holders of the turns never wait for slots that only the waiters for a turn could give
    back. ``waited``: the seconds the download's clock stood still (added by the fetcher), which its
    budget does not count.
    """

    __slots__ = ("_slot", "_worker", "waited")

    def __init__(self, worker: Worker, slot: _Slot) -> None:
        self._worker = worker
        self._slot = slot
        self.waited = 0.0

    def lend(self) -> None:
        self._slot.step_away()

    def forgo(self) -> None:
        self._slot.give_back()  # back from away, out of the queue for a slot; none is held

    async def reclaim(self) -> None:
        if not self._worker._stopping.is_set():
            await self._slot.take(first=True)
        if self._worker._stopping.is_set():  # an entry that waited into a stop is left to the next worker
            self._slot.give_back()
            raise _Stopped


class _Stopped(Exception):
    """The worker stopped while an entry waited for its origin, for a slot or to retry: the entry stays pending."""


class _Place:
    """A place in one of the worker's bounded store steps, held by an entry's task; given back once."""

    def __init__(self, bound: asyncio.Semaphore) -> None:
        self._bound = bound
        self._held = False

    async def take(self) -> None:
        await self._bound.acquire()
        self._held = True

    def give_back(self) -> None:
        if self._held:
            self._held = False
            self._bound.release()


class _Places:
    """An entry's places in the store steps: its body's (until the bytes are in a temp file), then its
    place among the stores finishing (the flush, the index step, the settle)."""

    def __init__(self, storing: asyncio.Semaphore, finishing: asyncio.Semaphore) -> None:
        self.body = _Place(storing)
        self.finish = _Place(finishing)

    def give_back(self) -> None:
        self.body.give_back()
        self.finish.give_back()


class _Slot:
    """One download slot of a worker, held by an entry's task while it downloads, for the key that sent it."""

    def __init__(self, slots: FairSlots, owner: str) -> None:
        self._slots = slots
        self._owner = owner
        self._held = False
        self._queued = False
        self._away = False
        self.waited = False

    def try_take(self) -> None:
        """Take a slot now if the rules allow, else queue up for one (``take`` waits for it)."""
        if not self._held:
            self._held = self._slots.try_take(self._owner)
        if not self._held and not self._queued:
            self._slots.queue_up(self._owner)
            self._queued = True

    def step_away(self) -> None:
        """Give the slot back while the entry waits for its origin (FairSlots.step_away; past the bound,
        counted as an entry waiting for a slot); ``take`` gets one back."""
        self.give_back()
        self._away = self._slots.step_away(self._owner)
        self._queued = not self._away

    async def take(self, first: bool = False) -> None:
        """Hold a slot (`first`: before any other waiting entry); if this had to wait for one, ``waited``
        says so until the caller clears it."""
        self._come_back()
        if not self._held:
            self.try_take()
            if not self._held:
                await self._slots.take(self._owner, first)
                self._held = self.waited = True
        self._unqueue()

    def give_back(self) -> None:
        self._come_back()
        self._unqueue()
        if self._held:
            self._held = False
            self._slots.give_back(self._owner)

    def _unqueue(self) -> None:
        if self._queued:
            self._queued = False
            self._slots.leave_queue(self._owner)

    def _come_back(self) -> None:
        if self._away:
            self._away = False
            self._slots.come_back(self._owner)
