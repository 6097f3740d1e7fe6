"""The batchers: ScriptBatcher against a real redis-server (calls of one loop turn go out as one
pipeline), ThreadBatcher with real threads (blocking calls of one loop turn go in one trip)."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from casimg.batching import ScriptBatcher, ThreadBatcher

# KEYS: counter     ARGV: amount  ->  the counter after adding; an error reply for a negative amount
ADD_LUA = """
if tonumber(ARGV[1]) < 0 then return redis.error_reply('negative amount') end
return redis.call('INCRBY', KEYS[1], ARGV[1])
"""


class Spied(ScriptBatcher):
    """Records the size of every batch it sends."""

    def __init__(self, client: aioredis.Redis) -> None:
        super().__init__(client)
        self.batches: list[int] = []

    async def _run(self, batch):  # type: ignore[no-untyped-def]
        self.batches.append(len(batch))
        await super()._run(batch)


@pytest.fixture
def key(request) -> str:
    return f"test-batching:{request.node.name}"


@pytest.fixture
def client(io_loop, redis_server):
    client = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    yield client
    io_loop.run_sync(client.aclose)


@pytest.mark.gen_test
async def test_calls_made_in_one_loop_turn_are_sent_together_and_answered_in_order(client, key):
    batcher = Spied(client)
    script = client.register_script(ADD_LUA)
    results = await asyncio.gather(*(batcher.call(script, [key], [n]) for n in range(1, 21)))
    assert batcher.batches == [20]
    assert results == [sum(range(1, n + 1)) for n in range(1, 21)]  # each call saw the ones before it
    assert await batcher.call(script, [key], [1]) == 211 and batcher.batches == [20, 1]


@pytest.mark.gen_test
async def test_one_call_failing_fails_only_its_caller(client, key):
    batcher = ScriptBatcher(client)
    script = client.register_script(ADD_LUA)
    results = await asyncio.gather(*(batcher.call(script, [key], [n]) for n in (5, -1, 7)), return_exceptions=True)
    assert results[0] == 5 and results[2] == 12
    assert isinstance(results[1], ResponseError) and "negative amount" in str(results[1])


@pytest.mark.gen_test
async def test_a_script_cache_lost_by_redis_is_loaded_again(client, key):
    batcher = ScriptBatcher(client)
    script = client.register_script(ADD_LUA)
    assert await batcher.call(script, [key], [1]) == 1
    await client.script_flush()  # what a restarted Redis looks like to its clients
    assert await asyncio.gather(batcher.call(script, [key], [1]), batcher.call(script, [key], [1])) == [2, 3]


@pytest.mark.gen_test
async def test_every_caller_of_a_batch_sees_redis_being_away(tmp_path):
    client = aioredis.Redis(unix_socket_path=str(tmp_path / "nothing.sock"), decode_responses=True)
    batcher = ScriptBatcher(client)
    script = client.register_script(ADD_LUA)
    try:
        results = await asyncio.gather(*(batcher.call(script, ["k"], [1]) for _ in range(3)), return_exceptions=True)
        assert all(isinstance(result, RedisConnectionError) for result in results), results
    finally:
        await client.aclose()


class CountingPool(ThreadPoolExecutor):
    """A one-thread executor that counts the trips it is given."""

    def __init__(self) -> None:
        super().__init__(max_workers=1)
        self.trips = 0

    def submit(self, fn, /, *args, **kwargs):  # type: ignore[no-untyped-def]
        self.trips += 1
        return super().submit(fn, *args, **kwargs)


@pytest.fixture
def pool():
    pool = CountingPool()
    yield pool
    pool.shutdown(wait=True)


@pytest.mark.gen_test
async def test_blocking_calls_of_one_loop_turn_share_one_trip_to_a_thread_and_run_in_order(pool):
    batcher = ThreadBatcher(pool)
    ran: list[tuple[int, int]] = []  # (call, thread)

    def step(number: int) -> int:
        ran.append((number, threading.get_ident()))
        return number * 10

    results = await asyncio.gather(*(batcher.call(step, n) for n in range(12)))
    assert results == [n * 10 for n in range(12)]
    assert [number for number, _ in ran] == list(range(12))
    assert pool.trips == 1
    assert {thread for _, thread in ran} != {threading.get_ident()}  # not on the event loop's thread
    assert await batcher.call(step, 99) == 990 and pool.trips == 2  # a later turn: a trip of its own


@pytest.mark.gen_test
async def test_one_blocking_call_failing_fails_only_its_caller(pool):
    batcher = ThreadBatcher(pool)

    def divide(a: int, b: int) -> float:
        return a / b

    results = await asyncio.gather(batcher.call(divide, 1, 2), batcher.call(divide, 1, 0),
                                   batcher.call(divide, 3, 4), return_exceptions=True)
    assert results[0] == 0.5 and results[2] == 0.75
    assert isinstance(results[1], ZeroDivisionError)
    assert pool.trips == 1


@pytest.mark.gen_test
async def test_a_cancelled_caller_leaves_the_rest_of_its_batch_answered(pool):
    batcher = ThreadBatcher(pool)
    ran: list[int] = []
    started = threading.Event()
    release = threading.Event()

    def step(number: int) -> int:
        if number == 0:
            started.set()
            release.wait(5)  # holds the trip until the cancel below has landed
        ran.append(number)
        return number

    callers = [asyncio.ensure_future(batcher.call(step, n)) for n in range(3)]
    await asyncio.sleep(0)  # the batch goes to the thread
    await asyncio.to_thread(started.wait, 5)
    callers[1].cancel()
    release.set()
    results = await asyncio.gather(*callers, return_exceptions=True)
    assert results[0] == 0 and results[2] == 2
    assert isinstance(results[1], asyncio.CancelledError)
    assert ran == [0, 1, 2]  # the cancelled call had been handed over, so it ran: only its answer is dropped


@pytest.mark.gen_test
async def test_callers_are_told_when_the_thread_is_gone(pool):
    batcher = ThreadBatcher(pool)
    pool.shutdown(wait=True)
    results = await asyncio.wait_for(asyncio.gather(batcher.call(abs, -1), batcher.call(abs, -2),
                                                    return_exceptions=True), 5)
    assert all(isinstance(result, RuntimeError) for result in results), results


def test_a_started_pool_has_every_thread_running_and_idle():
    from casimg.services import started_pool

    pool = started_pool(6, "casimg-test-started")
    try:
        threads = [t for t in threading.enumerate() if t.name.startswith("casimg-test-started")]
        assert len(threads) == 6 and all(t.is_alive() for t in threads)
        # Every first task has ended: six calls at once run on the six threads, and no seventh starts.
        gate = threading.Barrier(6)
        done = [pool.submit(gate.wait, 5) for _ in range(6)]
        assert all(0 <= future.result(10) < 6 for future in done)
        assert len([t for t in threading.enumerate() if t.name.startswith("casimg-test-started")]) == 6
    finally:
        pool.shutdown(wait=True)
