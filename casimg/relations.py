"""Variant relations in Redis: (source digest, canonical parameters) -> the variant's digest and size.

Each source's variants are one hash, ``KeySpace.variants(source)``; a relation counts as one reference of
the variant's digest in its blob record, exactly as a URL does, so everything that already follows
references follows variants too: the sweep and fsck see a variant blob as referenced, and the delete
protocol (blobs.py, lifecycle.py) holds for a variant stored while its blob is being deleted. The
references belong to the source: the step that removes a content's last reference (release.lua,
lib_drop.lua) removes its relations with it, and returns the variants that were left with none.

A render is claimed (``claim``) so that the cluster renders each variant once: the claim is a key with a
TTL, ended by the holder in the same step that records the relation (``add``), or replaced by the
render's error for a few seconds, which the requests that waited for it then answer with.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from enum import IntEnum

import redis.asyncio as aioredis

from casimg.lua import source as lua_source
from casimg.schema import BUCKET_DIGITS, KeySpace, blob_key

ERROR_MARK = "error "  # a claim key holding a failed render's "error <status> <detail>"


class Added(IntEnum):
    """What ``Relations.add`` found (variant_add.lua's outcome)."""

    GONE = 0  # the source has no reference left: deleted while it rendered
    RECORDED = 1
    EXISTS = 2  # recorded by another render already
    FULL = 3  # the source has variants_per_original variants
    VARIANT_ONLY = 4  # every reference of the source is a relation: variants are made of originals only


@dataclass(frozen=True)
class StoredVariant:
    """A variant as its relation records it."""

    digest: str
    size: int

    def encode(self) -> str:
        return f"{self.digest} {self.size}"

    @classmethod
    def decode(cls, value: str) -> StoredVariant:
        digest, _, size = value.partition(" ")
        return cls(digest, int(size or 0))


@dataclass(frozen=True)
class Lookup:
    """What ``Relations.find_count_claim`` found in one round trip."""

    found: StoredVariant | None  # the relation, if recorded
    count: int  # the source's variants
    variant_only: bool  # every reference of the source is a relation (variant_add.lua refuses it)
    token: str | None  # the render's claim, if this caller took it


class Relations:
    def __init__(self, redis: aioredis.Redis, keys: KeySpace) -> None:
        self.redis = redis
        self.keys = keys
        self._add = redis.register_script(lua_source("variant_add"))
        self._drop = redis.register_script(lua_source("variant_drop"))
        self._claim_end = redis.register_script(lua_source("claim_end"))

    async def find(self, source: str, canonical: str) -> StoredVariant | None:
        value = await self.redis.hget(self.keys.variants(source), canonical)
        return None if value is None else StoredVariant.decode(value)

    async def count(self, source: str) -> int:
        return int(await self.redis.hlen(self.keys.variants(source)))

    async def claim(self, source: str, canonical: str, seconds: float) -> str | None:
        """A token if this caller may render the variant now (for `seconds` at most), else None."""
        token = secrets.token_hex(8)
        taken = await self.redis.set(self.keys.variant_claim(source, canonical), token, nx=True,
                                     px=max(1, int(seconds * 1000)))
        return token if taken else None

    async def find_count_claim(self, source: str, canonical: str, seconds: float) -> Lookup:
        """``find``, ``count`` and ``claim`` in one round trip (a pipeline, not a transaction: the caller
        releases a claim it took but does not need), with whether the source is a variant only."""
        token = secrets.token_hex(8)
        key, raw = self.keys.variants(source), bytes.fromhex(source)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hget(key, canonical)
            pipe.hlen(key)
            pipe.hget(blob_key(self.keys, source), raw)
            pipe.hget(self.keys.variant_refs(source[:BUCKET_DIGITS]), raw)
            pipe.set(self.keys.variant_claim(source, canonical), token, nx=True, px=max(1, int(seconds * 1000)))
            value, count, refs, as_variant, taken = await pipe.execute()
        return Lookup(found=None if value is None else StoredVariant.decode(value), count=int(count),
                      variant_only=0 < _count(refs) <= _count(as_variant),
                      token=token if taken else None)

    async def claimed(self, source: str, canonical: str) -> str | None:
        """The claim's value: a holder's token, "error <status> <detail>" after a failed render, or None."""
        return await self.redis.get(self.keys.variant_claim(source, canonical))

    async def fail(self, source: str, canonical: str, token: str, status: int, detail: str, seconds: float) -> None:
        """End a claim with the render's error, kept `seconds` for the requests that waited on it."""
        await self._claim_end(keys=[self.keys.variant_claim(source, canonical)],
                              args=[token, f"{ERROR_MARK}{status} {detail}", max(1, int(seconds * 1000))])

    async def release(self, source: str, canonical: str, token: str) -> None:
        await self._claim_end(keys=[self.keys.variant_claim(source, canonical)], args=[token, "", 0])

    async def add(self, source: str, canonical: str, variant: StoredVariant, limit: int,
                  token: str) -> tuple[Added, StoredVariant | None]:
        """Store step 2 for a variant: record the relation (a reference of the variant's digest) and end
        the claim `token`, in one step. Returns the outcome and the relation now recorded."""
        k = self.keys
        outcome, value = await self._add(
            keys=[k.variants(source), k.count, k.variant_claim(source, canonical)],
            args=[source, canonical, variant.encode(), k.blob(""), limit, token, k.variant_refs("")])
        return Added(int(outcome)), (StoredVariant.decode(value) if value else None)

    async def drop(self, source: str, canonical: str, variant: StoredVariant) -> tuple[bool, list[str]]:
        """Remove one relation if it still records `variant` (fsck --repair: its blob is missing). Returns
        whether it was removed and the digests that lost their last reference with it."""
        k = self.keys
        reply = await self._drop(keys=[k.variants(source), k.count],
                                 args=[canonical, variant.encode(), k.blob(""), k.placeholder(""), k.variants(""),
                                       k.variant_refs("")])
        return bool(int(reply[0])), list(reply[1:])


def _count(record: str | None) -> int:
    """A count as the Lua scripts read it (``tonumber(...) or 0``): 0 when absent or damaged."""
    return int(record) if record and record.isdigit() else 0
