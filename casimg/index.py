"""The Redis index: URL -> digest, reference counts, per-content metadata, listing order.

Every Redis key casimg writes is named by ``KeySpace``; the README's key table mirrors it. Each change
that touches more than one key is a single Lua script, so the index never shows half a change:

- ``store``: point a URL at a digest, count the reference, keep the metadata, give the URL its place in
  the listing and, in the same step, record the outcome in its job (see queue.py).
- ``release``: remove a URL and its reference; the caller then runs the blob delete steps (blobs.py)
  when the count reached zero, and ``drop_meta_if_unreferenced`` to finish.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import redis.asyncio as aioredis

from casimg.batching import ScriptBatcher
from casimg.validation import ImageInfo

MICROS = 1_000_000


@dataclass(frozen=True)
class KeySpace:
    """The name of every Redis key casimg uses, all built here from one prefix."""

    prefix: str = "casimg:"

    @property
    def urls(self) -> str:
        """hash: original URL -> hex SHA-256 of its bytes."""
        return self.prefix + "urls"

    @property
    def refs(self) -> str:
        """hash: digest -> number of URLs pointing at it."""
        return self.prefix + "refs"

    def meta(self, bucket: str) -> str:
        """hash: digest -> "size width height content_type", for the digests starting with `bucket`.

        `bucket` is the digest's first ``META_BUCKET_DIGITS`` hex digits: 4,096 hashes small enough for
        Redis's compact (ziplist/listpack) encoding, which takes a third of the memory of one big hash.
        """
        return f"{self.prefix}meta:{bucket}"

    @property
    def order(self) -> str:
        """sorted set: URL scored by its stored_at time in microseconds (unique), the listing order."""
        return self.prefix + "order"

    @property
    def clock(self) -> str:
        """string: the last stored_at handed out, which keeps listing scores unique and increasing."""
        return self.prefix + "clock"

    @property
    def queue(self) -> str:
        """stream: one entry per URL to download; read by the consumer group ``QUEUE_GROUP``."""
        return self.prefix + "queue"

    def job(self, job_id: str) -> str:
        """hash: a job's status, counters and times."""
        return f"{self.prefix}job:{job_id}"

    def job_urls(self, job_id: str) -> str:
        """list: the job's distinct URLs in submission order."""
        return f"{self.prefix}job:{job_id}:urls"

    def job_results(self, job_id: str) -> str:
        """hash: position in the job's URL list -> JSON outcome, for the URLs that are finished."""
        return f"{self.prefix}job:{job_id}:results"

    def worker(self, name: str) -> str:
        """string with a TTL: present while the named worker is alive."""
        return f"{self.prefix}worker:{name}"

    @property
    def sweep_lock(self) -> str:
        """string with a TTL: held by the worker running the periodic sweep, so only one does."""
        return self.prefix + "sweep-lock"

    def inflight(self, key_id: str) -> str:
        """sorted set: the unfinished jobs of one API key, scored by submission time in ms."""
        return f"{self.prefix}inflight:{key_id}"

    def rate(self, key_id: str) -> str:
        """hash with a TTL: one API key's token bucket, {tokens, ts}."""
        return f"{self.prefix}rate:{key_id}"

    def auth_failures(self, address: str) -> str:
        """string with a 60 s TTL: 401 answers given to one client address in the current minute."""
        return f"{self.prefix}authfail:{address}"

    @property
    def api_keys(self) -> str:
        """hash: API key id -> JSON {name, scope, secret_sha256, created}."""
        return self.prefix + "apikeys"


QUEUE_GROUP = "workers"
# Metadata buckets: a digest's first 3 hex digits. With config/redis.conf's 512 entries per compact hash
# they stay compact up to about 2 million contents; past that Redis converts the fuller ones to plain
# hashes, which only costs memory.
META_BUCKET_DIGITS = 3


def meta_key(keys: KeySpace, digest: str) -> str:
    return keys.meta(digest[:META_BUCKET_DIGITS])


# Shared by the store and complete scripts: record one URL's outcome in its job exactly once and
# remove the queue entry. A job key that has expired still gets its entry acknowledged.
_COMPLETE_LUA = """
local function complete(job, results, queue, group, entry, field, result, counter)
  if entry ~= '' then
    redis.call('XACK', queue, group, entry)
    redis.call('XDEL', queue, entry)
  end
  if field == '' or redis.call('EXISTS', job) == 0 then return end
  if redis.call('HSETNX', results, field, result) == 0 then return end
  if redis.call('TTL', results) < 0 then redis.call('EXPIRE', results, math.max(redis.call('TTL', job), 1)) end
  redis.call('HINCRBY', job, counter, 1)
  local done = redis.call('HINCRBY', job, 'done', 1)
  if done >= tonumber(redis.call('HGET', job, 'total')) then
    redis.call('HSET', job, 'status', 'done', 'finished', ARGV[#ARGV])
  elseif redis.call('HGET', job, 'status') == 'queued' then
    redis.call('HSET', job, 'status', 'running')
  end
end
"""

