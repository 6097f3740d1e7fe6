"""The durable job queue against a real redis-server: submit, complete once, take over from dead workers."""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from casimg.errors import NotFound, TooLarge, TooManyRequests
from casimg.index import Index
from casimg.queue import KEPT_URL, JobQueue, Limits
from casimg.schema import QUEUE_GROUP, KeySpace, Outcome
from casimg.services import connect_redis


@pytest.fixture
def parts(io_loop, redis_server):
    client = connect_redis(redis_server.url, 8)
    keys = KeySpace(f"queue-{os.urandom(4).hex()}:")
    queue = JobQueue(client, keys, job_ttl=60)
    io_loop.run_sync(queue.ensure_group)
    yield queue, Index(client, keys)
    io_loop.run_sync(client.aclose)


@pytest.mark.gen_test
async def test_submit_keeps_distinct_urls_in_order_and_expires(parts):
    queue, _ = parts
    job_id, total = await queue.submit(["http://a/1", "http://a/2", "http://a/1", "http://a/3"])
    assert total == 3
    job = await queue.get(job_id)
    assert [r["url"] for r in job.results] == ["http://a/1", "http://a/2", "http://a/3"]
    assert {r["status"] for r in job.results} == {"pending"} and job.status == "queued"
    assert 0 < await queue.redis.ttl(queue.keys.job(job_id)) <= 60
    assert 0 < await queue.redis.ttl(queue.keys.job_urls(job_id)) <= 60
    with pytest.raises(NotFound):
        await queue.get("0" * 24)


@pytest.mark.gen_test
async def test_outcomes_count_once_and_finish_the_job(parts):
    queue, index = parts
    job_id, _ = await queue.submit(["http://a/1", "http://a/2"])
    entries = await queue.read("w1", {"": 10})
    assert [(e.position, e.url) for e in entries] == [(0, "http://a/1"), (1, "http://a/2")]
    failed = {"error": "HTTP 404", "attempts": 1}
    await index.complete(job_id, 0, entries[0].entry_id, Outcome.FAILED, failed)
    await index.complete(job_id, 0, entries[0].entry_id, Outcome.FAILED, failed)  # a duplicate changes nothing
    assert (await queue.get(job_id)).status == "running"
    await index.store("http://a/2", "a" * 64, None, job_id=job_id, position=1, entry_id=entries[1].entry_id)
    job = await queue.get(job_id)
    assert (job.status, job.done, job.failed, job.stored) == ("done", 2, 1, 1)
    assert job.results[1]["sha256"] == "a" * 64
    assert 0 < await queue.redis.ttl(queue.keys.job_results(job_id)) <= 60
    assert await queue.depth() == {"waiting": 0, "in_progress": 0}
    assert await queue.redis.xlen(queue.keys.queue) == 0


@pytest.mark.gen_test
async def test_entries_of_a_dead_worker_are_claimed_by_a_live_one(parts):
    queue, _ = parts
    await queue.submit(["http://a/1", "http://a/2", "http://a/3"])
    await queue.heartbeat("alive", 30)
    await queue.heartbeat("dying", 30)
    taken = await queue.read("dying", {"": 2})
    assert len(taken) == 2
    assert await queue.claim_unattended("alive", 10, held=set()) == []  # its heartbeat still runs
    await queue.retire("dying")
    claimed = await queue.claim_unattended("alive", 10, held=set())
    assert sorted(e.url for e in claimed) == sorted(e.url for e in taken)
    assert await queue.depth() == {"waiting": 1, "in_progress": 2}
    held = {(e.owner, e.entry_id) for e in claimed}
    assert await queue.claim_unattended("alive", 10, held) == []  # the dead consumer is gone now


