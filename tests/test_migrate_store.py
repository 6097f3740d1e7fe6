"""`casimg migrate-store`: the active store record, the copy, and a live migration there and back.

In-process cases drive casimg.migrate_store and storage.active against the test Redis and the session's S3
endpoint (moto_server, or the bucket CASIMG_S3_* name); the end-to-end case runs `casimg serve` importing
and serving while `casimg migrate-store` is killed with SIGKILL mid-copy, run again, and run back.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from casimg.errors import BadRequest, ConfigError
from casimg.index import BlobMeta
from casimg.lifecycle import store_blob
from casimg.migrate_store import _wait_for_processes, migrate_store
from casimg.services import open_services
from casimg.storage import BlobNotFound
from casimg.storage.active import ActiveStore, StoreName
from tests.conftest import make_settings, png
from tests.procs import (
    ROOT,
    Processes,
    Server,
    assert_fsck_clean,
    assert_retrievable,
    embedded_client,
    expected_bytes,
    image_urls,
    job,
    settle,
    submit,
)


def test_a_store_name_is_file_or_a_bucket_and_prefix():
    assert StoreName.parse("file") == StoreName("file")
    assert StoreName.parse("s3://b") == StoreName("s3", "b", "")
    assert StoreName.parse("s3://b/p") == StoreName("s3", "b", "p/")
    assert StoreName.parse("s3://b/p/q/") == StoreName("s3", "b", "p/q/")
    assert str(StoreName("s3", "b", "p/")) == "s3://b/p/"
    for wrong in ("s3://", "s3:///p", "gs://b/p", "/data"):
        with pytest.raises(ConfigError):
            StoreName.parse(wrong)


@pytest.fixture
def migrating(io_loop: Any, tmp_path: Path, redis_server: Any, s3: Any) -> Any:
    """The services of a process on a file store, with the S3 endpoint's settings, following the record."""
    settings = make_settings(tmp_path / "data", redis_server.url, **{**s3.settings("", tmp_path), "storage": "file"})
    settings.data_dir.mkdir(parents=True)
    services = io_loop.run_sync(lambda: open_services(settings, settings.redis_url, with_worker=False))
    yield services, StoreName("s3", s3.bucket, s3.prefix())
    io_loop.run_sync(services.close)


async def stored(services: Any, count: int) -> dict[str, bytes]:
    """`count` URLs indexed with blobs of their own in the active store: digest -> bytes."""
    blobs = {}
    for n in range(count):
        data = png(100 + n)
        digest = hashlib.sha256(data).hexdigest()
        tmp, _ = services.blobs.write_temp(data)
        await store_blob(services.blobs, services.index, tmp, f"http://origin/{n}.png", digest,
                         BlobMeta(len(data), "image/png", 4, 3))
        blobs[digest] = data
    return blobs


@pytest.mark.gen_test(timeout=60)
async def test_every_blob_goes_to_s3_and_back_and_every_process_follows(migrating):
    services, bucket = migrating
    blobs = await stored(services, 12)
    stale = "0" * 64  # a tombstone from an earlier time on an object store, long due
    await services.redis.zadd(services.stores.keys.tomb, {stale: 0})
    said: list[str] = []
    progress = await migrate_store(services.stores, services.index, bucket, said.append)
    assert (progress.referenced, progress.copied, progress.failed) == (12, 12, {})
    assert await services.redis.zscore(services.stores.keys.tomb, stale) is None
    assert await services.redis.hget(services.stores.keys.store, "active") == str(bucket)
    assert await services.redis.hget(services.stores.keys.store, "target") == ""
    await services.stores.refresh()
    assert services.blobs.kind == "s3"
    for digest, data in blobs.items():
        assert await services.blobs.read_range(digest) == data

    shutil.rmtree(services.settings.data_dir / "blobs")  # back to an empty blob directory
    (services.settings.data_dir / "blobs").mkdir()
    progress = await migrate_store(services.stores, services.index, StoreName("file"), said.append)
    assert (progress.copied, progress.failed) == (12, {})
    await services.stores.refresh()
    assert services.blobs.kind == "file"
    for digest, data in blobs.items():
        assert (services.settings.data_dir / "blobs" / digest[:2] / digest[2:4] / digest).read_bytes() == data
    assert "nothing to do" in (await migrate_store(services.stores, services.index, StoreName("file"),
                                                   said.append), said[-1])[1]


