"""Commands to Redis packed by hiredis, as redis-py's own synchronous client packs them.

redis-py's asyncio connections pack every command in Python (``AbstractConnection.pack_command``), while
its synchronous ones hand the packing to hiredis when it is installed. On the ingest's event loop the
Python packing was 4-6% of the time the process held the GIL (py-spy; BENCHMARKS.md, "Figures behind
design choices"). ``packed_by_hiredis`` gives a pool's connection class the synchronous client's packer;
the bytes on the wire are the same (tests/test_redis_packing.py compares them).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import hiredis
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import DataError


class _HiredisPacking:
    """A mix-in for a redis.asyncio connection class: ``pack_command`` and ``pack_commands`` by hiredis."""

    def pack_command(self, *args: Any) -> list[bytes]:
        # As redis-py's HiredisRespSerializer: a command name with spaces ("CONFIG GET") is sent as words.
        if isinstance(args[0], str):
            args = (*args[0].encode().split(), *args[1:])
        elif b" " in args[0]:
            args = (*args[0].split(), *args[1:])
        try:
            return [hiredis.pack_command(tuple(
                bytes(arg) if isinstance(arg, (bytearray, memoryview)) else arg for arg in args))]
        except TypeError as error:
            raise DataError(error) from error

    def pack_commands(self, commands: Iterable[Iterable[Any]]) -> list[bytes]:
        return [b"".join(self.pack_command(*command)[0] for command in commands)]


_PACKED: dict[type[AbstractConnection], type[AbstractConnection]] = {}


def packed_by_hiredis(connection_class: type[AbstractConnection]) -> type[AbstractConnection]:
    """`connection_class` (TCP, TLS or Unix socket, as the Redis URL chose) with hiredis packing."""
    if issubclass(connection_class, _HiredisPacking):
        return connection_class
    packed = _PACKED.get(connection_class)
    if packed is None:
        packed = _PACKED[connection_class] = type(
            f"Packed{connection_class.__name__}", (_HiredisPacking, connection_class), {})
    return packed