@pytest.mark.gen_test
async def test_a_live_worker_takes_back_its_own_entries_whose_read_reply_was_lost(parts):
    queue, _ = parts
    await queue.submit([f"http://a/{n}" for n in range(4)], key_id="k1")
    await queue.heartbeat("alive", 30)
    received = await queue.read("alive", {"k1": 2})
    # Redis ran this read for "alive", and its reply never came (Redis stopped before sending it): the
    # entries are pending under a live worker's name, which no other worker claims.
    lost = await queue.read("alive", {"k1": 2})
    held = {(e.owner, e.entry_id) for e in received}
    assert await queue.claim_unattended("other", 10, held=set()) == []
    claimed = await queue.claim_unattended("alive", 10, held)
    assert sorted((e.url, e.deliveries) for e in claimed) == [(e.url, 2) for e in lost]
    assert await queue.depth() == {"waiting": 0, "in_progress": 4}
    held |= {(e.owner, e.entry_id) for e in claimed}
    assert await queue.claim_unattended("alive", 10, held) == []
    assert [e.url for e in await queue.claim_unattended("alive", 1, set())] == [received[0].url]  # at most `count`


@pytest.mark.gen_test
async def test_each_key_queues_apart_and_is_listed_while_it_has_entries(parts):
    queue, index = parts
    await queue.submit([f"http://a/{n}" for n in range(5)], key_id="k1")
    await queue.submit(["http://b/1"], key_id="k2")
    await queue.submit(["http://c/1"])  # no key: the keyless stream
    assert await queue.owners() == ["", "k1", "k2"]
    assert await queue.redis.xlen(queue.keys.key_queue("k1")) == 5
    # k2's one URL is read at once, behind nothing of k1's.
    entries = await queue.read("w1", {"k2": 10, "": 10})
    assert sorted((e.owner, e.url) for e in entries) == [("", "http://c/1"), ("k2", "http://b/1")]
    assert await queue.depth() == {"waiting": 5, "in_progress": 2}
    k2 = next(e for e in entries if e.owner == "k2")
    await index.complete(k2.job_id, k2.position, k2.entry_id, Outcome.FAILED, {}, owner="k2")
    # Emptied: k2 is kept among the streams read (its client may come back), scored with the time.
    assert await queue.redis.zscore(queue.keys.queue_owners, "k2") != float("inf")
    assert await queue.redis.zscore(queue.keys.queue_owners, "k1") == float("inf")
    await queue.redis.zadd(queue.keys.queue_owners, {"k2": 1})  # as if it had been idle for long
    await queue.forget_idle_owners()
    assert await queue.owners() == ["", "k1"]
    await queue.submit(["http://b/2"], key_id="k2")
    assert await queue.owners() == ["", "k1", "k2"]


@pytest.mark.gen_test
async def test_a_dead_workers_entries_are_claimed_from_every_keys_stream(parts):
    queue, _ = parts
    await queue.submit(["http://a/1", "http://a/2"], key_id="k1")
    await queue.submit(["http://b/1"], key_id="k2")
    await queue.heartbeat("dying", 30)
    taken = await queue.read("dying", {"k1": 2, "k2": 1})
    assert len(taken) == 3
    await queue.retire("dying")
    claimed = await queue.claim_unattended("alive", 10, held=set())
    assert sorted((e.owner, e.url, e.deliveries) for e in claimed) == [
        ("k1", "http://a/1", 2), ("k1", "http://a/2", 2), ("k2", "http://b/1", 2)]
    assert await queue.depth() == {"waiting": 0, "in_progress": 3}


