"""The Redis index against a real redis-server."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import random
import time

import pytest
from redis.exceptions import ResponseError

from casimg.embedded import COMPACT_HASH_ENTRIES, COMPACT_HASH_VALUE, EmbeddedRedis
from casimg.index import BlobMeta, Index
from casimg.schema import KeySpace, Outcome, blob_key, url_bucket, url_key
from casimg.services import connect_redis

META = BlobMeta(size=3, content_type="image/png", width=1, height=1)


def digest(n: int) -> str:
    return f"{n:064x}"


def sha1(url: str) -> str:
    return hashlib.sha1(url.encode()).hexdigest()


def urls_in_bucket(bucket: str, count: int, head: str = "http://dense/") -> list[str]:
    """Real URLs whose SHA-1 falls in `bucket` (about 4,096 tries each), to fill one bucket."""
    state = hashlib.sha1(head.encode())
    found = []
    for n in itertools.count():
        tail = f"{n:x}"
        candidate = state.copy()
        candidate.update(tail.encode())
        if candidate.hexdigest().startswith(bucket):
            found.append(head + tail)
            if len(found) == count:
                return found
    raise AssertionError("unreachable")


async def record_of(index: Index, of: str) -> str | None:
    return await index.redis.hget(blob_key(index.keys, of), bytes.fromhex(of))


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
    assert await record_of(index, digest(1)) == "2"
    value = await index.redis.hget(index.keys.url(url_bucket("http://a/1")), "http://a/1")
    stored_at = (await index.lookup("http://a/1")).stored_at_ms
    assert value == f"{digest(1)} {stored_at} {META.encode()}"
    assert await index.redis.hgetall(index.keys.count) == {"urls": "2", "blobs": "1"}


@pytest.mark.gen_test
async def test_release_drops_the_reference_and_the_record_with_the_last(index):
    await index.store("http://a/1", digest(1), META)
    await index.store("http://a/2", digest(1), META)
    assert await index.release("http://a/1") == (digest(1), 1, ())
    assert await record_of(index, digest(1)) == "1"
    assert await index.redis.hgetall(index.keys.count) == {"urls": "1", "blobs": "1"}
    assert await index.release("http://a/2") == (digest(1), 0, ())
    assert await record_of(index, digest(1)) is None  # delete step 3 reads 0 references
    assert await index.refs_of(digest(1)) == 0
    assert await index.redis.hgetall(index.keys.count) == {"urls": "0", "blobs": "0"}
    assert await index.release("http://a/2") is None


@pytest.mark.gen_test
async def test_release_with_a_damaged_record_changes_nothing(index):
    await index.store("http://a/1", digest(1), META)
    await index.redis.hset(blob_key(index.keys, digest(1)), bytes.fromhex(digest(1)), "2 3 1 1 image/png")
    with pytest.raises(ResponseError, match="fsck --repair"):
        await index.release("http://a/1")
    assert await index.digest_of("http://a/1") == digest(1)
    assert await index.redis.hgetall(index.keys.count) == {"urls": "1", "blobs": "1"}


@pytest.mark.gen_test
async def test_a_store_after_the_last_release_counts_from_zero(index):
    await index.store("http://a/1", digest(1), META)
    await index.release("http://a/1")
    assert (await index.store("http://a/2", digest(1), META)).deduplicated is False
    assert await index.refs_of(digest(1)) == 1
    assert (await index.lookup("http://a/2")).size == 3  # the metadata comes with the URL
    assert await index.redis.hgetall(index.keys.count) == {"urls": "1", "blobs": "1"}


@pytest.mark.gen_test
async def test_lookup_returns_metadata_and_stored_at_in_ms(index):
    before = time.time_ns() // 1_000_000
    await index.store("http://a/1", digest(7), META)
    after = time.time_ns() // 1_000_000
    record = await index.lookup("http://a/1")
    assert (record.sha256, record.size, record.content_type) == (digest(7), 3, "image/png")
    assert before <= record.stored_at_ms <= after
    assert await index.lookup("http://a/none") is None


@pytest.mark.gen_test
async def test_digests_of_answers_a_batch_in_order(index):
    await index.store("http://a/1", digest(1), META)
    await index.store("http://a/3", digest(3), META)
    assert await index.digests_of(["http://a/3", "http://a/2", "http://a/1"]) == [digest(3), None, digest(1)]
    assert await index.digests_of([]) == []


@pytest.mark.gen_test
async def test_meta_is_set_only_where_missing_and_keeps_the_references(index):
    await index.store("http://a/1", digest(1), None)
    await index.store("http://a/2", digest(1), None)
    assert await record_of(index, digest(1)) == "2"
    assert (await index.lookup("http://a/1")).content_type == "application/octet-stream"
    assert (await index.snapshot()).bare == {"http://a/1", "http://a/2"}
    assert await index.ensure_meta("http://a/1", digest(1), META) is True
    assert await index.ensure_meta("http://a/1", digest(1), BlobMeta(9, "image/gif", 9, 9)) is False
    assert await index.ensure_meta("http://a/2", digest(2), META) is False  # it points at digest(1)
    assert await index.ensure_meta("http://a/none", digest(1), META) is False
    record = await index.lookup("http://a/1")
    assert (record.sha256, record.size, record.content_type) == (digest(1), 3, "image/png")
    assert (await index.snapshot()).bare == {"http://a/2"}
    assert await record_of(index, digest(1)) == "2"


@pytest.mark.gen_test
async def test_correct_meta_replaces_a_records_metadata_only_where_the_url_still_holds_that_digest(index):
    await index.store("http://a/1", digest(1), BlobMeta(3, "application/octet-stream", 4, 3))
    await index.store("http://a/2", digest(2), None)
    stored_at = (await index.lookup("http://a/1")).stored_at_ms
    assert (await index.snapshot()).types == {"http://a/1": "application/octet-stream"}
    webp = BlobMeta(3, "image/webp", 4, 3)
    assert await index.correct_meta("http://a/1", digest(2), webp) is False  # it points at digest(1)
    assert await index.correct_meta("http://a/1", digest(1), webp) is True
    assert await index.correct_meta("http://a/1", digest(1), webp) is False  # already so
    assert await index.correct_meta("http://a/none", digest(1), webp) is False
    record = await index.lookup("http://a/1")
    assert (record.content_type, record.size, record.stored_at_ms) == ("image/webp", 3, stored_at)
    assert await index.correct_meta("http://a/2", digest(2), webp) is True  # none before
    assert (await index.snapshot()).types == {"http://a/1": "image/webp", "http://a/2": "image/webp"}
    assert await record_of(index, digest(1)) == "1"


@pytest.mark.gen_test
async def test_listing_is_in_sha1_order_of_the_url_and_pages_follow_it(index):
    urls = [f"http://a/{n}" for n in range(50)] + urls_in_bucket("abc", 12)
    for n, url in enumerate(urls):
        await index.store(url, digest(n), META)
    whole = await index.page(None, 1000)
    assert [image[0] for image in whole.images] == sorted(urls, key=lambda url: (sha1(url), url))
    assert whole.next_cursor is None
    walked, cursor = [], None
    while True:
        page = await index.page(cursor, 5)  # pages end inside the dense bucket, and between buckets
        assert len(page.images) == 5 or page.next_cursor is None
        walked += [image[0] for image in page.images]
        if page.next_cursor is None:
            break
        assert page.next_cursor == sha1(walked[-1])
        cursor = page.next_cursor
    assert walked == [image[0] for image in whole.images]
    assert (await index.page("f" * 40, 10)).images == []


@pytest.mark.gen_test(timeout=60)
async def test_paging_sees_every_url_present_throughout_exactly_once_while_others_change(index):
    # Spread over many buckets, and packed into two neighbouring ones, so pages start and end inside
    # buckets that change between pages.
    stable = [f"http://stable/{n}" for n in range(300)] + urls_in_bucket("abc", 20, "http://stable/")
    churn = [f"http://churn/{n}" for n in range(300)] + urls_in_bucket("abd", 20, "http://churn/")
    for n, url in enumerate(stable + churn):
        await index.store(url, digest(n), META)
    random.seed(7)
    seen: list[str] = []
    cursor, added = None, 0
    while True:
        page = await index.page(cursor, 25)
        seen += [image[0] for image in page.images]
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
    # The walk moves forward through a fixed order: nothing, churned or new, comes twice or out of order.
    keys = [(sha1(url), url) for url in seen]
    assert keys == sorted(set(keys))


@pytest.mark.gen_test
async def test_repair_recounts_moves_misplaced_urls_and_fixes_the_counts(index):
    k = index.keys
    await index.store("http://a/1", digest(1), META)
    await index.store("http://a/2", digest(1), META)
    await index.store("http://a/3", digest(2), META)
    await index.store("http://a/4", digest(4), META)
    await index.redis.hset(blob_key(k, digest(1)), bytes.fromhex(digest(1)), "5")  # wrong count
    await index.redis.hset(blob_key(k, digest(3)), bytes.fromhex(digest(3)), "1")  # no URL points at it
    await index.redis.hdel(blob_key(k, digest(2)), bytes.fromhex(digest(2)))  # a referenced record lost
    wrong = "000" if url_bucket("http://ghost") != "000" else "001"
    await index.redis.hset(k.url(wrong), "http://ghost", f"{digest(2)} 1")  # a URL in the wrong bucket
    await index.redis.hset(k.count, mapping={"urls": 9, "blobs": 9})
    await index.redis.hdel(k.blob("000"), bytes.fromhex(digest(4)))  # a record in another bucket than its own
    await index.redis.hset(k.blob("fff"), bytes.fromhex(digest(4)), "1")
    snap = await index.snapshot()
    assert (snap.misplaced, snap.stray) == ({"http://ghost": wrong}, {digest(4): "fff"})
    fixes = await index.repair()
    assert len(fixes) == 6, fixes
    snap = await index.snapshot()
    assert snap.misplaced == {} and snap.stray == {}
    assert snap.refs == {digest(1): 2, digest(2): 2, digest(4): 1}
    assert snap.counts == {"urls": 5, "blobs": 3}
    assert (await index.lookup("http://ghost")).sha256 == digest(2)
    assert (await index.lookup("http://a/4")).content_type == "image/png"  # the URL keeps its metadata
    assert await index.repair() == []


@pytest.mark.gen_test
async def test_concurrent_stores_of_one_url_count_one_reference(index):
    outcomes = await asyncio.gather(*(index.store("http://same", digest(1), META) for _ in range(20)))
    assert sorted(o.outcome for o in outcomes).count("stored") == 1
    assert await index.refs_of(digest(1)) == 1
    assert await index.count() == 1


@pytest.mark.gen_test
async def test_the_count_goes_to_its_bucket_under_the_raw_digest_and_the_metadata_round_trips(index):
    meta = BlobMeta(size=123_456, content_type="image/webp", width=640, height=480)
    of = "abc" + "0" * 61
    await index.store("http://a/1", of, meta)
    assert await index.redis.hget(index.keys.blob("abc"), bytes.fromhex(of)) == "1"
    record = await index.lookup("http://a/1")
    assert BlobMeta(record.size, record.content_type, record.width, record.height) == meta
    assert (await index.page(None, 10)).images[0][3] == "image/webp"


@pytest.mark.gen_test
async def test_full_buckets_of_long_urls_keep_the_compact_encoding_on_the_embedded_redis(tmp_path):
    embedded = EmbeddedRedis(tmp_path / "data")
    embedded.start()
    client = connect_redis(embedded.url, 4)
    try:
        index = Index(client, KeySpace())
        meta = BlobMeta(size=150_000, content_type="image/jpeg", width=1024, height=768)
        # digest(n) all share the blob bucket "000": fill it to the size the layout is made for, with
        # URLs as long as a compact hash entry may be.
        urls = [f"https://example.com/{n}/".ljust(COMPACT_HASH_VALUE, "x") for n in range(COMPACT_HASH_ENTRIES)]
        for n, url in enumerate(urls):
            await index.store(url, digest(n), meta)
        assert await client.hlen(index.keys.blob("000")) == COMPACT_HASH_ENTRIES
        for key in {index.keys.blob("000")} | {url_key(index.keys, url) for url in urls}:
            assert await client.object("encoding", key) in ("ziplist", "listpack"), key
    finally:
        await client.aclose()
        embedded.stop()


@pytest.mark.parametrize("meta", [BlobMeta(3, "image/png", 1, 1), BlobMeta(0, "application/octet-stream", 0, 0)])
def test_metadata_decodes_to_what_was_encoded(meta):
    assert BlobMeta.decode(meta.encode()) == meta


@pytest.mark.gen_test
async def test_a_store_answers_an_outcome_as_the_job_counts_it(index):
    first = await index.store("http://a/1", digest(1), META)
    second = await index.store("http://a/2", digest(1), META)
    again = await index.store("http://a/1", digest(1), META)
    assert [o.kind for o in (first, second, again)] == [Outcome.STORED, Outcome.DEDUPLICATED, Outcome.EXISTS]
    assert [o.kind.status for o in (first, second, again)] == [Outcome.STORED, Outcome.STORED, Outcome.EXISTS]
    assert [o.kind.counter for o in (first, second, again)] == ["stored", "stored", "existed"]
    assert Outcome.FAILED.counter == "failed"
