"""The blob store as drivers: where image bytes live, named by their SHA-256.

A driver keeps one object per distinct content under its digest, and nothing else: which URLs point at
it, and how many, is the index's business (index.py), and when a blob may be deleted is the lifecycle's
(lifecycle.py). Each driver is a module of this package, built by ``open_storage`` (below) from the
settings:

    driver.py  the one protocol, ``Storage``, its typed errors, and ``Staging`` (local temp files), which
               the drivers import from there rather than from this package, so none imports in a cycle
    file.py    the data directory's blobs/ tree on a POSIX file system (the default)
    s3.py      an S3-compatible bucket (CASIMG_STORAGE=s3)

A third driver (GCS, Azure Blob) is one more module implementing ``Storage`` and one more branch in
``open_storage``; tests/test_storage.py runs the same conformance suite over every driver.

The shape follows distribution's registry/storage/driver: bytes are first written to a local temp file
and SHA-256-hashed as they stream in (the fetcher does it while downloading; ``write_temp`` for bytes in
memory), then ``commit`` places them under their digest, where "already there" is success because the
store is content-addressed and the same name means the same bytes. Nothing half-written is ever visible
under a digest. Reads take a byte range; ``stat`` gives the size; ``walk`` lists the digests stored;
``delete`` removes one (missing is fine); ``leftovers`` names what interrupted operations left behind;
``redirect_url`` lets a driver hand a client a URL to fetch the bytes from instead of casimg.

Errors are typed and derive from casimg.errors, so handlers.py's one mapping answers them: a missing
blob is ``BlobNotFound`` (404), a store that does not answer is ``StorageUnavailable`` (503).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from casimg.errors import ConfigError
from casimg.storage.driver import (
    HASH_CHUNK,
    TEMP_PREFIX,
    TEMP_SUFFIX,
    BlobNotFound,
    Leftover,
    Staging,
    Storage,
    StorageUnavailable,
    is_digest,
    open_temp,
)

if TYPE_CHECKING:
    from casimg.config import Settings

__all__ = ["HASH_CHUNK", "TEMP_PREFIX", "TEMP_SUFFIX", "BlobNotFound", "Leftover", "Staging", "Storage",
           "StorageUnavailable", "is_digest", "open_storage", "open_temp"]
DRIVERS = ("file", "s3")


def open_storage(settings: Settings, data_dir: Path | None = None) -> Storage:
    """The driver CASIMG_STORAGE names, over `data_dir` (default: the settings') for local files."""
    local = Path(data_dir if data_dir is not None else settings.data_dir)
    if settings.storage == "file":
        from casimg.storage.file import FileStore

        return FileStore(local)
    if settings.storage == "s3":
        from casimg.storage.s3 import S3Store, credentials_from

        return S3Store(local / "tmp", bucket=settings.s3_bucket, prefix=settings.s3_prefix,
                       endpoint=settings.s3_endpoint, region=settings.s3_region, redirect=settings.s3_redirect,
                       credentials=credentials_from(settings.s3_credentials_file))
    raise ConfigError(f"Setting 'storage' must be one of {', '.join(DRIVERS)}, not {settings.storage!r}")
