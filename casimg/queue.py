"""Durable jobs: submit, read, claim, complete, and take over after a crash.

A job is written to Redis in one Lua step before its 202 goes out: its status hash, its URL list, and one
entry per distinct URL in the queue stream. Workers read the stream through one consumer group, so
any number of processes on any number of machines share the work. An entry leaves the stream only in
the same Lua step that records its outcome (index.py ``complete``), so a crash at any moment leaves it
pending, never lost. Each worker keeps a heartbeat key alive; a worker whose heartbeat has expired is
dead, and any live worker claims its pending entries.
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
from casimg.index import QUEUE_GROUP, KeySpace, now_iso

SUBMIT_CHUNK = 1000  # URLs per RPUSH inside the submit script (Lua's unpack has a stack limit)
IN_FLIGHT_RETRY = 5.0  # seconds a client refused for too many unfinished jobs is asked to wait

# KEYS: job job_urls queue inflight
# ARGV: job_id ttl_ms created key_id max_in_flight job_key_prefix now_ms url...  ->  1 recorded, 0 refused
# The in-flight set is cleaned as it is read: a job that is done or has expired no longer counts.
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
for i = first, #ARGV do
  redis.call('XADD', KEYS[3], '*', 'job', job_id, 'pos', i - first, 'url', ARGV[i])
end
return 1
""".replace("CHUNK", str(SUBMIT_CHUNK))
SCAN_COUNT = 1000  # keys per SCAN step and statuses per pipeline when counting jobs


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


def _entry(entry_id: str, fields: dict[str, str]) -> Entry:
    return Entry(entry_id, fields["job"], int(fields["pos"]), fields["url"])


class JobQueue:
    def __init__(self, redis: aioredis.Redis, keys: KeySpace, job_ttl: float) -> None:
        self.redis = redis
        self.keys = keys
        self.job_ttl = max(1, int(job_ttl))
        self._submit = redis.register_script(SUBMIT_LUA)

    async def ensure_group(self) -> None:
        """Create the stream and its consumer group once; reading from id 0 keeps entries added before."""
        try:
            await self.redis.xgroup_create(self.keys.queue, QUEUE_GROUP, id="0", mkstream=True)
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
            keys=[k.job(job_id), k.job_urls(job_id), k.queue, k.inflight(key_id or "-")],
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

    async def read(self, consumer: str, count: int, block_ms: int) -> list[Entry]:
        reply = await self.redis.xreadgroup(
            QUEUE_GROUP, consumer, {self.keys.queue: ">"}, count=count, block=block_ms
        )
        return [_entry(entry_id, fields) for _, entries in reply or [] for entry_id, fields in entries]

    async def heartbeat(self, consumer: str, ttl: float) -> None:
        await self.redis.set(self.keys.worker(consumer), now_iso(), px=max(1, int(ttl * 1000)))

    async def retire(self, consumer: str) -> None:
        """A worker leaving cleanly: its unfinished entries become claimable at once."""
        await self.redis.delete(self.keys.worker(consumer))

    async def claim_from_dead(self, consumer: str, count: int) -> list[Entry]:
        """Move the pending entries of workers whose heartbeat expired to `consumer`."""
        claimed: list[Entry] = []
        for info in await self.redis.xinfo_consumers(self.keys.queue, QUEUE_GROUP):
            name = info["name"]
            if name == consumer or await self.redis.exists(self.keys.worker(name)):
                continue
            if info["pending"] == 0:
                await self.redis.xgroup_delconsumer(self.keys.queue, QUEUE_GROUP, name)
                continue
            pending = await self.redis.xpending_range(
                self.keys.queue, QUEUE_GROUP, min="-", max="+", count=count - len(claimed), consumername=name
            )
            delivered = {item["message_id"]: int(item["times_delivered"]) for item in pending}
            if delivered:
                for entry_id, fields in await self.redis.xclaim(
                    self.keys.queue, QUEUE_GROUP, consumer, min_idle_time=0, message_ids=list(delivered)
                ):
                    if fields:
                        claimed.append(replace(_entry(entry_id, fields), deliveries=delivered[entry_id] + 1))
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
        """Entries waiting to be read and entries read but not finished."""
        try:
            groups = await self.redis.xinfo_groups(self.keys.queue)
        except ResponseError:
            return {"waiting": 0, "in_progress": 0}
        length = await self.redis.xlen(self.keys.queue)
        pending = sum(int(g["pending"]) for g in groups if g["name"] == QUEUE_GROUP)
        return {"waiting": max(0, length - pending), "in_progress": pending}
