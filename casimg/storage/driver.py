"""The driver protocol every blob store implements (``Storage``), its typed errors, and the local staging
of temp files that every driver shares. The package docstring (casimg/storage/__init__.py) tells the whole.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import re
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from casimg.errors import NotFound, Unavailable

DIGEST_RE = re.compile(r"^[0-9a-f]{64}$")
HASH_CHUNK = 1024 * 1024
TEMP_PREFIX, TEMP_SUFFIX = "dl-", ".part"  # downloads in tmp/; the sweep and fsck know them by age


def is_digest(value: str) -> bool:
    return bool(DIGEST_RE.match(value))


class BlobNotFound(NotFound):
    """No blob is stored under this digest (or it went while it was read)."""

    def __init__(self, digest: str) -> None:
        super().__init__(f"no bytes stored for {digest}")
        self.digest = digest


class StorageUnavailable(Unavailable):
    """The store does not answer or refuses to (a full or read-only disk, an endpoint down or throttling)."""


@dataclass(frozen=True)
class Leftover:
    """Something a crash or an unfinished operation may leave behind."""

    path: Path  # a local file, or for an object store the key's path below its prefix
    kind: str  # "tmp" (a local temp file), "trash" (an interrupted delete) or "upload" (an unfinished multipart upload)
    digest: str | None  # the digest a trash file or upload belongs to, where known
    age: float  # seconds since it was last written


class _TempNames:
    """Temp file names unique across processes and machines: a random token drawn once per process (again
    in a forked child), then a counter. A random name per file cost a getrandom(2), with its hand-off of
    the GIL, twice per stored image."""

    def __init__(self) -> None:
        self._reset()
        os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        self._token = secrets.token_hex(6)
        self._counter = itertools.count()

    def next(self) -> str:
        return f"{TEMP_PREFIX}{self._token}-{next(self._counter):x}{TEMP_SUFFIX}"


temp_name = _TempNames().next


def open_temp(tmp_dir: Path) -> tuple[int, Path]:
    """A new, empty temp file in `tmp_dir`, open for writing: (fd, path).

    tempfile.mkstemp does the same with a retry loop around a generated name; a unique name never needs
    the retry, and mkstemp's Python was a sixth of a download's time in its thread (py-spy). O_EXCL still
    refuses to reuse a name, should one ever come round again.
    """
    path = tmp_dir / temp_name()
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), path


class Staging:
    """The local half every driver shares: temp files in this node's <data-dir>/tmp (blocking calls)."""

    def __init__(self, tmp_dir: Path) -> None:
        self.tmp_dir = tmp_dir

    def write_temp(self, data: bytes, digest: str | None = None) -> tuple[Path, str]:
        """A new temp file holding `data`, and its SHA-256 (`digest`, when the caller hashed `data` already);
        not yet durable (the driver's commit makes it so)."""
        fd, path = open_temp(self.tmp_dir)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        except BaseException:
            os.close(fd)
            os.unlink(path)
            raise
        os.close(fd)
        return path, digest or hashlib.sha256(data).hexdigest()

    @staticmethod
    def discard(path: Path | None) -> None:
        """Remove a temp or trash file; already gone is fine."""
        if path is None:
            return
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass

    @staticmethod
    def hash_file(path: Path) -> str:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            while chunk := handle.read(HASH_CHUNK):
                digest.update(chunk)
        return digest.hexdigest()

    def check_writable(self) -> None:
        """Raise OSError unless a file can be created in the temp directory."""
        probe = self.tmp_dir / f"probe-{secrets.token_hex(4)}"
        try:
            probe.write_bytes(b"")
        finally:
            self.discard(probe)

    def temp_leftovers(self) -> Iterator[Leftover]:
        """Every file in tmp/ with its age: downloads in progress, or left by a crash once old."""
        if not self.tmp_dir.exists():
            return
        now = time.time()
        for entry in os.scandir(self.tmp_dir):
            try:
                age = now - entry.stat().st_mtime
            except FileNotFoundError:
                continue
            yield Leftover(Path(entry.path), "tmp", None, age)


class Storage(Protocol):
    """What every driver offers. Staging is local on every driver: ``tmp_dir`` is this node's own."""

    kind: str  # "file" or "s3", as CASIMG_STORAGE names it
    tmp_dir: Path  # local temp files (downloads in progress), in the data directory

    def create_dirs(self) -> None:
        """Create the local directories the driver writes (at every process's start)."""

    def write_temp(self, data: bytes, digest: str | None = None) -> tuple[Path, str]:
        """A new local temp file holding `data`, and its SHA-256 (blocking: call in a thread)."""

    def discard(self, path: Path | None) -> None:
        """Remove a local temp file; already gone is fine (blocking)."""

    def hash_file(self, path: Path) -> str:
        """The SHA-256 of a local file (blocking)."""

    def local_path(self, digest: str) -> Path | None:
        """The blob's file, where the driver keeps blobs as local files (fsck reads them in place); else None."""

    async def commit(self, tmp: Path, digest: str, content_type: str | None = None) -> None:
        """Place the bytes of local file `tmp` (which hash to `digest`) under `digest`, durably.

        Already there is success. `tmp` stays; the caller discards it. StorageUnavailable on failure, and
        then nothing is visible under `digest` that was not there before."""

    async def stat(self, digest: str) -> int:
        """The size in bytes of the blob; BlobNotFound if it is not stored."""

    async def read_range(self, digest: str, start: int = 0, length: int | None = None) -> bytes:
        """`length` bytes (all to the end when None) from `start`; BlobNotFound if it is not stored."""

    async def delete(self, digest: str) -> None:
        """Remove the blob outright; not there is fine. The lifecycle decides when this is safe."""

    async def walk(self) -> list[str]:
        """Every digest stored, sorted (names that are not digests are skipped)."""

    async def usage(self) -> tuple[int, int]:
        """(blobs, bytes) really kept, from a walk of the store."""

    async def leftovers(self) -> list[Leftover]:
        """Temp files, trash and unfinished uploads that crashes or operations in progress left."""

    async def clear(self, leftover: Leftover) -> None:
        """Remove a leftover (a stale temp file, an abandoned upload); already gone is fine."""

    async def redirect_url(self, digest: str, content_type: str, filename: str) -> str | None:
        """A short-lived URL a client may fetch the bytes from instead, or None to serve them from casimg."""

    async def check(self) -> None:
        """Raise StorageUnavailable with the reason unless a blob could be stored now (for /readyz, start)."""

    async def close(self) -> None:
        """Release connections and threads."""
