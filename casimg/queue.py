"""Durable jobs: submit, read, claim, complete, and take over after a crash.

A job is written to Redis in one MULTI before its 202 goes out: its status hash, its URL list, and one
entry per distinct URL in the queue stream. Workers read the stream through one consumer group, so
any number of processes on any number of machines share the work. An entry leaves the stream only in
the same Lua step that records its outcome (index.py ``complete``), so a crash at any moment leaves it
pending, never lost. Each worker keeps a heartbeat key alive; a worker whose heartbeat has expired is
dead, and any live worker claims its pending entries.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from casimg.errors import NotFound
from casimg.index import QUEUE_GROUP, KeySpace, now_iso

SUBMIT_CHUNK = 1000  # URLs per RPUSH/XADD batch inside the submit transaction
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

    async def ensure_group(self) -> None:
        """Create the stream and its consumer group once; reading from id 0 keeps entries added before."""
        try:
            await self.redis.xgroup_create(self.keys.queue, QUEUE_GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def submit(self, urls: list[str], key_id: str = "") -> tuple[str, int]:
        """Record a job durably; returns (job_id, number of distinct URLs)."""
        distinct = list(dict.fromkeys(urls))
        job_id = secrets.token_hex(12)
        k = self.keys
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(k.job(job_id), mapping={
                "status": "queued", "total": len(distinct), "done": 0, "stored": 0, "existed": 0,
                "failed": 0, "created": now_iso(), "key": key_id,
            })
            pipe.expire(k.job(job_id), self.job_ttl)
            for start in range(0, len(distinct), SUBMIT_CHUNK):
                pipe.rpush(k.job_urls(job_id), *distinct[start:start + SUBMIT_CHUNK])
            pipe.expire(k.job_urls(job_id), self.job_ttl)
            for position, url in enumerate(distinct):
                pipe.xadd(k.queue, {"job": job_id, "pos": position, "url": url})
            await pipe.execute()
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
            ids = [item["message_id"] for item in pending]
            if ids:
                for entry_id, fields in await self.redis.xclaim(
                    self.keys.queue, QUEUE_GROUP, consumer, min_idle_time=0, message_ids=ids
                ):
                    if fields:
                        claimed.append(_entry(entry_id, fields))
            if len(claimed) >= count:
                break
        return claimed

    async def count_by_status(self) -> dict[str, int]:
        """How many unexpired jobs are queued, running and done.

        Jobs are found with SCAN (never KEYS): the keyspace holds a few keys per job and a fixed handful
        besides, since URLs, refs and metadata are each one hash, so this stays cheap however many images
        are stored.
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