@pytest.mark.gen_test(timeout=60)
async def test_a_second_migration_to_another_store_is_refused_while_one_is_under_way(migrating):
    services, bucket = migrating
    await stored(services, 1)
    keys = services.stores.keys
    await services.redis.hset(keys.store, mapping={"active": "file", "target": str(bucket), "epoch": "1", "id": "x"})
    with pytest.raises(BadRequest, match="under way"):
        await migrate_store(services.stores, services.index, StoreName("s3", bucket.bucket, "elsewhere/"))


@pytest.mark.gen_test(timeout=60)
async def test_the_copy_waits_for_a_store_begun_under_the_old_epoch(migrating):
    """The safety of the copy rests on this: a process acknowledges a new epoch only once every store it
    began before has reached the index, so none of them can land in the old store alone after the copy."""
    services, bucket = migrating
    stores: ActiveStore = services.stores
    keys = stores.keys
    with stores.storing() as (_, target):
        assert target is None
        record = {"active": "file", "target": str(bucket), "epoch": "1", "id": "y"}
        await services.redis.hset(keys.store, mapping=record)
        await stores.refresh()
        await stores.acknowledge()
        waiting = asyncio.ensure_future(_wait_for_processes(services.redis, keys, 1, lambda line: None))
        await asyncio.sleep(0.5)
        assert not waiting.done(), "the copy went ahead while a store of the old epoch was in flight"
        with stores.storing() as (_, now_target):
            assert now_target is stores.target is not None  # a store begun now writes both
    await stores.acknowledge()
    await asyncio.wait_for(waiting, 5)


@pytest.mark.gen_test(timeout=60)
async def test_a_referenced_blob_missing_from_the_source_stops_the_flip(migrating):
    services, bucket = migrating
    blobs = await stored(services, 3)
    gone = sorted(blobs)[0]
    (services.settings.data_dir / "blobs" / gone[:2] / gone[2:4] / gone).unlink()
    progress = await migrate_store(services.stores, services.index, bucket, lambda line: None)
    assert list(progress.failed) == [gone] and progress.copied == 2
    record = await services.redis.hgetall(services.stores.keys.store)
    assert (record["active"], record["target"]) == ("file", str(bucket))  # not flipped: reads stay whole
    with pytest.raises(BlobNotFound):
        await services.stores.driver(bucket).stat(gone)


# -- end to end: a live migration, killed and resumed, and back ------------------------------------------

IMPORT = 150  # URLs imported while the store moves
ENV = {"CASIMG_PER_HOST_CONCURRENCY": "8", "CASIMG_RATE_LIMIT": "0"}


def migrate_command(data_dir: Path, to: str, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "casimg", "migrate-store", "--data-dir", str(data_dir), "--to", to],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def run_migration(data_dir: Path, to: str, env: dict[str, str]) -> str:
    command = migrate_command(data_dir, to, env)
    out, _ = command.communicate(timeout=120)
    assert command.returncode == 0, out
    return out


class Reader(threading.Thread):
    """Reads the URLs stored so far, over and over, until stopped; every answer must be exact."""

    def __init__(self, server: Server, job_id: str) -> None:
        super().__init__(daemon=True)
        self.server, self.job_id = server, job_id
        self.stop, self.reads, self.errors = threading.Event(), 0, []

    def run(self) -> None:
        while not self.stop.is_set():
            done = [r["url"] for r in job(self.server, self.job_id)["results"] if r["status"] == "stored"]
            for url in done[-10:]:
                status, body, _ = self.server.call("GET", f"/api/image?url={quote(url, safe='')}")
                self.reads += 1
                if status != 200 or body != expected_bytes(url):
                    self.errors.append((url, status))
            self.stop.wait(0.1)  # a steady trickle of reads, not a flood that starves the import


def read_back(server: Server, urls: list[str]) -> None:
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda url: assert_retrievable(server, [url]), urls))


