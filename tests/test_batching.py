"""ScriptBatcher against a real redis-server: calls of one loop turn go out as one pipeline."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from casimg.batching import ScriptBatcher

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
