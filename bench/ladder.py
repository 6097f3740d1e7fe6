"""The required work, then casimg's own steps added one at a time, in one process, to see what each costs.

    .venv/bin/python -m bench.ladder --workspace /dev/shm
    .venv/bin/python -m bench.ladder --images 3000 --rounds 6 --pin --made-fan-out

bench.parts splits a casimg ingest by process; this splits casimg's own process by step. Each rung does
what the rung above it does and one thing more, with casimg's own code for it, at casimg's concurrency
(64 downloads, its store and finish depths) on the bench's origin and corpus:

1. ``required``: bench.references' required work: a bare aiohttp GET, then in one trip to a thread the
   validation (casimg's settings), a SHA-256 and a plain file, then the shared syncfs (FlushGroup).
2. ``fetcher``: the download through casimg's Fetcher (the address guard, the caps per address and
   domain, the timeouts, the redirect checks) instead of a bare GET.
3. ``index``: the index step after the flush: Index.store of each URL with its real queue entry (one
   job, submitted through JobQueue and read as a worker reads it), through the ScriptBatcher, on
   casimg's Redis client (services.connect_redis).
4. ``temp``: the body written under a temp name in a FileStore's tmp/ (write_temp), not a plain file.
5. ``link``: the temp file linked in under its content name (FileStore.link_in, ab/cd/<sha256>), in
   the same trip to the thread, as the worker's staging does.
6. ``settle``: the whole store of the worker (lifecycle.store_blob: the index step, then the settle of
   the temp name, many in one trip to a thread) and the staging's attempt to link a temp name to a
   content already stored.
7. ``worker``: casimg's own Worker, built by services.open_services as ``casimg serve`` builds it, with
   the bench's settings (bench.stack.start_casimg), on this process's loop, logging to a file: all of the
   above, and its queue reads, its fair slots, politeness, a task per entry, the log line and the
   counters; what ``casimg serve --processes 1`` runs, less its HTTP server.

A store made for a round is young, so most of its blobs make their ab/cd/ directory; ``--made-fan-out``
makes all 65,536 before the timed part, as in a store with a few hundred thousand blobs. ``--pin`` runs
the process on one CPU, as ``casimg serve`` pins each of its servers when it runs one per CPU
(casimg/affinity.py).

Rounds are interleaved, each in the reverse order of the one before; each rung's row gives its median
images/s (range), the CPU of this process per image (every thread), and Redis's. Only loopback addresses
are used. Prints markdown; writes nothing to the repository.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import logging
import os
import platform
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import redis.asyncio as aioredis

from bench import log, spread, workspace
from bench.corpus import make_images, set_directory
from bench.origin import CONCURRENCY, PER_HOST, image_urls, serve_image_set
from bench.procs import ROOT, Procs, own_cpu
from bench.python_floor import cpu as process_cpu
from bench.references import write_file
from bench.stack import start_redis
from casimg import affinity
from casimg.batching import ThreadBatcher
from casimg.cli import setup_logging
from casimg.config import Settings, load_settings
from casimg.fetcher import Fetcher
from casimg.index import BlobMeta, Index
from casimg.lifecycle import store_blob
from casimg.queue import Entry, JobQueue
from casimg.runtime import run_loop
from casimg.schema import KeySpace
from casimg.services import connect_redis, open_services
from casimg.storage.file import FileStore, FlushGroup
from casimg.validation import ImageInfo, validator
from casimg.worker import FINISH_DEPTH, STORE_DEPTH

RUNGS = ("required", "fetcher", "index", "temp", "link", "settle", "worker")
LOOPBACK = ("127.0.0.0/8",)  # the bench's origin listens on 8 loopback addresses, which the guard refuses by default
# The other settings bench.stack.start_casimg gives the casimg of the ingest table
WORKER_SETTINGS = {"rate_limit": 0, "origin_rate": 1_000_000, "origin_burst": 1_000_000}


@dataclass
class Rung:
    """What one run of a rung does: the rungs up to and including `name`."""

    name: str

    def has(self, step: str) -> bool:
        return RUNGS.index(self.name) >= RUNGS.index(step)


class Ladder:
    """One run of one rung over `urls`, in the directory `out`, with Redis at `redis_url` under `prefix`."""

    def __init__(self, rung: Rung, settings: Settings, out: Path, redis_url: str, prefix: str,
                 made_fan_out: bool = False) -> None:
        self.rung = rung
        self.settings = settings
        self.out = out
        self.redis_url = redis_url
        self.keys = KeySpace(prefix)
        self.made_fan_out = made_fan_out
        self.validate = validator(settings)  # as the worker validates a body
        # (the worker's store is the one its settings name: the data dir out/casimg)
        self.store = FileStore(out / ("casimg" if rung.name == "worker" else "data")) if rung.has("temp") else None
        self.index: Index | None = None
        self.entries: dict[str, Entry] = {}

    async def prepare(self, urls: list[str], redis: aioredis.Redis) -> None:
        """Untimed: the job submitted and its entries read, the store's directories made."""
        if self.store is not None:
            self.store.create_dirs()
            if self.made_fan_out:
                for first in range(256):
                    for second in range(256):
                        os.makedirs(self.store.root / f"{first:02x}" / f"{second:02x}", exist_ok=True)
        if self.rung.has("index") and self.rung.name != "worker":  # the worker's job is submitted in its run
            queue = JobQueue(redis, self.keys, 3600)
            self.index = Index(redis, self.keys)
            await queue.ensure_group()
            await queue.submit(urls)
            while len(self.entries) < len(urls):
                self.entries.update((entry.url, entry) for entry in await queue.read("ladder", {"": 1000}))

    def keep(self, number: int, data: bytes) -> tuple[Path, str, ImageInfo]:
        """In a thread, once per body: validate, hash, and keep it as the rung says."""
        info = self.validate(data)
        digest = hashlib.sha256(data).hexdigest()
        if self.store is None:
            path = self.out / f"{number}.bin"
            write_file(path, data)
            return path, digest, info
        if self.rung.has("settle"):
            tmp = self.store.temp_link_to(digest)  # the worker's attempt for a content already stored
            if tmp is not None:
                return tmp, digest, info
        tmp, digest = self.store.write_temp(data, digest)
        if self.rung.has("link"):
            self.store.link_in_or_discard(tmp, digest, sync=False)
        return tmp, digest, info

    async def run(self, urls: list[str]) -> float:
        """The timed part: every URL fetched and kept; its seconds."""
        if self.rung.name == "worker":
            return await self._run_worker(urls)
        loop = asyncio.get_running_loop()
        slots = asyncio.Semaphore(CONCURRENCY)
        storing = asyncio.Semaphore(STORE_DEPTH * CONCURRENCY)
        finishing = asyncio.Semaphore(FINISH_DEPTH * CONCURRENCY)
        flusher = FlushGroup(self.store.root if self.store is not None else self.out)
        settler = ThreadBatcher()
        download, close_download = await self._downloader()

        async def one(number: int, url: str) -> None:
            async with slots:
                data = await download(url)
                await storing.acquire()
            try:
                size = len(data)
                tmp, digest, info = await loop.run_in_executor(None, self.keep, number, data)
                del data
                await finishing.acquire()
            finally:
                storing.release()
            try:
                await flusher.flush()
                await self._index(url, tmp, digest, BlobMeta(size, info.content_type, info.width, info.height), settler)
            finally:
                finishing.release()

        started = time.monotonic()
        try:
            await asyncio.gather(*(one(number, url) for number, url in enumerate(urls)))
            return time.monotonic() - started
        finally:
            flusher.close()
            await close_download()

    async def _run_worker(self, urls: list[str]) -> float:
        """casimg's Worker on this loop, from the job's submit (untimed) until the job is done."""
        overrides = {"data_dir": self.out / "casimg", "redis_url": self.redis_url, "key_prefix": self.keys.prefix,
                     "allow_networks": ",".join(LOOPBACK), **WORKER_SETTINGS}
        settings = load_settings(environ={}, overrides=overrides)
        services = await open_services(settings, self.redis_url, with_worker=True)
        try:
            job_id, _ = await services.queue.submit(urls)
            assert services.worker is not None
            started = time.monotonic()
            services.worker.start()
            # Polled as a client would poll the job: the worker says nothing else when a job is done.
            while await services.queue.status(job_id) != "done":  # noqa: ASYNC110
                await asyncio.sleep(0.005)
            seconds = time.monotonic() - started
            await services.worker.stop(settings.shutdown_grace)
            return seconds
        finally:
            await services.close()

    async def _downloader(self) -> tuple[Callable[[str], Awaitable[bytes]], Callable[[], Awaitable[None]]]:
        """(download a URL's body, close what downloads): casimg's Fetcher from its rung on, else a bare GET."""
        if self.rung.has("fetcher"):
            s = self.settings
            fetcher = Fetcher(tmp_dir=self.out / "fetch-tmp", max_bytes=s.max_image_bytes,
                              total_timeout=s.fetch_timeout, connect_timeout=s.connect_timeout,
                              max_connections=CONCURRENCY,
                              max_per_host=s.per_host_concurrency, max_per_domain=s.per_domain_concurrency,
                              max_redirects=s.max_redirects, max_url_length=s.max_url_length,
                              allow_networks=LOOPBACK, user_agent=s.user_agent)
            await fetcher.start()

            async def fetch(url: str) -> bytes:
                downloaded = await fetcher.fetch(url)
                assert downloaded.data is not None, "a body over the in-memory size: the corpus has none"
                return downloaded.data
            return fetch, fetcher.close
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=CONCURRENCY, limit_per_host=PER_HOST))

        async def get(url: str) -> bytes:
            async with session.get(url) as response:
                response.raise_for_status()
                return await response.read()
        return get, session.close

    async def _index(self, url: str, tmp: Path, digest: str, meta: BlobMeta, settler: ThreadBatcher) -> None:
        if self.index is None:
            return
        entry = self.entries[url]
        job: dict[str, Any] = {"job_id": entry.job_id, "position": entry.position, "entry_id": entry.entry_id,
                               "attempts": 1, "owner": entry.owner}
        if self.rung.has("settle"):
            assert self.store is not None
            await store_blob(self.store, self.index, tmp, url, digest, meta, linked=True, run=settler.call, **job)
        else:
            await self.index.store(url, digest, meta, **job)


