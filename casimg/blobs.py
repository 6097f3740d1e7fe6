"""The blob store: image bytes on disk, one file per distinct content, named by its SHA-256.

The data directory, drawn once::

    <data-dir>/
      blobs/                      the store: one read-only file per content
        ab/cd/abcd...ef           full hex SHA-256, fanned out by its first two byte pairs
      tmp/                        downloads in progress: dl-*.part, fsynced before placement
      trash/                      blobs being deleted: <digest>.<unique>, gone once the delete ends
      redis/                      the embedded Redis (append-only file, unix socket)
      admin.key                   the first admin API key, mode 0600
      serve.lock                  held by the live `casimg serve` that owns this directory

``blob_path`` is the only code that maps a digest to a path.

Placing and removing blobs is lock-free against the Redis reference counts, and the steps are public
so that tests can run them in any interleaving (``worker.store_blob`` and ``service.delete_url``
drive them in order):

store of bytes with digest d, already fsynced in ``tmp``:
  1. ``link_in(tmp, d)`` -- an existing file is success: same name, same bytes.
  2. (Redis) point the URL at d and increment refs[d].
  3. ``ensure_present(tmp, d)`` -- if a delete moved the file away between 1 and 2, link it again.
  4. ``discard(tmp)``.

delete of the last reference to d:
  1. (Redis) remove the URL and decrement refs[d]; go on only when it reached 0.
  2. ``move_to_trash(d)``.
  3. (Redis) read refs[d]; above 0 means a store came in between: ``restore_from_trash``; otherwise
     drop d's metadata.
  4. ``discard(trash)``.

Whatever the order of the two, the file exists once a store has finished. A crash leaves at worst a
temp file, an unreferenced blob or a trash file, which ``casimg fsck --repair`` clears.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

DIGEST_RE = re.compile(r"^[0-9a-f]{64}$")
HASH_CHUNK = 1024 * 1024
READ_ONLY = 0o444


def is_digest(value: str) -> bool:
    return bool(DIGEST_RE.match(value))


@dataclass(frozen=True)
class Leftover:
    """A file that a crash or an unfinished operation may leave behind."""

    path: Path
    kind: str  # "tmp" or "trash"
    digest: str | None  # the digest a trash file belongs to
    age: float  # seconds since last modification


class BlobStore:
    def __init__(self, data_dir: Path) -> None:
        self.root = Path(data_dir) / "blobs"
        self.tmp_dir = Path(data_dir) / "tmp"
        self.trash_dir = Path(data_dir) / "trash"

    def create_dirs(self) -> None:
        for directory in (self.root, self.tmp_dir, self.trash_dir):
            directory.mkdir(parents=True, exist_ok=True)

    def blob_path(self, digest: str) -> Path:
        """The one place a digest becomes a path: blobs/ab/cd/abcd..."""
        return self.root / self.relative_name(digest)

    @staticmethod
    def relative_name(digest: str) -> str:
        """``blob_path`` below the store root, ab/cd/abcd..., also the URI under nginx's internal location.

        A plain string: GET /api/image builds it on every request behind nginx, and pathlib costs 5%.
        """
        if not is_digest(digest):
            raise ValueError(f"not a SHA-256 hex digest: {digest!r}")
        return f"{digest[0:2]}/{digest[2:4]}/{digest}"

    # -- store steps ----------------------------------------------------------------------------

    def link_in(self, tmp: Path, digest: str) -> None:
        """Store step 1: give the fsynced temp file its content name. Existing file: same bytes, fine."""
        target = self.blob_path(digest)
        os.chmod(tmp, READ_ONLY)
        try:
            os.link(tmp, target)
        except FileExistsError:
            pass  # linked by another store, which may not have made it durable yet: the fsync below does
        except FileNotFoundError:
            # The first blob under a new ab/cd: the new directories must reach the disk before the index
            # counts the blob, or a power loss could take them, and the blob, with it. Rare: 65,536 times.
            target.parent.mkdir(parents=True, exist_ok=True)
            _fsync_dir(target.parent.parent)
            _fsync_dir(self.root)
            with contextlib.suppress(FileExistsError):
                os.link(tmp, target)
        _fsync_dir(target.parent)

    def ensure_present(self, tmp: Path, digest: str) -> bool:
        """Store step 3: True if the blob had to be linked again because a delete moved it away."""
        if self.blob_path(digest).exists():
            return False
        self.link_in(tmp, digest)
        return True

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

    @staticmethod
    def discard(path: Path | None) -> None:
        """Remove a temp or trash file; already gone is fine."""
        if path is None:
            return
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass

    # -- reads ----------------------------------------------------------------------------------

    def exists(self, digest: str) -> bool:
        return self.blob_path(digest).exists()

    def read(self, digest: str, start: int = 0, length: int | None = None) -> bytes:
        with open(self.blob_path(digest), "rb") as handle:
            if start:
                handle.seek(start)
            return handle.read() if length is None else handle.read(length)

    def hash_file(self, path: Path) -> str:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            while chunk := handle.read(HASH_CHUNK):
                digest.update(chunk)
        return digest.hexdigest()

    def iter_digests(self) -> Iterator[str]:
        """Every digest that has a file in the store (names that are not digests are skipped)."""
        if not self.root.exists():
            return
        for first in sorted(os.listdir(self.root)):
            for second in sorted(os.listdir(self.root / first)):
                for name in sorted(os.listdir(self.root / first / second)):
                    if is_digest(name) and self.blob_path(name) == self.root / first / second / name:
                        yield name

    def usage(self) -> tuple[int, int]:
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

    def leftovers(self) -> Iterator[Leftover]:
        now = time.time()
        for directory, kind in ((self.tmp_dir, "tmp"), (self.trash_dir, "trash")):
            if not directory.exists():
                continue
            for entry in os.scandir(directory):
                try:
                    age = now - entry.stat().st_mtime
                except FileNotFoundError:
                    continue
                digest = entry.name.split(".", 1)[0] if kind == "trash" else None
                yield Leftover(Path(entry.path), kind, digest if digest and is_digest(digest) else None, age)

    def check_writable(self) -> None:
        """Raise OSError unless a file can be created in the temp directory."""
        probe = self.tmp_dir / f"probe-{secrets.token_hex(4)}"
        try:
            probe.write_bytes(b"")
        finally:
            self.discard(probe)


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
