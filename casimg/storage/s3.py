"""The s3 driver: blobs as objects of an S3-compatible bucket, one per distinct content.

The bucket, drawn once::

    <prefix>blobs/ab/cd/abcd...ef      one object per content, its key from its full hex SHA-256
    <prefix>uploads/<sha256>.<token>   a large blob's multipart upload, copied to its key, then deleted

``blob_key`` is the only code that maps a digest to a key. Each node keeps its temp files (downloads in
progress) in its own <data-dir>/tmp; nothing else is local.

Commit (``commit``): the bytes are in a local temp file, hashed while they were downloaded. Up to
``MULTIPART_THRESHOLD`` they go in one PUT with ``If-None-Match: *``; above it, as a multipart upload to
an uploads/ key, then a copy to the digest's key whose completion carries ``If-None-Match: *``. An object
becomes visible whole or not at all (a PUT, or a multipart completion, is atomic), so nothing half-written
is ever seen under a digest's key; the condition means different bytes never replace what is there, and
a 412 means the content is stored already, which is success. The bytes cannot change on the way either:
each request is signed with SigV4 over the SHA-256 of its body, which the store checks.

Deleting without link/rename. The file driver moves a blob aside and puts it back if a store raced in;
an object store has no such move. Here the index's reference counts stay the truth, and three Redis keys
(schema.KeySpace: ``claims:{d}``, ``deleting:{d}``, ``tomb``) order every store and delete of the same
content, on any number of nodes (lifecycle.py runs the steps; the Lua is in casimg/lua/):

  store of content d:  1. claim d (claim.lua; while ``deleting:{d}`` exists, wait and ask again)
                       2. commit the object (412: already there), unless d is referenced already: then
                          its object is there, and the claim keeps it there until step 3
                       3. the index step (store.lua, as for files)
                       4. unclaim (unclaim.lua): was the claim still live?  If it had expired (the upload
                          outlasted CLAIM_TTL), go back to 1 and commit again, which waits out any delete
                          that began meanwhile and puts the object back.
  delete of a URL:     1. release (release.lua); at 0 references, tomb d: the sweep may delete it after
                          a grace period (tomb.lua). No object is deleted on the request path.
  sweep (one worker):  1. begin_delete d (begin_delete.lua): only if d is due, unreferenced and without
                          a live claim; it sets ``deleting:{d}`` for DELETING_TTL
                       2. DELETE the object (every request ends well within DELETING_TTL)
                       3. end_delete: remove ``deleting:{d}``.

Why an indexed URL always has its object: Redis orders a store's claim against the sweep's begin_delete.
If the claim comes first, begin_delete sees it (or, once the index step has run, the reference) and leaves
the object. If begin_delete comes first, the claim waits until end_delete, or until the marker's TTL,
which outlives the DELETE in flight, and the commit that follows uploads the object afresh. A claim that
expired before the index step is caught by unclaim (a claim live at step 4 was live throughout, since it
only ever expires), and the store commits again under a new claim after its reference is counted, so no
later begin_delete can pass (a store that skipped its upload because d was referenced relies on that
re-commit, the one window where a reference may precede its object). Crashes leave a claim (it expires;
nothing was indexed), a marker (it expires), a tombstone (swept later), an uploads/ object or an
unreferenced object (the sweep tombs what no URL, claim or tombstone names, and deletes it a grace
period later). Reads need no claim; a presigned URL
lives PRESIGN_TTL, less than the tombstone grace, so a link handed out before a delete keeps working
until it expires.

The client is obstore (Rust's object_store), measured against aiobotocore on moto with bench/s3_client.py
(300 puts of 100 KB, 16 at once, BENCHMARKS.md): aiobotocore spent about 3 ms of CPU per PUT in this
process, obstore about 0.6 ms; one PUT sequentially took about 15 ms against 6 ms. Ingest here is bound by
the CPU (a whole download costs well under a millisecond of it), so aiobotocore's cost per PUT would cut
the ingest rate several times over; the price of obstore is a second HTTP stack (reqwest, on threads of its
own) beside aiohttp, and credentials from the environment or a file rather than botocore's whole chain.
obstore retries 5xx answers (503 SlowDown included) and dropped connections with exponential backoff and
jitter, within RETRY_TIMEOUT.
"""

