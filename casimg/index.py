"""The Redis index: URL -> digest, stored_at and metadata; per-content reference counts; listing.

Every Redis key casimg writes is named by ``schema.KeySpace``. The index lives in 2 x 4,096 small hashes,
each kept in Redis's compact (ziplist/listpack) encoding, which holds them to about 230 bytes per URL (the
newest-first order adds about 115, BENCHMARKS.md "Redis memory"):

- ``url:{bucket}``: URL -> "<sha256 hex> <stored_at ms> <size> <width> <height> <content_type>" (just
  "<sha256 hex> <stored_at ms>" while the metadata is missing), the bucket named by the first 3 hex
  digits of the URL's SHA-1. The listing walks these buckets in order, so it is ordered by that SHA-1.
  A lookup or a listing row is this one value: the metadata describes the bytes, which never change
  under a digest, so each URL keeps its own copy rather than a second read of the content's record.
- ``blob:{bucket}``: the 32 raw bytes of a SHA-256 -> its reference count, the bucket named by the
  digest's first 3 hex digits. Raw rather than hex fields save a third of the bucket's memory; a
  content with no references has no record.
- ``count``: the number of URLs and of referenced contents, so totals need no scan.
- ``recent`` and ``recent:{bound}``: the newest-first order, each URL once as "<stored_at><SHA-1><URL>" in
  small sorted sets that Redis orders byte by byte (lua/lib_recent.lua draws it). A URL keeps its place
  from its store to its release, so a walk in this order, too, sees each URL present throughout once.

Each change that touches more than one key is a single Lua script (lua/, composed as lua.SCRIPTS says), so
the index never shows half a change:

- ``store``: point a URL at a digest with its metadata, count the reference, bump the counts, place the
  URL in the newest-first order and, in the same step, record the outcome in its job (see queue.py).
- ``release``: remove a URL, its reference and its place in the newest-first order; the caller then runs
  the blob delete steps (lifecycle.py) when the count reached zero.

The scripts build the bucket names a digest or URL leads to from the prefixes in their ARGV, as KeySpace
does (the bucket is known only once the script has read the digest). A single Redis, which is what
casimg runs on, allows that; a cluster would want every key in KEYS. Replies that carry a digest carry
it as hex: the decoding client cannot read raw bytes, and only ``snapshot`` reads blob buckets whole,
through a client that does not decode.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple

import redis.asyncio as aioredis
from redis.client import NEVER_DECODE

from casimg.batching import ScriptBatcher
from casimg.clock import now_iso, now_ms
from casimg.lua import source as lua_source
from casimg.schema import (
    BUCKET_DIGITS,
    BUCKETS,
    QUEUE_GROUP,
    RECENT_CURSOR_PREFIX,
    KeySpace,
    Order,
    Outcome,
    blob_key,
    placeholder_key,
    queue_stream,
    url_bucket,
    url_key,
)


class ImageRecord(NamedTuple):
    """One indexed URL with its content's metadata, as a lookup returns it (a listing page's rows are
    plain tuples of the same fields, ``Row``)."""

    url: str
    sha256: str
    size: int
    content_type: str
    width: int
    height: int
    stored_at_ms: int
    placeholder: str | None = None  # the content's ThumbHash (base64); only listing rows carry it


class Released(NamedTuple):
    """What unindexing a URL left: its digest, that digest's references left, and the digests of the
    variants that lost their last reference with it (when `left` is 0), for the blob delete steps."""

    digest: str
    left: int
    freed: tuple[str, ...] = ()


@dataclass(frozen=True)
class StoreOutcome:
    outcome: Outcome  # STORED or EXISTS
    sha256: str
    deduplicated: bool

    @property
    def kind(self) -> Outcome:
        """The outcome as logged and counted: DEDUPLICATED for a URL stored under a content already there."""
        return Outcome.DEDUPLICATED if self.deduplicated else self.outcome


# URL buckets one urls_of script call reads: 4 buckets of ~250 URLs each at a million URLs hold Redis about
# a millisecond; 32 calls go in one round trip (BENCHMARKS.md, "Gallery").
URL_SCAN_BUCKETS = 4
URL_SCAN_CALLS = 32

# ImageRecord's fields, in order, as a plain tuple: a listing page has a thousand, and making each a
# NamedTuple cost a tenth of building the page's JSON (BENCHMARKS.md, "Figures behind design choices").
Row = tuple[str, str, int, str, int, int, int, str | None]


# What a filtered page may spend before it ends, with fewer rows if so, and a cursor to go on from: each
# page is one Lua call, which holds Redis while it runs. The time is the bound that matters (a URL looked
# at costs 1-15 µs with the machine's load, BENCHMARKS.md "Listing filters"); the count keeps a page's
# work the same on any machine when the time is not reached. An unfiltered page looks only at its rows.
FILTER_BUDGET = 10_000  # URLs looked at
FILTER_BUDGET_US = 3_000  # µs of Redis's time, read from its clock as the page goes


@dataclass(frozen=True)
class ListingFilter:
    """What a listing keeps: URLs starting with `prefix`, holding `contains`, on host `host` (all that are
    not empty). `host` is compared without the port and lowercased in ASCII, as lua/lib_filter.lua does."""

    prefix: str = ""
    contains: str = ""
    host: str = ""

    def __bool__(self) -> bool:
        return bool(self.prefix or self.contains or self.host)

    def args(self) -> list[str]:
        return [self.prefix, self.contains, "".join(c.lower() if c.isascii() else c for c in self.host)]


NO_FILTER = ListingFilter()


@dataclass(frozen=True)
class Page:
    images: list[Row]  # view them with views.image_json(*row)
    next_cursor: str | None  # while more follow: the SHA-1 (hex) of the page's last URL (or, filtered, of
    # the last URL looked at); "r." + the hex of its (stored_at, SHA-1) key in the newest-first order
    total: int  # URLs indexed, read in the same step as the page


@dataclass(frozen=True)
class Snapshot:
    """The whole index at one moment, for fsck."""

    urls: dict[str, str]  # URL -> digest (where a URL sits in two buckets, the entry in its own bucket)
    misplaced: dict[str, str]  # URL -> the bucket it sits in, which is not the one its SHA-1 names
    refs: dict[str, int]  # digest -> references, from the records in their own bucket
    bare: set[str]  # the URLs whose value lacks the metadata
    types: dict[str, str]  # URL -> the content type its metadata records (for the URLs that have it)
    stray: dict[str, str]  # digest -> the bucket its record sits in, which is not its own
    counts: dict[str, int]  # the count hash: urls, blobs (0 where missing)
    # source -> canonical -> "<variant hex> <size>": every variant relation
    variants: dict[str, dict[str, str]] = dataclasses.field(default_factory=dict)
    # digest -> how many of its references are relations, as recorded in its own bucket
    variant_refs: dict[str, int] = dataclasses.field(default_factory=dict)
    variant_refs_stray: dict[str, str] = dataclasses.field(default_factory=dict)  # digest -> another bucket


@dataclass(frozen=True)
class BlobMeta:
    """What the index keeps about one content, in the value of each URL that points at it, as the string
    "size width height content_type"."""

    size: int
    content_type: str
    width: int
    height: int

    def encode(self) -> str:
        return f"{self.size} {self.width} {self.height} {self.content_type}"

    @classmethod
    def decode(cls, text: str) -> BlobMeta:
        size, width, height, content_type = text.split(" ", 3)
        return cls(size=int(size), content_type=content_type, width=int(width), height=int(height))


# What a URL shows while its metadata is missing (fsck reports that, and --repair rebuilds it).
UNKNOWN_META = BlobMeta(size=0, content_type="application/octet-stream", width=0, height=0)


def has_meta(value: str) -> bool:
    """Whether a URL's value carries its metadata: a space after "<sha256 hex> <stored_at>"."""
    return value.find(" ", 66) != -1