@dataclass
class Result:
    rate: float  # images/s
    cpu_ms: float  # this process's CPU per image
    redis_ms: float  # Redis's CPU per image


async def one_run(rung: Rung, settings: Settings, urls: list[str], out: Path, redis_url: str, redis_pid: int,
                  prefix: str, made_fan_out: bool) -> Result:
    redis = connect_redis(redis_url, CONCURRENCY + 64)  # casimg's client, as open_services makes it
    try:
        ladder = Ladder(rung, settings, out, redis_url, prefix, made_fan_out)
        await ladder.prepare(urls, redis)
        cpu, redis_cpu = sum(process_cpu()), own_cpu(redis_pid)
        seconds = await ladder.run(urls)
        cpu, redis_cpu = sum(process_cpu()) - cpu, own_cpu(redis_pid) - redis_cpu
    finally:
        await redis.aclose()
    per_image = 1000 / len(urls)
    return Result(len(urls) / seconds, cpu * per_image, redis_cpu * per_image)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.ladder", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=3000, help="distinct images (default 3000)")
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds (default 4)")
    parser.add_argument("--rungs", default=",".join(RUNGS), help=f"which rungs, in order (default {','.join(RUNGS)})")
    parser.add_argument("--pin", action="store_true", help="run on one CPU, as a pinned casimg server does")
    parser.add_argument("--made-fan-out", action="store_true",
                        help="make the store's 65,536 ab/cd/ directories before each timed run")
    parser.add_argument("--workspace", default=None, help="where the run's temp directory goes (default: TMPDIR)")
    parser.add_argument("--cache", default=str(ROOT / ".bench-cache"), help="where the images are kept")
    args = parser.parse_args()
    rungs = [Rung(name) for name in args.rungs.split(",")]
    if any(rung.name not in RUNGS for rung in rungs):
        parser.error(f"--rungs takes names among {', '.join(RUNGS)}")
    if args.pin and not affinity.pin(affinity.usable()[0]):
        parser.error("this system refused to pin the process")
    settings = load_settings()
    setup_logging(settings.log_format)  # the worker rung's log line per URL, as casimg writes it
    cache = set_directory(Path(args.cache), args.images)
    files = make_images(cache, args.images)
    results: dict[str, list[Result]] = {rung.name: [] for rung in rungs}
    procs = Procs()
    with workspace(False, "casimg-ladder-", args.workspace) as work:
        try:
            port, origin = serve_image_set(procs, work, cache)
            urls, _, _ = image_urls(port, files)
            (work / "redis").mkdir()
            redis_process, redis_url = start_redis(procs, work / "redis", persistent=True)
            casimg_log = logging.FileHandler(work / "casimg.log")
            casimg_log.setFormatter(logging.getLogger().handlers[0].formatter)
            logging.getLogger().handlers[:] = [casimg_log]
            log(f"origin: {origin}; workspace {work}")
            runs = 0
            for round_number in range(args.rounds):
                for rung in rungs if round_number % 2 == 0 else rungs[::-1]:
                    runs += 1
                    out = work / f"run-{runs}"
                    out.mkdir()
                    result = run_loop(one_run(rung, settings, urls, out, redis_url, redis_process.pid,
                                              f"ladder{runs}:", args.made_fan_out))
                    results[rung.name].append(result)
                    log(f"round {round_number + 1}, {rung.name}: {result.rate:.0f} images/s, "
                        f"{result.cpu_ms:.3f} ms CPU per image, Redis {result.redis_ms:.3f}")
        finally:
            procs.stop_all()
    print(report(args, results))