from __future__ import annotations

import asyncio
import configparser
import os
import secrets
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from casimg.errors import ConfigError
from casimg.storage.driver import BlobNotFound, Leftover, Staging, StorageUnavailable, is_digest

MULTIPART_THRESHOLD = 16 * 1024 * 1024  # one PUT up to here (images are mostly far smaller); parts above
PART_SIZE = 8 * 1024 * 1024  # S3 wants parts of at least 5 MiB but the last
REQUEST_TIMEOUT = timedelta(seconds=30)  # one request, body included
CONNECT_TIMEOUT = timedelta(seconds=5)
RETRY_TIMEOUT = timedelta(seconds=60)  # all the retries of one operation; obstore's default is 3 minutes
MAX_RETRIES = 8
# A claim outlives any commit that goes well: one operation's retries end within RETRY_TIMEOUT.
CLAIM_TTL = 600.0
# The deleting marker outlives any DELETE in flight: its retries end within RETRY_TIMEOUT + one request.
DELETING_TTL = 300.0
TOMB_GRACE = 900.0  # seconds between a blob's last reference going and its object's deletion
PRESIGN_TTL = 300.0  # seconds a presigned URL is valid; less than TOMB_GRACE (see above)
CHECK_TIMEOUT = 10.0  # seconds /readyz and the start-up check wait for the bucket
# A read is a client waiting: past this, it gets a 503 with Retry-After rather than a hung request.
READ_RETRY_TIMEOUT = timedelta(seconds=8)
READ_RETRIES = 3


