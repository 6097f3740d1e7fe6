"""The placeholder queue in Redis: contents stored without a placeholder, waiting for a filler (filler.py).

The store script queues a content (its hex SHA-256, scored with the time of the store) in the same step
that indexes its URL, when placeholders are on and the content has none. A filler claims a batch by
moving each entry's score to the end of a lease; it writes each placeholder (or '' when the pixels do not
decode, so that nothing asks again) and removes the entry in one step, which keeps nothing for a content
deleted meanwhile. A filler that dies mid-batch loses nothing: its entries fall due again when the lease
ends and the next claim, by any host's filler, takes them.
"""

from __future__ import annotations

import time

import redis.asyncio as aioredis

from casimg.lua import source as lua_source
from casimg.schema import KeySpace, placeholder_key


class PlaceholderQueue:
    def __init__(self, redis: aioredis.Redis, keys: KeySpace) -> None:
        self.redis = redis
        self.keys = keys
        self._claim = redis.register_script(lua_source("placeholder_claim"))
        self._fill = redis.register_script(lua_source("placeholder_fill"))

    async def claim(self, count: int, lease: float) -> list[str]:
        """Up to `count` digests due now, each leased for `lease` seconds."""
        return list(await self._claim(keys=[self.keys.placeholder_todo],
                                      args=[int(time.time() * 1000), int(lease * 1000), count]))

    async def fill(self, digest: str, placeholder: str | None) -> bool:
        """End `digest`'s entry, keeping `placeholder` (None: none can be made) if the content is still
        referenced and has none. True if it was kept."""
        k = self.keys
        return bool(await self._fill(keys=[k.placeholder_todo, k.placeholders_made],
                                     args=[digest, placeholder or "", k.blob(""), k.placeholder("")]))

    async def drop(self, digest: str) -> None:
        """End `digest`'s entry without a placeholder: its bytes are gone (fsck tells whether it still
        has URLs, and --repair queues it again once they are back)."""
        await self.redis.zrem(self.keys.placeholder_todo, digest)

    async def queue(self, digests: list[str]) -> int:
        """Queue `digests` (fsck --repair: contents with no placeholder and no entry). Returns how many
        were added; one queued or leased already keeps its entry."""
        if not digests:
            return 0
        now = int(time.time() * 1000)
        return int(await self.redis.zadd(self.keys.placeholder_todo, dict.fromkeys(digests, now), nx=True))

    async def pending(self) -> int:
        """Entries queued or leased."""
        return int(await self.redis.zcard(self.keys.placeholder_todo))

    async def missing(self, digests: list[str], batch: int = 1000) -> list[str]:
        """Those of `digests` that have no placeholder (nor the '' of one that cannot be made) and no
        entry in the queue: what a lost entry would leave."""
        found: list[str] = []
        for start in range(0, len(digests), batch):
            chunk = digests[start:start + batch]
            async with self.redis.pipeline(transaction=False) as pipe:
                for digest in chunk:
                    pipe.hexists(placeholder_key(self.keys, digest), bytes.fromhex(digest))
                    pipe.zscore(self.keys.placeholder_todo, digest)
                replies = await pipe.execute()
            found += [digest for i, digest in enumerate(chunk) if not replies[2 * i] and replies[2 * i + 1] is None]
        return found
