"""Every interleaving of a store and a delete (or orphan removal) of the same content.

Each operation runs as a task that stops at every ``pause`` seam of casimg.lifecycle; a schedule says
which operation takes its next step. All schedules are enumerated, each on fresh state, and after each
the invariant must hold: every indexed URL has its blob, counts match, metadata is there, and no
temp or trash file is left.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from casimg.fsck import sweep
from casimg.index import BlobMeta, Index
from casimg.lifecycle import delete_url, remove_if_unreferenced, store_blob
from casimg.schema import KeySpace
from casimg.services import connect_redis
from casimg.storage.file import FileStore

BYTES = b"the same image bytes at two URLs"
DIGEST = hashlib.sha256(BYTES).hexdigest()
META = BlobMeta(size=32, content_type="image/png", width=1, height=1)


class Stepped:
    """Runs one operation a step at a time: each advance lets it run to its next pause, or to its end."""

    def __init__(self, operation: Callable[[Callable[[str], Awaitable[None]]], Awaitable[Any]]) -> None:
        self.operation = operation
        self.task: asyncio.Task[Any] | None = None
        self.arrived: asyncio.Queue[str] = asyncio.Queue()
        self.proceed: asyncio.Queue[None] = asyncio.Queue()
        self.steps: list[str] = []

    async def pause(self, step: str) -> None:
        await self.arrived.put(step)
        await self.proceed.get()

    async def advance(self) -> None:
        if self.task is None:
            self.task = asyncio.ensure_future(self.operation(self.pause))
        elif self.task.done():
            return
        else:
            self.proceed.put_nowait(None)
        arrival = asyncio.ensure_future(self.arrived.get())
        await asyncio.wait({arrival, self.task}, return_when=asyncio.FIRST_COMPLETED)
        if arrival.done():
            self.steps.append(arrival.result())
        else:
            arrival.cancel()
            self.task.result()  # re-raise a failure of the operation itself

    async def finish(self) -> None:
        while self.task is None or not self.task.done():
            await self.advance()
        self.task.result()


def schedules(first: str, first_moves: int, second: str, second_moves: int) -> list[str]:
    """Every order of `first_moves` advances of one operation and `second_moves` of the other."""
    total = first_moves + second_moves
    orders = []
    for positions in itertools.combinations(range(total), first_moves):
        orders.append("".join(first if i in positions else second for i in range(total)))
    return orders


async def _world(tmp_path: Path, redis_url: str, name: str) -> tuple[FileStore, Index]:
    blobs = FileStore(tmp_path / name)
    blobs.create_dirs()
    client = connect_redis(redis_url, 8)
    return blobs, Index(client, KeySpace(f"lifecycle-{name}-{id(blobs)}:"))


async def _temp_with_bytes(blobs: FileStore) -> Path:
    tmp = blobs.tmp_dir / f"dl-{len(list(blobs.tmp_dir.iterdir()))}-{id(object())}.part"
    tmp.write_bytes(BYTES)
    return tmp


async def assert_invariant(blobs: FileStore, index: Index) -> None:
    snap = await index.snapshot()
    counts = Counter(snap.urls.values())
    for url, digest in snap.urls.items():
        assert blobs.exists(digest), f"{url} is indexed but its blob is gone"
    assert snap.bare == set()  # every URL carries its metadata
    assert dict(counts) == snap.refs  # a finished delete leaves no record at 0 references behind
    assert snap.counts == {"urls": len(snap.urls), "blobs": len(counts)}
    assert snap.misplaced == {} and snap.stray == {}
    assert list(blobs.trash_dir.iterdir()) == [] and list(blobs.tmp_dir.iterdir()) == []
    if not snap.urls:
        assert not blobs.exists(DIGEST)


@pytest.mark.gen_test(timeout=60)
@pytest.mark.parametrize("schedule", schedules("S", 3, "D", 4))
async def test_store_racing_delete_of_last_reference(tmp_path, redis_server, schedule):
    """URL a holds the only reference to the bytes; a is deleted while b stores the same bytes."""
    blobs, index = await _world(tmp_path, redis_server.url, schedule)
    seed = await _temp_with_bytes(blobs)
    await store_blob(blobs, index, seed, "http://origin/a", DIGEST, META)

    tmp = await _temp_with_bytes(blobs)
    store = Stepped(lambda pause: store_blob(blobs, index, tmp, "http://origin/b", DIGEST, META, pause=pause))
    delete = Stepped(lambda pause: delete_url(blobs, index, "http://origin/a", pause=pause))
    for move in schedule:
        await (store if move == "S" else delete).advance()
    await store.finish()
    await delete.finish()

    assert await index.digest_of("http://origin/b") == DIGEST
    assert await index.digest_of("http://origin/a") is None
    assert blobs.read(DIGEST) == BYTES
    await assert_invariant(blobs, index)
    await index.redis.aclose()


@pytest.mark.gen_test(timeout=60)
@pytest.mark.parametrize("schedule", schedules("S", 3, "R", 3))
async def test_store_racing_orphan_removal(tmp_path, redis_server, schedule):
    """fsck --repair removes an unreferenced blob while a store of the same bytes is under way."""
    blobs, index = await _world(tmp_path, redis_server.url, schedule)
    orphan = await _temp_with_bytes(blobs)
    blobs.link_in(orphan, DIGEST)
    blobs.discard(orphan)

    tmp = await _temp_with_bytes(blobs)
    store = Stepped(lambda pause: store_blob(blobs, index, tmp, "http://origin/b", DIGEST, META, pause=pause))
    removal = Stepped(lambda pause: remove_if_unreferenced(blobs, index, DIGEST, pause=pause))
    for move in schedule:
        await (store if move == "S" else removal).advance()
    await store.finish()
    await removal.finish()

    assert blobs.read(DIGEST) == BYTES
    await assert_invariant(blobs, index)
    await index.redis.aclose()


@pytest.mark.gen_test(timeout=60)
@pytest.mark.parametrize("schedule", schedules("D", 4, "E", 4))
async def test_two_deletes_of_urls_sharing_content(tmp_path, redis_server, schedule):
    blobs, index = await _world(tmp_path, redis_server.url, schedule)
    for url in ("http://origin/a", "http://origin/b"):
        await store_blob(blobs, index, await _temp_with_bytes(blobs), url, DIGEST, META)
    first = Stepped(lambda pause: delete_url(blobs, index, "http://origin/a", pause=pause))
    second = Stepped(lambda pause: delete_url(blobs, index, "http://origin/b", pause=pause))
    for move in schedule:
        await (first if move == "D" else second).advance()
    await first.finish()
    await second.finish()
    assert not blobs.exists(DIGEST)
    assert await index.refs_of(DIGEST) == 0
    await assert_invariant(blobs, index)
    await index.redis.aclose()


@pytest.mark.gen_test(timeout=60)
async def test_delete_whose_blob_cannot_be_moved_leaves_it_for_the_sweep(tmp_path, redis_server):
    """A blob directory that refuses the move (read-only, failing) must not turn a delete into an error."""
    blobs, index = await _world(tmp_path, redis_server.url, "stuck")
    await store_blob(blobs, index, await _temp_with_bytes(blobs), "http://origin/a", DIGEST, META)
    blobs.trash_dir.rmdir()
    blobs.trash_dir.write_bytes(b"")  # a file where trash/ should be: the move fails with an OSError
    assert await delete_url(blobs, index, "http://origin/a") == DIGEST
    assert await index.digest_of("http://origin/a") is None
    assert blobs.exists(DIGEST)  # left as an unreferenced blob
    blobs.trash_dir.unlink()
    assert f"removed orphan blob {DIGEST}" in await sweep(index, blobs, grace=3600)
    assert not blobs.exists(DIGEST)
    await assert_invariant(blobs, index)
    await index.redis.aclose()
