"""The durable job queue against a real redis-server: submit, complete once, take over from dead workers."""

from __future__ import annotations

import os

import pytest

from casimg.app import connect_redis
from casimg.errors import NotFound
from casimg.index import Index, KeySpace
from casimg.queue import JobQueue


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
    failed = {"status": "failed", "error": "HTTP 404", "attempts": 1}
    await index.complete(job_id, 0, entries[0].entry_id, failed, "failed")
    await index.complete(job_id, 0, entries[0].entry_id, failed, "failed")  # a duplicate changes nothing
    assert (await queue.get(job_id)).status == "running"
    await index.store("http://a/2", "a" * 64, "{}", job_id=job_id, position=1, entry_id=entries[1].entry_id)
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
    assert await queue.claim_from_dead("alive", 10) == []  # its heartbeat still runs
    await queue.retire("dying")
    claimed = await queue.claim_from_dead("alive", 10)
    assert sorted(e.url for e in claimed) == sorted(e.url for e in taken)
    assert await queue.depth() == {"waiting": 1, "in_progress": 2}
    assert await queue.claim_from_dead("alive", 10) == []  # the dead consumer is gone now


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
    await index.complete(k2.job_id, k2.position, k2.entry_id, {"status": "failed"}, "failed", owner="k2")
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
    claimed = await queue.claim_from_dead("alive", 10)
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
    assert await queue.wait_for_entries("w1", ["k2"], 10) == []
    await queue.submit(["http://b/2"], key_id="k2")
    assert [e.url for e in await queue.wait_for_entries("w1", ["k2"], 10)] == ["http://b/2"]