@pytest.mark.gen_test
async def test_a_stream_that_lost_its_group_gets_it_back_and_blocks_no_other(parts):
    queue, _ = parts
    await queue.submit(["http://a/1"], key_id="k1")
    await queue.submit(["http://b/1"], key_id="k2")
    await queue.redis.delete(queue.keys.key_queue("k1"))  # as a Redis that lost part of its data might
    await queue.redis.xadd(queue.keys.key_queue("k1"), {"job": "j", "pos": "0", "url": "http://a/2"})
    entries = await queue.read("w1", {"k1": 5, "k2": 5})
    assert [e.url for e in entries] == ["http://b/1"]
    assert [e.url for e in await queue.read("w1", {"k1": 5})] == ["http://a/2"]  # its group is back
    await queue.redis.delete(queue.keys.key_queue("k2"))
    await queue.redis.delete(queue.keys.queue_wake)  # the wake stream's group goes too, and comes back
    assert await queue.wait_for_entries("w1", ["k2"], 10) == ([], False)
    await queue.submit(["http://b/2"], key_id="k2")  # k2 is busy already: no wake entry
    entries, woken = await queue.wait_for_entries("w1", ["k2"], 10)
    assert [e.url for e in entries] == ["http://b/2"] and not woken


@pytest.mark.gen_test
async def test_a_key_new_to_an_idle_worker_wakes_it_once_and_leaves_nothing_pending(parts):
    """An idle worker blocks on the streams of the keys it knows; a key it has never seen wakes it through
    the wake stream, once per time its queue stops being empty, and the wake entry is acknowledged."""
    queue, index = parts
    await queue.heartbeat("w1", 30)
    waiting = asyncio.ensure_future(queue.wait_for_entries("w1", [""], 20_000))
    await asyncio.sleep(0.2)  # blocked in Redis by now
    assert not waiting.done()
    started = time.monotonic()
    await queue.submit(["http://new/1", "http://new/2"], key_id="k9")
    entries, woken = await asyncio.wait_for(waiting, 10)
    assert woken and entries == [] and time.monotonic() - started < 10
    assert "k9" in await queue.owners()  # what the woken worker reads next
    assert (await queue.redis.xpending(queue.keys.queue_wake, QUEUE_GROUP))["pending"] == 0
    # More of a busy key's jobs wake no one: its stream is one the workers block on already.
    await queue.submit(["http://new/3"], key_id="k9")
    assert await queue.redis.xlen(queue.keys.queue_wake) == 1
    # Emptied and busy again: a worker may have forgotten it, so it wakes one again.
    for entry in await queue.read("w1", {"k9": 10}):
        await index.complete(entry.job_id, entry.position, entry.entry_id, Outcome.FAILED, {}, owner="k9")
    await queue.submit(["http://new/4"], key_id="k9")
    assert await queue.redis.xlen(queue.keys.queue_wake) == 2


@pytest.mark.gen_test
async def test_the_wake_streams_readers_go_with_their_workers_and_leave_nothing_pending(parts):
    queue, _ = parts
    for name in ("alive", "dead"):
        await queue.heartbeat(name, 30)
        await queue.submit(["http://a/1"], key_id=f"key-of-{name}")  # a reader is named once it reads one
        assert await queue.wait_for_entries(name, [""], 1000) == ([], True)
    assert len(await queue.redis.xinfo_consumers(queue.keys.queue_wake, QUEUE_GROUP)) == 2
    await queue.retire("dead")
    await queue.tidy_wake_readers("alive")
    readers = await queue.redis.xinfo_consumers(queue.keys.queue_wake, QUEUE_GROUP)
    assert [(reader["name"], reader["pending"]) for reader in readers] == [("alive", 0)]
    # A wait whose reply never came (a timeout, a cancelled wait) leaves its wake pending under a live
    # worker; the worker's own tidying drops it, and its next read names it again.
    await queue.submit(["http://a/2"], key_id="another")
    await queue.redis.xreadgroup(QUEUE_GROUP, "alive", {queue.keys.queue_wake: ">"}, count=1)
    assert (await queue.redis.xpending(queue.keys.queue_wake, QUEUE_GROUP))["pending"] == 1
    await queue.tidy_wake_readers("alive")
    assert (await queue.redis.xpending(queue.keys.queue_wake, QUEUE_GROUP))["pending"] == 0


