"""The Redis index against a real redis-server."""

from __future__ import annotations

import asyncio
import random

import pytest

from casimg.app import connect_redis
from casimg.embedded import COMPACT_HASH_ENTRIES, EmbeddedRedis
from casimg.index import BlobMeta, Index, KeySpace

META = BlobMeta(size=3, content_type="image/png", width=1, height=1).encode()


def digest(n: int) -> str:
    return f"{n:064x}"


@pytest.fixture
def index(io_loop, redis_server, request):
    client = connect_redis(redis_server.url, 16)
    yield Index(client, KeySpace(f"index-{request.node.name}-{random.random()}:"))
    io_loop.run_sync(client.aclose)


@pytest.mark.gen_test
async def test_store_counts_references_and_reports_dedup(index):
    first = await index.store("http://a/1", digest(1), META)
    second = await index.store("http://a/2", digest(1), META)
    again = await index.store("http://a/1", digest(2), META)
    assert (first.outcome, first.deduplicated) == ("stored", False)
    assert (second.outcome, second.deduplicated) == ("stored", True)
    assert (again.outcome, again.sha256) == ("exists", digest(1))
    assert await index.refs_of(digest(1)) == 2
    assert await index.redis.hget(index.keys.urls, "http://a/1") == digest(1)


@pytest.mark.gen_test
async def test_release_drops_the_reference_and_metadata_last(index):
    await index.store("http://a/1", digest(1), META)
    await index.store("http://a/2", digest(1), META)
    assert await index.release("http://a/1") == (digest(1), 1)
    assert await index.drop_meta_if_unreferenced(digest(1)) == 1
    assert await index.meta_of(digest(1)) is not None
    assert await index.release("http://a/2") == (digest(1), 0)
    assert await index.drop_meta_if_unreferenced(digest(1)) == 0
    assert await index.meta_of(digest(1)) is None
    assert await index.redis.hexists(index.keys.refs, digest(1)) == 0
    assert await index.release("http://a/2") is None


@pytest.mark.gen_test
async def test_lookup_returns_metadata_and_stored_at(index):
    await index.store("http://a/1", digest(7), META)
    record = await index.lookup("http://a/1")
    assert (record.sha256, record.size, record.content_type) == (digest(7), 3, "image/png")
    assert record.stored_at.year >= 2024
    assert await index.lookup("http://a/none") is None


@pytest.mark.gen_test
async def test_listing_scores_are_unique_and_increasing(index):
    for n in range(50):
        await index.store(f"http://a/{n}", digest(n), META)
    page = await index.page(0, 1000)
    stamps = [image.stored_at_us for image in page.images]
    assert stamps == sorted(stamps) and len(set(stamps)) == 50
    assert page.next_cursor is None


@pytest.mark.gen_test(timeout=60)
async def test_paging_sees_every_url_present_throughout_exactly_once_while_others_change(index):
    stable = [f"http://stable/{n}" for n in range(300)]
    churn = [f"http://churn/{n}" for n in range(300)]
    for n, url in enumerate(stable + churn):
        await index.store(url, digest(n), META)
    random.seed(7)
    seen: list[str] = []
    cursor, added = 0, 0
    while True:
        page = await index.page(cursor, 25)
        seen += [image.url for image in page.images]
        # Between pages: delete some churn URLs, re-add some, add new ones.
        for url in random.sample(churn, 10):
            await index.release(url)
        for url in random.sample(churn, 5):
            await index.store(url, digest(9999), META)
        for _ in range(3):
            added += 1
            await index.store(f"http://new/{added}", digest(10_000 + added), META)
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    assert all(seen.count(url) == 1 for url in stable)
    # URLs stored during the walk come after the cursor, so the walk reaches them (all but the last
    # three, stored after the final page was read).
    assert {f"http://new/{n}" for n in range(1, added - 2)} <= set(seen)


@pytest.mark.gen_test
async def test_repair_recounts_and_realigns_the_listing(index):
    await index.store("http://a/1", digest(1), META)
    await index.store("http://a/2", digest(1), META)
    await index.redis.hset(index.keys.refs, digest(1), 5)
    await index.redis.hset(index.keys.refs, digest(3), 1)
    await index.redis.zrem(index.keys.order, "http://a/2")
    await index.redis.zadd(index.keys.order, {"http://ghost": 1})
    fixes = await index.repair()
    assert len(fixes) == 4
    urls, refs, _, listed = await index.snapshot()
    assert refs == {digest(1): 2}
    assert listed == set(urls)
    assert await index.repair() == []


@pytest.mark.gen_test
async def test_concurrent_stores_of_one_url_count_one_reference(index):
    outcomes = await asyncio.gather(*(index.store("http://same", digest(1), META) for _ in range(20)))
    assert sorted(o.outcome for o in outcomes).count("stored") == 1
    assert await index.refs_of(digest(1)) == 1


@pytest.mark.gen_test
async def test_metadata_goes_to_its_bucket_and_round_trips(index):
    meta = BlobMeta(size=123_456, content_type="image/webp", width=640, height=480)
    await index.store("http://a/1", "abc" + "0" * 61, meta.encode())
    assert await index.redis.hget(index.keys.meta("abc"), "abc" + "0" * 61) == "123456 640 480 image/webp"
    assert await index.meta_of("abc" + "0" * 61) == meta
    assert (await index.page(0, 10)).images[0].content_type == "image/webp"


@pytest.mark.gen_test
async def test_a_full_metadata_bucket_keeps_the_compact_encoding_on_the_embedded_redis(tmp_path):
    embedded = EmbeddedRedis(tmp_path / "data")
    embedded.start()
    client = connect_redis(embedded.url, 4)
    try:
        index = Index(client, KeySpace())
        meta = BlobMeta(size=150_000, content_type="image/jpeg", width=1024, height=768).encode()
        # digest(n) all share the bucket "000": fill it to the size the layout is made for.
        for n in range(COMPACT_HASH_ENTRIES):
            await index.ensure_meta(digest(n), meta)
        assert await client.hlen(index.keys.meta("000")) == COMPACT_HASH_ENTRIES
        assert await client.object("encoding", index.keys.meta("000")) in ("ziplist", "listpack")
    finally:
        await client.aclose()
        embedded.stop()
