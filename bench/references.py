"""What casimg is measured against, in the same run: for the ingest, the limit (a plain aiohttp
fetch-and-write) and the required work (the limit plus what casimg cannot skip for a body); for
retrieval, the bare handler (one Redis HGET and one file read)."""

from __future__ import annotations

import asyncio
import hashlib
import multiprocessing
import os
import tempfile
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from bench.origin import CONCURRENCY, PER_HOST
from casimg import affinity


@dataclass
class IngestResult:
    seconds: float
    images: int
    bytes: int
    stored: int = 0
    existed: int = 0
    failed: int = 0
    failures: list[str] = field(default_factory=list)
    cpu_seconds: float = 0.0  # user + system CPU of the run's processes, threads included
    redis_cpu_seconds: float = 0.0  # of the run's own Redis, for a casimg run

    @property
    def cpu_ms_per_image(self) -> float:
        return self.cpu_seconds / self.images * 1000

    @property
    def per_second(self) -> float:
        return self.images / self.seconds

    @property
    def mb_per_second(self) -> float:
        return self.bytes / self.seconds / 1e6


Fetch = Callable[[list[str], Path], Coroutine[Any, Any, IngestResult]]


def write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)


async def fetch_and_keep(urls: list[str], out_dir: Path, keep: Callable[[Path, bytes], None] = write_file,
                         flusher: Any = None) -> IngestResult:
    """Fetch every URL with aiohttp at casimg's concurrency, and hand each body to `keep(path, body)` in
    a thread; with a `flusher` (blobs.FlushGroup), wait for its flush after that, as a blob does.

    Bodies being kept are bounded as casimg's worker bounds its stores (STORE_DEPTH places per download
    slot for a body until it is written, taken before the slot is given back; then FINISH_DEPTH places
    per slot for the flush, taken before the body's place is given back), so a reference holds no more
    in memory, and batches no more into one flush, than casimg may.
    """
    from casimg.worker import FINISH_DEPTH, STORE_DEPTH

    connector = aiohttp.TCPConnector(limit=CONCURRENCY, limit_per_host=PER_HOST)
    loop = asyncio.get_running_loop()
    total = 0
    slots = asyncio.Semaphore(CONCURRENCY)
    storing = asyncio.Semaphore(STORE_DEPTH * CONCURRENCY)
    finishing = asyncio.Semaphore(FINISH_DEPTH * CONCURRENCY)

    async def one(session: aiohttp.ClientSession, number: int, url: str) -> None:
        nonlocal total
        async with slots:
            async with session.get(url) as response:
                response.raise_for_status()
                data = await response.read()
            await storing.acquire()
        try:
            total += len(data)
            await loop.run_in_executor(None, keep, out_dir / f"{number}.bin", data)
            del data
            await finishing.acquire()
        finally:
            storing.release()
        try:
            if flusher is not None:
                await flusher.flush()
        finally:
            finishing.release()

    started = time.monotonic()
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(one(session, number, url) for number, url in enumerate(urls)))
    return IngestResult(time.monotonic() - started, len(urls), total)


async def plain_fetch(urls: list[str], out_dir: Path) -> IngestResult:
    """The limit: aiohttp fetch and write to a file, same concurrency, no validation, hash or index."""
    return await fetch_and_keep(urls, out_dir)


async def required_work_fetch(urls: list[str], out_dir: Path) -> IngestResult:
    """The limit plus what casimg cannot skip: its validation, SHA-256, and durable bytes.

    Each body goes to a thread once to be validated (casimg's settings: CASIMG_VALIDATION and the
    limits), hashed and written, then waits for a shared syncfs (casimg's FlushGroup) as a blob does
    before it is indexed. No index, queue, temp name, content-named link or log. It runs in one process
    on the limit's event loop and thread pool, so its ratio to the limit is what the required work
    costs there; what is left between it and casimg is casimg's own overhead.
    """
    from casimg.config import load_settings
    from casimg.storage.file import FlushGroup
    from casimg.validation import validator

    validate = validator(load_settings())  # as the worker validates a body

    def keep(path: Path, data: bytes) -> None:
        validate(data)
        hashlib.sha256(data).digest()
        write_file(path, data)

    flusher = FlushGroup(out_dir)
    try:
        return await fetch_and_keep(urls, out_dir, keep, flusher)
    finally:
        flusher.close()