@pytest.mark.gen_test
async def test_a_wake_read_with_entries_is_told_apart_from_them_on_every_path(parts):
    queue, _ = parts
    await queue.submit(["http://a/1", "http://a/2"], key_id="k1")  # a new key: entries and a wake
    entries, woken = await queue.read_waking("w", {"k1": 5})  # one stream: a single call
    assert [(e.owner, e.url) for e in entries] == [("k1", "http://a/1"), ("k1", "http://a/2")] and woken
    await queue.submit(["http://b/1"], key_id="k2")
    await queue.submit(["http://c/1"], key_id="k3")
    entries, woken = await queue.read_waking("w", {"": 3, "k2": 5, "k3": 5})  # a pipeline: one wake a turn
    assert sorted((e.owner, e.url) for e in entries) == [("k2", "http://b/1"), ("k3", "http://c/1")] and woken
    assert await queue.read_waking("w", {"": 3, "k2": 5}) == ([], True)
    assert await queue.read_waking("w", {"": 3, "k2": 5}) == ([], False)
    await queue.submit(["http://d/1"], key_id="k4")
    entries, woken = await queue.wait_for_entries("w", ["", "k4"], 10)
    assert [(e.owner, e.url) for e in entries] == [("k4", "http://d/1")] and woken
    assert (await queue.redis.xpending(queue.keys.queue_wake, QUEUE_GROUP))["pending"] == 0


@pytest.mark.gen_test
async def test_a_wake_stream_that_lost_its_group_gets_it_back_on_every_path(parts):
    """Made again by the enqueue step's XADD, without its group: each read path makes the group again, and
    the wake written meanwhile is read once it is back."""
    queue, _ = parts
    for wanted in ({"k1": 5}, {"": 5, "k1": 5}):
        await queue.redis.delete(queue.keys.queue_wake)
        await queue.submit(["http://a/1"], key_id=f"new-{len(wanted)}")
        assert (await queue.read_waking("w", wanted))[1] is False  # NOGROUP: the group is made
        assert (await queue.read_waking("w", wanted))[1] is True
    await queue.redis.delete(queue.keys.queue_wake)
    await queue.submit(["http://x/1"], key_id="newest")
    assert await queue.wait_for_entries("w", [""], 10) == ([], False)
    assert await queue.wait_for_entries("w", [""], 10) == ([], True)


@pytest.mark.gen_test
async def test_one_wake_wakes_one_of_two_waiting_workers_and_the_stream_stays_short(parts):
    queue, _ = parts
    waiting = [asyncio.ensure_future(queue.wait_for_entries(name, [""], 1500)) for name in ("a", "b")]
    await asyncio.sleep(0.2)
    await queue.submit(["http://n/1"], key_id="fresh")
    assert sorted([woken for _, woken in await asyncio.gather(*waiting)]) == [False, True]
    for n in range(250):  # 250 keys new at once: the stream is trimmed as it goes
        await queue.submit([f"http://a/{n}"], key_id=f"key{n}")
    assert await queue.redis.xlen(queue.keys.queue_wake) <= 200


# -- recording large jobs in short steps --------------------------------------------------------------

@pytest.mark.gen_test
async def test_too_long_urls_fail_at_once_and_the_job_keeps_a_bounded_prefix(parts):
    queue, _ = parts
    long_url = "http://a/" + "x" * 100_000
    job_id, total = await queue.submit(["http://a/1", long_url], limits=Limits(max_url_length=8192))
    assert total == 2
    job = await queue.get(job_id)
    assert (job.status, job.done, job.failed) == ("queued", 1, 1)
    cut = job.results[1]
    assert cut["status"] == "failed" and cut["error"] == "URL too long"
    assert cut["url"].startswith(long_url[:KEPT_URL]) and len(cut["url"]) < KEPT_URL + 50
    assert "100009 characters" in cut["url"]
    assert [e.url for e in await queue.read("w", {"": 10})] == ["http://a/1"]  # no entry for the long one
    only_long, _ = await queue.submit([long_url + "y", long_url + "z"], limits=Limits(max_url_length=8192))
    finished = await queue.get(only_long)
    assert (finished.status, finished.failed) == ("done", 2) and finished.finished


