"""Which blob store is active: a record in Redis that every process follows, so a store can be moved
(`casimg migrate-store`, migrate_store.py) while servers and workers run.

Settings are frozen at a process's start, and CASIMG_STORAGE names the store a process opens first. Once
a migration has run, the record in Redis (schema.KeySpace.store) names it instead, for every process::

    store        hash  active: the store reads and deletes use ("file" or "s3://bucket/prefix/")
                       target: during a migration, the store being filled ("" otherwise)
                       epoch:  bumped at every change of the two, so a process sees a change at a glance
                       id:     the migration under way, which names its progress set (store-copied:{id})
    store-acks   hash  process name -> "<epoch> <Redis time in ms>": the epoch it follows, and when it said so

A store name is "file" (the process's own data directory's blobs/) or "s3://bucket/prefix/": the bucket
and prefix come from the name, the endpoint, region and credentials from the process's settings.

Each process reads the record at start and again every ``FOLLOW_INTERVAL`` (``ActiveStore.follow``).
While a target is named, every store is written to both (``ActiveStore.storing`` hands a store the pair it
must write, and the worker commits the bytes to the target before the index step), reads go to the
active store, and deletes follow the active store's own protocol; the target receives no deletes, so a
copy there is never raced by one (what a delete leaves in it is an unreferenced blob for its sweep).

A process acknowledges an epoch (``store-acks``) only once no store it began under an earlier epoch is
still in flight. The migration copies only after every live process has acknowledged its epoch, so from
then on every store that reaches the index has its bytes in the target, and a pass over the index copies
everything indexed before; its argument is in migrate_store.py. A process registers in ``store-acks``
before it first reads the record, so a process starting while a migration begins is waited for too.
A process whose acknowledgement is older than ``LIVE_WINDOW`` is taken for dead (killed, or its host
gone): what it had in flight never reached the index.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import redis.asyncio as aioredis

from casimg.errors import REDIS_ERRORS, ConfigError
from casimg.schema import KeySpace
from casimg.storage import Storage, open_storage

if TYPE_CHECKING:
    from casimg.config import Settings

log = logging.getLogger("casimg.storage")

FOLLOW_INTERVAL = 1.0  # seconds between reads of the record: how long a process may lag a change
# An acknowledgement older than this is a dead process's. Many times the interval: a busy 2-core host
# can hold a process's loop for seconds, and taking a live process for dead would let a copy start early.
LIVE_WINDOW = 20.0
FILE = "file"


@dataclass(frozen=True)
class StoreName:
    """A store as the record names it: "file", or an S3 bucket and key prefix."""

    kind: str  # "file" or "s3"
    bucket: str = ""
    prefix: str = ""

    def __str__(self) -> str:
        return FILE if self.kind == FILE else f"s3://{self.bucket}/{self.prefix}"

    @classmethod
    def parse(cls, text: str) -> StoreName:
        """"file" or "s3://bucket[/prefix]" (a prefix gets its trailing "/"); ConfigError otherwise."""
        text = text.strip()
        if text == FILE:
            return cls(FILE)
        if not text.startswith("s3://") or not text[5:].split("/", 1)[0]:
            raise ConfigError(f"a store is 'file' or 's3://bucket/prefix', not {text!r}")
        bucket, _, prefix = text[5:].partition("/")
        return cls("s3", bucket, prefix if not prefix or prefix.endswith("/") else prefix + "/")

    @classmethod
    def of(cls, settings: Settings) -> StoreName:
        """The store a process's settings name (CASIMG_STORAGE and CASIMG_S3_*)."""
        if settings.storage == FILE:
            return cls(FILE)
        return cls("s3", settings.s3_bucket, settings.s3_prefix)

    def settings(self, settings: Settings) -> Settings:
        """`settings` with this store in place of the one they name (endpoint and credentials kept)."""
        if self.kind == FILE:
            return dataclasses.replace(settings, storage=FILE)
        return dataclasses.replace(settings, storage="s3", s3_bucket=self.bucket, s3_prefix=self.prefix)


