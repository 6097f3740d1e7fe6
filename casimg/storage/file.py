"""The file driver: image bytes on a POSIX file system, one file per distinct content, named by its SHA-256.

The data directory, drawn once::

    <data-dir>/
      blobs/                      the store: one read-only file per content
        ab/cd/abcd...ef           full hex SHA-256, fanned out by its first two byte pairs
      tmp/                        downloads in progress: dl-*.part, linked into blobs/ when complete
      trash/                      blobs being deleted: <digest>.<unique>, gone once the delete ends
      redis/                      the embedded Redis (append-only file, unix socket)
      admin.key                   the first admin API key, mode 0600
      serve.lock                  held by the live `casimg serve` that owns this directory

``relative_name`` is the only code that maps a digest to a name in the store (``blob_path`` adds the
root). The protocol's async methods (``commit``, ``read_range``, ``walk``, ...) run the blocking calls
below in a thread; the worker's hot path calls the blocking ones itself, batched into one trip to a
thread for many downloads.

Placing and removing blobs is lock-free against the Redis reference counts, and the steps are public
so that tests can run them in any interleaving (``lifecycle.store_blob`` and ``lifecycle.delete_url``
drive them in order):

store of bytes with digest d, in ``tmp`` (``write_temp``):
  1. ``link_in(tmp, d)`` -- an existing file is success: same name, same bytes. The bytes and the name
     must be on disk before step 2: ``link_in`` fsyncs them, or, for downloads, ``link_in(sync=False)``
     and then one ``FlushGroup.flush`` for many stores at once.
  2. (Redis) point the URL at d and increment refs[d].
  3. ``ensure_present(tmp, d)`` -- if a delete moved the file away between 1 and 2, link it again.
  4. ``discard(tmp)``. (``settle`` is 3 and 4 in one call.)

delete of the last reference to d:
  1. (Redis) remove the URL and decrement refs[d] (its record goes at 0); go on only when it reached 0.
  2. ``move_to_trash(d)``.
  3. (Redis) read refs[d]; above 0 means a store came in between: ``restore_from_trash``.
  4. ``discard(trash)``.

Whatever the order of the two, the file exists once a store has finished. A crash leaves at worst a
temp file, an unreferenced blob or a trash file, which ``casimg fsck --repair`` clears.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import os
import secrets
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from casimg.storage.driver import (
    BlobNotFound,
    Leftover,
    Staging,
    StorageUnavailable,
    is_digest,
    temp_name,
)

READ_ONLY = 0o444
_NOWAIT_READS = hasattr(os, "preadv") and hasattr(os, "RWF_NOWAIT")  # Linux 4.14+: see read_cached


class FileStore(Staging):
    """The ``Storage`` driver over <data-dir>/blobs (see the module docstring for the tree)."""

    kind = "file"

    def __init__(self, data_dir: Path) -> None:
        super().__init__(Path(data_dir) / "tmp")
        self.root = Path(data_dir) / "blobs"
        self.trash_dir = Path(data_dir) / "trash"
        self._root_text = str(self.root)

    def create_dirs(self) -> None:
        for directory in (self.root, self.tmp_dir, self.trash_dir):
            directory.mkdir(parents=True, exist_ok=True)

    def blob_path(self, digest: str) -> Path:
        """The blob's path: blobs/ab/cd/abcd..."""
        return self.root / self.relative_name(digest)

    def _blob_text(self, digest: str) -> str:
        """``blob_path`` as a string, for the store steps every download takes: building and checking
        a Path cost about three times the same calls on a string (BENCHMARKS.md, "Figures behind design
        choices")."""
        return f"{self._root_text}/{self.relative_name(digest)}"

    @staticmethod
    def relative_name(digest: str) -> str:
        """``blob_path`` below the store root, ab/cd/abcd..., also the URI under nginx's internal location.

        A plain string: GET /api/image builds it on every request behind nginx, and pathlib costs 5%.
        """
        if not is_digest(digest):
            raise ValueError(f"not a SHA-256 hex digest: {digest!r}")
        return f"{digest[0:2]}/{digest[2:4]}/{digest}"

    # -- store steps ----------------------------------------------------------------------------

    def temp_link_to(self, digest: str) -> Path | None:
        """Store step 1 for bytes the store holds already: a new temp name for the blob `digest` (a hard
        link to it), already linked in; None if there is no such blob. A repeat writes no bytes and
        makes no new file, so the flush that follows has none of its bytes to write; the temp name
        plays its part in the rest of the store, as ``write_temp``'s does (``ensure_present`` links
        the blob again from it if a delete took the blob away meanwhile)."""
        path = self.tmp_dir / temp_name()
        try:
            os.link(self._blob_text(digest), path)
        except FileNotFoundError:
            return None
        return path

    def link_in(self, tmp: Path, digest: str, *, sync: bool = True) -> None:
        """Store step 1: give the temp file its content name. Existing file: same bytes, fine.

        With `sync`, the bytes and the name are on disk when this returns. Without, the caller must make
        them durable before the index counts the blob, as ``FlushGroup.flush`` does for many at once.
        """
        target = self._blob_text(digest)
        os.chmod(tmp, READ_ONLY)
        if sync:
            _fsync_file(tmp)
        try:
            os.link(tmp, target)
        except FileExistsError:
            pass  # linked by another store, which may not have made it durable yet: the fsync below does
        except FileNotFoundError:
            # The first blob under a new ab/cd: the new directories must reach the disk before the index
            # counts the blob, or a power loss could take them, and the blob, with it. Rare: 65,536 times.
            parent = Path(target).parent
            parent.mkdir(parents=True, exist_ok=True)
            if sync:
                _fsync_dir(parent.parent)
                _fsync_dir(self.root)
            with contextlib.suppress(FileExistsError):
                os.link(tmp, target)
        if sync:
            _fsync_dir(Path(target).parent)

    def link_in_or_discard(self, tmp: Path, digest: str, *, sync: bool = True) -> None:
        """``link_in`` for a temp file the store step owns: if the link fails, the temp file goes too."""
        try:
            self.link_in(tmp, digest, sync=sync)
        except BaseException:
            self.discard(tmp)
            raise

    def ensure_present(self, tmp: Path, digest: str) -> bool:
        """Store step 3: True if the blob had to be linked again because a delete moved it away."""
        if os.path.exists(self._blob_text(digest)):
            return False
        self.link_in(tmp, digest)
        return True

    def settle(self, tmp: Path, digest: str) -> bool:
        """Store steps 3 and 4 in one call (one trip to a thread); True if the blob was linked again."""
        try:
            return self.ensure_present(tmp, digest)
        finally:
            self.discard(tmp)

    # -- delete steps ---------------------------------------------------------------------------

    def move_to_trash(self, digest: str) -> Path | None:
        """Delete step 2: move the blob out of the store; None if it was not there."""
        trash = self.trash_dir / f"{digest}.{secrets.token_hex(6)}"
        # Processes create trash/ at start, but it must also survive being removed by hand: a rename into a
        # missing directory fails like a missing blob would, and the blob would stay while counted gone.
        self.trash_dir.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(self.blob_path(digest), trash)
        except FileNotFoundError:
            return None
        return trash

    def restore_from_trash(self, trash: Path, digest: str) -> None:
        """Delete step 3, when a store raced in: put the bytes back under their name."""
        self.link_in(trash, digest)

    # -- reads ----------------------------------------------------------------------------------

    def exists(self, digest: str) -> bool:
        return self.blob_path(digest).exists()

    def read(self, digest: str, start: int = 0, length: int | None = None) -> bytes:
        with open(self.blob_path(digest), "rb") as handle:
            if start:
                handle.seek(start)
            return handle.read() if length is None else handle.read(length)

    def read_cached(self, digest: str, start: int, length: int) -> bytes | None:
        """The `length` bytes at `start` if the page cache holds all of them, read without a thread;
        None when any would have to come from the disk (read_range then reads them in a thread).

        A read from the page cache takes microseconds, less than the hand-off to a thread and back
        (Tornado's StaticFileHandler reads on the loop outright); preadv2's RWF_NOWAIT makes the kernel
        refuse, rather than wait for the disk, so a cold blob never stalls the loop on I/O. Opening the
        file still reads its directory entry, as StaticFileHandler's open does.
        """
        if not _NOWAIT_READS:
            return None
        buffer = bytearray(length)
        fd = os.open(f"{self._root_text}/{self.relative_name(digest)}", os.O_RDONLY)
        try:
            got = os.preadv(fd, [buffer], start, os.RWF_NOWAIT)
        except BlockingIOError:
            return None
        except OSError as exc:  # a file system or kernel without non-blocking buffered reads
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise
            return None
        finally:
            os.close(fd)
        return bytes(buffer) if got == length else None  # a short read: the rest is not cached

    def iter_digests(self) -> Iterator[str]:
        """Every digest that has a file in the store (names that are not digests are skipped)."""
        if not self.root.exists():
            return
        for first in sorted(os.listdir(self.root)):
            for second in sorted(os.listdir(self.root / first)):
                for name in sorted(os.listdir(self.root / first / second)):
                    if is_digest(name) and self.blob_path(name) == self.root / first / second / name:
                        yield name

    def disk_usage(self) -> tuple[int, int]:
        """(files, bytes) in the store, from a walk of the blob tree: the bytes really kept, not the index's view."""
        files = size = 0
        if not self.root.exists():
            return 0, 0
        for first in os.scandir(self.root):
            if not first.is_dir():
                continue
            for second in os.scandir(first.path):
                if not second.is_dir():
                    continue
                for entry in os.scandir(second.path):
                    try:
                        size += entry.stat().st_size
                    except FileNotFoundError:  # deleted while we walked
                        continue
                    files += 1
        return files, size

    def iter_leftovers(self) -> Iterator[Leftover]:
        yield from self.temp_leftovers()
        if not self.trash_dir.exists():
            return
        now = time.time()
        for entry in os.scandir(self.trash_dir):
            try:
                age = now - entry.stat().st_mtime
            except FileNotFoundError:
                continue
            digest = entry.name.split(".", 1)[0]
            yield Leftover(Path(entry.path), "trash", digest if is_digest(digest) else None, age)

    # -- the Storage protocol ---------------------------------------------------------------------

    def local_path(self, digest: str) -> Path | None:
        return self.blob_path(digest)

    async def commit(self, tmp: Path, digest: str, content_type: str | None = None) -> None:
        await asyncio.to_thread(self.link_in, tmp, digest)

    async def stat(self, digest: str) -> int:
        try:
            return (await asyncio.to_thread(os.stat, self.blob_path(digest))).st_size
        except FileNotFoundError:
            raise BlobNotFound(digest) from None

    async def read_range(self, digest: str, start: int = 0, length: int | None = None) -> bytes:
        try:
            # From the page cache on the loop; from the disk in a thread (BENCHMARKS.md: the hop cost more
            # than the read of a cached image).
            cached = self.read_cached(digest, start, length) if length is not None else None
            if cached is not None:
                return cached
            return await asyncio.get_running_loop().run_in_executor(None, self.read, digest, start, length)
        except FileNotFoundError:
            raise BlobNotFound(digest) from None

    async def delete(self, digest: str) -> None:
        await asyncio.to_thread(self.discard, self.blob_path(digest))

    async def walk(self) -> list[str]:
        return await asyncio.to_thread(lambda: list(self.iter_digests()))

    async def usage(self) -> tuple[int, int]:
        return await asyncio.get_running_loop().run_in_executor(None, self.disk_usage)

    async def leftovers(self) -> list[Leftover]:
        return await asyncio.to_thread(lambda: list(self.iter_leftovers()))

    async def clear(self, leftover: Leftover) -> None:
        await asyncio.to_thread(self.discard, leftover.path)

    async def redirect_url(self, digest: str, content_type: str, filename: str) -> str | None:
        return None  # the bytes are served by casimg, or by nginx in front (accel_redirect)

    async def check(self) -> None:
        try:
            await asyncio.get_running_loop().run_in_executor(None, self.check_writable)
        except OSError as exc:
            raise StorageUnavailable(f"blob directory not writable: {exc.strerror or exc}") from None

    async def close(self) -> None:
        return None


