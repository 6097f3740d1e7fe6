"""The Redis index against a real redis-server."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import random
import re
import time
from urllib.parse import urlsplit

import pytest
from redis.asyncio import ConnectionPool, Redis
from redis.exceptions import ResponseError

from casimg.embedded import COMPACT_HASH_ENTRIES, COMPACT_HASH_VALUE, EmbeddedRedis
from casimg.index import BlobMeta, Index, ListingFilter
from casimg.migrate import backfill_recent
from casimg.placeholder_queue import PlaceholderQueue
from casimg.schema import RECENT_KEY_BYTES, KeySpace, Order, Outcome, blob_key, url_bucket, url_key
from casimg.services import connect_redis

META = BlobMeta(size=3, content_type="image/png", width=1, height=1)
RECENT_LEAF_MAX = 128  # lua/lib_recent.lua's RECENT_LEAF
UNTIMED = 10**9  # µs: a filtered page's time budget that a test never reaches, so its count alone ends it


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
async def test_a_batch_of_digests_and_fields_is_one_command(index):
    """A worker asks this for every read of the queue: one command, not a pipeline of an HGET per URL,
    which the client packs and parses one by one."""
    urls = [f"http://a/{n}" for n in range(100)]
    await index.store(urls[7], digest(7), META)
    await index.redis.hset("job-x", "cancelled", "1")
    await index.digests_and_fields(urls[:2], [])  # the script is loaded
    await index.redis.config_resetstat()
    known, fields = await index.digests_and_fields(urls, [("job-x", "cancelled"), ("job-y", "cancelled")])
    assert known == [digest(7) if n == 7 else None for n in range(100)] and fields == ["1", None]
    stats = await index.redis.info("commandstats")
    assert stats["cmdstat_evalsha"]["calls"] == 1 and stats["cmdstat_hget"]["calls"] == 102


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
        leaves = {key async for key in client.scan_iter(index.keys.recent_leaf("*"))}
        assert len(leaves) >= COMPACT_HASH_ENTRIES // 128  # the newest-first order's leaves, split as they fill
        for key in {index.keys.blob("000"), index.keys.recent} | leaves | {url_key(index.keys, url) for url in urls}:
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


# -- the newest-first order -------------------------------------------------------------------------

def newest_key(url: str, stored_at_ms: int) -> tuple[int, bytes]:
    """A row's place in the newest-first order: rows come by this key, descending."""
    return stored_at_ms, hashlib.sha1(url.encode()).digest()


async def walk_newest(index: Index, limit: int) -> tuple[list[tuple[str, int]], list[str]]:
    """(URL, stored_at ms) of each row of a newest-first walk, and the cursors it followed."""
    rows, cursors, cursor = [], [], None
    while True:
        page = await index.page(cursor, limit, Order.RECENT)
        assert len(page.images) == limit or page.next_cursor is None
        rows += [(image[0], image[6]) for image in page.images]
        if page.next_cursor is None:
            return rows, cursors
        cursor = page.next_cursor
        cursors.append(cursor)


async def store_as_before(index: Index, url: str, digest_hex: str, stored_at_ms: int) -> None:
    """A URL as an index written before the newest-first order holds it: its bucket entry, its reference
    and the count, nothing else; migrate.backfill_recent gives it its place."""
    k = index.keys
    await index.redis.hset(url_key(k, url), url, f"{digest_hex} {stored_at_ms} {META.encode()}")
    if await index.redis.hincrby(blob_key(k, digest_hex), bytes.fromhex(digest_hex), 1) == 1:
        await index.redis.hincrby(k.count, "blobs", 1)
    await index.redis.hincrby(k.count, "urls", 1)


async def check_leaves(index: Index) -> int:
    """The newest-first structure is well formed: each leaf holds at most RECENT_LEAF members, all at or
    past its bound and before the next leaf's, and each member names a URL indexed with that stored_at.
    Returns the members."""
    k = index.keys
    raw = index.redis.connection_pool
    client = Redis.from_pool(ConnectionPool(connection_class=raw.connection_class, max_connections=1,
                                            **{**raw.connection_kwargs, "decode_responses": False}))
    try:
        bounds = await client.zrange(k.recent, 0, -1)
        members = 0
        for i, bound in enumerate(bounds):
            leaf = await client.zrange(k.recent_leaf(bound.hex() if bound else "first"), 0, -1)
            assert len(leaf) <= RECENT_LEAF_MAX
            assert bound == b"" or leaf, "an empty leaf is dropped from the directory"
            for member in leaf:
                assert member[:RECENT_KEY_BYTES] >= bound
                assert i + 1 == len(bounds) or member < bounds[i + 1]
                url = member[RECENT_KEY_BYTES:].decode()
                assert member[6:RECENT_KEY_BYTES] == hashlib.sha1(url.encode()).digest()
                record = await index.lookup(url)
                assert record is not None and record.stored_at_ms == int.from_bytes(member[:6], "big"), url
            members += len(leaf)
    finally:
        await client.aclose()
    assert members == await index.count()
    return members