@pytest.mark.gen_test
async def test_urls_with_credentials_fail_at_once_and_their_secret_never_reaches_redis(parts, redis_server):
    queue, _ = parts
    secret = "hunter2-" + "s" * 16
    urls = ["http://a/1", f"http://user:{secret}@a/2?x=1", f"https://{secret}@a/3",
            f"http://u:{secret}@a/" + "x" * 9000]
    job_id, total = await queue.submit(urls, limits=Limits(max_url_length=8192))
    assert total == 4
    job = await queue.get(job_id)
    assert (job.status, job.done, job.failed) == ("queued", 3, 3)
    assert [(r["url"], r["status"], r.get("error")) for r in job.results[:3]] == [
        ("http://a/1", "pending", None),
        ("http://***@a/2?x=1", "failed", "credentials in URL"),
        ("https://***@a/3", "failed", "credentials in URL"),
    ]
    # Both reasons hold for the last; the cut keeps no userinfo either.
    assert job.results[3]["error"] == "credentials in URL" and job.results[3]["url"].startswith("http://***@a/xxx")
    assert [e.url for e in await queue.read("w", {"": 10})] == ["http://a/1"]
    client = redis_server.client()
    try:
        for key in client.scan_iter(match=queue.keys.prefix + "*"):
            kind = client.type(key)
            dump = {"list": lambda k: client.lrange(k, 0, -1), "hash": client.hgetall, "string": client.get,
                    "stream": lambda k: client.xrange(k), "zset": lambda k: client.zrange(k, 0, -1),
                    "set": client.smembers}[kind](key)
            assert secret not in repr(dump), key
    finally:
        client.close()


@pytest.mark.gen_test
async def test_the_bytes_of_a_keys_unfinished_jobs_are_bounded(parts):
    queue, index = parts
    limits = Limits(max_in_flight=100, max_bytes=1000)
    first, _ = await queue.submit(["http://a/" + "1" * 591], "k", limits)  # 600 bytes
    with pytest.raises(TooManyRequests, match="hold 600 bytes of URLs and this one 600 more; CASIMG_MAX_QUEUED_BYTES"):
        await queue.submit(["http://a/" + "2" * 591], "k", limits)
    with pytest.raises(TooLarge, match="1209 bytes; CASIMG_MAX_QUEUED_BYTES allows 1000"):
        await queue.submit(["http://a/" + "3" * 1200], "k", limits)
    assert (await queue.submit(["http://a/" + "4" * 591], "other", limits))[0]  # another key has its own bytes
    entry = next(e for e in await queue.read("w", {"k": 10}) if e.job_id == first)
    await index.complete(first, 0, entry.entry_id, Outcome.FAILED, {"error": "x", "attempts": 1}, owner="k")
    assert (await queue.submit(["http://a/" + "2" * 591], "k", limits))[0]  # the first job is done now
    # A refused job leaves nothing behind: only the three admitted jobs have keys.
    jobs = {key for key in await queue.redis.keys(queue.keys.job("*")) if key.count(":") == 2}
    assert len(jobs) == 3


@pytest.mark.gen_test
async def test_a_large_submit_is_many_short_redis_calls(parts):
    """10,000 URLs of 1,600 characters (16 MB): one Lua call held Redis 0.5-2 s; no call may now take more
    than a few ms. The bound asserted is 50 ms, generous for a loaded 2-core machine."""
    queue, _ = parts
    urls = [f"http://a/{n}/" + "x" * 1600 for n in range(10_000)]
    redis = queue.redis
    old = await redis.config_get("slowlog-*")
    await redis.config_set("slowlog-max-len", 100_000)
    await redis.config_set("slowlog-log-slower-than", 0)
    await redis.slowlog_reset()
    try:
        job_id, total = await queue.submit(urls)
        calls = await redis.slowlog_get(100_000)
    finally:
        await redis.config_set("slowlog-log-slower-than", old["slowlog-log-slower-than"])
        await redis.config_set("slowlog-max-len", old["slowlog-max-len"])
    assert total == 10_000 and await redis.xlen(queue.keys.queue) == 10_000
    longest = max(calls, key=lambda call: call["duration"])
    print(sorted(((c["duration"], c["command"][:60]) for c in calls), reverse=True)[:8])
    assert longest["duration"] < 50_000, longest  # microseconds
    assert sum(1 for call in calls if call["command"].startswith(b"EVALSHA")) > 50  # the enqueue steps
    job = await queue.get(job_id)  # read back in steps as well
    assert [r["url"] for r in job.results] == urls