class FlushGroup:
    """Makes what was written under one directory durable, for many callers with one syncfs(2).

    Downloads link their blobs in without an fsync each (``link_in(sync=False)``) and then ``await
    flush()``, which returns once a flush that *started after the call* has finished: everything the
    caller wrote before it is then on disk. Callers that arrive while a flush runs share the next one,
    so under load one syncfs makes a whole batch of blobs durable, where fsyncs of each file and each
    directory cost two to four disk flushes per blob.

    syncfs writes out everything dirty on the data directory's filesystem, the embedded Redis's
    append-only file included; on a filesystem shared with heavy writers of other data it would wait
    for theirs too, so the data directory is best on a volume of its own. Where syncfs is missing (not
    Linux), ``os.sync`` does the same for every filesystem.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._next: asyncio.Future[None] | None = None  # the flush callers wait for, not yet started
        self._running = False
        # A thread of its own: a flush queued behind the blocking pool's work would keep every store
        # waiting, and one running there would take a thread from it for its whole length.
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="casimg-flush")

    def close(self) -> None:
        self._thread.shutdown(wait=False)

    async def flush(self) -> None:
        wanted = self._next
        if wanted is None:
            wanted = self._next = asyncio.get_running_loop().create_future()
            if not self._running:
                self._start()
        await asyncio.shield(wanted)

    def _start(self) -> None:
        assert self._next is not None
        waiting, self._next = self._next, None
        self._running = True
        running = asyncio.get_running_loop().run_in_executor(self._thread, sync_filesystem, self.directory)

        def finished(done: asyncio.Future[None]) -> None:
            self._running = False
            error = done.exception()
            if error is not None:
                waiting.set_exception(error)
            else:
                waiting.set_result(None)
            if self._next is not None:
                self._start()

        running.add_done_callback(finished)


_libc = ctypes.CDLL(None, use_errno=True)
_syncfs = getattr(_libc, "syncfs", None)


def sync_filesystem(directory: Path) -> None:
    """Write everything dirty on `directory`'s filesystem to disk, and wait for it (syncfs(2))."""
    if _syncfs is None:  # pragma: no cover - not Linux
        os.sync()
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        if _syncfs(fd) != 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(directory: Path) -> None:
    """Make a new directory entry durable, so a power loss cannot leave an indexed URL without its file."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError as exc:  # pragma: no cover - platforms without directory fds
        if exc.errno in (errno.EISDIR, errno.EACCES):
            return
        raise
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