@pytest.mark.gen_test(timeout=60)
async def test_newest_first_lists_by_stored_at_then_sha1_and_pages_follow_it(index):
    # Stores gathered at once share milliseconds; 300 URLs of one millisecond, and 40 of another, written
    # as an older index left them, fill leaves with ties and make them split inside one millisecond.
    await asyncio.gather(*(index.store(f"http://a/{n}", digest(n), META) for n in range(200)))
    for n in range(300):
        await store_as_before(index, f"http://tie/{n}", digest(1000 + n), 1_764_000_000_000)
    for n in range(40):
        await store_as_before(index, f"http://old/{n}", digest(2000 + n), 1_000_000_000_000 + n // 10)
    assert await backfill_recent(index.redis, index.keys) == 340
    assert await check_leaves(index) == 540
    whole = await index.page(None, 1000, Order.RECENT)
    rows = [(image[0], image[6]) for image in whole.images]
    assert rows == sorted(rows, key=lambda row: newest_key(*row), reverse=True)
    assert len(rows) == 540 and whole.next_cursor is None and whole.total == 540
    for limit in (1, 7, 128):
        walked, cursors = await walk_newest(index, limit)
        assert walked == rows
        assert all(re.fullmatch(r"r\.[0-9a-f]{52}", cursor) for cursor in cursors)
    last = rows[-1]
    past_end = "r." + last[1].to_bytes(6, "big").hex() + hashlib.sha1(last[0].encode()).hexdigest()
    assert (await index.page(past_end, 10, Order.RECENT)).images == []
    first = rows[0]
    at_first = "r." + first[1].to_bytes(6, "big").hex() + hashlib.sha1(first[0].encode()).hexdigest()
    assert [image[0] for image in (await index.page(at_first, 2, Order.RECENT)).images] == [
        rows[1][0], rows[2][0]]  # a cursor is the last row seen: the page starts after it


@pytest.mark.gen_test(timeout=90)
async def test_newest_first_paging_sees_every_url_present_throughout_exactly_once_while_others_change(index):
    # 600 stable and 300 churning URLs, stored interleaved so that leaves hold both: between pages some
    # churn URLs go (leaves shrink and merge) and come back or new ones arrive (the newest leaf splits).
    stable = [f"http://stable/{n}" for n in range(600)]
    churn = [f"http://churn/{n}" for n in range(300)]
    for n in range(0, 600, 20):
        batch = stable[n:n + 20] + churn[n // 2:n // 2 + 10]
        await asyncio.gather(*(index.store(url, digest(n), META) for url in batch))
    random.seed(11)
    seen: list[tuple[str, int]] = []
    cursor, added = None, 0
    while True:
        page = await index.page(cursor, 25, Order.RECENT)
        seen += [(image[0], image[6]) for image in page.images]
        for url in random.sample(churn, 30):
            await index.release(url)
        for url in random.sample(churn, 15):
            await index.store(url, digest(9999), META)
        for _ in range(5):
            added += 1
            await index.store(f"http://new/{added}", digest(10_000 + added), META)
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    urls = [url for url, _ in seen]
    assert all(urls.count(url) == 1 for url in stable)
    # The walk moves one way through a fixed order: nothing comes twice or out of order.
    keys = [newest_key(*row) for row in seen]
    assert keys == sorted(set(keys), reverse=True)
    await check_leaves(index)
    for url in stable + churn + [f"http://new/{n}" for n in range(1, added + 1)]:
        await index.release(url)
    assert await check_leaves(index) == 0
    assert await index.redis.zrange(index.keys.recent, 0, -1) == [""]  # only the first leaf's bound is left


# -- filters ----------------------------------------------------------------------------------------

FILTER_URLS = [
    "http://example.com/a/1.jpg", "http://example.com/a/2.png", "https://example.com/b/cat.jpg",
    "http://Example.COM:8080/a/3.jpg", "http://user@example.com/c/cat-4.jpg", "http://cdn.example.com/a/cat.jpg",
    "https://[::1]:9000/a/cat.jpg", "http://example.org/a/1.jpg", "http://example.com?cat", "ftp://example.com/a",
    "http://example.com.evil/a/1.jpg", "http://exämple.com/a/ümlaut-cat.jpg",
]


def kept(url: str, where: ListingFilter) -> bool:
    """What the filter should keep, by Python's own URL parsing."""
    host = urlsplit(url).hostname or ""
    return (url.startswith(where.prefix) and where.contains in url
            and (not where.host or host == where.host.lower()))


async def walk_filtered(index: Index, order: Order, where: ListingFilter, limit: int, budget: int) -> list[str]:
    urls, cursor = [], None
    for _ in range(10_000):
        page = await index.page(cursor, limit, order, where, budget, budget_us=UNTIMED)
        assert len(page.images) <= limit
        urls += [image[0] for image in page.images]
        if page.next_cursor is None:
            return urls
        cursor = page.next_cursor
    raise AssertionError("the walk did not end")


@pytest.mark.gen_test(timeout=60)
@pytest.mark.parametrize("order", list(Order))
async def test_filters_keep_the_matching_urls_in_either_order(index, order):
    noise = [f"http://noise.example.net/{n}" for n in range(300)]
    for n, url in enumerate(FILTER_URLS + noise):
        await index.store(url, digest(n), META)
    whole = [image[0] for image in (await index.page(None, 1000, order)).images]
    for where in [ListingFilter(prefix="http://example.com/a/"), ListingFilter(contains="cat"),
                  ListingFilter(host="example.com"), ListingFilter(host="EXAMPLE.com"), ListingFilter(host="::1"),
                  ListingFilter(host="exämple.com"), ListingFilter(contains="ümlaut"), ListingFilter(prefix="nothing"),
                  ListingFilter(prefix="http://", contains="cat", host="example.com"), ListingFilter(host="example")]:
        expected = [url for url in whole if kept(url, where)]
        assert [image[0] for image in (await index.page(None, 1000, order, where, budget_us=UNTIMED)).images] == (
            expected), where
        for budget in (1, 40):  # small budgets: pages end early, often empty, and the walk goes on
            assert await walk_filtered(index, order, where, 2, budget) == expected, (where, budget)


@pytest.mark.gen_test(timeout=60)
@pytest.mark.parametrize("order", list(Order))
async def test_a_filtered_page_that_finds_nothing_ends_at_its_budget_with_a_cursor(index, order):
    for n in range(600):
        await index.store(f"http://bulk.example/{n}", digest(n), META)
    await index.store("http://rare.example/x", digest(1000), META)
    where, pages = ListingFilter(host="rare.example"), 0
    # A page also ends once it has run for its time, here none: after its first bucket, or 64 URLs.
    timed = await index.page(None, 10, order, where, budget=10**6, budget_us=0)
    assert timed.next_cursor is not None and len(timed.images) <= 1
    page = await index.page(None, 10, order, where, budget=50, budget_us=UNTIMED)
    assert page.next_cursor is not None and len(page.images) <= 1
    cursor, found = page.next_cursor, [image[0] for image in page.images]
    while cursor is not None:
        page = await index.page(cursor, 10, order, where, budget=50, budget_us=UNTIMED)
        found += [image[0] for image in page.images]
        cursor, pages = page.next_cursor, pages + 1
    assert found == ["http://rare.example/x"]
    assert pages >= 5  # 601 URLs, each page looking at about 50 (a whole bucket in the default order)


@pytest.mark.gen_test(timeout=90)
@pytest.mark.parametrize("order", list(Order))
async def test_a_filtered_walk_sees_each_matching_url_present_throughout_once_while_others_change(index, order):
    stable = [f"http://keep.example/{n}" for n in range(300)]
    other = [f"http://other.example/{n}" for n in range(300)]
    churn = [f"http://keep.example/churn/{n}" for n in range(150)]
    await asyncio.gather(*(index.store(url, digest(n), META) for n, url in enumerate(stable + other + churn)))
    where = ListingFilter(host="keep.example")
    random.seed(5)
    seen, cursor, added = [], None, 0
    while True:
        page = await index.page(cursor, 10, order, where, budget=60)
        seen += [(image[0], image[6]) for image in page.images]
        for url in random.sample(churn, 15):
            await index.release(url)
        for url in random.sample(churn, 8):
            await index.store(url, digest(7777), META)
        added += 1
        await index.store(f"http://keep.example/new/{added}", digest(20_000 + added), META)
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    urls = [url for url, _ in seen]
    assert all(urls.count(url) == 1 for url in stable)
    assert all(urlsplit(url).hostname == "keep.example" for url in urls)
    keys = [newest_key(*row) for row in seen] if order is Order.RECENT else [(sha1(url), url) for url in urls]
    assert keys == (sorted(set(keys), reverse=True) if order is Order.RECENT else sorted(set(keys)))


@pytest.mark.gen_test
async def test_listings_read_no_placeholders_until_the_first_is_made(index):
    """Until a placeholder was ever made (its flag), a listing page skips reading its rows' placeholders:
    one written straight into its hash, without the flag, is not shown. The first one made sets the flag."""
    for n in (1, 2):
        await index.store(f"http://ph/{n}", digest(n), META)
    await index.redis.hset(index.keys.placeholder(digest(1)[:3]), bytes.fromhex(digest(1)), "written-by-hand")
    for order in (Order.SHA1, Order.RECENT):
        assert [row[7] for row in (await index.page(None, 10, order)).images] == [None, None]  # (..., placeholder)
    queue = PlaceholderQueue(index.redis, index.keys)
    assert await queue.fill(digest(2), "made")
    for order in (Order.SHA1, Order.RECENT):
        shown = {row[1]: row[7] for row in (await index.page(None, 10, order)).images}
        assert shown == {digest(1): "written-by-hand", digest(2): "made"}
    # A content that could not be given one ('') lists as null, as does one never made.
    assert await queue.fill(digest(3), None) is False  # not referenced: nothing is kept
    await index.store("http://ph/3", digest(3), META)
    assert await queue.fill(digest(3), None)
    rows = {row[1]: row[7] for row in (await index.page(None, 10)).images}
    assert rows[digest(3)] is None