# KEYS: urls refs meta-bucket-of-digest order clock job results queue
# ARGV: url digest meta now_us entry group field attempts now_iso
STORE_LUA = _COMPLETE_LUA + """
local url, digest = ARGV[1], ARGV[2]
local old = redis.call('HGET', KEYS[1], url)
local outcome, prior
if old then
  outcome, digest, prior = 'exists', old, -1
else
  prior = tonumber(redis.call('HGET', KEYS[2], digest) or '0')
  redis.call('HSET', KEYS[1], url, digest)
  redis.call('HINCRBY', KEYS[2], digest, 1)
  redis.call('HSETNX', KEYS[3], digest, ARGV[3])
  local now = tonumber(ARGV[4])
  local last = tonumber(redis.call('GET', KEYS[5]) or '0')
  if now <= last then now = last + 1 end
  local stamp = string.format('%.0f', now)
  redis.call('SET', KEYS[5], stamp)
  redis.call('ZADD', KEYS[4], stamp, url)
  outcome = 'stored'
end
local result = {status = outcome, sha256 = digest, attempts = tonumber(ARGV[8])}
if outcome == 'stored' and prior > 0 then result.deduplicated = true end
complete(KEYS[6], KEYS[7], KEYS[8], ARGV[6], ARGV[5], ARGV[7], cjson.encode(result),
         outcome == 'stored' and 'stored' or 'existed')
return {outcome, digest, prior}
"""

# KEYS: job results queue     ARGV: entry group field result_json counter now_iso
COMPLETE_LUA = _COMPLETE_LUA + """
complete(KEYS[1], KEYS[2], KEYS[3], ARGV[2], ARGV[1], ARGV[3], ARGV[4], ARGV[5])
return 1
"""

# KEYS: urls refs order     ARGV: url  ->  {digest, references left} or nil
RELEASE_LUA = """
local digest = redis.call('HGET', KEYS[1], ARGV[1])
if not digest then return nil end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
local left = redis.call('HINCRBY', KEYS[2], digest, -1)
if left <= 0 then redis.call('HDEL', KEYS[2], digest); left = 0 end
return {digest, left}
"""

# KEYS: refs meta-bucket-of-digest     ARGV: digest  ->  references (metadata dropped when 0)
DROP_META_LUA = """
local refs = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
if refs <= 0 then redis.call('HDEL', KEYS[2], ARGV[1]) end
return refs
"""

# The metadata bucket depends on the digest found, so the scripts below that read it build its name from
# the meta key prefix in ARGV, the way KeySpace.meta does.
_META_OF_LUA = f"""
local function meta_of(prefix, digest)
  return redis.call('HGET', prefix .. string.sub(digest, 1, {META_BUCKET_DIGITS}), digest) or ''
end
"""

# KEYS: urls order     ARGV: url meta_prefix  ->  {digest, meta, stored_at_us} or nil
LOOKUP_LUA = _META_OF_LUA + """
local digest = redis.call('HGET', KEYS[1], ARGV[1])
if not digest then return nil end
return {digest, meta_of(ARGV[2], digest), redis.call('ZSCORE', KEYS[2], ARGV[1]) or '0'}
"""

# KEYS: order urls     ARGV: after_us limit meta_prefix  ->  {more, url, stored_at_us, digest, meta, ...}
PAGE_LUA = _META_OF_LUA + """
local rows = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. ARGV[1], '+inf', 'WITHSCORES', 'LIMIT', 0,
                        tonumber(ARGV[2]) + 1)
local limit = tonumber(ARGV[2])
local out = {0}
if #rows > 2 * limit then out[1] = 1 end
for i = 1, math.min(#rows, 2 * limit), 2 do
  local digest = redis.call('HGET', KEYS[2], rows[i])
  if digest then
    out[#out + 1] = rows[i]
    out[#out + 1] = rows[i + 1]
    out[#out + 1] = digest
    out[#out + 1] = meta_of(ARGV[3], digest)
  end
end
return out
"""

