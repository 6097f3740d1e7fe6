"""Commands packed by hiredis (casimg/redis_packing.py): the same bytes as redis-py's Python packer, and
a real redis-server answers them."""

from __future__ import annotations

import pytest
from redis.asyncio.connection import Connection, SSLConnection, UnixDomainSocketConnection
from redis.exceptions import DataError

from casimg.redis_packing import packed_by_hiredis
from casimg.services import connect_redis

COMMANDS = [
    ("SET", "casimg:k", "value"),
    ("SET", b"casimg:k", b"\x00\xff\r\n binary"),
    ("HSET", "casimg:h", "count", 12, "ratio", 0.25, "big", 10**20, "negative", -3),
    ("SET", "casimg:k", "é 图像 😀"),
    ("SET", "casimg:k", ""),
    ("SET", "casimg:k", bytearray(b"from a bytearray"), "PX", 1000),
    ("SET", "casimg:k", memoryview(b"from a memoryview")),
    ("CONFIG GET", "maxmemory"),
    (b"CONFIG GET", b"appendonly"),
    ("EVALSHA", "a" * 40, 2, "casimg:url:ab", "casimg:blob:cd", "https://example.com/a.jpg", 140_000),
]


@pytest.mark.parametrize("base", [Connection, SSLConnection, UnixDomainSocketConnection])
def test_each_connection_class_packs_the_bytes_redis_py_packs(base):
    python, packed = base(), packed_by_hiredis(base)()
    assert isinstance(packed, base)
    for command in COMMANDS:
        assert b"".join(packed.pack_command(*command)) == b"".join(python.pack_command(*command)), command
    assert b"".join(packed.pack_commands(COMMANDS)) == b"".join(python.pack_commands(COMMANDS))
    assert packed_by_hiredis(packed_by_hiredis(base)) is packed_by_hiredis(base)


@pytest.mark.parametrize("value", [True, None, object()])
def test_a_value_redis_cannot_take_is_refused_as_before(value):
    for connection in (Connection(), packed_by_hiredis(Connection)()):
        with pytest.raises(DataError):
            connection.pack_command("SET", "casimg:k", value)


@pytest.mark.gen_test
async def test_a_real_server_answers_commands_pipelines_and_scripts_packed_by_hiredis(redis_server):
    client = connect_redis(redis_server.url, 2)
    try:
        assert issubclass(client.connection_pool.connection_class, UnixDomainSocketConnection)
        assert client.connection_pool.connection_class is packed_by_hiredis(UnixDomainSocketConnection)
        key = "test-redis-packing"
        await client.delete(key)
        assert await client.hset(key, mapping={"text": "é 图像", "n": 12, "x": 0.25}) == 3
        assert await client.hgetall(key) == {"text": "é 图像", "n": "12", "x": "0.25"}
        async with client.pipeline(transaction=True) as pipe:
            pipe.hincrby(key, "n", 30).hget(key, "text").config_get("appendonly")
            assert await pipe.execute() == [42, "é 图像", {"appendonly": "yes"}]
        script = client.register_script("return redis.call('HGET', KEYS[1], ARGV[1]) .. ARGV[2]")
        assert await script(keys=[key], args=["n", "!"]) == "42!"
        await client.delete(key)
    finally:
        await client.aclose()
