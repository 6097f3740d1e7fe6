"""The file driver on a real directory: its blocking steps, its Storage methods, its flushes."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import stat
import threading
import time

import pytest

from casimg.config import load_settings
from casimg.storage import BlobNotFound, StorageUnavailable, is_digest, open_storage
from casimg.storage import file as blobs_module
from casimg.storage.file import FileStore, FlushGroup, sync_filesystem


@pytest.fixture
def blobs(tmp_path):
    store = FileStore(tmp_path)
    store.create_dirs()
    return store


def _temp(blobs: FileStore, data: bytes):
    path = blobs.tmp_dir / f"dl-{hashlib.md5(data).hexdigest()}.part"
    path.write_bytes(data)
    return path, hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize(("digest", "relative"), [
    ("ab" + "cd" + "e" * 60, "blobs/ab/cd/abcd" + "e" * 60),
    ("0" * 64, "blobs/00/00/" + "0" * 64),
    ("f" * 64, "blobs/ff/ff/" + "f" * 64),
])
def test_blob_path_fans_out_by_the_first_two_byte_pairs(blobs, tmp_path, digest, relative):
    assert blobs.blob_path(digest) == tmp_path / relative


@pytest.mark.parametrize(
    "bad", ["", "A" * 64, "g" * 64, "a" * 63, "a" * 65, "../" + "a" * 61, "a" * 32 + "/" + "a" * 31]
)
def test_blob_path_refuses_anything_but_a_hex_digest(blobs, bad):
    assert not is_digest(bad)
    with pytest.raises(ValueError):
        blobs.blob_path(bad)


def test_link_in_places_a_read_only_file_and_tolerates_an_existing_one(blobs):
    tmp, digest = _temp(blobs, b"bytes")
    blobs.link_in(tmp, digest)
    target = blobs.blob_path(digest)
    assert target.read_bytes() == b"bytes"
    assert stat.S_IMODE(target.stat().st_mode) == 0o444
    again, _ = _temp(blobs, b"bytes")
    blobs.link_in(again, digest)  # same name, same bytes: success
    assert target.read_bytes() == b"bytes"
    assert list(blobs.iter_digests()) == [digest]


def test_trash_and_restore(blobs):
    tmp, digest = _temp(blobs, b"abc")
    blobs.link_in(tmp, digest)
    trash = blobs.move_to_trash(digest)
    assert trash is not None and not blobs.exists(digest)
    assert blobs.move_to_trash(digest) is None
    blobs.restore_from_trash(trash, digest)
    assert blobs.read(digest) == b"abc"
    blobs.discard(trash)
    blobs.discard(trash)  # already gone is fine
    assert [left.kind for left in blobs.iter_leftovers()] == ["tmp"]


def test_trash_works_in_a_data_dir_without_a_trash_directory(tmp_path):
    store = FileStore(tmp_path)  # what `casimg serve` has: tmp/ and blobs/ appear on use, trash/ never did
    store.tmp_dir.mkdir()
    tmp, digest = _temp(store, b"abc")
    store.link_in(tmp, digest)
    trash = store.move_to_trash(digest)
    assert trash is not None and trash.read_bytes() == b"abc"
    assert not store.exists(digest)


def test_ensure_present_relinks_only_when_missing(blobs):
    tmp, digest = _temp(blobs, b"xyz")
    blobs.link_in(tmp, digest)
    assert blobs.ensure_present(tmp, digest) is False
    os.rename(blobs.blob_path(digest), blobs.trash_dir / f"{digest}.1")
    assert blobs.ensure_present(tmp, digest) is True
    assert blobs.read(digest, 1, 1) == b"y"


def test_leftovers_name_trash_digests(blobs):
    digest = "a" * 64
    (blobs.trash_dir / f"{digest}.abc").write_bytes(b"")
    (blobs.tmp_dir / "dl-1.part").write_bytes(b"")
    found = {(left.kind, left.digest) for left in blobs.iter_leftovers()}
    assert found == {("trash", digest), ("tmp", None)}


def test_hash_file_matches_hashlib(blobs):
    tmp, digest = _temp(blobs, os.urandom(3 * 1024 * 1024 + 5))
    assert blobs.hash_file(tmp) == digest


def test_write_temp_holds_the_bytes_and_names_their_digest(blobs):
    data = b"some image bytes" * 1000
    tmp, digest = blobs.write_temp(data)
    assert tmp.parent == blobs.tmp_dir and tmp.name.startswith("dl-") and tmp.read_bytes() == data
    assert digest == hashlib.sha256(data).hexdigest()
    blobs.link_in(tmp, digest, sync=False)
    assert blobs.read(digest) == data and os.stat(tmp).st_ino == os.stat(blobs.blob_path(digest)).st_ino


def test_settle_relinks_a_blob_a_delete_moved_away_and_removes_the_temp_name(blobs):
    tmp, digest = blobs.write_temp(b"shared bytes")
    blobs.link_in(tmp, digest)
    trash = blobs.move_to_trash(digest)  # a delete of the last reference, between store steps 1 and 3
    assert not blobs.exists(digest)
    assert blobs.settle(tmp, digest) is True
    assert blobs.read(digest) == b"shared bytes" and not tmp.exists()
    blobs.discard(trash)
    tmp2, _ = blobs.write_temp(b"shared bytes")
    blobs.link_in(tmp2, digest)
    assert blobs.settle(tmp2, digest) is False and not tmp2.exists()


@pytest.mark.gen_test
async def test_the_storage_methods_answer_for_present_and_missing_blobs(blobs):
    tmp, digest = blobs.write_temp(b"0123456789")
    await blobs.commit(tmp, digest)
    await blobs.commit(tmp, digest)  # already there: success
    blobs.discard(tmp)
    assert await blobs.stat(digest) == 10 and await blobs.read_range(digest, 3, 4) == b"3456"
    assert await blobs.walk() == [digest] and await blobs.usage() == (1, 10)
    missing = "0" * 64
    for call in (blobs.stat(missing), blobs.read_range(missing)):
        with pytest.raises(BlobNotFound):
            await call
    await blobs.delete(digest)
    await blobs.delete(digest)  # already gone: fine
    assert not blobs.exists(digest)
    assert await blobs.redirect_url(digest, "image/png", "x.png") is None


@pytest.mark.gen_test
async def test_check_names_an_unwritable_directory(blobs):
    await blobs.check()
    blobs.tmp_dir.rmdir()
    blobs.tmp_dir.write_bytes(b"")  # a file where tmp/ should be
    with pytest.raises(StorageUnavailable, match="not writable"):
        await blobs.check()


def test_open_storage_builds_the_driver_the_settings_name(tmp_path):
    store = open_storage(load_settings(environ={}), tmp_path)
    assert isinstance(store, FileStore) and store.root == tmp_path / "blobs"


# -- FlushGroup: one syncfs for many stores ---------------------------------------------------------

class CountedSync:
    """Wraps the real sync_filesystem: counts the flushes, and can hold one in the thread until told."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, held: bool = False) -> None:
        self.calls = 0
        self.held = held
        self.permits = threading.Semaphore(0)  # with `held`, each flush waits for one
        self.entered = threading.Semaphore(0)
        self.fail_with: OSError | None = None
        real = blobs_module.sync_filesystem

        def counted(directory):
            self.calls += 1
            self.entered.release()
            if self.held:
                assert self.permits.acquire(timeout=10)
            if self.fail_with is not None:
                raise self.fail_with
            real(directory)

        monkeypatch.setattr(blobs_module, "sync_filesystem", counted)


