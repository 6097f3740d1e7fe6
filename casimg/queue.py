"""Durable jobs: submit, read, claim, complete, and take over after a crash.

A job is recorded in Redis before its 202 goes out: its status hash, its URL list, and one entry per
distinct URL in the queue stream. Workers read the stream through one consumer group, so any number of
processes on any number of machines share the work. An entry leaves the stream only in the same Lua step
that records its outcome (index.py ``complete``), so a crash at any moment leaves it pending, never lost.
Each worker keeps a heartbeat key alive; a worker whose heartbeat has expired is dead, and any live
worker claims its pending entries. A live worker also takes back its own pending entries that it does
not hold: those of a read whose reply Redis never sent (it stopped right after running the read).

Each API key's entries wait in a stream of their own (``queue:{key_id}``; ``queue`` holds those of jobs
sent without a key, and those queued before keys had streams), so one key's backlog is never in front of
another key's entries; how much a worker reads from which stream is decided by scheduler.FairSlots.
``queue-owners`` scores each key +inf while its stream holds entries (from the enqueue step that adds
some) and, from the step that removes the last one (index.py ``complete``), the time it became empty.
Workers read the streams of the keys busy or idle for less than ``OWNER_KEEP``, and claim dead workers'
entries from each: a client that comes back within the hour wakes a waiting worker at once (its stream
is among those the worker blocks on). So does a key seen for the first time in a while: the enqueue step
that makes a key busy adds an entry to ``queue-wake``, which workers read with their entries (idle ones
block on it), and the worker the entry goes to looks at the list again at once. The others find such a
key on their next look at the list (a fifth of a second at most when idle, half a second when busy:
worker.py).

A submit of 10,000 long URLs is megabytes, and Redis serves no one else while one call runs: recorded in
one Lua call it held every reader for over half a second. So a job is recorded in short steps, none of
more than about ``STEP_BYTES`` of URLs:

1. stage: the URL list, ``STEP_BYTES`` at a time, with a short TTL (``STAGING_TTL``). Nothing reads it
   yet: no job hash names it, and its id is known to no one else. A crash here leaves chunks that expire.
2. publish: one small Lua step checks the key's unfinished jobs and bytes, writes the job hash, gives
   the list the job's TTL, and adds the job to the ``enqueuing`` set. All of it, or none.
3. enqueue: stream entries, ``STEP_BYTES`` of URLs at a time, each step moving the job's ``enqueued``
   cursor with its entries. Should the process die here, a worker takes the job from the ``enqueuing``
   set after ``RESUME_AFTER`` and finishes it; two enqueuers of one job never add an entry twice.

A job is cancelled (``cancel``, lua/cancel.lua) in one step of constant cost: it is flagged
``cancelled`` and done, and each URL without a result counts as failed and reads as ``failed:
cancelled``. No outcome is recorded in it afterwards (lua/lib_complete.lua), no entry queued
(lua/enqueue.lua), no worker starts one of its entries (worker.py asks in the batch lookup of the entries
it reads) or indexes one that was downloading (lua/store.lua refuses it, and the bytes go). A job's end,
whichever it is, queues its callback in the same step (webhooks.py).

A URL that cannot be stored is not a request error: it fails from the start, and the job keeps what
may be kept of it. A URL longer than the longest accepted keeps its first ``KEPT_URL`` characters and a
marker (``failed: URL too long``); a URL with credentials (``http://user:secret@host/``) keeps the URL
with its userinfo replaced by ``***`` (``failed: credentials in URL``), so the secret never reaches Redis.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterator
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field, replace
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from casimg import tracing
from casimg.clock import now_iso
from casimg.errors import NotFound, TooLarge, TooManyRequests, Unavailable
from casimg.lua import source as lua_source
from casimg.schema import QUEUE_GROUP, KeySpace, Outcome, queue_stream
from casimg.userinfo import CREDENTIALS, has_userinfo, without_userinfo

IN_FLIGHT_RETRY = 5.0  # seconds a client refused for too many unfinished jobs or bytes is asked to wait
# URL bytes one Redis call writes or reads at most, and URLs (an XADD from Lua costs about 12 us of Redis's
# time, a URL of an RPUSH far less): about 2 ms a call on an idle machine at most, so a reader waits no
# longer than that behind a submit (BENCHMARKS.md, "Read latency under a submit flood").
STEP_BYTES = 64 * 1024
STAGE_URLS = 1000
ENQUEUE_URLS = 200
STAGING_TTL = 600  # seconds unpublished chunks live; each chunk written renews it
RESUME_AFTER = 30.0  # seconds after publishing that an unfinished enqueue counts as abandoned
RESUME_BATCH = 10  # abandoned enqueues a worker finishes per look
KEPT_URL = 2048  # characters of a too long URL the job keeps, to show which one it was
TOO_LONG = "URL too long"
CANCELLED = "cancelled"  # the error of each URL its job's cancel found unfinished
PENDING_RESULT = {"status": "pending"}  # a URL without a result yet
CANCELLED_RESULT = {"status": Outcome.FAILED.value, "error": CANCELLED, "attempts": 0}  # ... in a cancelled job


SCAN_COUNT = 1000  # keys per SCAN step and statuses per pipeline when counting jobs
OWNER_KEEP = 3600.0  # seconds a key whose stream is empty stays among the streams workers read
WAKE_KEPT = 32  # entries the wake stream keeps at least (Redis trims whole nodes of 100: a little over 100 at most)


def _glob_escape(text: str) -> str:
    """`text` matched literally in a Redis glob pattern (a key prefix may contain * ? [ ])."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