@dataclass(frozen=True)
class StoreRecord:
    """The record as one process last read it."""

    active: StoreName
    target: StoreName | None = None
    epoch: int = 0
    migration: str = ""

    @classmethod
    def decode(cls, fields: dict[str, str], default: StoreName) -> StoreRecord:
        if not fields.get("active"):
            return cls(default)
        target = fields.get("target") or ""
        return cls(StoreName.parse(fields["active"]), StoreName.parse(target) if target else None,
                   int(fields.get("epoch") or 0), fields.get("id") or "")


class ActiveStore:
    """One process's view of the record, and the drivers it names (opened once each, kept till close)."""

    def __init__(self, settings: Settings, redis: aioredis.Redis, keys: KeySpace, name: str,
                 data_dir: Path | None = None) -> None:
        self.settings, self.redis, self.keys, self.name = settings, redis, keys, name
        self.data_dir = data_dir
        self._drivers: dict[StoreName, Storage] = {}
        self.record = StoreRecord(StoreName.of(settings))
        self.active: Storage = self.driver(self.record.active)
        self.target: Storage | None = None
        self._in_flight: Counter[int] = Counter()  # epoch -> stores begun under it and not yet finished
        self._task: asyncio.Task[None] | None = None

    def driver(self, name: StoreName) -> Storage:
        if name not in self._drivers:
            # Every process makes sure of the directories it may write: a delete renames into trash/, and
            # a missing trash/ would leave the blob in place.
            driver = open_storage(name.settings(self.settings), self.data_dir)
            driver.create_dirs()
            self._drivers[name] = driver
        return self._drivers[name]

    async def start(self, follow: bool = True) -> None:
        """Read the record, and with `follow` register first and follow it from now on (servers and
        workers; a short command such as fsck reads it once). A Redis that is down fails the start."""
        if follow:
            await self.acknowledge(-1)  # before the first read: see the module docstring
        await self.refresh()
        if follow:
            await self.acknowledge()
            self._task = asyncio.create_task(self.follow(), name="casimg-store-follow")

    async def refresh(self) -> bool:
        """Read the record; switch drivers if it changed. True if it did."""
        fields = await self.redis.hgetall(self.keys.store)
        record = StoreRecord.decode(fields, StoreName.of(self.settings))
        if record == self.record:
            return False
        if record.active != self.record.active:
            log.info("the active blob store is now %s (was %s)", record.active, self.record.active)
        if record.target is not None and record.target != self.record.target:
            log.info("stores are written to %s as well, until a migration to it ends", record.target)
        self.active = self.driver(record.active)
        self.target = self.driver(record.target) if record.target is not None else None
        self.record = record
        return True

    async def acknowledge(self, epoch: int | None = None) -> None:
        """Say which epoch this process follows, if no store begun under an earlier one is in flight."""
        if epoch is None:
            epoch = self.record.epoch
            if any(count and begun < epoch for begun, count in self._in_flight.items()):
                epoch = min(begun for begun, count in self._in_flight.items() if count)
        seconds, micros = await self.redis.time()
        await self.redis.hset(self.keys.store_acks, self.name, f"{epoch} {seconds * 1000 + micros // 1000}")

    async def follow(self) -> None:
        while True:
            await asyncio.sleep(FOLLOW_INTERVAL)
            try:
                await self.refresh()
                await self.acknowledge()
            except REDIS_ERRORS as exc:  # the record is kept as last read; reads and stores go on
                log.warning("could not read the active store record: %s", exc)

    @contextlib.contextmanager
    def storing(self) -> Iterator[tuple[Storage, Storage | None]]:
        """The (active, target) pair one store writes, counted as in flight until it is finished."""
        epoch = self.record.epoch
        self._in_flight[epoch] += 1
        try:
            yield self.active, self.target
        finally:
            self._in_flight[epoch] -= 1
            if not self._in_flight[epoch]:
                del self._in_flight[epoch]

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            with contextlib.suppress(*REDIS_ERRORS):
                await self.redis.hdel(self.keys.store_acks, self.name)
        for driver in self._drivers.values():
            await driver.close()