@pytest.mark.gen_test
async def test_concurrent_flushes_share_one_syncfs(blobs, monkeypatch):
    sync = CountedSync(monkeypatch)
    group = FlushGroup(blobs.root)
    try:
        await asyncio.gather(*(group.flush() for _ in range(50)))
    finally:
        group.close()
    # The first caller starts a flush at once; the 49 that arrive while it runs all wait for one more.
    assert sync.calls <= 2


@pytest.mark.gen_test
async def test_a_flush_asked_for_while_one_runs_waits_for_the_next(blobs, monkeypatch):
    sync = CountedSync(monkeypatch, held=True)
    group = FlushGroup(blobs.root)
    loop = asyncio.get_running_loop()
    try:
        first = asyncio.ensure_future(group.flush())
        assert await loop.run_in_executor(None, sync.entered.acquire, True, 10)
        # This caller's bytes may have been written after the running flush looked: it needs its own.
        second = asyncio.ensure_future(group.flush())
        sync.permits.release()
        await first
        assert await loop.run_in_executor(None, sync.entered.acquire, True, 10)  # the next one began
        assert sync.calls == 2 and not second.done()
        sync.permits.release()
        await second
        assert sync.calls == 2
    finally:
        group.close()


@pytest.mark.gen_test
async def test_a_failed_flush_fails_every_caller_waiting_for_it(blobs, monkeypatch):
    sync = CountedSync(monkeypatch)
    sync.fail_with = OSError(errno.EIO, "Input/output error")
    group = FlushGroup(blobs.root)
    try:
        results = await asyncio.gather(*(group.flush() for _ in range(5)), return_exceptions=True)
        assert all(isinstance(result, OSError) and result.errno == errno.EIO for result in results)
        sync.fail_with = None
        await group.flush()  # the group goes on once the disk does
    finally:
        group.close()