# KEYS: urls refs order clock     ARGV: now_us  ->  list of the fixes made, for fsck's report
REPAIR_LUA = """
local fixes, counts = {}, {}
local urls = redis.call('HGETALL', KEYS[1])
for i = 1, #urls, 2 do counts[urls[i + 1]] = (counts[urls[i + 1]] or 0) + 1 end
local refs = redis.call('HGETALL', KEYS[2])
for i = 1, #refs, 2 do
  if not counts[refs[i]] then
    redis.call('HDEL', KEYS[2], refs[i])
    fixes[#fixes + 1] = 'refs ' .. refs[i] .. ': ' .. refs[i + 1] .. ' -> 0'
  end
end
for digest, n in pairs(counts) do
  local had = tonumber(redis.call('HGET', KEYS[2], digest) or '0')
  if had ~= n then
    redis.call('HSET', KEYS[2], digest, n)
    fixes[#fixes + 1] = 'refs ' .. digest .. ': ' .. had .. ' -> ' .. n
  end
end
local now = tonumber(ARGV[1])
local last = tonumber(redis.call('GET', KEYS[4]) or '0')
for i = 1, #urls, 2 do
  if not redis.call('ZSCORE', KEYS[3], urls[i]) then
    if now <= last then now = last + 1 end
    last = now
    redis.call('ZADD', KEYS[3], string.format('%.0f', now), urls[i])
    fixes[#fixes + 1] = 'listed again: ' .. urls[i]
  end
end
redis.call('SET', KEYS[4], string.format('%.0f', last))
local listed = redis.call('ZRANGE', KEYS[3], 0, -1)
for i = 1, #listed do
  if redis.call('HEXISTS', KEYS[1], listed[i]) == 0 then
    redis.call('ZREM', KEYS[3], listed[i])
    fixes[#fixes + 1] = 'unlisted: ' .. listed[i]
  end
end
return fixes
"""


@dataclass(frozen=True)
class ImageRecord:
    url: str
    sha256: str
    size: int
    content_type: str
    width: int
    height: int
    stored_at_us: int

    @property
    def stored_at(self) -> datetime:
        return datetime.fromtimestamp(self.stored_at_us / MICROS, tz=UTC)

    def as_json(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "sha256": self.sha256,
            "size": self.size,
            "content_type": self.content_type,
            "width": self.width,
            "height": self.height,
            "stored_at": iso(self.stored_at),
        }


@dataclass(frozen=True)
class StoreOutcome:
    outcome: str  # "stored" or "exists"
    sha256: str
    deduplicated: bool


@dataclass(frozen=True)
class Page:
    images: list[ImageRecord]
    next_cursor: int | None


def iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def now_iso() -> str:
    return iso(datetime.now(UTC))


@dataclass(frozen=True)
class BlobMeta:
    """What the index keeps about one content, stored as the string "size width height content_type"."""

    size: int
    content_type: str
    width: int
    height: int

    def encode(self) -> str:
        return f"{self.size} {self.width} {self.height} {self.content_type}"

    @classmethod
    def decode(cls, raw: str) -> BlobMeta:
        size, width, height, content_type = raw.split(" ", 3)
        return cls(size=int(size), content_type=content_type, width=int(width), height=int(height))


# What a record shows while its metadata is missing (fsck reports that, and --repair rebuilds it).
UNKNOWN_META = BlobMeta(size=0, content_type="application/octet-stream", width=0, height=0)


def encode_meta(size: int, info: ImageInfo) -> str:
    return BlobMeta(size=size, content_type=info.content_type, width=info.width, height=info.height).encode()


def _record(url: str, digest: str, meta: str, stored_at: str | float) -> ImageRecord:
    known = BlobMeta.decode(meta) if meta else UNKNOWN_META
    return ImageRecord(
        url=url,
        sha256=digest,
        size=known.size,
        content_type=known.content_type,
        width=known.width,
        height=known.height,
        stored_at_us=int(float(stored_at)),
    )