def report(args: argparse.Namespace, results: dict[str, list[Result]]) -> str:
    """The markdown table: each rung's figures, and what it added to the rung above it, round by round."""
    options = " ".join(f"--{flag}" for flag, on in (("pin", args.pin), ("made-fan-out", args.made_fan_out)) if on)
    lines = [f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} cores, Python "
             f"{platform.python_version()}. `python -m bench.ladder --images {args.images} --rounds {args.rounds}"
             f"{' ' + options if options else ''}`"
             f"{', workspace ' + args.workspace if args.workspace else ''}; medians over the rounds.\n",
             "| rung | images/s | CPU ms per image | Redis CPU ms per image | against the rung above: rate | CPU ms "
             "per image added |",
             "|---|---|---|---|---|---|"]
    above: list[Result] | None = None
    for name, runs in results.items():
        rates = [run.rate for run in runs]
        against = added = ""
        if above is not None:
            ratios = [run.rate / other.rate for run, other in zip(runs, above, strict=True)]
            against = spread(ratios)
            extra = [run.cpu_ms - other.cpu_ms for run, other in zip(runs, above, strict=True)]
            added = f"{statistics.median(extra):+.3f}"
        lines.append(f"| {name} | {spread(rates, '.0f')} | "
                     f"{statistics.median(run.cpu_ms for run in runs):.3f} | "
                     f"{statistics.median(run.redis_ms for run in runs):.3f} | {against} | {added} |")
        above = runs
    return "\n".join(lines)


if __name__ == "__main__":
    main()