def reference_run(work: Path, urls: list[str], fetch: Fetch = plain_fetch, processes: int = 1) -> IngestResult:
    """One run of the limit (plain_fetch) or of another reference, into a new directory under `work`;
    with `processes` > 1, that many forked processes at once, each with its share of the URLs and the
    whole concurrency, as `casimg serve --processes` runs them (each on a CPU of its own when there is one
    per CPU), timed from a common start to the last."""
    # Each run keeps its files until the workspace goes at the end: on an ext4 without a journal, files
    # created soon after thousands were deleted cost several times as much (the inode allocator steps
    # over recently freed inodes one by one), and deleting the limit's files between runs slowed
    # whatever wrote next, casimg or the limit.
    out = Path(tempfile.mkdtemp(prefix="plain-", dir=work))
    before = _own_and_children_cpu()
    if processes == 1:
        result = asyncio.run(fetch(urls, out))
    else:
        result = _forked_run(fetch, urls, out, processes)
    result.cpu_seconds = _own_and_children_cpu() - before
    # Untimed: the limit leaves its bytes in the page cache, and casimg, which makes its blobs durable
    # before indexing them (syncfs), would otherwise pay for writing them out.
    os.sync()
    return result


def _own_and_children_cpu() -> float:
    """CPU seconds of this process and of the children it has waited for (the forked references)."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


def _forked_run(fetch: Fetch, urls: list[str], out: Path, processes: int) -> IngestResult:
    context = multiprocessing.get_context("fork")
    go = context.Event()
    totals = context.Queue()

    # Pinned as `casimg serve` pins its servers (casimg.affinity): one per usable CPU, each on its own.
    cpus = affinity.serve_plan(processes, pin=True)

    def child(number: int, share: list[str], directory: Path) -> None:
        if cpus is not None:
            affinity.pin(cpus[number])
        directory.mkdir()
        go.wait()
        totals.put(asyncio.run(fetch(share, directory)).bytes)

    children = [context.Process(target=child, args=(number, urls[number::processes], out / str(number)))
                for number in range(processes)]
    for process in children:
        process.start()
    started = time.monotonic()
    go.set()
    total = sum(totals.get() for _ in children)
    seconds = time.monotonic() - started
    for process in children:
        process.join()
        if process.exitcode != 0:
            raise RuntimeError(f"a reference process exited with status {process.exitcode}")
    return IngestResult(seconds, len(urls), total)


def run_bare(port: int, redis_url: str, blob_root: str, processes: int, minimal: bool = True) -> None:
    """A Tornado handler doing only what a read cannot skip: one Redis HGET (of the URL's bucket) and one
    file read; in the process `python -m bench _bare` (`_threaded` for the previous reference) starts.

    The minimal one (the reference since issue 18) reads the file on the event loop, as Tornado's
    StaticFileHandler does, and has Tornado compute no ETag (`compute_etag` returns None), which casimg
    never does either. `minimal=False` is the reference the runs before used: the read in a thread and
    Tornado's SHA-1 ETag over every body, work that casimg does not do, so it flattered casimg.
    """
    import redis.asyncio as aioredis
    import tornado.httpserver
    import tornado.netutil
    import tornado.process
    import tornado.web

    sockets = tornado.netutil.bind_sockets(port, "127.0.0.1", reuse_port=True)
    if processes > 1:
        cpus = affinity.serve_plan(processes, pin=True)  # as casimg serve pins its servers
        number = tornado.process.fork_processes(processes)
        if cpus is not None:
            affinity.pin(cpus[number])

    def read(path: str) -> bytes:
        with open(path, "rb") as handle:
            return handle.read()

    from casimg.schema import KeySpace, url_key

    keys = KeySpace()

    class Minimal(tornado.web.RequestHandler):
        async def get(self) -> None:
            url = self.get_query_argument("url")
            value = await self.application.settings["redis"].hget(url_key(keys, url), url)
            if value is None:
                raise tornado.web.HTTPError(404)
            digest = value[:64]  # "<sha256 hex> <stored_at>"
            self.finish(read(f"{blob_root}/{digest[0:2]}/{digest[2:4]}/{digest}"))

        def compute_etag(self) -> None:
            return None

    class Threaded(tornado.web.RequestHandler):
        async def get(self) -> None:
            url = self.get_query_argument("url")
            value = await self.application.settings["redis"].hget(url_key(keys, url), url)
            if value is None:
                raise tornado.web.HTTPError(404)
            digest = value[:64]
            path = f"{blob_root}/{digest[0:2]}/{digest[2:4]}/{digest}"
            self.write(await asyncio.get_running_loop().run_in_executor(None, read, path))

    handler = Minimal if minimal else Threaded

    async def main() -> None:
        client = aioredis.Redis(connection_pool=aioredis.BlockingConnectionPool.from_url(
            redis_url, max_connections=128, decode_responses=True))
        app = tornado.web.Application([(r"/api/image", handler), (r"/healthz", handler)], redis=client)
        server = tornado.httpserver.HTTPServer(app)
        server.add_sockets(sockets)
        await asyncio.Event().wait()

    from casimg.runtime import run_loop

    run_loop(main())  # the same event loop casimg runs on (uvloop when installed): the same stack
