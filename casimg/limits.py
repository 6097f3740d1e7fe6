"""Request limits shared by every casimg process through Redis: a rate per API key, and 401s per address.

Rate: a token bucket per key in Redis (``KeySpace.rate``), refilled at ``rate_limit`` tokens a second up
to ``rate_burst``. Asking Redis on every request would cost a round trip on the hottest path, so each
process leases a few tokens at a time (``LEASE_SECONDS`` of the rate) and spends them locally; leased
tokens not spent within ``LEASE_SECONDS`` are dropped. So the limit holds across all processes, give
or take one lease per process, and a key under the rate never waits for Redis on most requests.

Concurrent requests of one key share the process's lease: while one asks Redis for more, the others
wait for that answer instead of asking too, and what it grants is added to what is left. Were each to
lease for itself and keep only its own, every lease but the last would be drawn from the bucket and
thrown away, and a key's parallel clients would get a fraction of what one serial client gets.

Failed authentication: every 401 counts against the client address for a minute
(``KeySpace.auth_failures``); past ``auth_failure_limit`` a bad or missing key gets 429 instead, with
Retry-After saying when the minute ends. A valid key is never slowed by this: secrets are 256-bit
random values that no number of guesses finds, and refusing valid keys would let one broken client
behind a shared proxy address lock out everyone else behind it.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass

import redis.asyncio as aioredis

from casimg.errors import TooManyRequests
from casimg.lua import source as lua_source
from casimg.schema import KeySpace

LEASE_SECONDS = 0.05  # a lease holds this much of the rate: 10 tokens at 200 a second
AUTH_WINDOW = 60  # seconds over which 401s from one address are counted




@dataclass
class Lease:
    """Tokens of one key held by this process: spendable until `expiry` (time.monotonic())."""

    left: int = 0
    expiry: float = 0.0

    def spend(self) -> bool:
        if self.left > 0 and self.expiry > time.monotonic():
            self.left -= 1
            return True
        return False


class RateLimiter:
    """The per-key token bucket, spent through leases (see the module docstring)."""

    def __init__(self, redis: aioredis.Redis, keys: KeySpace, rate: float, burst: int) -> None:
        self.keys = keys
        self.rate = rate
        self.burst = burst
        self.lease_size = max(1, min(burst, math.ceil(rate * LEASE_SECONDS)))
        self._leases: dict[str, Lease] = {}
        # key id -> the one lease request in flight for it: None when Redis granted tokens, else the
        # milliseconds until one is there
        self._asking: dict[str, asyncio.Task[int | None]] = {}
        self._take = redis.register_script(lua_source("rate_take"))

    async def take(self, key_id: str) -> None:
        """Spend one request of `key_id`'s rate, or raise TooManyRequests."""
        if self.rate <= 0:
            return
        while True:
            lease = self._leases.get(key_id)
            if lease is not None and lease.spend():
                return
            asking = self._asking.get(key_id)
            if asking is None:
                asking = self._asking[key_id] = asyncio.ensure_future(self._ask(key_id))
            # Shielded: a request that goes away must not cancel the answer the others wait for.
            wait_ms = await asyncio.shield(asking)
            if wait_ms is not None:
                lease = self._leases.get(key_id)
                if lease is not None and lease.spend():  # granted to a lease request that ended meanwhile
                    return
                raise TooManyRequests(f"rate limit of {self.rate:g} requests a second for this key exceeded",
                                      retry_after=wait_ms / 1000)

    async def _ask(self, key_id: str) -> int | None:
        """Lease tokens from Redis and add them to the key's lease; None if granted, else the wait in ms."""
        try:
            granted, wait_ms = await self._take(keys=[self.keys.rate(key_id)],
                                                args=[self.rate, self.burst, self.lease_size])
        finally:
            del self._asking[key_id]
        now = time.monotonic()
        lease = self._leases.get(key_id)
        if not granted:
            if lease is not None and lease.expiry <= now:
                del self._leases[key_id]
            return int(wait_ms)
        if lease is None or lease.expiry <= now:
            self._leases[key_id] = Lease(int(granted), now + LEASE_SECONDS)
        else:
            lease.left += int(granted)
            lease.expiry = now + LEASE_SECONDS
        return None


class AuthFailures:
    """Counts 401s per client address; past the limit they turn into 429s."""

    def __init__(self, redis: aioredis.Redis, keys: KeySpace, limit: int) -> None:
        self.keys = keys
        self.limit = limit
        self._count = redis.register_script(lua_source("auth_count"))

    async def record(self, address: str) -> None:
        """Count one failed authentication from `address`; raise TooManyRequests past the limit."""
        if self.limit <= 0:
            return
        failures, seconds_left = await self._count(keys=[self.keys.auth_failures(address)], args=[AUTH_WINDOW])
        if int(failures) > self.limit:
            raise TooManyRequests(
                f"too many requests without a valid API key from this address ({self.limit} a minute)",
                retry_after=max(1, int(seconds_left)),
            )