class Index:
    def __init__(self, redis: aioredis.Redis, keys: KeySpace) -> None:
        self.redis = redis
        self.keys = keys
        self._batcher = ScriptBatcher(redis)
        self._store = redis.register_script(STORE_LUA)
        self._complete = redis.register_script(COMPLETE_LUA)
        self._release = redis.register_script(RELEASE_LUA)
        self._drop_meta = redis.register_script(DROP_META_LUA)
        self._lookup = redis.register_script(LOOKUP_LUA)
        self._page = redis.register_script(PAGE_LUA)
        self._repair = redis.register_script(REPAIR_LUA)

    async def store(
        self,
        url: str,
        digest: str,
        meta: str,
        *,
        job_id: str = "",
        position: int | None = None,
        entry_id: str = "",
        attempts: int = 1,
    ) -> StoreOutcome:
        """Store step 2 (blobs.py): index the URL and, atomically with it, finish its queue entry."""
        k = self.keys
        outcome, stored_digest, prior = await self._batcher.call(
            self._store,
            [k.urls, k.refs, meta_key(k, digest), k.order, k.clock, k.job(job_id), k.job_results(job_id), k.queue],
            [url, digest, meta, time.time_ns() // 1000, entry_id, QUEUE_GROUP,
             "" if position is None else str(position), attempts, now_iso()],
        )
        return StoreOutcome(outcome, stored_digest, outcome == "stored" and int(prior) > 0)

    async def complete(
        self, job_id: str, position: int, entry_id: str, result: dict[str, Any], counter: str
    ) -> None:
        """Record an outcome that did not change the index (failed, or already present)."""
        k = self.keys
        await self._complete(
            keys=[k.job(job_id), k.job_results(job_id), k.queue],
            args=[entry_id, QUEUE_GROUP, str(position), json.dumps(result, separators=(",", ":")), counter,
                  now_iso()],
        )

    async def release(self, url: str) -> tuple[str, int] | None:
        """Delete step 1: unindex the URL. Returns (digest, references left) or None if unknown."""
        k = self.keys
        reply = await self._release(keys=[k.urls, k.refs, k.order], args=[url])
        if reply is None:
            return None
        return reply[0], int(reply[1])

    async def drop_meta_if_unreferenced(self, digest: str) -> int:
        """Delete step 3: the references a digest has now; its metadata goes when that is 0."""
        return int(await self._drop_meta(keys=[self.keys.refs, meta_key(self.keys, digest)], args=[digest]))

    async def digest_of(self, url: str) -> str | None:
        return await self.redis.hget(self.keys.urls, url)

    async def digests_of(self, urls: list[str]) -> list[str | None]:
        """The digest of each URL, None where it is not indexed; one round trip."""
        return list(await self.redis.hmget(self.keys.urls, urls)) if urls else []

    async def refs_of(self, digest: str) -> int:
        return int(await self.redis.hget(self.keys.refs, digest) or 0)

    async def refs_many(self, digests: list[str]) -> list[int]:
        if not digests:
            return []
        return [int(n or 0) for n in await self.redis.hmget(self.keys.refs, digests)]

    async def lookup(self, url: str) -> ImageRecord | None:
        k = self.keys
        reply = await self._lookup(keys=[k.urls, k.order], args=[url, k.meta("")])
        if reply is None:
            return None
        return _record(url, reply[0], reply[1], reply[2])

    async def meta_of(self, digest: str) -> BlobMeta | None:
        raw = await self.redis.hget(meta_key(self.keys, digest), digest)
        return BlobMeta.decode(raw) if raw else None

    async def ensure_meta(self, digest: str, meta: str) -> None:
        await self.redis.hsetnx(meta_key(self.keys, digest), digest, meta)

    async def page(self, after_us: int, limit: int) -> Page:
        """Images stored after the cursor, oldest first. A URL present throughout a walk is seen once."""
        k = self.keys
        reply = await self._page(keys=[k.order, k.urls], args=[after_us, limit, k.meta("")])
        images = [
            _record(reply[i], reply[i + 2], reply[i + 3], reply[i + 1]) for i in range(1, len(reply), 4)
        ]
        more = bool(int(reply[0]))
        return Page(images, images[-1].stored_at_us if more and images else None)

    async def count(self) -> int:
        return int(await self.redis.hlen(self.keys.urls))

    async def all_urls(self) -> dict[str, str]:
        return await self.redis.hgetall(self.keys.urls)

    async def all_refs(self) -> dict[str, int]:
        return {d: int(n) for d, n in (await self.redis.hgetall(self.keys.refs)).items()}

    async def snapshot(self) -> tuple[dict[str, str], dict[str, int], dict[str, str], set[str]]:
        """urls, refs, meta and listed URLs read in one MULTI, so fsck compares one moment."""
        k = self.keys
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hgetall(k.urls).hgetall(k.refs).zrange(k.order, 0, -1)
            for bucket in range(16**META_BUCKET_DIGITS):
                pipe.hgetall(k.meta(f"{bucket:0{META_BUCKET_DIGITS}x}"))
            urls, refs, listed, *buckets = await pipe.execute()
        meta = {digest: raw for bucket in buckets for digest, raw in bucket.items()}
        return urls, {d: int(n) for d, n in refs.items()}, meta, set(listed)

    async def repair(self) -> list[str]:
        """Recount references and re-align the listing with the URL hash, in one atomic step."""
        k = self.keys
        return list(await self._repair(keys=[k.urls, k.refs, k.order, k.clock], args=[time.time_ns() // 1000]))