@pytest.mark.gen_test(timeout=30)
async def test_staged_chunks_of_an_unpublished_job_are_invisible_and_expire(redis_server):
    client = connect_redis(redis_server.url, 8)
    keys = KeySpace(f"queue-{os.urandom(4).hex()}:")
    queue = JobQueue(client, keys, job_ttl=60, staging_ttl=1)
    try:
        await queue.ensure_group()
        urls = [f"http://a/{n}/" + "x" * 1000 for n in range(1000)]
        await queue._stage("ab" * 12, urls, {3: "URL too long"})  # the process dies here: never published
        assert await client.llen(keys.job_urls("ab" * 12)) == 1000
        with pytest.raises(NotFound):
            await queue.get("ab" * 12)
        assert await client.xlen(keys.queue) == 0 and await client.zcard(keys.enqueuing) == 0
        assert await queue.resume_enqueuing(older_than=0) == 0
        deadline = time.monotonic() + 20
        while await client.exists(keys.job_urls("ab" * 12), keys.job_results("ab" * 12)):
            assert time.monotonic() < deadline, "staged chunks did not expire"
            await asyncio.sleep(0.1)
    finally:
        await client.aclose()


@pytest.mark.gen_test
async def test_a_job_published_but_not_fully_enqueued_is_finished_once_by_a_worker(parts):
    queue, _ = parts
    urls = [f"http://a/{n}/" + "x" * 1000 for n in range(2000)]
    job_id = "cd" * 12
    await queue._stage(job_id, urls, {})
    await queue._publish_or_refuse(job_id, "k", Limits(), total=len(urls), failed=0, size=0)
    assert await queue.enqueue_step(job_id) is False  # one step, then the process dies
    partly = await queue.redis.xlen(queue.keys.key_queue("k"))
    assert 0 < partly < len(urls)
    assert (await queue.get(job_id)).status == "queued"
    assert await queue.resume_enqueuing() == 0  # not yet abandoned: its submitter may still be at it
    # Two workers resume it at once: every URL gets exactly one entry.
    await asyncio.gather(queue.resume_enqueuing(older_than=0), queue.resume_enqueuing(older_than=0))
    entries = await queue.read("w", {"k": 5000})
    assert sorted(e.position for e in entries) == list(range(len(urls)))
    assert await queue.redis.zcard(queue.keys.enqueuing) == 0


@pytest.mark.gen_test
async def test_a_store_records_its_outcome_once_and_moves_the_job_from_queued_to_running_to_done(parts):
    """The store step records the URL's outcome in its job as index.complete does (store.lua, lib_complete.lua)."""
    queue, index = parts
    job_id, _ = await queue.submit(["http://a/1", "http://a/2", "http://a/3"])
    entries = await queue.read("w1", {"": 10})
    assert (await queue.get(job_id)).status == "queued"
    first = await index.store("http://a/1", "a" * 64, None, job_id=job_id, position=0, entry_id=entries[0].entry_id)
    assert first.outcome is Outcome.STORED
    assert ((job := await queue.get(job_id)).status, job.done, job.stored) == ("running", 1, 1)
    again = await index.store("http://a/1", "a" * 64, None, job_id=job_id, position=0)
    assert again.outcome is Outcome.EXISTS and (await queue.get(job_id)) == job  # counted once
    await index.store("http://a/2", "a" * 64, None, job_id=job_id, position=1, entry_id=entries[1].entry_id)
    await index.store("http://a/3", "b" * 64, None, job_id=job_id, position=2, entry_id=entries[2].entry_id)
    job = await queue.get(job_id)
    assert (job.status, job.done, job.stored) == ("done", 3, 3) and job.finished
    assert [r["sha256"] for r in job.results] == ["a" * 64, "a" * 64, "b" * 64]
    assert await queue.depth() == {"waiting": 0, "in_progress": 0}