@dataclass(frozen=True)
class Entry:
    """One URL of one job, as read from the queue."""

    entry_id: str
    job_id: str
    position: int
    url: str
    deliveries: int = 1  # this one included: above 1, earlier workers stopped or died while on it
    owner: str = ""  # the id of the API key that submitted it ("" for none): which stream it is in
    traceparent: str = ""  # the submit's trace context, when it was traced (tracing.py)


@dataclass
class Job:
    job_id: str
    status: str
    total: int
    done: int
    stored: int
    existed: int
    failed: int
    created: str
    finished: str | None
    results: list[dict[str, Any]] = field(default_factory=list)
    key: str = ""  # the id of the API key that submitted it ("" for none)
    callback: dict[str, Any] | None = None  # {state, attempts, last_status[, last_error]}, if it has a callback

    def as_json(self, with_results: bool = True) -> dict[str, Any]:
        body: dict[str, Any] = {
            "job_id": self.job_id,
            "status": self.status,
            "total": self.total,
            "done": self.done,
            "stored": self.stored,
            "existed": self.existed,
            "failed": self.failed,
            "created": self.created,
            "finished": self.finished,
        }
        if self.callback is not None:
            body["callback"] = self.callback
        if with_results:
            body["results"] = self.results
        return body


@dataclass(frozen=True)
class Limits:
    """What one submit may add: 0 (or the defaults) turns a limit off."""

    max_in_flight: int = 0  # unfinished jobs of the key
    max_bytes: int = 0  # bytes of URLs in the key's unfinished jobs
    max_url_length: int = 1 << 62  # characters; a longer URL fails with TOO_LONG


def _kept_urls(urls: list[str], max_length: int) -> tuple[list[str], dict[int, str]]:
    """The URLs as the job keeps them, and the positions of those that fail from the start, with why.

    A URL with credentials keeps the rest of itself (userinfo.without_userinfo); one too long to download
    is cut to its first KEPT_URL characters (and max_length at most) and a marker saying how long it was.
    The userinfo goes first, so that a cut never keeps a secret.
    """
    kept, failed = list(urls), {}
    for position, url in enumerate(urls):
        if has_userinfo(url):
            kept[position] = without_userinfo(url)
            failed[position] = CREDENTIALS
        if len(url) > max_length:
            kept[position] = f"{kept[position][:min(KEPT_URL, max_length)]}... [cut: {len(url)} characters]"
            failed.setdefault(position, TOO_LONG)
    return kept, failed


def _failure(reason: str) -> str:
    return json.dumps({"status": Outcome.FAILED.value, "error": reason, "attempts": 0}, separators=(",", ":"))