def test_sync_filesystem_reports_a_directory_it_cannot_open(tmp_path):
    with pytest.raises(FileNotFoundError):
        sync_filesystem(tmp_path / "missing")
    sync_filesystem(tmp_path)  # a real syncfs(2) returns without error


def _stored(blobs: FileStore, data: bytes) -> str:
    tmp, digest = _temp(blobs, data)
    blobs.link_in(tmp, digest)
    return digest


def test_read_cached_reads_what_the_page_cache_holds_and_refuses_what_only_the_disk_has(blobs):
    data = os.urandom(256 * 1024)
    digest = _stored(blobs, data)
    blobs.read(digest)  # in the page cache now
    assert blobs.read_cached(digest, 0, len(data)) == data
    assert blobs.read_cached(digest, 1000, 5000) == data[1000:6000]
    fd = os.open(blobs.blob_path(digest), os.O_RDONLY)
    try:
        os.fsync(fd)
        # Clean pages: the kernel drops them, but given once, from one CPU, the advice left them cached in
        # about half the tries. Likely cause: pages still in a CPU's batch on their way to its lists are
        # not dropped, and the advice drains the batch of the CPU it runs on only. Given from each CPU in
        # turn, a few times, it left them in about one try in six (cause not found); then the check below
        # skips the rest.
        cpus = os.sched_getaffinity(0)
        try:
            for _ in range(3):
                for cpu in cpus:
                    os.sched_setaffinity(0, {cpu})
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                time.sleep(0.02)
        finally:
            os.sched_setaffinity(0, cpus)
    finally:
        os.close(fd)
    if blobs.read_cached(digest, 0, len(data)) is not None:
        pytest.skip("this file system keeps the pages (tmpfs) or cannot drop them")
    assert asyncio.run(blobs.read_range(digest, 0, len(data))) == data  # from the disk, in a thread
    assert blobs.read_cached(digest, 0, len(data)) == data  # and cached again


def test_read_cached_past_the_end_is_none_and_a_missing_blob_raises(blobs):
    digest = _stored(blobs, b"x" * 100)
    blobs.read(digest)
    assert blobs.read_cached(digest, 50, 100) is None  # a short read is never taken for the whole
    with pytest.raises(FileNotFoundError):
        blobs.read_cached("0" * 64, 0, 10)
    with pytest.raises(BlobNotFound):
        asyncio.run(blobs.read_range("0" * 64, 0, 10))


def test_a_repeat_stages_as_a_link_to_the_stored_blob_and_survives_a_delete_meanwhile(blobs):
    data = os.urandom(50_000)
    digest = _stored(blobs, data)
    assert blobs.temp_link_to("0" * 64) is None  # nothing stored under that digest
    tmp = blobs.temp_link_to(digest)
    assert tmp is not None and tmp.parent == blobs.tmp_dir and tmp.name.startswith("dl-")
    assert os.stat(tmp).st_ino == os.stat(blobs.blob_path(digest)).st_ino  # no bytes written, no new file
    trash = blobs.move_to_trash(digest)  # a delete of the last other reference, between steps 1 and 2
    blobs.discard(trash)
    assert blobs.settle(tmp, digest) is True  # step 3 links the blob again from the temp name
    assert blobs.read(digest) == data and not tmp.exists()


def test_write_temp_takes_a_digest_the_caller_computed(blobs):
    data = b"some bytes"
    path, digest = blobs.write_temp(data, hashlib.sha256(data).hexdigest())
    assert path.read_bytes() == data and digest == hashlib.sha256(data).hexdigest()


def test_temp_names_differ_in_a_process_and_in_a_forked_child(blobs):
    from casimg.storage.driver import open_temp, temp_name

    mine = {temp_name() for _ in range(1000)}
    assert len(mine) == 1000 and all(name.startswith("dl-") and name.endswith(".part") for name in mine)
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # the child's names, drawn after the fork
        os.close(read)
        os.write(write, "\n".join(temp_name() for _ in range(100)).encode())
        os._exit(0)
    os.close(write)
    after = {temp_name() for _ in range(100)}  # the parent's, after the fork: the same count, another token
    with os.fdopen(read) as pipe:
        theirs = set(pipe.read().split("\n"))
    os.waitpid(child, 0)
    assert len(theirs) == 100 and not theirs & (mine | after)
    fd, path = open_temp(blobs.tmp_dir)
    os.close(fd)
    assert path.name not in mine | after | theirs and path.parent == blobs.tmp_dir
