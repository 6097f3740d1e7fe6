"""The move of a casimg 0.1 index to the current layout, against a real redis-server and blob store.

The old index is written by raw commands, as casimg 0.1 left it; then it is moved whole, moved after a
start that died after one batch, and moved by several processes at once.
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass

import pytest

from casimg.fsck import fsck
from casimg.index import BlobMeta, Index
from casimg.migrate import migrate, move_batch
from casimg.schema import KeySpace, OldKeySpace, Order
from casimg.services import connect_redis, open_services
from casimg.storage.file import FileStore
from tests.conftest import make_settings, png

CONTENTS = 250
URLS = 700  # more URLs than contents: some contents have several URLs


@dataclass(frozen=True)
class OldEntry:
    url: str
    digest: str
    stored_at_us: int | None  # None: no score in the old listing (an old index fsck had not repaired)


async def write_old_index(index: Index, blobs: FileStore) -> tuple[list[OldEntry], str]:
    """An old index of URLS URLs over CONTENTS contents, their blobs on disk; returns the entries and the
    digest whose metadata the old index had lost."""
    old = OldKeySpace(index.keys.prefix)
    digests = []
    for n in range(CONTENTS):
        data = png(n)
        digest = hashlib.sha256(data).hexdigest()
        tmp = blobs.tmp_dir / f"dl-{n}.part"
        tmp.write_bytes(data)
        blobs.link_in(tmp, digest)
        blobs.discard(tmp)
        digests.append(digest)
        if n:  # the first content's metadata is missing
            await index.redis.hset(old.meta(digest[:3]), digest, BlobMeta(len(data), "image/png", 4, 3).encode())
    entries = []
    for n in range(URLS):
        stamp = None if n == 5 else 1_764_612_345_123_456 + n * 1_000_003
        entries.append(OldEntry(f"https://old.example.com/{n}.png", digests[n % CONTENTS], stamp))
    async with index.redis.pipeline(transaction=False) as pipe:
        for entry in entries:
            pipe.hset(old.urls, entry.url, entry.digest)
            pipe.hincrby(old.refs, entry.digest, 1)
            if entry.stored_at_us is not None:
                pipe.zadd(old.order, {entry.url: entry.stored_at_us})
        pipe.set(old.clock, 1_764_612_345_123_456 + URLS * 1_000_003)
        await pipe.execute()
    return entries, digests[0]


async def walk_newest(index: Index, limit: int = 100) -> list[tuple[str, int]]:
    """(URL, stored_at ms) of every row of a walk in the newest-first order."""
    rows, cursor = [], None
    while True:
        page = await index.page(cursor, limit, Order.RECENT)
        rows += [(image[0], image[6]) for image in page.images]
        if page.next_cursor is None:
            return rows
        cursor = page.next_cursor


async def assert_moved(index: Index, blobs: FileStore, entries: list[OldEntry], lost_meta: str) -> None:
    """Every old URL is in the new layout with its digest, time and metadata; nothing of the old is left."""
    old = OldKeySpace(index.keys.prefix)
    assert [key async for key in index.redis.scan_iter(f"{old.prefix}*") if not key.startswith(
        (index.keys.url(""), index.keys.blob(""), index.keys.count, index.keys.recent, index.keys.migrations))] == []
    for entry in entries:
        record = await index.lookup(entry.url)
        assert record is not None and record.sha256 == entry.digest, entry.url
        if entry.stored_at_us is not None:
            assert record.stored_at_ms == entry.stored_at_us // 1000
        else:
            assert record.stored_at_ms > 0  # the time of the move
        if entry.digest == lost_meta:
            assert record.content_type == "application/octet-stream"
        else:
            assert (record.content_type, record.width, record.height, record.size) == (
                "image/png", 4, 3, len(blobs.read(entry.digest)))
    walked, cursor = [], None
    while True:
        page = await index.page(cursor, 100)
        walked += [image[0] for image in page.images]
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    assert sorted(walked) == sorted(entry.url for entry in entries)
    newest = await walk_newest(index)  # the URLs moved have their place in the newest-first order too
    assert sorted(url for url, _ in newest) == sorted(entry.url for entry in entries)
    assert newest == sorted(newest, key=lambda row: (row[1], hashlib.sha1(row[0].encode()).digest()), reverse=True)
    assert await index.redis.hgetall(index.keys.count) == {"urls": str(URLS), "blobs": str(CONTENTS)}
    assert await index.refs_of(entries[0].digest) == URLS // CONTENTS + 1  # 700 URLs over 250: 3 or 2 each
    bare = sorted(entry.url for entry in entries if entry.digest == lost_meta)
    report = await fsck(index, blobs)
    assert report.problems == [f"no metadata for URL {url}" for url in bare]  # lost in the old index too
    assert (await fsck(index, blobs, repair=True)).ok
    assert {(await index.lookup(url)).width for url in bare} == {4}


@pytest.mark.gen_test(timeout=60)
async def test_an_old_index_moves_whole_and_its_old_keys_go(world):
    blobs, index = world
    entries, lost_meta = await write_old_index(index, blobs)
    assert await migrate(index.redis, index.keys, batch=100) == URLS
    await assert_moved(index, blobs, entries, lost_meta)
    assert await migrate(index.redis, index.keys) == 0  # a later start finds nothing to do


@pytest.mark.gen_test(timeout=60)
async def test_a_move_killed_after_one_batch_finishes_on_the_next_start(world):
    blobs, index = world
    entries, lost_meta = await write_old_index(index, blobs)
    first = [entry.url for entry in entries[:150]]
    assert await move_batch(index.redis, index.keys, first) == 150  # the start that died after one batch
    assert await move_batch(index.redis, index.keys, first) == 0  # a batch that comes again moves nothing twice
    assert await migrate(index.redis, index.keys, batch=100) == URLS - 150
    await assert_moved(index, blobs, entries, lost_meta)


@pytest.mark.gen_test(timeout=60)
async def test_processes_starting_together_move_each_url_once(world, redis_server):
    blobs, index = world
    entries, lost_meta = await write_old_index(index, blobs)
    clients = [connect_redis(redis_server.url, 2) for _ in range(3)]
    try:
        moved = await asyncio.gather(*(migrate(client, index.keys, batch=50) for client in clients))
    finally:
        for client in clients:
            await client.aclose()
    assert sum(moved) == URLS
    await assert_moved(index, blobs, entries, lost_meta)


@pytest.mark.gen_test(timeout=60)
async def test_a_url_stored_again_since_keeps_its_new_entry(world):
    blobs, index = world
    entries, lost_meta = await write_old_index(index, blobs)
    again = entries[5]  # the one without an old stored_at, which assert_moved does not compare
    await index.store(again.url, again.digest, BlobMeta(len(png(5)), "image/png", 4, 3))
    stored_at = (await index.lookup(again.url)).stored_at_ms
    assert await migrate(index.redis, index.keys) == URLS - 1
    assert (await index.lookup(again.url)).stored_at_ms == stored_at
    await assert_moved(index, blobs, entries, lost_meta)


@pytest.mark.gen_test(timeout=60)
async def test_services_move_the_old_index_when_they_open(redis_server, tmp_path):
    settings = make_settings(tmp_path / "data", redis_server.url)
    blobs = FileStore(settings.data_dir)
    blobs.create_dirs()
    client = connect_redis(redis_server.url, 2)
    try:
        entries, _ = await write_old_index(Index(client, KeySpace(settings.key_prefix)), blobs)
    finally:
        await client.aclose()
    services = await open_services(settings, redis_server.url, with_worker=False)
    try:
        assert (await services.index.lookup(entries[0].url)).sha256 == entries[0].digest
        assert await services.index.count() == URLS
    finally:
        await services.close()
