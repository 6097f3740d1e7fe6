"""Brings the index to the current layout (index.py) when a process starts: the casimg 0.1 index moves,
and URLs stored before the newest-first order existed get their place in it.

casimg 0.1 kept the index in five keys, named by ``schema.OldKeySpace`` and read only here:
``urls`` (URL -> hex digest), ``order`` (URL scored by stored_at in µs), ``refs`` (digest ->
references), ``meta:{3 hex}`` (digest -> "size width height content_type") and ``clock``.

``migrate`` runs in services.open_services, so before a server, a worker or a command (fsck, stats) uses the
index. It walks the old URL hash with HSCAN and moves it a batch at a time. Each batch is one Lua call
that, for each URL still in the old hash, writes the URL's new entry (stored_at from the old score, and
the old metadata of its digest where there is some), counts its reference in the new blob record, bumps
the counts, and removes the old entries. A URL is moved by whichever call finds it first, so processes
starting together, or one killed at any point, move each URL exactly once. Once the old URL hash is
gone, the other old keys are deleted in one command. Stop every casimg 0.1 process before the upgrade:
one still writing to the old keys would keep the move from finishing.

The newest-first order (``recent``, lua/lib_recent.lua) came later than the URL buckets. ``backfill_recent``
reads the buckets one at a time and sends their URLs, BACKFILL_BATCH to a Lua call, each with the stored_at
in its value: the call gives each URL that still holds that value its member; a URL that has one (stored
since by a current process) keeps it, so processes starting together, or a start after one killed
halfway, only repeat work. The walk ends by recording
``recent`` in the migrations hash, and later starts skip it. Until then a newest-first listing shows the
URLs the walk has reached and those stored since. Stop processes older than this order first: they store
URLs without a place in it.
"""

from __future__ import annotations

import logging

import redis.asyncio as aioredis

from casimg.clock import now_ms
from casimg.lua import source as lua_source
from casimg.schema import BUCKETS, KeySpace, OldKeySpace

log = logging.getLogger("casimg.migrate")

# URLs per Lua call. Each call holds Redis, longer as the new buckets fill: 250 took about 20 ms at
# 300,000 URLs on a busy 2-core machine.
MIGRATE_BATCH = 250
# URLs placed per backfill call: each costs up to ~100 µs of Redis's CPU while the order is small (its
# directory then in the compact encoding, read linearly), so a call holds Redis about 2 ms
# (BENCHMARKS.md, "Redis memory").
BACKFILL_BATCH = 20
RECENT_MIGRATION = "recent"  # its field in the migrations hash



async def move_batch(redis: aioredis.Redis, k: KeySpace, urls: list[str]) -> int:
    """Move these URLs from the old layout, atomically; those no longer in it are skipped. Returns how many moved."""
    old = OldKeySpace(k.prefix)
    script = redis.register_script(lua_source("migrate"))
    return int(await script(keys=[old.urls, old.order, k.count],
                            args=[k.url(""), k.blob(""), old.meta(""), now_ms(), *urls]))


async def migrate(redis: aioredis.Redis, keys: KeySpace, batch: int = MIGRATE_BATCH) -> int:
    """Move a casimg 0.1 index (keys under `keys`' prefix) to the current layout, if there is one, then
    give the URLs stored before the newest-first order their place in it, once. Returns the URLs this call
    moved from casimg 0.1."""
    moved = await move_old_index(redis, keys, batch)
    await backfill_recent(redis, keys)
    return moved


async def backfill_recent(redis: aioredis.Redis, keys: KeySpace, again: bool = False) -> int:
    """Give every indexed URL its member in the newest-first order, unless a finished run says it has one
    (an empty index needs none) and not `again` (fsck --repair). Returns the members this call added."""
    if not again and await redis.hexists(keys.migrations, RECENT_MIGRATION):
        return 0
    added = 0
    if int(await redis.hget(keys.count, "urls") or 0) > 0:
        log.info("placing the stored URLs in the newest-first order")
        script = redis.register_script(lua_source("backfill_recent"))
        for bucket in BUCKETS:
            entries = [(url, value.split(" ", 2)[1]) for url, value in (await redis.hgetall(keys.url(bucket))).items()
                       if value.count(" ") >= 1]
            for start in range(0, len(entries), BACKFILL_BATCH):
                batch = [part for entry in entries[start:start + BACKFILL_BATCH] for part in entry]
                added += int(await script(keys=[keys.recent], args=[keys.url(""), keys.recent_leaf(""), *batch]))
        log.info("placed %d URLs in the newest-first order", added)
    await redis.hset(keys.migrations, RECENT_MIGRATION, now_ms())
    return added


async def move_old_index(redis: aioredis.Redis, keys: KeySpace, batch: int = MIGRATE_BATCH) -> int:
    """Move a casimg 0.1 index to the current layout, if there is one. Returns the URLs this call moved."""
    old = OldKeySpace(keys.prefix)
    if not await redis.exists(*old.markers()):
        return 0
    log.info("moving the casimg 0.1 index (%s) to the current layout", old.urls)
    moved = 0
    # A pass of HSCAN returns every URL that stays in the hash throughout; more passes only if URLs came
    # in meanwhile (a casimg 0.1 process still running).
    while await redis.exists(old.urls):
        cursor = 0
        while True:
            cursor, entries = await redis.hscan(old.urls, cursor, count=batch)
            if entries:
                moved += await move_batch(redis, keys, list(entries))
            if cursor == 0:
                break
    await redis.delete(old.order, old.refs, *(old.meta(bucket) for bucket in BUCKETS), old.clock)
    log.info("moved %d URLs to the current index layout; the old keys are deleted", moved)
    return moved
