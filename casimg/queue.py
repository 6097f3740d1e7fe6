"""Durable jobs: submit, read, claim, complete, and take over after a crash.

A job is written to Redis in one Lua step before its 202 goes out: its status hash, its URL list, and one
entry per distinct URL in the queue stream of the key that submitted it (``queue:{key_id}``; ``queue``
for jobs sent without a key), whose id the same step marks busy in ``queue-owners``. Workers read
every stream through one consumer group each, so any number of processes on any number of machines
share the work, and each key's backlog waits in its own stream: how much a worker reads from which is
decided by scheduler.FairSlots. An entry leaves its stream only in the same Lua step that records its
outcome (index.py ``complete``), so a crash at any moment leaves it pending, never lost. Each worker keeps
a heartbeat key alive; a worker whose heartbeat has expired is dead, and any live worker claims its
pending entries, in every stream.

``queue-owners`` scores each key +inf while its stream holds entries and, from the step that removes the
last one (index.py ``complete``), the time it became empty. Workers read the streams of the keys busy or
idle for less than ``OWNER_KEEP``: a client that comes back within the hour wakes a waiting worker at once
(its stream is among those the worker blocks on), and a key seen for the first time in a while is found
on the worker's next turn, a second later at most.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass, field, replace
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from casimg.errors import NotFound, TooManyRequests
from casimg.index import QUEUE_GROUP, KeySpace, now_iso, queue_stream

SUBMIT_CHUNK = 1000  # URLs per RPUSH inside the submit script (Lua's unpack has a stack limit)
IN_FLIGHT_RETRY = 5.0  # seconds a client refused for too many unfinished jobs is asked to wait

# KEYS: job job_urls queue inflight queue_owners
# ARGV: job_id ttl_ms created key_id max_in_flight job_key_prefix now_ms url...  ->  1 recorded, 0 refused
# The in-flight set is cleaned as it is read: a job that is done or has expired no longer counts. A key's
# stream and its consumer group are made with its first entry.
SUBMIT_LUA = """
local job_id, ttl, limit = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[5])
if limit > 0 then
  local ids = redis.call('ZRANGE', KEYS[4], 0, -1)
  for i = 1, #ids do
    local status = redis.call('HGET', ARGV[6] .. ids[i], 'status')
    if not status or status == 'done' then redis.call('ZREM', KEYS[4], ids[i]) end
  end
  if redis.call('ZCARD', KEYS[4]) >= limit then return 0 end
  redis.call('ZADD', KEYS[4], ARGV[7], job_id)
  redis.call('PEXPIRE', KEYS[4], ttl)
end
local first, total = 8, #ARGV - 7
redis.call('HSET', KEYS[1], 'status', 'queued', 'total', total, 'done', 0, 'stored', 0, 'existed', 0,
           'failed', 0, 'created', ARGV[3], 'key', ARGV[4])
