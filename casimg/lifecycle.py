"""The blob lifecycle: the store and delete protocols of casimg.storage.file, run against the index.

Both are written as a sequence of awaited steps with a ``pause`` seam between them, so a test can stop
one operation between any two steps, run another to completion, and then let the first go on: every
interleaving of a store and a delete of the same content is tested that way (tests/test_lifecycle.py).
File system calls go to a thread, never onto the event loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from casimg.index import BlobMeta, Index, StoreOutcome
from casimg.schema import Outcome
from casimg.storage.file import FileStore

log = logging.getLogger("casimg.lifecycle")

Pause = Callable[[str], Awaitable[None]]
# Runs a blocking file call off the event loop: ``await run(func, *args)`` returns ``func(*args)``.
Run = Callable[..., Awaitable[Any]]
T = TypeVar("T")


async def _no_pause(step: str) -> None:
    return None


async def store_blob(
    blobs: FileStore,
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
    (batching.ThreadBatcher).
    """
    if not linked:
        try:
            await asyncio.to_thread(blobs.link_in, tmp, digest)
        except BaseException:
            await asyncio.to_thread(blobs.discard, tmp)
            raise
        await pause("linked")
    settled = False
    try:
        outcome = await index.store(url, digest, meta, **job)
        await pause("indexed")
        if outcome.outcome is Outcome.STORED:
            settled = True
            await run(blobs.settle, tmp, digest)
        else:
            # The URL was indexed by someone else meanwhile; our link may have made an unreferenced blob.
            await remove_if_unreferenced(blobs, index, digest)
        return outcome
    finally:
        if not settled:
            await run(blobs.discard, tmp)


async def store_referenced(
    blobs: FileStore,
    index: Index,
    tmp: Path,
    digest: str,
    reference: Callable[[], Awaitable[T]],
    counted: Callable[[T], bool],
) -> T:
    """Store steps 1-4 with another reference than a URL as step 2 (a variant relation, relations.py):
    `reference()` counts it in Redis, and `counted(its answer)` says whether it did. If not, our link may
    have made an unreferenced blob, which goes through the delete steps. `tmp` is consumed."""
    try:
        await blobs.commit(tmp, digest)
    except BaseException:
        await asyncio.to_thread(blobs.discard, tmp)
        raise
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


async def delete_url(blobs: FileStore, index: Index, url: str, *, pause: Pause = _no_pause) -> str | None:
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


async def remove_if_unreferenced(blobs: FileStore, index: Index, digest: str, *, pause: Pause = _no_pause) -> bool:
    """Delete steps 2-4: move the blob away; put it back if a store raced in. True if it is gone."""
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

