"""Stores and deletes of the same content on an object store: claims, tombstones and the sweep.

As tests/test_lifecycle.py does for files, each operation runs as a task that stops at every ``pause``
seam of casimg.lifecycle, and every order of their steps is run on fresh state against the session's S3
endpoint (moto_server, or the bucket CASIMG_S3_* names). A store asked to claim while a delete is in
flight waits inside its step; the schedule then lets the other operation go on (``Stepped`` gives up
waiting for an arrival after BLOCKED seconds). After each schedule: every indexed URL's object exists
and reads back byte-identical, counts match, and no claim, marker or temp file is left.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from casimg.fsck import fsck, sweep
from casimg.index import BlobMeta, Index
from casimg.lifecycle import delete_tombstoned, delete_url, store_blob
from casimg.schema import KeySpace
from casimg.services import connect_redis
from casimg.storage import BlobNotFound
from casimg.storage.s3 import S3Store
from tests.conftest import png
from tests.test_lifecycle import Stepped, schedules

BYTES = png(7)
DIGEST = hashlib.sha256(BYTES).hexdigest()
META = BlobMeta(size=len(BYTES), content_type="image/png", width=4, height=3)
BLOCKED = 0.2  # seconds without an arrival after which a step counts as waiting (for a delete to end)


class Waiting(Stepped):
    """``Stepped``, but an advance also returns when the operation waits inside a step."""

    async def advance(self) -> None:
        if self.task is None:
            self.task = asyncio.ensure_future(self.operation(self.pause))
        elif self.task.done():
            return
        elif not getattr(self, "blocked", False):
            self.proceed.put_nowait(None)
        arrival = asyncio.ensure_future(self.arrived.get())
        await asyncio.wait({arrival, self.task}, timeout=BLOCKED, return_when=asyncio.FIRST_COMPLETED)
        self.blocked = not arrival.done() and not self.task.done()
        if arrival.done():
            self.steps.append(arrival.result())
        else:
            arrival.cancel()
            if self.task.done():
                self.task.result()


@pytest.fixture
def world(io_loop: Any, s3: Any, redis_server: Any, tmp_path: Path) -> Any:
    client = connect_redis(redis_server.url, 8)
    store = s3.store_for(tmp_path / "tmp", tomb_grace=0)
    yield store, Index(client, KeySpace(f"objects-{id(store)}-{tmp_path.name}:"))
    io_loop.run_sync(client.aclose)


async def temp(store: S3Store) -> Path:
    return store.write_temp(BYTES)[0]


async def assert_invariant(store: S3Store, index: Index) -> None:
    snap = await index.snapshot()
    counts = Counter(snap.urls.values())
    for url, digest in snap.urls.items():
        assert await store.read_range(digest) == BYTES, f"{url} is indexed but its object is not whole"
    assert dict(counts) == snap.refs and snap.bare == set()
    assert snap.counts == {"urls": len(snap.urls), "blobs": len(counts)}
    redis = index.redis
    assert await redis.exists(index.keys.claims(DIGEST), index.keys.deleting(DIGEST)) == 0
    assert list(store.tmp_dir.iterdir()) == []
    assert (await fsck(index, store)).ok


async def seed_due_tombstone(store: S3Store, index: Index) -> None:
    """The object of DIGEST is stored, its last URL deleted: a tombstone the sweep may act on now."""
    await store_blob(store, index, await temp(store), "http://origin/a", DIGEST, META)
    assert await delete_url(store, index, "http://origin/a") == DIGEST
    assert await index.due_tombs(10) == [DIGEST]


@pytest.mark.slow  # 35 schedules, each with real requests to the endpoint
@pytest.mark.gen_test(timeout=120)
@pytest.mark.parametrize("schedule", schedules("S", 4, "X", 3))
async def test_store_racing_the_sweeps_delete_of_the_same_content(world, schedule):
    store, index = world
    await seed_due_tombstone(store, index)
    tmp = await temp(store)
    stored = Waiting(lambda pause: store_blob(store, index, tmp, "http://origin/b", DIGEST, META, pause=pause))
    deleted = Waiting(lambda pause: delete_tombstoned(store, index, DIGEST, pause=pause))
    for who in schedule:
        await (stored if who == "S" else deleted).advance()
    await stored.finish()
    await deleted.finish()
    await assert_invariant(store, index)
    assert (await index.lookup("http://origin/b")).sha256 == DIGEST


@pytest.mark.slow
@pytest.mark.gen_test(timeout=120)
@pytest.mark.parametrize("schedule", schedules("S", 4, "D", 2))
async def test_store_racing_the_delete_of_the_last_url_then_a_sweep(world, schedule):
    store, index = world
    await store_blob(store, index, await temp(store), "http://origin/a", DIGEST, META)
    tmp = await temp(store)
    stored = Waiting(lambda pause: store_blob(store, index, tmp, "http://origin/b", DIGEST, META, pause=pause))
    deleted = Waiting(lambda pause: delete_url(store, index, "http://origin/a", pause=pause))
    for who in schedule:
        await (stored if who == "S" else deleted).advance()
    await stored.finish()
    await deleted.finish()
    await sweep(index, store, grace=3600)  # deletes a due tombstone only if nothing references it
    await assert_invariant(store, index)


@pytest.mark.gen_test(timeout=60)
async def test_a_claim_that_expired_before_the_index_step_commits_again(world, caplog):
    """The upload outlasted its claim and a sweep deleted the object meanwhile: the store notices at
    unclaim and uploads again, now that its reference keeps any later sweep off."""
    store, index = world
    await seed_due_tombstone(store, index)
    tmp = await temp(store)
    stored = Waiting(lambda pause: store_blob(store, index, tmp, "http://origin/b", DIGEST, META, pause=pause))
    await stored.advance()  # claimed
    await stored.advance()  # committed (412: the object is still there)
    await index.redis.delete(index.keys.claims(DIGEST))  # as if its TTL ran out ...
    await index.tomb(DIGEST, 0)  # ... and a sweep found the object unreferenced (its claim took the old tomb)
    assert await delete_tombstoned(store, index, DIGEST)  # nothing protects it now: deleted
    with pytest.raises(BlobNotFound):
        await store.stat(DIGEST)
    with caplog.at_level(logging.WARNING, logger="casimg.lifecycle"):
        await stored.finish()
    assert "committing again" in caplog.text
    await assert_invariant(store, index)


@pytest.mark.gen_test(timeout=60)
async def test_a_store_waits_out_the_marker_of_a_sweeper_that_died_mid_delete(world):
    store, index = world
    await seed_due_tombstone(store, index)
    assert await index.begin_delete(DIGEST, marker_ttl=1.0)
    await store.delete(DIGEST)  # ... and the sweeper dies before end_delete: the marker expires in 1 s
    started = asyncio.get_running_loop().time()
    await store_blob(store, index, await temp(store), "http://origin/b", DIGEST, META)
    assert asyncio.get_running_loop().time() - started >= 0.5  # it waited for the marker
    await assert_invariant(store, index)


@pytest.mark.gen_test(timeout=60)
async def test_two_stores_and_a_delete_between_them(world):
    store, index = world
    await seed_due_tombstone(store, index)
    first = Waiting(lambda pause: store_blob(store, index, tmp1, "http://origin/b", DIGEST, META, pause=pause))
    second = Waiting(lambda pause: store_blob(store, index, tmp2, "http://origin/c", DIGEST, META, pause=pause))
    tmp1, tmp2 = await temp(store), await temp(store)
    await first.advance()  # claimed
    deleted = Waiting(lambda pause: delete_tombstoned(store, index, DIGEST, pause=pause))
    await deleted.advance()  # refused: a live claim
    await second.advance()
    await first.finish()
    await second.finish()
    await deleted.finish()
    await assert_invariant(store, index)
    assert await index.refs_of(DIGEST) == 2


@pytest.mark.gen_test(timeout=60)
async def test_the_sweep_tombstones_orphans_and_deletes_them_once_due(world, s3, tmp_path):
    store, index = world
    orphan, _ = store.write_temp(BYTES)
    await store.commit(orphan, DIGEST)  # a store that died before its index step
    store.discard(orphan)
    assert "orphan blob" in " ".join((await fsck(index, store)).notes)
    patient = s3.store_for(tmp_path / "tmp2", prefix=store.prefix)  # the default grace: 15 minutes
    assert await sweep(index, patient, grace=3600) == [f"tombstoned orphan object {DIGEST}"]
    assert await store.stat(DIGEST) == len(BYTES)  # not due yet
    await index.redis.delete(index.keys.tomb)
    done = await sweep(index, store, grace=3600)  # no grace: tombstoned and deleted in one sweep
    assert done == [f"tombstoned orphan object {DIGEST}", f"deleted object {DIGEST}"]
    assert await store.walk() == []


@pytest.mark.gen_test(timeout=60)
async def test_fsck_over_an_object_store_reports_a_missing_and_a_damaged_object(world):
    store, index = world
    await store_blob(store, index, await temp(store), "http://origin/a", DIGEST, META)
    other = png(8)
    tmp, digest = store.write_temp(other)
    await store_blob(store, index, tmp, "http://origin/b", digest, BlobMeta(len(other), "image/png", 4, 3))
    assert (await fsck(index, store)).ok
    await store.delete(DIGEST)
    liar, _ = store.write_temp(b"not the bytes of this digest")
    await store.delete(digest)
    await store.commit(liar, digest)
    store.discard(liar)
    problems = (await fsck(index, store)).problems
    assert f"missing blob {DIGEST} for URL http://origin/a" in problems
    assert any(p.startswith(f"damaged blob {digest}") for p in problems)


@pytest.mark.gen_test(timeout=60)
async def test_a_tombstone_laid_while_a_store_holds_its_claim_deletes_nothing(world):
    """The store found the object there (412), then the last other URL went and its tombstone fell due
    before the store's index step: the live claim alone keeps the sweep off the object."""
    store, index = world
    await store_blob(store, index, await temp(store), "http://origin/a", DIGEST, META)
    tmp = await temp(store)
    stored = Waiting(lambda pause: store_blob(store, index, tmp, "http://origin/b", DIGEST, META, pause=pause))
    await stored.advance()  # claimed (the digest was referenced: no upload needed)
    await stored.advance()  # committed
    assert await delete_url(store, index, "http://origin/a") == DIGEST  # tombstoned, due at once
    assert not await delete_tombstoned(store, index, DIGEST)
    await stored.finish()
    await assert_invariant(store, index)
