"""The blob lifecycle: the store and delete protocols of the storage drivers, run against the index.

The file driver moves blobs with link and rename (storage/file.py's docstring); an object store has
neither, and its blobs go through claims and tombstones instead (storage/s3.py's docstring, with the
argument why an indexed URL always has its object). ``store_blob``, ``delete_url`` and
``remove_if_unreferenced`` run the one their driver needs; ``sweep_tombs`` is the object store's deletion.

Both are written as a sequence of awaited steps with a ``pause`` seam between them, so a test can stop
one operation between any two steps, run another to completion, and then let the first go on: every
interleaving of a store and a delete of the same content is tested that way (tests/test_lifecycle.py).
File system calls go to a thread, never onto the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from casimg.index import BlobMeta, Index, StoreOutcome
from casimg.schema import Outcome
from casimg.storage import Storage
from casimg.storage.file import FileStore
from casimg.storage.s3 import CLAIM_TTL, DELETING_TTL, TOMB_GRACE

log = logging.getLogger("casimg.lifecycle")

Pause = Callable[[str], Awaitable[None]]
# Runs a blocking file call off the event loop: ``await run(func, *args)`` returns ``func(*args)``.
Run = Callable[..., Awaitable[Any]]
T = TypeVar("T")


async def _no_pause(step: str) -> None:
    return None


CLAIM_WAIT = 0.05  # first pause before asking again for a claim a delete in flight refused (doubling)
CLAIM_WAIT_MAX = 0.25  # a DELETE takes milliseconds; the wait only happens while one is in flight


async def store_blob(
    blobs: Storage,
    index: Index,
    tmp: Path,
    url: str,
    digest: str,
    meta: BlobMeta,
    *,
    linked: bool = False,
    pause: Pause = _no_pause,
    run: Run = asyncio.to_thread,
    **job: Any,
) -> StoreOutcome:
    """Index `url` -> `digest` with its bytes in `tmp`, steps 1-4 (2-4 when `linked`); `tmp` is consumed.

    `job` (job_id, position, entry_id, attempts, owner) finishes the URL's queue entry in the same Redis
    step. Downloads come in `linked`: they do step 1 in the same trip to a thread as validation, make many
    blobs durable with one flush (storage.file.FlushGroup), and pass a `run` that settles many with one trip
    (batching.ThreadBatcher). On an object store, `linked` and `run` do not apply: see ``_store_claimed``.
    """
    if not isinstance(blobs, FileStore):
        return await _store_claimed(blobs, index, tmp, url, digest, meta, pause=pause, **job)
    if not linked:
        await asyncio.to_thread(blobs.link_in_or_discard, tmp, digest)
        await pause("linked")
    settled = False
    try:
        outcome = await index.store(url, digest, meta, **job)
        await pause("indexed")
        if outcome.outcome is Outcome.STORED:
            settled = True
            await run(blobs.settle, tmp, digest)
        else:
            # The URL was indexed by someone else meanwhile, or its job was cancelled (then it is not indexed);
            # our link may have made an unreferenced blob.
            await remove_if_unreferenced(blobs, index, digest)
        return outcome
    finally:
        if not settled:
            await run(blobs.discard, tmp)


async def delete_url(blobs: Storage, index: Index, url: str, *, pause: Pause = _no_pause) -> str | None:
    """Remove `url` from the index, and its blob with its last reference (and then its variants' blobs,
    unless another reference holds them). None if `url` is unknown."""
    released = await index.release(url)
    if released is None:
        return None
    await pause("released")
    if released.left == 0:
        await remove_if_unreferenced(blobs, index, released.digest, pause=pause)
        for variant in released.freed:  # variants go with their source's last reference
            await remove_if_unreferenced(blobs, index, variant)
    return released.digest


async def store_referenced(
    blobs: Storage,
    index: Index,
    tmp: Path,
    digest: str,
    content_type: str,
    reference: Callable[[], Awaitable[T]],
    counted: Callable[[T], bool],
    *,
    linked: bool = False,
) -> T:
    """The store steps with another reference than a URL as the index step (a variant relation,
    relations.py): `reference()` counts it in Redis, and `counted(its answer)` says whether it did. If not,
    our commit may have made an unreferenced blob, which goes as any other. `tmp` is consumed. `linked`:
    the caller has done the file store's step 1 (``link_in`` with its fsync) already, in its own trip to
    a thread."""
    if not isinstance(blobs, FileStore):
        return await _referenced_claimed(blobs, index, tmp, digest, content_type, reference, counted)
    if not linked:
        await asyncio.to_thread(blobs.link_in_or_discard, tmp, digest)
    settled = False
    try:
        answer = await reference()
        if counted(answer):
            settled = True
            await asyncio.to_thread(blobs.settle, tmp, digest)
        else:
            await remove_if_unreferenced(blobs, index, digest)
        return answer
    finally:
        if not settled:
            await asyncio.to_thread(blobs.discard, tmp)


async def remove_if_unreferenced(blobs: Storage, index: Index, digest: str, *, pause: Pause = _no_pause) -> bool:
    """Delete steps 2-4: move the blob away; put it back if a store raced in. True if it is gone.

    On an object store: tombstone it for the sweep (``sweep_tombs``), and answer False: it is not gone yet."""
    if not isinstance(blobs, FileStore):
        await index.tomb(digest, _grace(blobs))
        return False
    if await index.refs_of(digest) > 0:
        return False
    await pause("checked")
    try:
        trash = await asyncio.to_thread(blobs.move_to_trash, digest)
    except OSError as exc:
        # The blob directory is read-only or failing. The URL is already out of the index, so its delete
        # has happened; the bytes stay as an unreferenced blob, which the sweep or fsck --repair removes.
        log.warning("could not move blob %s to the trash (%s); left for the sweep", digest, exc.strerror or exc)
        return False
    await pause("trashed")
    try:
        if await index.refs_of(digest) > 0:
            if trash is not None:
                await asyncio.to_thread(blobs.restore_from_trash, trash, digest)
            return False
        return True
    finally:
        await asyncio.to_thread(blobs.discard, trash)



# -- an object store: claims and tombstones (storage/s3.py's docstring has the argument) ----------------

async def _store_claimed(
    blobs: Storage, index: Index, tmp: Path, url: str, digest: str, meta: BlobMeta, *, pause: Pause, **job: Any
) -> StoreOutcome:
    """A download's store on an object store: ``_referenced_claimed`` with the URL's index step."""
    return await _referenced_claimed(
        blobs, index, tmp, digest, meta.content_type, lambda: index.store(url, digest, meta, **job),
        lambda outcome: outcome.outcome is Outcome.STORED, pause=pause)


async def _referenced_claimed(
    blobs: Storage, index: Index, tmp: Path, digest: str, content_type: str,
    reference: Callable[[], Awaitable[T]], counted: Callable[[T], bool], *, pause: Pause = _no_pause,
) -> T:
    """Claim, commit, reference (`reference()`, the index step; `counted` says whether it added a
    reference), unclaim; commit again under a new claim if the first expired before the index step. `tmp`
    is consumed."""
    token = secrets.token_hex(8)
    claimed = False
    try:
        present = await _claim(index, digest, token)
        claimed = True
        await pause("claimed")
        if not present:  # a referenced digest's object is there: no request needed
            await blobs.commit(tmp, digest, content_type)
        await pause("committed")
        answer = await reference()
        await pause("indexed")
        claimed = False
        live = await index.unclaim(digest, token)
        if not counted(answer):
            # Referenced by someone else meanwhile: our commit may have made an unreferenced object.
            await index.tomb(digest, _grace(blobs))
            return answer
        while not live:
            # The claim expired before the index step: a sweep may have deleted the object since. Our
            # reference now keeps any later sweep off it; a claim waits out a delete in flight.
            log.warning("claim on %s expired during its commit; committing again", digest)
            await _claim(index, digest, token)
            claimed = True
            await blobs.commit(tmp, digest, content_type)
            claimed = False
            live = await index.unclaim(digest, token)
        return answer
    finally:
        if claimed:
            await _quietly(index.unclaim(digest, token))
        await asyncio.to_thread(blobs.discard, tmp)


async def _claim(index: Index, digest: str, token: str) -> bool:
    """Take a claim on `digest`, waiting while a delete of its object is in flight (at most DELETING_TTL);
    True if the digest is referenced, so its object is known to be there."""
    wait = CLAIM_WAIT
    while not (answer := await index.claim(digest, token, CLAIM_TTL)):
        await asyncio.sleep(wait)
        wait = min(wait * 2, CLAIM_WAIT_MAX)
    return answer == 2


async def delete_tombstoned(blobs: Storage, index: Index, digest: str, *, pause: Pause = _no_pause) -> bool:
    """The sweep's deletion of one due tombstone: begin_delete, DELETE, end_delete. True if deleted."""
    if not await index.begin_delete(digest, DELETING_TTL):
        return False
    await pause("marked")
    try:
        await blobs.delete(digest)
        await pause("deleted")
    finally:
        await index.end_delete(digest)
    return True


async def sweep_tombs(blobs: Storage, index: Index, *, batch: int = 1000) -> list[str]:
    """Delete the objects of every due tombstone that nothing references or claims (one sweeper at a time)."""
    done = []
    while due := await index.due_tombs(batch):
        for digest in due:
            if await delete_tombstoned(blobs, index, digest):
                done.append(f"deleted object {digest}")
        if len(due) < batch:
            break
    return done


def _grace(blobs: Storage) -> float:
    """How long an object store keeps an unreferenced object before the sweep may delete it."""
    return float(getattr(blobs, "tomb_grace", TOMB_GRACE))


async def _quietly(step: Awaitable[Any]) -> None:
    try:
        await step
    except Exception as exc:  # the claim expires on its own; the error that brought us here matters more
        log.warning("could not release a claim: %s", exc)