class S3Store(Staging):
    """The ``Storage`` driver over an S3-compatible bucket (see the module docstring for the layout)."""

    kind = "s3"

    def __init__(self, tmp_dir: Path, *, bucket: str, prefix: str = "", endpoint: str = "",
                 region: str = "us-east-1", redirect: str = "off", credentials: dict[str, str] | None = None,
                 multipart_threshold: int = MULTIPART_THRESHOLD, part_size: int = PART_SIZE,
                 tomb_grace: float = TOMB_GRACE) -> None:
        super().__init__(tmp_dir)
        self.tomb_grace = tomb_grace  # how long an unreferenced object is kept (lifecycle.py reads it)
        self.multipart_threshold, self.part_size = multipart_threshold, part_size
        self.bucket, self.prefix, self.endpoint, self.region = bucket, prefix, endpoint, region
        self.redirect = redirect
        self._credentials = credentials or {}
        self._client: Any = None
        self._probe: Any = None
        self._reader: Any = None

    def __repr__(self) -> str:  # never the credentials
        return f"S3Store(bucket={self.bucket!r}, prefix={self.prefix!r}, endpoint={self.endpoint!r})"

    @property
    def store(self) -> Any:
        """The obstore client, made on first use: never in a parent that forks (casimg serve --processes),
        whose child would inherit a client without the threads that drive it."""
        if self._client is None:
            self._client = self._new_client(REQUEST_TIMEOUT, MAX_RETRIES, RETRY_TIMEOUT)
        return self._client

    @property
    def reader(self) -> Any:
        """The client of reads (stat, read_range), which give up sooner than uploads do."""
        if self._reader is None:
            self._reader = self._new_client(REQUEST_TIMEOUT, READ_RETRIES, READ_RETRY_TIMEOUT)
        return self._reader

    @property
    def probe(self) -> Any:
        """A client that does not retry, for ``check``: a readiness probe must answer within seconds."""
        if self._probe is None:
            self._probe = self._new_client(timedelta(seconds=CHECK_TIMEOUT), 0, timedelta(seconds=CHECK_TIMEOUT))
        return self._probe

    def _new_client(self, timeout: timedelta, retries: int, retry_timeout: timedelta) -> Any:
        from obstore.store import S3Store as Client

        options: dict[str, Any] = {"timeout": timeout, "connect_timeout": CONNECT_TIMEOUT}
        if self.endpoint.startswith("http://"):
            options["allow_http"] = True
        config: dict[str, Any] = {"region": self.region, **self._credentials}
        if self.endpoint:
            config["endpoint"] = self.endpoint
            config["virtual_hosted_style_request"] = False
        return Client(self.bucket, config=config, client_options=options, copy_if_not_exists="multipart",
                      retry_config={"max_retries": retries, "retry_timeout": retry_timeout})

    def create_dirs(self) -> None:
        self.tmp_dir.mkdir(parents=True, exist_ok=True)

    def blob_key(self, digest: str) -> str:
        """The one place a digest becomes a key: <prefix>blobs/ab/cd/abcd..."""
        if not is_digest(digest):
            raise ValueError(f"not a SHA-256 hex digest: {digest!r}")
        return f"{self.prefix}blobs/{digest[0:2]}/{digest[2:4]}/{digest}"

    def local_path(self, digest: str) -> Path | None:
        return None

    # -- the Storage protocol ---------------------------------------------------------------------

    async def commit(self, tmp: Path, digest: str, content_type: str | None = None) -> None:
        import obstore
        from obstore.exceptions import AlreadyExistsError, PreconditionError

        attributes = {"Content-Type": content_type} if content_type else None
        key = self.blob_key(digest)
        try:
            size = (await asyncio.to_thread(os.stat, tmp)).st_size
            if size <= self.multipart_threshold:
                await obstore.put_async(self.store, key, tmp, mode="create", attributes=attributes)
                return
            staging = f"{self.prefix}uploads/{digest}.{secrets.token_hex(6)}"
            try:
                await obstore.put_async(self.store, staging, tmp, use_multipart=True, chunk_size=self.part_size,
                                        attributes=attributes)
                await obstore.copy_async(self.store, staging, key, overwrite=False)
            finally:
                await _quietly(obstore.delete_async(self.store, staging))
        except (AlreadyExistsError, PreconditionError):
            return  # the same name holds the same bytes
        except Exception as exc:
            raise _unavailable(exc) from None

    async def stat(self, digest: str) -> int:
        import obstore

        try:
            return int((await obstore.head_async(self.reader, self.blob_key(digest)))["size"])
        except FileNotFoundError:
            raise BlobNotFound(digest) from None
        except Exception as exc:
            raise _unavailable(exc) from None

    async def read_range(self, digest: str, start: int = 0, length: int | None = None) -> bytes:
        import obstore

        key = self.blob_key(digest)
        try:
            if length is None:
                options = {"range": {"offset": start}} if start else None
                result = await obstore.get_async(self.reader, key, options=options)
                return bytes(await result.bytes_async())
            if length <= 0:
                return b""
            return bytes(await obstore.get_range_async(self.reader, key, start=start, length=length))
        except FileNotFoundError:
            raise BlobNotFound(digest) from None
        except Exception as exc:
            raise _unavailable(exc) from None

    async def delete(self, digest: str) -> None:
        import obstore

        try:
            await obstore.delete_async(self.store, self.blob_key(digest))
        except FileNotFoundError:
            return
        except Exception as exc:
            raise _unavailable(exc) from None

    async def listing(self, under: str) -> list[dict[str, Any]]:
        """Every object below <prefix><under>: path, size, last_modified."""
        import obstore

        try:
            found: list[dict[str, Any]] = []
            async for batch in obstore.list(self.store, prefix=self.prefix + under, chunk_size=1000):
                found.extend(batch)
            return found
        except Exception as exc:
            raise _unavailable(exc) from None

    async def walk(self) -> list[str]:
        names = (entry["path"].rsplit("/", 1)[-1] for entry in await self.listing("blobs/"))
        return sorted(name for name in names if is_digest(name))

    async def usage(self) -> tuple[int, int]:
        objects = await self.listing("blobs/")
        return len(objects), sum(int(entry["size"]) for entry in objects)

    async def leftovers(self) -> list[Leftover]:
        found = await asyncio.to_thread(lambda: list(self.temp_leftovers()))
        now = time.time()
        for entry in await self.listing("uploads/"):
            name = entry["path"].rsplit("/", 1)[-1]
            digest = name.split(".", 1)[0]
            found.append(Leftover(Path(entry["path"]), "upload", digest if is_digest(digest) else None,
                                  now - entry["last_modified"].timestamp()))
        return found

    async def clear(self, leftover: Leftover) -> None:
        import obstore

        if leftover.kind != "upload":
            await asyncio.to_thread(self.discard, leftover.path)
            return
        try:
            await obstore.delete_async(self.store, str(leftover.path))
        except FileNotFoundError:
            return
        except Exception as exc:
            raise _unavailable(exc) from None

    async def redirect_url(self, digest: str, content_type: str, filename: str) -> str | None:
        import obstore

        if self.redirect != "presigned":
            return None
        try:
            return await obstore.sign_async(self.store, "GET", self.blob_key(digest), timedelta(seconds=PRESIGN_TTL))
        except Exception as exc:
            raise _unavailable(exc) from None

    async def check(self) -> None:
        import obstore

        async def one_listing() -> None:
            stream = obstore.list(self.probe, prefix=self.prefix + "blobs/", chunk_size=1)
            async for _ in stream:
                break

        try:
            await asyncio.wait_for(one_listing(), CHECK_TIMEOUT)
        except TimeoutError:
            raise StorageUnavailable(f"bucket {self.bucket!r} did not answer within {CHECK_TIMEOUT:.0f} s") from None
        except Exception as exc:
            raise _unavailable(exc, f"bucket {self.bucket!r}: ") from None

    async def close(self) -> None:
        self._client = self._probe = self._reader = None