def _fields(url: str, value: str, placeholder: str | None = None) -> Row:
    """ImageRecord's fields from a URL's value "<sha256 hex> <stored_at> <size> <width> <height> <type>"."""
    parts = value.split(" ", 5)  # BlobMeta.encode's order after the digest and time, without a BlobMeta
    if len(parts) < 6:
        known = UNKNOWN_META
        return url, parts[0], known.size, known.content_type, known.width, known.height, int(parts[1]), placeholder
    digest, stored_at, size, width, height, content_type = parts
    return url, digest, int(size), content_type, int(width), int(height), int(stored_at), placeholder


class Index:
    def __init__(self, redis: aioredis.Redis, keys: KeySpace, placeholders: bool = False) -> None:
        self.redis = redis
        self.keys = keys
        self.placeholders = placeholders  # a stored content without a placeholder is queued for one
        self._placeholders_made = False  # seen the flag set by the first placeholder (it is never unset)
        self._batcher = ScriptBatcher(redis)
        self._store = redis.register_script(lua_source("store"))
        self._hget_many = redis.register_script(lua_source("hget_each"))
        self._complete = redis.register_script(lua_source("complete"))
        self._release = redis.register_script(lua_source("release"))
        self._ensure_meta = redis.register_script(lua_source("ensure_meta"))
        self._correct_meta = redis.register_script(lua_source("correct_meta"))
        self._lookup = redis.register_script(lua_source("lookup"))
        self._page = redis.register_script(lua_source("page"))
        self._urls_of = redis.register_script(lua_source("urls_of"))
        self._page_recent = redis.register_script(lua_source("page_recent"))
        self._recent_prune = redis.register_script(lua_source("recent_prune"))
        self._repair = redis.register_script(lua_source("repair"))
        self._claim = redis.register_script(lua_source("claim"))
        self._unclaim = redis.register_script(lua_source("unclaim"))
        self._tomb = redis.register_script(lua_source("tomb"))
        self._begin_delete = redis.register_script(lua_source("begin_delete"))

    async def store(
        self,
        url: str,
        digest: str,
        meta: BlobMeta | None,
        *,
        job_id: str = "",
        position: int | None = None,
        entry_id: str = "",
        attempts: int = 1,
        owner: str = "",
    ) -> StoreOutcome:
        """Store step 2 (storage/file.py): index the URL and, atomically with it, finish its entry in the queue
        stream of `owner` (the API key that sent it; the keyless stream if empty). With placeholders on, a
        content that has none is queued for the filler (filler.py) in the same step."""
        k = self.keys
        outcome, stored_digest, prior = await self._batcher.call(
            self._store,
            [url_key(k, url), blob_key(k, digest), k.count, k.job(job_id), k.job_results(job_id),
             queue_stream(k, owner), k.queue_owners, k.recent, k.webhooks],
            [url, digest, "" if meta is None else meta.encode(), now_ms(), entry_id, QUEUE_GROUP,
             "" if position is None else str(position),
             attempts, owner, k.recent_leaf(""), k.placeholder_todo if self.placeholders else "",
             k.placeholder(""), now_iso()],
        )
        stored = Outcome(outcome)  # the script answers 'stored', 'exists' or 'cancelled' (the job was)
        return StoreOutcome(stored, stored_digest, stored is Outcome.STORED and int(prior) > 0)

    async def complete(
        self, job_id: str, position: int, entry_id: str, outcome: Outcome, detail: dict[str, Any], owner: str = ""
    ) -> None:
        """Record an outcome that did not change the index (failed, or already present), with its `detail`
        (sha256, or error and attempts) in the job's result; the entry leaves the queue stream of `owner`
        (the keyless stream if empty). A result with a sha256 gains its content's placeholder."""
        k = self.keys
        result = {"status": outcome.status.value, **detail}
        digest = detail.get("sha256")
        await self._complete(
            keys=[k.job(job_id), k.job_results(job_id), queue_stream(k, owner), k.queue_owners, k.webhooks],
            args=[entry_id, QUEUE_GROUP, str(position), json.dumps(result, separators=(",", ":")),
                  outcome.counter, owner, now_ms(), f"{digest} {k.placeholder('')}" if digest else "", now_iso()],
        )

    async def release(self, url: str) -> Released | None:
        """Delete step 1: unindex the URL (with its content's last reference, the content's placeholder
        and variant relations go too). None if the URL is unknown."""
        k = self.keys
        reply = await self._release(keys=[url_key(k, url), k.count, k.recent],
                                    args=[url, k.blob(""), k.recent_leaf(""), k.placeholder(""), k.variants(""),
                                          k.variant_refs("")])
        if reply is None:
            return None
        return Released(reply[0], int(reply[1]), tuple(reply[2:]))

    async def digest_of(self, url: str) -> str | None:
        value = await self.redis.hget(url_key(self.keys, url), url)
        return value[:64] if value else None

    async def digests_of(self, urls: list[str]) -> list[str | None]:
        """digest_of for each URL, in one round trip."""
        digests, _ = await self.digests_and_fields(urls, [])
        return digests

    async def digests_and_fields(
        self, urls: list[str], fields: list[tuple[str, str]]
    ) -> tuple[list[str | None], list[str | None]]:
        """digest_of for each URL and HGET key field for each of `fields` (keys other modules name), in one
        round trip: a worker asks whether its entries' jobs are cancelled in the same trip as their URLs."""
        values = await self._hget_each([*((url_key(self.keys, url), url) for url in urls), *fields])
        return [value[:64] if value else None for value in values[:len(urls)]], values[len(urls):]

    async def records_of(self, urls: list[str]) -> list[ImageRecord | None]:
        """lookup for each URL, in one round trip."""
        values = await self._hget_each((url_key(self.keys, url), url) for url in urls)
        return [None if value is None else ImageRecord._make(_fields(url, value)) for url, value in
                zip(urls, values, strict=True)]

    async def refs_of(self, digest: str) -> int:
        record = await self.redis.hget(blob_key(self.keys, digest), bytes.fromhex(digest))
        return int(record) if record else 0

    async def refs_many(self, digests: list[str]) -> list[int]:
        records = await self._hget_each((blob_key(self.keys, d), bytes.fromhex(d)) for d in digests)
        return [int(record) if record else 0 for record in records]

    async def _hget_each(self, pairs: Iterable[tuple[str, str | bytes]]) -> list[Any]:
        """HGET key field for each pair, in one command (the pairs lie in different buckets): one script
        call, which the client packs and parses once where a pipeline of HGETs costs it that per pair."""
        keys: list[str] = []
        fields: list[str | bytes] = []
        for key, field in pairs:
            keys.append(key)
            fields.append(field)
        if not keys:
            return []
        return list(await self._hget_many(keys=keys, args=fields))

    async def lookup(self, url: str) -> ImageRecord | None:
        """The record of `url`, or None; one HGET, sent with the other lookups of its loop turn."""
        value = await self._batcher.call(self._lookup, [url_key(self.keys, url)], [url])
        return None if value is None else ImageRecord._make(_fields(url, value))

    async def ensure_meta(self, url: str, digest: str, meta: BlobMeta) -> bool:
        """Give `url` its metadata if it points at `digest` and lacks it. True if it was set."""
        return bool(await self._ensure_meta(keys=[url_key(self.keys, url)], args=[url, digest, meta.encode()]))

    async def correct_meta(self, url: str, digest: str, meta: BlobMeta) -> bool:
        """Give `url` the metadata `meta`, replacing what it holds, if it points at `digest`. True if it
        changed. For fsck --repair: `meta` must be read from the blob's own bytes."""
        return bool(await self._correct_meta(keys=[url_key(self.keys, url)], args=[url, digest, meta.encode()]))

    async def page(self, cursor: str | None, limit: int, order: Order = Order.SHA1,
                   where: ListingFilter = NO_FILTER, budget: int = FILTER_BUDGET,
                   budget_us: int = FILTER_BUDGET_US) -> Page:
        """`limit` (>= 1) images after the cursor in `order` (fewer at the end; more only where URLs share
        one SHA-1, or in the newest-first order one (stored_at, SHA-1)). A URL present throughout a walk is
        seen once: its place never changes. The cursor must be one of `order`'s (the handler checks).

        With a filter, only the URLs it keeps; and a page that has looked at `budget` URLs, or run for
        `budget_us` µs, ends with what it found (none, maybe) and a cursor to go on from."""
        if order is Order.RECENT:
            return await self._page_newest(cursor, limit, where, budget, budget_us)
        k = self.keys
        reply, made = await self._page_and_flag(
            self._page, [k.count], [k.url(""), cursor or "", limit, *where.args(), budget, budget_us])
        images = await self._with_placeholders([_fields(reply[i], reply[i + 1]) for i in range(3, len(reply), 2)],
                                               made)
        more = bool(int(reply[0]))
        return Page(images, reply[2] if more else None, int(reply[1]))

    async def urls_of(self, digest: str, limit: int) -> list[str]:
        """Up to `limit` URLs that point at `digest`, in bucket order. There is no reverse map (it would cost
        more memory per URL than the rest of the index), so this reads the URL buckets, URL_SCAN_BUCKETS per
        script call and URL_SCAN_CALLS calls per round trip, and stops once `limit` are found: each call
        holds Redis briefly, and other clients are served between them."""
        found: list[str] = []
        names = [self.keys.url(bucket) for bucket in BUCKETS]
        step = URL_SCAN_BUCKETS * URL_SCAN_CALLS
        for start in range(0, len(names), step):
            async with self.redis.pipeline(transaction=False) as pipe:
                for first in range(start, min(start + step, len(names)), URL_SCAN_BUCKETS):
                    chunk = names[first:first + URL_SCAN_BUCKETS]
                    await self._urls_of(keys=chunk, args=[digest], client=pipe)  # queued; the pipeline loads it
                for urls in await pipe.execute():
                    found += urls
            if len(found) >= limit:
                break
        return found[:limit]

    async def _page_newest(
        self, cursor: str | None, limit: int, where: ListingFilter, budget: int, budget_us: int
    ) -> Page:
        k = self.keys
        after = bytes.fromhex(cursor.removeprefix(RECENT_CURSOR_PREFIX)) if cursor else b""
        reply, made = await self._page_and_flag(
            self._page_recent, [k.count, k.recent],
            [k.url(""), k.recent_leaf(""), after, limit, *where.args(), budget, budget_us])
        images = await self._with_placeholders([_fields(reply[i], reply[i + 1]) for i in range(3, len(reply), 2)],
                                               made)
        more = bool(int(reply[0]))
        return Page(images, RECENT_CURSOR_PREFIX + reply[2] if more else None, int(reply[1]))

    async def recent_size(self) -> int:
        """Members of the newest-first order, summed over its leaves (one ZCARD each, pipelined): fsck
        compares it with the URLs indexed."""
        bounds = await self._recent_bounds()
        async with self.redis.pipeline(transaction=False) as pipe:
            for bound in bounds:
                pipe.zcard(self.keys.recent_leaf(bound.hex() if bound else "first"))
            return sum(await pipe.execute())

    async def prune_recent(self) -> int:
        """Drop the newest-first order's members whose URL is gone or indexed with another stored_at, a leaf
        per Lua call, the last leaf first (a leaf that empties joins the one before, not yet pruned).
        Returns the members dropped."""
        k, removed = self.keys, 0
        for bound in reversed(await self._recent_bounds()):
            removed += int(await self._recent_prune(keys=[k.recent], args=[k.url(""), k.recent_leaf(""), bound]))
        return removed

    async def _recent_bounds(self) -> list[bytes]:
        """The leaves' bounds, raw (the decoding client cannot read them)."""
        raw = await self.redis.execute_command("ZRANGE", self.keys.recent, 0, -1, **{NEVER_DECODE: True})
        return list(raw)

    async def placeholder_of(self, digest: str) -> str | None:
        """The content's placeholder (ThumbHash, base64), None if it has none (or none can be made: '')."""
        return await self.redis.hget(placeholder_key(self.keys, digest), bytes.fromhex(digest)) or None

    async def _page_and_flag(self, script: Any, keys: list[str], args: list[Any]) -> tuple[list[Any], bool]:
        """A page script's reply, and whether any placeholder was ever made (the flag rides in the page's
        round trip until this process has seen it set; from then on it is not asked)."""
        if self._placeholders_made:
            return await script(keys=keys, args=args), True
        async with self.redis.pipeline(transaction=False) as pipe:
            await script(keys=keys, args=args, client=pipe)  # queued; the pipeline loads it
            pipe.exists(self.keys.placeholders_made)
            reply, made = await pipe.execute()
        self._placeholders_made = bool(made)
        return reply, self._placeholders_made

    async def _with_placeholders(self, rows: list[Row], made: bool = True) -> list[Row]:
        """The rows with their contents' placeholders, read in one round trip (kept once per content, so
        not in the URL's value); none are read while no placeholder was ever `made`."""
        if not rows or not made:
            return rows
        async with self.redis.pipeline(transaction=False) as pipe:
            for row in rows:
                pipe.hget(placeholder_key(self.keys, row[1]), bytes.fromhex(row[1]))
            found = await pipe.execute()
        return [(*row[:7], placeholder or None) for row, placeholder in zip(rows, found, strict=True)]

    async def count(self) -> int:
        """URLs indexed, from the count hash."""
        return int(await self.redis.hget(self.keys.count, "urls") or 0)

    async def sizes(self) -> tuple[int, int]:
        """(URLs, distinct contents), from the count hash the scripts keep exact."""
        urls, blobs = await self.redis.hmget(self.keys.count, ["urls", "blobs"])
        return int(urls or 0), int(blobs or 0)

    async def take_sweep_lock(self, holder: str, seconds: float) -> bool:
        """Whether `holder` may run the periodic sweep of unindexed blobs now: True for one caller until
        the lock expires after `seconds`, so one worker at a time sweeps."""
        return bool(await self.redis.set(self.keys.sweep_lock, holder, nx=True, px=max(1, int(seconds * 1000))))

    # -- claims and tombstones: the lifecycle of blobs on an object store (lifecycle.py, storage/s3.py) --

    async def claim(self, digest: str, token: str, ttl: float) -> int:
        """Hold a claim on `digest` for `ttl` seconds while a store uploads it: 1, or 2 when the digest is
        referenced (so its object is there and stays while the claim lives); 0 while a delete of its
        object may be in flight (the caller waits and asks again)."""
        k = self.keys
        return int(await self._claim(keys=[k.claims(digest), k.deleting(digest), k.tomb, blob_key(k, digest)],
                                     args=[token, max(1, int(ttl * 1000)), digest, bytes.fromhex(digest)]))

    async def unclaim(self, digest: str, token: str) -> bool:
        """Drop the claim; True if it was still live, so no delete of the object can have begun since it
        was taken."""
        return bool(await self._unclaim(keys=[self.keys.claims(digest)], args=[token]))

    async def tomb(self, digest: str, grace: float) -> bool:
        """Mark an unreferenced digest's object for deletion by the sweep after `grace` seconds; False
        (and nothing marked) if it is referenced."""
        k = self.keys
        return bool(await self._tomb(keys=[blob_key(k, digest), k.tomb],
                                     args=[bytes.fromhex(digest), digest, max(0, int(grace * 1000))]))

    async def due_tombs(self, limit: int) -> list[str]:
        """Up to `limit` tombstoned digests whose grace has passed (by this node's clock, which only
        picks candidates: begin_delete decides by Redis's)."""
        return await self.redis.zrangebyscore(self.keys.tomb, "-inf", int(time.time() * 1000),
                                              start=0, num=limit)

    async def tombstoned(self) -> set[str]:
        return set(await self.redis.zrange(self.keys.tomb, 0, -1))

    async def begin_delete(self, digest: str, marker_ttl: float) -> bool:
        """True if the sweep may delete `digest`'s object now: due, unreferenced, unclaimed. The deleting
        marker is then set for `marker_ttl` seconds, longer than any DELETE request may take."""
        k = self.keys
        return bool(await self._begin_delete(
            keys=[blob_key(k, digest), k.claims(digest), k.deleting(digest), k.tomb],
            args=[bytes.fromhex(digest), digest, max(1, int(marker_ttl * 1000))]))

    async def end_delete(self, digest: str) -> None:
        await self.redis.delete(self.keys.deleting(digest))

    async def snapshot(self) -> Snapshot:
        """Every bucket and the counts read in one MULTI, so fsck compares one moment.

        Blob buckets have raw digests as fields, which the decoding client cannot read; they are read
        through a client of their own on the same server (redis-py's NEVER_DECODE does not work in MULTI).
        """
        k = self.keys
        pool = self.redis.connection_pool
        raw = aioredis.Redis.from_pool(aioredis.ConnectionPool(
            connection_class=pool.connection_class, max_connections=1,
            **{**pool.connection_kwargs, "decode_responses": False},
        ))
        relations = raw.register_script(lua_source("variants_all"))
        try:
            async with raw.pipeline(transaction=True) as pipe:
                for bucket in BUCKETS:
                    pipe.hgetall(k.url(bucket))
                for bucket in BUCKETS:
                    pipe.hgetall(k.blob(bucket))
                await relations(keys=[], args=[k.variants(""), _glob_escape(k.variants("")) + "*"], client=pipe)
                pipe.hgetall(k.count)
                for bucket in BUCKETS:
                    pipe.hgetall(k.variant_refs(bucket))
                replies = await pipe.execute()
        finally:
            await raw.aclose()
        n = len(BUCKETS)
        buckets, (flat, counts), as_variant = replies[:2 * n], replies[2 * n:2 * n + 2], replies[2 * n + 2:]
        snap = Snapshot(urls={}, misplaced={}, refs={}, bare=set(), stray={}, types={},
                        counts={"urls": 0, "blobs": 0} | {f.decode(): int(n) for f, n in counts.items()})
        seen_types: dict[str, str] = {}
        for bucket, entries in zip(BUCKETS, buckets[:len(BUCKETS)], strict=True):
            for field, raw_value in entries.items():
                url, value = field.decode(), raw_value.decode()
                if url_bucket(url) == bucket:
                    snap.urls[url] = value[:64]
                else:
                    snap.misplaced[url] = bucket
                    snap.urls.setdefault(url, value[:64])
                if not has_meta(value):
                    snap.bare.add(url)
                elif url_bucket(url) == bucket or url not in snap.types:  # as for urls: its own bucket wins
                    recorded = value.rsplit(" ", 1)[1]  # BlobMeta.encode puts the content type last
                    snap.types[url] = seen_types.setdefault(recorded, recorded)  # one string per type
        for bucket, entries in zip(BUCKETS, buckets[len(BUCKETS):], strict=True):
            for field, record in entries.items():
                digest = field.hex()
                if digest[:BUCKET_DIGITS] != bucket:
                    snap.stray[digest] = bucket
                    continue
                snap.refs[digest] = int(record) if record.isdigit() else 0  # fsck reports a damaged count
        for i in range(0, len(flat), 3):
            source, canonical, value = (part.decode() for part in flat[i:i + 3])
            snap.variants.setdefault(source, {})[canonical] = value
        for bucket, entries in zip(BUCKETS, as_variant, strict=True):
            for field, record in entries.items():
                digest = field.hex()
                if digest[:BUCKET_DIGITS] != bucket:
                    snap.variant_refs_stray[digest] = bucket  # lookups never find it there
                    continue
                snap.variant_refs[digest] = int(record) if record.isdigit() else -1
        return snap

    async def repair(self) -> list[str]:
        """Move misplaced URLs, recount references (from URLs and variant relations) and the part of them
        that are relations, drop unreferenced records, relations of unreferenced sources and their
        placeholders, and fix the counts, atomically."""
        k = self.keys
        return list(await self._repair(keys=[k.count], args=[k.url(""), k.blob(""), k.placeholder(""),
                                                             k.variants(""), _glob_escape(k.variants("")) + "*",
                                                             k.variant_refs("")]))


def _glob_escape(text: str) -> str:
    """`text` as a literal in a Redis MATCH pattern (a key prefix may hold *, ?, [ or \\)."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)