@pytest.mark.gen_test
async def test_a_cancel_ends_the_job_in_one_step_and_nothing_is_recorded_or_queued_after_it(parts):
    queue, index = parts
    urls = [f"http://a/{n}" for n in range(5)]
    job_id = "c" * 24
    await queue._stage(job_id, urls, {})
    await queue._publish_or_refuse(job_id, "", Limits(), total=5, failed=0, size=40)
    assert await queue.enqueue_step(job_id, 2) is False  # two queued; the submitter stops here (a crash)
    entries = await queue.read("w1", {"": 10})
    await index.complete(job_id, 0, entries[0].entry_id, Outcome.FAILED, {"error": "HTTP 404", "attempts": 1})

    assert await queue.cancel(job_id) is True
    job = await queue.get(job_id)
    assert (job.status, job.done, job.failed, job.stored) == ("done", 5, 5, 0) and job.finished
    assert job.results[0]["error"] == "HTTP 404"
    assert all(r == {"url": r["url"], "status": "failed", "error": "cancelled", "attempts": 0} for r in job.results[1:])
    assert await queue.cancel(job_id) is False  # done already: unchanged
    assert await queue.redis.zscore(queue.keys.enqueuing, job_id) is None

    # The entry in flight ends: acknowledged, nothing recorded; a download that comes back is not indexed.
    await index.complete(job_id, 1, entries[1].entry_id, Outcome.FAILED, {"error": "HTTP 500", "attempts": 1})
    stored = await index.store("http://a/2", "b" * 64, None, job_id=job_id, position=2)
    assert stored.outcome is Outcome.CANCELLED and await index.digest_of("http://a/2") is None
    assert await queue.get(job_id) == job
    assert await queue.depth() == {"waiting": 0, "in_progress": 0}
    assert await queue.enqueue_step(job_id) is True  # a resumed enqueue adds nothing
    assert await queue.redis.xlen(queue.keys.queue) == 0
    with pytest.raises(NotFound):
        await queue.cancel("d" * 24)


@pytest.mark.gen_test
async def test_entries_another_worker_takes_over_between_our_look_and_our_claim_are_not_claimed_twice(
        parts, monkeypatch):
    """A dead worker's entries, one idle for a while and one read just before it stopped; another worker
    takes both over between our look and our claim, which reaches Redis 30 ms later: neither is ours."""
    queue, _ = parts
    await queue.heartbeat("dying", 30)
    await queue.submit(["http://a/old"])
    assert len(await queue.read("dying", {"": 1})) == 1
    await asyncio.sleep(0.5)
    await queue.submit(["http://a/fresh"])
    assert len(await queue.read("dying", {"": 1})) == 1
    await queue.retire("dying")
    await queue.heartbeat("w2", 30)
    look = queue.redis.xpending_range

    async def then_w2_claims(*args, **kwargs):
        pending = await look(*args, **kwargs)
        await queue.redis.xclaim(queue.stream_of(""), QUEUE_GROUP, "w2", min_idle_time=0,
                                 message_ids=[item["message_id"] for item in pending])
        await asyncio.sleep(0.03)
        return pending

    monkeypatch.setattr(queue.redis, "xpending_range", then_w2_claims)
    assert await queue.claim_unattended("w3", 10, set()) == []
    assert await queue.depth() == {"waiting": 0, "in_progress": 2}
