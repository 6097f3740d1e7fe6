"""`casimg migrate-store --to s3://bucket/prefix` (or `--to file`): move every blob to another store while
the service runs. pict-rs's migrate-store is the model: copy every referenced blob, check each copy,
record progress so an interrupted run resumes where it stopped; unlike pict-rs, the switch happens live,
through the store record that every process follows (storage/active.py).

The steps, each recorded in Redis before the next begins:

1. Begin: the record gets the target and a new epoch (and the migration an id). Every process, within
   FOLLOW_INTERVAL, writes each new store to the target as well, before its index step.
2. Wait until every live process has acknowledged the epoch, which it does once no store it began
   before is in flight. From then on, every store that reaches the index has its bytes in the target.
3. Copy: for each digest the index references (the blob records' counts, as fsck reads them), read the
   bytes from the active store, check they hash to the digest, commit them to the target, read them back
   from the target and check again; then add the digest to ``store-copied:{id}``. Digests already in that
   set are skipped: a run that was killed resumes here.
4. Check: a fresh read of the index; every digest referenced since the first read must be in the target
   already (it was written to both stores, step 2); one that is not is copied too (a safety net).
5. Flip: the record names the target as active, with no target and a new epoch, in one transaction that
   fails if the record changed meanwhile. Processes switch within FOLLOW_INTERVAL; one that has not yet
   still writes to both and reads from the old store, which keeps every blob (nothing is deleted there).
   Its write to an object store takes no claim; that is safe because no tombstone there can come due
   within seconds of the flip: step 1 deleted those an earlier time on an object store left, and new
   ones wait out a grace period of minutes.

What a delete does meanwhile: it follows the active store's protocol; if its blob was copied already,
the copy is an unreferenced blob in the target, which the target's sweep removes once it is active. A
digest whose blob is gone from the source when the copy reads it is skipped when the index no longer
references it, and otherwise stops the flip (the run says which).

Variants are rendered on request and not kept as blobs, so the index's digests are all there is to copy.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import redis.asyncio as aioredis

from casimg.errors import BadRequest
from casimg.index import Index
from casimg.schema import KeySpace
from casimg.storage import BlobNotFound, Storage, StorageUnavailable
from casimg.storage.active import LIVE_WINDOW, ActiveStore, StoreName, StoreRecord

log = logging.getLogger("casimg.migrate_store")

COPY_CONCURRENCY = 8  # blobs copied at once: enough to hide an object store's latency, little memory
ACK_POLL = 0.2  # seconds between looks at the acknowledgements
ACK_FORGET = 3600.0  # an acknowledgement this old (a process that died) is removed
REPORT_EVERY = 5.0  # seconds between progress lines


@dataclass
class Progress:
    referenced: int = 0
    copied: int = 0  # in this run
    skipped: int = 0  # copied by an earlier, interrupted run
    gone: int = 0  # deleted while the migration ran
    failed: dict[str, str] = field(default_factory=dict)  # digest -> why it could not be copied


async def migrate_store(stores: ActiveStore, index: Index, to: StoreName,
                        say: Callable[[str], None] = print) -> Progress:
    """Run (or resume) the migration of every blob to `to` and make it the active store.

    BadRequest if another migration is under way; StorageUnavailable if the target does not answer. The
    flip happens only when every referenced blob is in the target; Progress.failed says what stopped it.
    """
    redis, keys = stores.redis, stores.keys
    await stores.refresh()
    record = stores.record
    if record.target is not None and record.target != to:
        raise BadRequest(f"a migration to {record.target} is under way: finish it first "
                         f"(casimg migrate-store --to {record.target})")
    if record.target is None and record.active == to:
        say(f"the active store is {to} already: nothing to do")
        return Progress()
    target = stores.driver(to)
    await target.check()
    if record.target is None:
        record = await _begin(redis, keys, record, to)
        say(f"migration {record.migration}: stores go to {record.active} and {to} from now on")
    else:
        say(f"resuming migration {record.migration} from {record.active} to {to}")
    await stores.refresh()
    await _wait_for_processes(redis, keys, record.epoch, say)
    source = stores.driver(record.active)
    progress = Progress()
    copied_key = keys.store_copied(record.migration)
    referenced = await _referenced(index)
    done = set(await redis.smembers(copied_key))
    todo = sorted(referenced - done)
    progress.referenced, progress.skipped = len(referenced), len(referenced) - len(todo)
    say(f"copying {len(todo)} of {len(referenced)} referenced blobs ({progress.skipped} copied before)")
    await _copy_all(source, target, index, redis, copied_key, todo, progress, say)
    # Step 4: what was indexed since the read above was written to both stores; check it is there.
    later = sorted(await _referenced(index) - referenced)
    progress.referenced += len(later)
    missing = [digest for digest in later if not await _present(target, digest)]
    if missing:
        say(f"{len(missing)} blob(s) indexed during the copy are not in {to}: copying them")
        await _copy_all(source, target, index, redis, copied_key, missing, progress, say)
    if progress.failed:
        for digest, why in sorted(progress.failed.items()):
            say(f"not copied: {digest}: {why}")
        say(f"{len(progress.failed)} blob(s) could not be copied; the active store stays {record.active} "
            "(run the command again to retry)")
        return progress
    await _flip(redis, keys, record)
    await redis.delete(copied_key)
    say(f"done: {progress.referenced} blobs in {to} ({progress.copied} copied now, {progress.skipped} before, "
        f"{progress.gone} deleted meanwhile); {to} is the active store")
    return progress


async def _begin(redis: aioredis.Redis, keys: KeySpace, record: StoreRecord, to: StoreName) -> StoreRecord:
    began = StoreRecord(record.active, to, record.epoch + 1, secrets.token_hex(6))
    # Tombstones left from an earlier time on an object store must not come due in the new one: a process
    # that has not yet seen the flip writes there without a claim. Their objects, if any, are orphans that
    # the sweep's walk tombstones afresh, with a full grace period.
    forget = [keys.tomb] if to.kind != "file" else []
    await _write(redis, keys, record, {"active": str(began.active), "target": str(to),
                                       "epoch": str(began.epoch), "id": began.migration}, forget)
    return began


async def _flip(redis: aioredis.Redis, keys: KeySpace, record: StoreRecord) -> None:
    assert record.target is not None
    await _write(redis, keys, record, {"active": str(record.target), "target": "",
                                       "epoch": str(record.epoch + 1), "id": ""})


async def _write(redis: aioredis.Redis, keys: KeySpace, expected: StoreRecord, fields: dict[str, str],
                 forget: list[str] | None = None) -> None:
    """Replace the record (and delete the keys `forget` names), unless it is no longer at `expected`'s
    epoch (another migrate-store ran)."""
    async with redis.pipeline(transaction=True) as pipe:
        await pipe.watch(keys.store)
        epoch = int(await pipe.hget(keys.store, "epoch") or 0)
        if epoch != expected.epoch:
            raise BadRequest("the store record changed meanwhile: another migrate-store is running")
        pipe.multi()
        pipe.hset(keys.store, mapping=fields)
        if forget:
            pipe.delete(*forget)
        await pipe.execute()


async def _wait_for_processes(redis: aioredis.Redis, keys: KeySpace, epoch: int, say: Callable[[str], None]) -> None:
    """Until every live process follows `epoch` with nothing older in flight (storage/active.py)."""
    last_said = 0.0
    while True:
        seconds, micros = await redis.time()
        now = seconds * 1000 + micros // 1000
        waiting, dead = [], []
        for name, value in (await redis.hgetall(keys.store_acks)).items():
            acked, _, at = value.partition(" ")
            age = (now - int(at or 0)) / 1000
            if age > ACK_FORGET:
                dead.append(name)
            elif age <= LIVE_WINDOW and int(acked) < epoch:
                waiting.append(name)
        if dead:
            await redis.hdel(keys.store_acks, *dead)
        if not waiting:
            return
        if time.monotonic() - last_said > REPORT_EVERY:
            say(f"waiting for {len(waiting)} process(es) to write to both stores: {', '.join(sorted(waiting))}")
            last_said = time.monotonic()
        await asyncio.sleep(ACK_POLL)


async def _referenced(index: Index) -> set[str]:
    snap = await index.snapshot()
    return {digest for digest, refs in snap.refs.items() if refs > 0}


async def _present(store: Storage, digest: str) -> bool:
    try:
        await store.stat(digest)
    except BlobNotFound:
        return False
    return True


async def _copy_all(source: Storage, target: Storage, index: Index, redis: aioredis.Redis, copied_key: str,
                    todo: list[str], progress: Progress, say: Callable[[str], None]) -> None:
    slots = asyncio.Semaphore(COPY_CONCURRENCY)
    last_said = time.monotonic()

    async def one(digest: str) -> None:
        nonlocal last_said
        async with slots:
            try:
                if await copy_blob(source, target, digest):
                    await redis.sadd(copied_key, digest)
                    progress.copied += 1
                elif await index.refs_of(digest) == 0:
                    progress.gone += 1
                else:
                    progress.failed[digest] = f"referenced, but missing from {source.kind} store"
            except (StorageUnavailable, OSError, ValueError) as exc:
                progress.failed[digest] = str(exc)
        if time.monotonic() - last_said > REPORT_EVERY:
            say(f"copied {progress.copied} of {len(todo)}")
            last_said = time.monotonic()

    await asyncio.gather(*(one(digest) for digest in todo))


async def copy_blob(source: Storage, target: Storage, digest: str) -> bool:
    """Copy one blob and check it on both sides; False if the source has none. ValueError if a side's
    bytes do not hash to `digest`; StorageUnavailable if a store fails."""
    try:
        data = await source.read_range(digest)
    except BlobNotFound:
        return False
    if hashlib.sha256(data).hexdigest() != digest:
        raise ValueError(f"the source's bytes of {digest} are damaged (casimg fsck reports it)")
    tmp, _ = await asyncio.to_thread(target.write_temp, data)
    try:
        await target.commit(tmp, digest)
    finally:
        await asyncio.to_thread(target.discard, tmp)
    try:
        back = await target.read_range(digest)
    except BlobNotFound:
        raise StorageUnavailable(f"{digest} is not in the target right after its copy") from None
    if hashlib.sha256(back).hexdigest() != digest:
        raise ValueError(f"the copy of {digest} reads back different bytes")
    return True