async def _quietly(step: Any) -> None:
    try:
        await step
    except Exception:  # a failed clean-up leaves an uploads/ object, which the sweep removes
        return


def _unavailable(exc: BaseException, lead: str = "") -> StorageUnavailable:
    """StorageUnavailable with the first line of the client's message: the operation, the key and the
    store's answer; never credentials (requests carry them in headers, which messages do not quote)."""
    name = type(exc).__name__
    detail = " ".join(str(exc).split())
    if "NoSuchBucket" in detail:
        detail = "the bucket does not exist"
    elif name in ("PermissionDeniedError", "UnauthenticatedError") or any(
            code in detail for code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch")):
        detail = f"access denied (check the credentials): {detail}"
    return StorageUnavailable(f"object store: {lead}{detail[:300]}")


def credentials_from(settings_file: str, environ: dict[str, str] | None = None) -> dict[str, str]:
    """The access key for obstore's config: from an AWS shared-credentials file when one is named, else
    from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN. Empty: obstore looks for itself
    (instance and container roles, web identity)."""
    env = dict(os.environ if environ is None else environ)
    if settings_file:
        parser = configparser.ConfigParser()
        try:
            with open(settings_file, encoding="utf-8") as handle:
                parser.read_file(handle)
        except OSError as exc:
            raise ConfigError(f"Cannot read s3_credentials_file {settings_file}: {exc.strerror}") from None
        profile = env.get("AWS_PROFILE", "default")
        if not parser.has_section(profile):
            raise ConfigError(f"s3_credentials_file {settings_file} has no [{profile}] section")
        section = parser[profile]
        pairs = {"access_key_id": section.get("aws_access_key_id"),
                 "secret_access_key": section.get("aws_secret_access_key"),
                 "token": section.get("aws_session_token")}
    else:
        pairs = {"access_key_id": env.get("AWS_ACCESS_KEY_ID"), "secret_access_key": env.get("AWS_SECRET_ACCESS_KEY"),
                 "token": env.get("AWS_SESSION_TOKEN")}
    found = {name: value for name, value in pairs.items() if value}
    if settings_file and not {"access_key_id", "secret_access_key"} <= found.keys():
        raise ConfigError(f"s3_credentials_file {settings_file}: needs aws_access_key_id and aws_secret_access_key")
    return found