redis.call('PEXPIRE', KEYS[1], ttl)
for start = first, #ARGV, CHUNK do
  redis.call('RPUSH', KEYS[2], unpack(ARGV, start, math.min(start + CHUNK - 1, #ARGV)))
end
redis.call('PEXPIRE', KEYS[2], ttl)
if ARGV[4] ~= '' then
  if redis.call('EXISTS', KEYS[3]) == 0 then redis.call('XGROUP', 'CREATE', KEYS[3], 'GROUP', '0', 'MKSTREAM') end
  redis.call('ZADD', KEYS[5], 'inf', ARGV[4])
end
for i = first, #ARGV do
  redis.call('XADD', KEYS[3], '*', 'job', job_id, 'pos', i - first, 'url', ARGV[i])
end
return 1
""".replace("CHUNK", str(SUBMIT_CHUNK)).replace("'GROUP'", f"'{QUEUE_GROUP}'")
SCAN_COUNT = 1000  # keys per SCAN step and statuses per pipeline when counting jobs
OWNER_KEEP = 3600.0  # seconds a key whose stream is empty stays among the streams workers read


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
        if with_results:
            body["results"] = self.results
        return body


def _entry(entry_id: str, fields: dict[str, str], owner: str) -> Entry:
    return Entry(entry_id, fields["job"], int(fields["pos"]), fields["url"], owner=owner)


class JobQueue:
    def __init__(self, redis: aioredis.Redis, keys: KeySpace, job_ttl: float) -> None:
        self.redis = redis
        self.keys = keys
        self.job_ttl = max(1, int(job_ttl))
        self._submit = redis.register_script(SUBMIT_LUA)

    async def ensure_group(self, owner: str = "") -> None:
        """Create an owner's stream and its consumer group once (the keyless one by default); reading from
        id 0 keeps entries added before."""
        try:
            await self.redis.xgroup_create(self.stream_of(owner), QUEUE_GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def submit(self, urls: list[str], key_id: str = "", max_in_flight: int = 0) -> tuple[str, int]:
        """Record a job durably; returns (job_id, number of distinct URLs).

        With `max_in_flight`, the job is refused (TooManyRequests) while `key_id` has that many
        unfinished jobs; the check and the recording are one atomic step.
        """
        distinct = list(dict.fromkeys(urls))
        job_id = secrets.token_hex(12)
        k = self.keys
        admitted = await self._submit(
            keys=[k.job(job_id), k.job_urls(job_id), self.stream_of(key_id), k.inflight(key_id or "-"),
                  k.queue_owners],
            args=[job_id, int(self.job_ttl * 1000), now_iso(), key_id, max_in_flight if key_id else 0,
                  k.job(""), time.time_ns() // 1_000_000, *distinct],
        )
        if not admitted:
            raise TooManyRequests(
                f"this key has {max_in_flight} unfinished jobs; submit more when some are done",
                retry_after=IN_FLIGHT_RETRY,
            )
        return job_id, len(distinct)

    async def status(self, job_id: str) -> str | None:
        return await self.redis.hget(self.keys.job(job_id), "status")

    async def get(self, job_id: str, with_results: bool = True) -> Job:
        k = self.keys
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hgetall(k.job(job_id))
            if with_results:
                pipe.lrange(k.job_urls(job_id), 0, -1)
                pipe.hgetall(k.job_results(job_id))
            replies = await pipe.execute()
        info = replies[0]
        if not info:
            raise NotFound(f"no job {job_id!r} (unknown, or expired)")
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
        )
        if with_results:
            urls, results = replies[1], replies[2]
            for position, url in enumerate(urls):
                raw = results.get(str(position))
                job.results.append({"url": url, **json.loads(raw)} if raw else {"url": url, "status": "pending"})
        return job

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
        """Up to wanted[owner] new entries from each owner's stream, in one round trip, without waiting."""
        if not wanted:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for owner, count in wanted.items():
                pipe.xreadgroup(QUEUE_GROUP, consumer, {self.stream_of(owner): ">"}, count=count)
            replies = await pipe.execute(raise_on_error=False)
        entries: list[Entry] = []
        for owner, reply in zip(wanted, replies, strict=True):
            if isinstance(reply, ResponseError):
                await self._regroup(owner, reply)
            else:
                entries += self._entries(owner, reply)
        return entries

    async def wait_for_entries(self, consumer: str, owners: list[str], block_ms: int) -> list[Entry]:
        """At most one new entry from each of `owners`' streams, waiting up to `block_ms` for the first."""
        streams = {self.stream_of(owner): ">" for owner in owners}
        try:
            reply = await self.redis.xreadgroup(QUEUE_GROUP, consumer, streams, count=1, block=block_ms)
        except ResponseError as exc:
            for owner in owners:
                await self._regroup(owner, exc)
            return []
        by_stream = {self.stream_of(owner): owner for owner in owners}
        entries: list[Entry] = []
        for stream, items in reply or []:
            entries += self._entries(by_stream[stream], [[stream, items]])
        return entries

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

    async def claim_from_dead(self, consumer: str, count: int) -> list[Entry]:
        """Move up to `count` pending entries of workers whose heartbeat expired to `consumer`, from every
        owner's stream."""
        claimed: list[Entry] = []
        for owner in await self.owners():
            if len(claimed) >= count:
                break
            claimed += await self._claim_stream(consumer, owner, count - len(claimed))
        return claimed

    async def _claim_stream(self, consumer: str, owner: str, count: int) -> list[Entry]:
        stream = self.stream_of(owner)
        claimed: list[Entry] = []
        try:
            consumers = await self.redis.xinfo_consumers(stream, QUEUE_GROUP)
        except ResponseError:  # the stream or its group is gone (a Redis that lost its data): nothing to claim
            return []
        for info in consumers:
            name = info["name"]
            if name == consumer or await self.redis.exists(self.keys.worker(name)):
                continue
            if info["pending"] == 0:
                await self.redis.xgroup_delconsumer(stream, QUEUE_GROUP, name)
                continue
            pending = await self.redis.xpending_range(
                stream, QUEUE_GROUP, min="-", max="+", count=count - len(claimed), consumername=name
            )
            delivered = {item["message_id"]: int(item["times_delivered"]) for item in pending}
            if delivered:
                for entry_id, fields in await self.redis.xclaim(
                    stream, QUEUE_GROUP, consumer, min_idle_time=0, message_ids=list(delivered)
                ):
                    if fields:
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