@pytest.mark.slow
def test_a_live_migration_killed_and_resumed_then_back_again(tmp_path, origin, s3):
    procs = Processes()
    data_dir = tmp_path / "data"
    prefix = s3.prefix()
    env = {**os.environ, **ENV, **s3.env(prefix), "CASIMG_STORAGE": "file"}
    started = time.monotonic()
    try:
        server = procs.server(data_dir, env={k: v for k, v in env.items() if k.startswith(("CASIMG", "AWS"))})
        first = image_urls(origin, IMPORT, start=60_000)
        settle(server, submit(server, first))
        urls = image_urls(origin, IMPORT, start=61_000, query="delay=0.05")
        job_id = submit(server, urls)
        reader = Reader(server, job_id)
        reader.start()
        client = embedded_client(data_dir)

        command = migrate_command(data_dir, f"s3://{s3.bucket}/{prefix}", env)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            migration = client.hget("casimg:store", "id")
            if migration and client.scard(f"casimg:store-copied:{migration}") >= 20:
                break
            time.sleep(0.005)
        command.send_signal(signal.SIGKILL)
        command.wait()
        record = client.hgetall("casimg:store")
        assert record["target"] == f"s3://{s3.bucket}/{prefix}", "the migration ended before it was killed"
        copied_before = client.scard(f"casimg:store-copied:{record['id']}")

        print(f"\nkilled at {time.monotonic() - started:.1f} s")
        store = s3.store_for(tmp_path / "check", prefix=prefix)

        async def in_bucket(url: str) -> bool:
            data = expected_bytes(url)
            try:
                return await store.read_range(hashlib.sha256(data).hexdigest()) == data
            except BlobNotFound:
                return False

        async def all_in_bucket(urls: list[str]) -> list[bool]:
            return await asyncio.gather(*(in_bucket(url) for url in urls))

        # Stored while the migration is stopped half-way: written to both stores at once.
        during = image_urls(origin, 20, start=62_000)
        assert settle(server, submit(server, during))["stored"] == len(during)
        assert all(asyncio.run(all_in_bucket(during))), "a store during the migration did not reach the target"
        out = run_migration(data_dir, f"s3://{s3.bucket}/{prefix}", env)
        print(f"resumed and done at {time.monotonic() - started:.1f} s")
        assert "resuming" in out and f"{copied_before} copied before" in out, out
        assert "indexed during the copy are not in" not in out, out  # they were written to both stores
        assert client.hget("casimg:store", "active") == f"s3://{s3.bucket}/{prefix}"
        final = settle(server, job_id)
        print(f"import settled at {time.monotonic() - started:.1f} s")
        reader.stop.set()
        reader.join(30)
        assert not reader.errors and reader.reads > 0, reader.errors[:5]
        assert final["failed"] == 0, [r for r in final["results"] if r["status"] == "failed"][:3]

        # Every URL, those imported during the migration included, is in the bucket and reads back
        # byte-identical, from the bucket itself and through the server with the blob directory gone.
        urls += during
        assert all(asyncio.run(all_in_bucket(first + urls)))
        print(f"bucket checked at {time.monotonic() - started:.1f} s")
        shutil.move(data_dir / "blobs", tmp_path / "old-blobs")
        (data_dir / "blobs").mkdir()
        time.sleep(2)  # the server follows the record within a second
        read_back(server, first + urls)
        print(f"read back at {time.monotonic() - started:.1f} s")
        assert_fsck_clean(data_dir, env=env)

        print(f"read back and fsck at {time.monotonic() - started:.1f} s")
        # And back, into the empty blob directory, while the server keeps serving.
        out = run_migration(data_dir, "file", env)
        assert f"{2 * IMPORT + len(during)} blobs in file" in out, out
        assert client.hget("casimg:store", "active") == "file"
        time.sleep(2)
        read_back(server, first + urls)
        assert_fsck_clean(data_dir, env=env)
        print("\n" + json.dumps({"reads during the migration": reader.reads, "copied before the kill": copied_before,
                                 "seconds": round(time.monotonic() - started, 1)}))
        client.close()
        assert server.terminate() == 0
    finally:
        procs.cleanup()