def _callback_state(info: dict[str, str]) -> dict[str, Any] | None:
    """The job's callback as GET /api/jobs/{id} shows it, from its hash; None for a job without one."""
    if not info.get("callback"):
        return None
    status = info.get("cb_status", "")
    state: dict[str, Any] = {"state": info.get("cb_state", "pending"), "attempts": int(info.get("cb_attempts", 0)),
                             "last_status": int(status) if status.isdigit() else None}
    if info.get("cb_error"):
        state["last_error"] = info["cb_error"]
    return state


def _chunks(urls: list[str], most: int = STAGE_URLS) -> Iterator[tuple[int, list[str]]]:
    """(position of the first, URLs) in runs of at most `most` URLs and about STEP_BYTES bytes."""
    first, size = 0, 0
    for position, url in enumerate(urls):
        size += len(url)
        if position + 1 - first >= most or size >= STEP_BYTES:
            yield first, urls[first:position + 1]
            first, size = position + 1, 0
    if first < len(urls):
        yield first, urls[first:]


def _entry(entry_id: str, fields: dict[str, str], owner: str) -> Entry:
    return Entry(entry_id, fields["job"], int(fields["pos"]), fields["url"], owner=owner,
                 traceparent=fields.get("tp", ""))


class JobQueue:
    def __init__(self, redis: aioredis.Redis, keys: KeySpace, job_ttl: float, staging_ttl: float = STAGING_TTL) -> None:
        self.redis = redis
        self.keys = keys
        self.job_ttl = max(1, int(job_ttl))
        self.staging_ttl_ms = max(1, int(staging_ttl * 1000))
        self.resume_after = RESUME_AFTER
        self._publish = redis.register_script(lua_source("publish"))
        self._enqueue = redis.register_script(lua_source("enqueue"))
        self._cancel = redis.register_script(lua_source("cancel"))
        self._take_over = redis.register_script(lua_source("take_over"))

    async def ensure_group(self, owner: str = "") -> None:
        """Create an owner's stream and its consumer group once; by default the keyless one's, and the wake
        stream's that idle workers wait on beside it. Reading from id 0 keeps entries added before."""
        for stream in [self.stream_of(owner)] if owner else [self.stream_of(""), self.keys.queue_wake]:
            try:
                await self.redis.xgroup_create(stream, QUEUE_GROUP, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    async def submit(self, urls: list[str], key_id: str = "", limits: Limits | None = None,
                     callback: str = "") -> tuple[str, int]:
        """Record a job durably (stage, publish, enqueue: see the module's docstring); returns
        (job_id, number of distinct URLs). A `callback` URL is POSTed the job when it is done (webhooks.py).

        With `limits`, the job is refused while `key_id` has too many unfinished jobs (TooManyRequests)
        or URL bytes in them (TooManyRequests, or TooLarge for a job larger than the limit by itself);
        the check and the publishing are one atomic step.
        """
        limits = limits or Limits()
        distinct = list(dict.fromkeys(urls))
        kept, failed = _kept_urls(distinct, limits.max_url_length)
        size = sum(len(url.encode()) for url in kept)
        if key_id and 0 < limits.max_bytes < size:
            raise TooLarge(f"the URLs of this job are {size} bytes; CASIMG_MAX_QUEUED_BYTES allows "
                           f"{limits.max_bytes} bytes of URLs in a key's unfinished jobs")
        job_id = secrets.token_hex(12)
        await self._stage(job_id, kept, failed)
        await self._publish_or_refuse(job_id, key_id, limits, total=len(kept), failed=len(failed), size=size,
                                      callback=callback)
        # Each step asks for exactly the URLs it will take: the list is read in Redis by the step.
        for _, chunk in _chunks(kept, ENQUEUE_URLS):
            await self.enqueue_step(job_id, len(chunk))
        while not await self.enqueue_step(job_id):  # only if the steps above met a concurrent resumer
            pass
        return job_id, len(distinct)

    async def _stage(self, job_id: str, urls: list[str], failed: dict[int, str]) -> None:
        """Step 1: the URL list (and the results of the URLs failed from the start), a chunk per call, with
        a short TTL."""
        k = self.keys
        for first, chunk in _chunks(urls):
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.rpush(k.job_urls(job_id), *chunk)
                pipe.pexpire(k.job_urls(job_id), self.staging_ttl_ms)
                results = {str(pos): _failure(failed[pos]) for pos in range(first, first + len(chunk))
                           if pos in failed}
                if results:
                    pipe.hset(k.job_results(job_id), mapping=results)
                    pipe.pexpire(k.job_results(job_id), self.staging_ttl_ms)
                await pipe.execute()

    async def _publish_or_refuse(self, job_id: str, key_id: str, limits: Limits, *, total: int, failed: int,
                                 size: int, callback: str = "") -> None:
        """Step 2: one small atomic step, the admission and the job's appearance."""
        k = self.keys
        code, held = await self._publish(
            keys=[k.job(job_id), k.job_urls(job_id), k.job_results(job_id), k.inflight(key_id or "-"),
                  k.enqueuing, k.webhooks],
            args=[job_id, int(self.job_ttl * 1000), now_iso(), key_id, limits.max_in_flight if key_id else 0,
                  k.job(""), time.time_ns() // 1_000_000, total, failed, size, limits.max_bytes if key_id else 0,
                  callback, tracing.current()],
        )
        if code == 1:
            return
        await self.redis.delete(k.job_urls(job_id), k.job_results(job_id))
        if code == 0:
            raise TooManyRequests(
                f"this key has {held} unfinished jobs (CASIMG_MAX_JOBS_IN_FLIGHT is {limits.max_in_flight}); "
                "submit more when some are done", retry_after=IN_FLIGHT_RETRY)
        if code == 2:
            raise TooManyRequests(
                f"this key's unfinished jobs hold {held} bytes of URLs and this one {size} more; "
                f"CASIMG_MAX_QUEUED_BYTES allows {limits.max_bytes}; submit more when some are done",
                retry_after=IN_FLIGHT_RETRY)
        raise Unavailable("the job's URL list expired before it was complete; submit it again")

    async def enqueue_step(self, job_id: str, most: int = ENQUEUE_URLS) -> bool:
        """Step 3, once: entries for the next URLs (`most` at most) of a published job. True when all
        have theirs."""
        k = self.keys
        return bool(await self._enqueue(
            keys=[k.job(job_id), k.job_urls(job_id), k.job_results(job_id), k.queue, k.enqueuing, k.queue_owners,
                  k.queue_wake],
            args=[job_id, most, STEP_BYTES, k.key_queue(""), QUEUE_GROUP, WAKE_KEPT],
        ))

    async def resume_enqueuing(self, older_than: float | None = None) -> int:
        """Finish the enqueue of jobs published more than `older_than` seconds ago (default
        `resume_after`) whose submitter stopped before it was done (a crash); returns how many."""
        wait = self.resume_after if older_than is None else older_than
        cutoff = time.time_ns() // 1_000_000 - int(wait * 1000)
        abandoned = await self.redis.zrangebyscore(self.keys.enqueuing, "-inf", cutoff, start=0, num=RESUME_BATCH)
        for job_id in abandoned:
            while not await self.enqueue_step(job_id):
                pass
        return len(abandoned)

    async def status(self, job_id: str) -> str | None:
        return await self.redis.hget(self.keys.job(job_id), "status")

    async def get(self, job_id: str, with_results: bool = True) -> Job:
        k = self.keys
        urls: list[str] | None = None
        if with_results:
            total, size = await self.redis.hmget(k.job(job_id), "total", "bytes")
            if total is not None and int(size or 0) > STEP_BYTES:
                # The list never changes once published: read in steps, so no one call holds Redis long.
                urls = await self._read_urls(job_id, int(total), int(size))
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hgetall(k.job(job_id))
            if with_results:
                if urls is None:
                    pipe.lrange(k.job_urls(job_id), 0, -1)
                pipe.hgetall(k.job_results(job_id))
            replies = await pipe.execute()
        info = replies[0]
        if not info:
            raise NotFound(f"no job {job_id!r} (unknown, or expired)")
        if with_results and urls is None:
            urls = replies.pop(1)
        job = Job(
            job_id=job_id,
            status=info["status"],
            total=int(info["total"]),
            done=int(info["done"]),
            stored=int(info["stored"]),
            existed=int(info["existed"]),
            failed=int(info["failed"]),
            created=info["created"],
            finished=info.get("finished"),
            key=info.get("key", ""),
            callback=_callback_state(info),
        )
        if with_results:
            assert urls is not None
            results = replies[1]
            missing = CANCELLED_RESULT if info.get("cancelled") else PENDING_RESULT
            for position, url in enumerate(urls):
                raw = results.get(str(position))
                job.results.append({"url": url, **json.loads(raw)} if raw else {"url": url, **missing})
        return job

    async def cancel(self, job_id: str) -> bool:
        """Cancel an unfinished job: each URL without a result fails with CANCELLED, and the job is done, in
        one step of constant cost (lua/cancel.lua: no result is written, a missing one reads as CANCELLED).
        True if it was cancelled now, False if it was done already; NotFound if there is none.
        """
        k = self.keys
        answer = await self._cancel(
            keys=[k.job(job_id), k.enqueuing, k.webhooks],
            args=[job_id, time.time_ns() // 1_000_000, now_iso()],
        )
        if answer == -1:
            raise NotFound(f"no job {job_id!r} (unknown, or expired)")
        return answer == 1

    async def is_cancelled(self, job_id: str) -> bool:
        return bool(await self.redis.hexists(self.keys.job(job_id), "cancelled"))

    async def _read_urls(self, job_id: str, total: int, size: int) -> list[str]:
        step = max(1, total * STEP_BYTES // size)
        urls: list[str] = []
        for first in range(0, total, step):
            urls += await self.redis.lrange(self.keys.job_urls(job_id), first, first + step - 1)
        return urls

    # -- workers --------------------------------------------------------------------------------

    def stream_of(self, owner: str) -> str:
        return queue_stream(self.keys, owner)

    async def owners(self) -> list[str]:
        """The keys with entries queued or idle for under OWNER_KEEP, sorted; "" (the keyless stream) first."""
        since = time.time_ns() // 1_000_000 - int(OWNER_KEEP * 1000)
        return ["", *sorted(await self.redis.zrangebyscore(self.keys.queue_owners, since, "+inf"))]

    async def forget_idle_owners(self) -> None:
        """Drop the keys idle for over OWNER_KEEP; one that submits meanwhile is scored +inf, so stays."""
        since = time.time_ns() // 1_000_000 - int(OWNER_KEEP * 1000)
        await self.redis.zremrangebyscore(self.keys.queue_owners, "-inf", f"({since}")

    async def read(self, consumer: str, wanted: dict[str, int]) -> list[Entry]:
        """Up to wanted[owner] new entries from each owner's stream, in one round trip, without waiting.
        A wake entry it meets is taken and dropped (read_waking says so)."""
        return (await self.read_waking(consumer, wanted))[0]

    async def read_waking(self, consumer: str, wanted: dict[str, int]) -> tuple[list[Entry], bool]:
        """`read`, and the wake stream in the same round trip: the entries, and whether a key's queue
        stopped being empty since (a key the caller may not know yet; see wait_for_entries)."""
        if not wanted:
            return [], False
        wake = self.keys.queue_wake
        if len(wanted) == 1:  # the usual case under load, one busy key: a pipeline costs more CPU than a call
            [(owner, count)] = wanted.items()
            try:
                reply = await self.redis.xreadgroup(QUEUE_GROUP, consumer, {self.stream_of(owner): ">", wake: ">"},
                                                    count=count)
            except ResponseError as exc:
                for each in {"", owner}:  # the keyless stream's group comes with the wake stream's
                    await self._regroup(each, exc)
                return [], False
            reply, woken = await self._without_wake(reply)
            return self._entries(owner, reply), woken
        async with self.redis.pipeline(transaction=False) as pipe:
            for owner, count in wanted.items():
                pipe.xreadgroup(QUEUE_GROUP, consumer, {self.stream_of(owner): ">"}, count=count)
            pipe.xreadgroup(QUEUE_GROUP, consumer, {wake: ">"}, count=1)
            *replies, wake_reply = await pipe.execute(raise_on_error=False)
        entries: list[Entry] = []
        for owner, reply in zip(wanted, replies, strict=True):
            if isinstance(reply, ResponseError):
                await self._regroup(owner, reply)
            else:
                entries += self._entries(owner, reply)
        if isinstance(wake_reply, ResponseError):
            await self._regroup("", wake_reply)
            return entries, False
        return entries, (await self._without_wake(wake_reply))[1]

    async def wait_for_entries(self, consumer: str, owners: list[str], block_ms: int) -> tuple[list[Entry], bool]:
        """At most one new entry from each of `owners`' streams, waiting up to `block_ms` for the first, or
        for a key's queue to stop being empty; the entries, and whether the latter woke it.

        A key among `owners` wakes the wait with its first entry. Any other key, one the caller has not
        seen yet, wakes it through the wake stream (``queue-wake``: lua/enqueue.lua adds an entry when a
        key's queue stops being empty), and the caller then looks for it. The group hands each wake entry
        to one waiting worker."""
        wake = self.keys.queue_wake
        streams = {self.stream_of(owner): ">" for owner in owners} | {wake: ">"}
        try:
            reply = await self.redis.xreadgroup(QUEUE_GROUP, consumer, streams, count=1, block=block_ms)
        except ResponseError as exc:
            for owner in {"", *owners}:  # the keyless stream's group comes with the wake stream's
                await self._regroup(owner, exc)
            return [], False
        reply, woken = await self._without_wake(reply)
        by_stream = {self.stream_of(owner): owner for owner in owners}
        entries: list[Entry] = []
        for stream, items in reply:
            entries += self._entries(by_stream[stream], [[stream, items]])
        return entries, woken

    async def _without_wake(self, reply: Any) -> tuple[list[Any], bool]:
        """An XREADGROUP reply without the wake stream's part, which is acknowledged at once (a wake is
        worth nothing later); and whether it had one."""
        wake = self.keys.queue_wake
        woken = [entry_id for stream, items in reply or [] if stream == wake for entry_id, _ in items]
        if woken:
            await self.redis.xack(wake, QUEUE_GROUP, *woken)
        return [part for part in reply or [] if part[0] != wake], bool(woken)

    async def _regroup(self, owner: str, error: ResponseError) -> None:
        """A stream whose group is gone (a Redis that lost its data, a hand-made key): make it again, so
        that one broken stream never stops the reading of all the others."""
        if "NOGROUP" not in str(error):
            raise error
        await self.ensure_group(owner)

    def _entries(self, owner: str, reply: Any) -> list[Entry]:
        return [_entry(entry_id, fields, owner) for _, entries in reply or [] for entry_id, fields in entries]

    async def heartbeat(self, consumer: str, ttl: float) -> None:
        await self.redis.set(self.keys.worker(consumer), now_iso(), px=max(1, int(ttl * 1000)))

    async def retire(self, consumer: str) -> None:
        """A worker leaving cleanly: its unfinished entries become claimable at once."""
        await self.redis.delete(self.keys.worker(consumer))

    async def claim_unattended(self, consumer: str, count: int,
                               held: AbstractSet[tuple[str, str]]) -> list[Entry]:
        """Move to `consumer` up to `count` pending entries that nobody is working on, from every owner's
        stream: those of workers whose heartbeat expired, and `consumer`'s own but for those it `held`
        ((owner, entry id) pairs) when it called.

        A worker can own entries it never received: Redis ran its read (or claim) and the reply was lost,
        because Redis stopped before sending it or the reply timed out. They are pending under its name,
        and its heartbeat keeps every other worker from them, so it takes them back itself.
        """
        claimed: list[Entry] = []
        for owner in await self.owners():
            if len(claimed) >= count:
                break
            claimed += await self._claim_stream(consumer, owner, count - len(claimed), held)
        return claimed

    async def tidy_wake_readers(self, consumer: str) -> None:
        """Drop the wake stream's readers whose worker is gone, and `consumer`'s own record if a reply it
        never got (a timeout, a cancelled wait) left wake entries pending under it. Each worker reads the
        stream under its own name, and its next read names it again; a wake entry is worth nothing later."""
        wake = self.keys.queue_wake
        try:
            readers = await self.redis.xinfo_consumers(wake, QUEUE_GROUP)
        except ResponseError:  # the stream or its group is gone: the next wait makes them again
            return
        for info in readers:
            name = info["name"]
            if (info["pending"] > 0 if name == consumer else not await self.redis.exists(self.keys.worker(name))):
                await self.redis.xgroup_delconsumer(wake, QUEUE_GROUP, name)

    async def _claim_stream(self, consumer: str, owner: str, count: int,
                            held: AbstractSet[tuple[str, str]]) -> list[Entry]:
        stream = self.stream_of(owner)
        claimed: list[Entry] = []
        try:
            consumers = await self.redis.xinfo_consumers(stream, QUEUE_GROUP)
        except ResponseError:  # the stream or its group is gone (a Redis that lost its data): nothing to claim
            return []
        for info in consumers:
            name = info["name"]
            own = name == consumer
            if not own and await self.redis.exists(self.keys.worker(name)):
                continue
            if info["pending"] == 0:
                if not own:
                    await self.redis.xgroup_delconsumer(stream, QUEUE_GROUP, name)
                continue
            # Our own pending entries are all looked at (those we hold are most of them); a dead worker's,
            # only as many as we take.
            pending = await self.redis.xpending_range(
                stream, QUEUE_GROUP, min="-", max="+", count=info["pending"] if own else count - len(claimed),
                consumername=name,
            )
            items = [item for item in pending if not (own and (owner, item["message_id"]) in held)]
            items = items[:count - len(claimed)]
            delivered = {item["message_id"]: int(item["times_delivered"]) for item in items}
            if delivered:
                # Each entry only if it is still pending under `name`: one another worker took over since
                # our look stays with it (take_over.lua).
                for entry_id, flat in await self._take_over(
                        keys=[stream], args=[QUEUE_GROUP, name, consumer, *delivered]):
                    fields = dict(zip(flat[::2], flat[1::2], strict=True))
                    claimed.append(replace(_entry(entry_id, fields, owner), deliveries=delivered[entry_id] + 1))
            if len(claimed) >= count:
                break
        return claimed

    async def count_by_status(self) -> dict[str, int]:
        """How many unexpired jobs are queued, running and done.

        Jobs are found with SCAN (never KEYS): the keyspace holds a few keys per job and a fixed number
        besides (the index's 2 x 4,096 buckets and its count hash), so this stays cheap however
        many images are stored.
        """
        counts = {"queued": 0, "running": 0, "done": 0}
        pattern = _glob_escape(self.keys.job("")) + "*"
        ids: list[str] = []
        async for key in self.redis.scan_iter(match=pattern, count=SCAN_COUNT):
            job_id = key[len(self.keys.job("")):]
            if ":" not in job_id:
                ids.append(job_id)
        for start in range(0, len(ids), SCAN_COUNT):
            async with self.redis.pipeline(transaction=False) as pipe:
                for job_id in ids[start:start + SCAN_COUNT]:
                    pipe.hget(self.keys.job(job_id), "status")
                for status in await pipe.execute():
                    if status is not None:
                        counts[status] = counts.get(status, 0) + 1
        return counts

    async def depth(self) -> dict[str, int]:
        """Entries waiting to be read and entries read but not finished, over every owner's stream."""
        waiting = in_progress = 0
        for owner in await self.owners():
            stream = self.stream_of(owner)
            try:
                groups = await self.redis.xinfo_groups(stream)
            except ResponseError:
                continue
            length = await self.redis.xlen(stream)
            pending = sum(int(g["pending"]) for g in groups if g["name"] == QUEUE_GROUP)
            waiting += max(0, length - pending)
            in_progress += pending
        return {"waiting": waiting, "in_progress": in_progress}
