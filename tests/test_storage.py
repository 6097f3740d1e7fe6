"""The conformance suite every storage driver passes (distribution's driver/testsuites is the model).

Each test runs over the file driver on a temp dir and the s3 driver on the session's S3 endpoint (a real
`moto_server` process, or the bucket CASIMG_S3_ENDPOINT / CASIMG_S3_BUCKET name; tests/procs.S3Endpoint),
each under a prefix of its own. A third driver joins by adding itself to DRIVERS.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path
from typing import Any

import pytest

from casimg.storage import BlobNotFound, Storage, StorageUnavailable
from casimg.storage.file import FileStore

DRIVERS = ["file", "s3"]


@pytest.fixture(params=DRIVERS)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    if request.param == "file":
        files = FileStore(tmp_path / "data")
        files.create_dirs()
        return files
    return request.getfixturevalue("s3").store_for(tmp_path / "data" / "tmp")


def staged(store: Storage, data: bytes) -> tuple[Path, str]:
    return store.write_temp(data)


async def stored(store: Storage, data: bytes) -> str:
    tmp, digest = staged(store, data)
    try:
        await store.commit(tmp, digest, "application/octet-stream")
    finally:
        store.discard(tmp)
    return digest


@pytest.mark.gen_test(timeout=60)
async def test_a_committed_blob_reads_back_whole_and_in_ranges(store):
    data = os.urandom(70_000)
    digest = await stored(store, data)
    assert await store.stat(digest) == len(data)
    assert await store.read_range(digest) == data
    assert await store.read_range(digest, 0, 10) == data[:10]
    assert await store.read_range(digest, 65_000, 5_000) == data[65_000:]
    assert await store.read_range(digest, 69_990) == data[69_990:]  # from an offset to the end
    assert await store.read_range(digest, 5, 0) == b""


@pytest.mark.gen_test(timeout=60)
async def test_committing_a_stored_digest_again_is_success(store):
    data = b"twice" * 100
    assert await stored(store, data) == await stored(store, data)
    assert await store.walk() == [hashlib.sha256(data).hexdigest()]


@pytest.mark.gen_test(timeout=60)
async def test_different_bytes_never_replace_a_stored_blob(store):
    """A commit under a digest that holds already keeps what is there: the name means those bytes."""
    data = b"the real bytes"
    digest = await stored(store, data)
    liar, _ = staged(store, b"other bytes under the same name")
    await store.commit(liar, digest)
    store.discard(liar)
    assert await store.read_range(digest) == data


@pytest.mark.gen_test(timeout=60)
async def test_concurrent_commits_of_one_digest_leave_one_sound_blob(store):
    data = os.urandom(50_000)
    temps = [staged(store, data) for _ in range(8)]
    await asyncio.gather(*(store.commit(tmp, digest) for tmp, digest in temps))
    for tmp, _ in temps:
        store.discard(tmp)
    digest = temps[0][1]
    assert await store.walk() == [digest]
    assert await store.read_range(digest) == data
    assert await store.usage() == (1, len(data))


@pytest.mark.gen_test(timeout=60)
async def test_missing_blobs_raise_blob_not_found_and_delete_is_idempotent(store):
    missing = "0" * 64
    for call in (store.stat(missing), store.read_range(missing), store.read_range(missing, 3, 4)):
        with pytest.raises(BlobNotFound):
            await call
    await store.delete(missing)
    digest = await stored(store, b"to delete")
    await store.delete(digest)
    await store.delete(digest)
    with pytest.raises(BlobNotFound):
        await store.stat(digest)
    assert await store.walk() == []


@pytest.mark.gen_test(timeout=60)
async def test_deletes_racing_commits_leave_the_blob_whole_or_absent(store):
    """Without the lifecycle's ordering either may win; what is never seen is a partial blob."""
    data = os.urandom(120_000)
    for _ in range(5):
        tmp, digest = staged(store, data)
        await asyncio.gather(store.commit(tmp, digest), store.delete(digest), store.commit(tmp, digest))
        store.discard(tmp)
        try:
            assert await store.read_range(digest) == data
        except BlobNotFound:
            assert digest not in await store.walk()


@pytest.mark.gen_test(timeout=60)
async def test_walk_lists_every_stored_digest_sorted(store):
    digests = [await stored(store, f"blob {n}".encode()) for n in range(12)]
    assert await store.walk() == sorted(digests)
    files, size = await store.usage()
    assert files == 12 and size == sum(len(f"blob {n}".encode()) for n in range(12))


@pytest.mark.gen_test(timeout=60)
async def test_an_interrupted_upload_is_a_leftover_until_cleared(store):
    tmp, _ = staged(store, b"a download that was never committed")
    found = [left for left in await store.leftovers() if left.kind == "tmp"]
    assert [left.path for left in found] == [tmp] and found[0].age < 60
    await store.clear(found[0])
    assert not tmp.exists()
    assert [left for left in await store.leftovers() if left.kind == "tmp"] == []


@pytest.mark.gen_test(timeout=60)
async def test_a_store_that_cannot_work_says_why(store, tmp_path):
    await store.check()
    broken: Any
    if isinstance(store, FileStore):
        broken = store
        broken.tmp_dir.rmdir()
        broken.tmp_dir.write_bytes(b"")  # a file where tmp/ should be
        reason = "not writable"
    else:
        broken = store.__class__(store.tmp_dir, bucket="no-such-bucket", prefix=store.prefix,
                                 endpoint=store.endpoint, region=store.region, credentials=store._credentials)
        reason = "does not exist"
    with pytest.raises(StorageUnavailable, match=reason):
        await broken.check()
    assert isinstance(StorageUnavailable("x"), Exception)


# -- the s3 driver alone ----------------------------------------------------------------------------

S3_PART = 5 * 1024 * 1024  # the smallest part S3 takes


@pytest.mark.gen_test(timeout=120)
async def test_s3_a_large_blob_goes_up_in_parts_and_is_committed_only_once(s3, tmp_path):
    store = s3.store_for(tmp_path / "tmp", multipart_threshold=S3_PART, part_size=S3_PART)
    data = os.urandom(2 * S3_PART + 1000)
    digest = await stored(store, data)
    assert await store.read_range(digest) == data
    assert await store.walk() == [digest]
    liar, _ = staged(store, os.urandom(2 * S3_PART))  # different bytes, the same name: refused, kept
    await store.commit(liar, digest)
    store.discard(liar)
    assert await store.read_range(digest, len(data) - 10) == data[-10:]
    assert [left for left in await store.leftovers() if left.kind == "upload"] == []  # the staging copy went


@pytest.mark.gen_test(timeout=60)
async def test_s3_keys_fan_out_by_digest_under_the_prefix(s3, tmp_path):
    store = s3.store_for(tmp_path / "tmp", prefix="some/prefix/")
    digest = "ab" + "cd" + "e" * 60
    assert store.blob_key(digest) == "some/prefix/blobs/ab/cd/" + digest
    with pytest.raises(ValueError):
        store.blob_key("../" + digest[3:])
    assert "secret" not in repr(store).lower()
