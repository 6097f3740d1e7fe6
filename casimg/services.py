"""The services of one casimg process: the open Redis, the index, the queue, the API keys, the blob
store, the limits and, in a process that downloads, the fetcher and the worker. They are opened in
``open_services`` and closed in ``Services.close``; handlers, workers and commands reach them only
through a ``Services``.

``redis_for`` says which Redis a process uses: the configured one, or the data directory's embedded one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import threading
from collections.abc import Awaitable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from casimg.config import Settings
from casimg.embedded import DataDirLock, EmbeddedRedis
from casimg.fetcher import Fetcher
from casimg.index import Index
from casimg.keys import KeyStore, Scope
from casimg.limits import AuthFailures, RateLimiter
from casimg.metrics import Metrics
from casimg.migrate import migrate
from casimg.placeholder_queue import PlaceholderQueue
from casimg.politeness import OriginPace, Robots
from casimg.queue import JobQueue
from casimg.redis_packing import packed_by_hiredis
from casimg.relations import Relations
from casimg.render_pool import RenderPool
from casimg.schema import KeySpace
from casimg.storage import Storage
from casimg.storage.active import ActiveStore
from casimg.variant_store import VariantStore
from casimg.variants import VariantPolicy
from casimg.webhooks import Deliverer
from casimg.worker import Worker

log = logging.getLogger("casimg")
STOP_PART_TIMEOUT = 15.0  # seconds each part of a stop may take beyond its own grace

REDIS_CONNECT_TIMEOUT = 2.0  # a Redis that is down must turn into a quick 503, not a hung request
REDIS_SOCKET_TIMEOUT = 10.0
REDIS_POOL_WAIT = 5.0  # seconds a request waits for a free Redis connection before a 503
BLOCKING_THREADS = 32  # the blocking pool of each process (see open_services)
POOL_START_TIMEOUT = 10.0  # seconds a pool's first tasks wait for all its threads (started_pool)


@dataclass
class Services:
    """Everything a handler or worker needs, created once per process and closed at stop."""

    settings: Settings
    redis: aioredis.Redis
    index: Index
    queue: JobQueue
    api_keys: KeyStore
    stores: ActiveStore  # the blob store drivers, and which is active (the Redis record, else CASIMG_STORAGE)
    rate: RateLimiter
    auth_failures: AuthFailures
    variants: VariantStore
    placeholders: PlaceholderQueue
    fetcher: Fetcher | None = None
    worker: Worker | None = None
    metrics: Metrics | None = None

    @property
    def blobs(self) -> Storage:
        """The active blob store's driver: reads and deletes go there (storage/active.py)."""
        return self.stores.active

    async def close(self) -> None:
        """Each part stops in a bounded time: a part that does not (a cancellation swallowed inside a
        Redis command, a future nothing will resolve) is logged with where it waits and left behind, so a
        stop never hangs."""
        if self.worker is not None:
            await _bounded("the worker", self.worker.stop(self.settings.shutdown_grace),
                           self.settings.shutdown_grace + STOP_PART_TIMEOUT)
        if self.fetcher is not None:
            await _bounded("the downloads' HTTP client", self.fetcher.close())
        await _bounded("the render pool", asyncio.to_thread(self.variants.close))  # its workers reaped
        await _bounded("the blob stores", self.stores.close())
        await _bounded("the Redis client", self.redis.aclose())


async def _bounded(part: str, step: Awaitable[Any], seconds: float = STOP_PART_TIMEOUT) -> None:
    task = asyncio.ensure_future(step)
    done, _ = await asyncio.wait({task}, timeout=seconds)
    if done:
        task.result()
        return
    log.warning("stopping: %s did not stop within %.0f s; going on without it, where it waits: %s",
                part, seconds, "".join(_where(task)) or "unknown")
    task.cancel()  # not awaited: a part that swallows its cancellation must not hold the stop


def _where(task: asyncio.Future[Any]) -> list[str]:
    if not isinstance(task, asyncio.Task):
        return []
    frames = task.get_stack()
    return [f"{frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}; " for frame in frames]


def connect_redis(url: str, max_connections: int) -> aioredis.Redis:
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=REDIS_POOL_WAIT,
        decode_responses=True,
        socket_connect_timeout=REDIS_CONNECT_TIMEOUT,
        socket_timeout=REDIS_SOCKET_TIMEOUT,
    )
    pool.connection_class = packed_by_hiredis(pool.connection_class)
    return aioredis.Redis(connection_pool=pool)


def started_pool(threads: int, name: str) -> ThreadPoolExecutor:
    """A thread pool with all its threads running already.

    ThreadPoolExecutor starts a thread when a submit finds none idle, and that submit waits until the
    new thread runs. On the event loop, under the first ingest's load, with the GIL contended, those
    waits were a sizeable share of the loop's time (BENCHMARKS.md, "Figures behind design choices").
    Here each thread's first task waits for all the others, so each submit starts a thread; then all
    of them are idle.
    """
    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix=name)
    all_started = threading.Barrier(threads)
    for _ in range(threads):
        pool.submit(all_started.wait, POOL_START_TIMEOUT)
    return pool


async def open_services(settings: Settings, redis_url: str, with_worker: bool,
                        metrics: Metrics | None = None, follow_store: bool = True) -> Services:
    """Connect to Redis and build the services; with_worker adds the fetcher and a (not yet started) worker.

    follow_store: follow the active store record from now on (servers and workers); a short command reads
    it once.

    metrics: where the process counts (``Metrics.shared`` in ``casimg serve`` and ``worker``); by default
    counts of its own.
    """
    # Each in-flight download holds a connection only briefly, but requests and workers share the pool.
    # Blocking file work (blob reads, the downloads' validate-write-link step) waits on the disk far
    # more than it computes; asyncio's default of cores + 4 threads left downloads queueing for a thread.
    asyncio.get_running_loop().set_default_executor(started_pool(BLOCKING_THREADS, "casimg-io"))
    client = connect_redis(redis_url, settings.download_concurrency + 64)
    keyspace = KeySpace(settings.key_prefix)
    stores = ActiveStore(settings, client, keyspace, f"{socket.gethostname()}-{os.getpid()}-{os.urandom(3).hex()}")
    index = Index(client, keyspace, placeholders=settings.placeholders)
    metrics = metrics or Metrics()
    # The render pool's processes start with the first render (casimg serve starts them at its start).
    variants = VariantStore(VariantPolicy.from_settings(settings), RenderPool.from_settings(settings),
                            Relations(client, keyspace), index, lambda: stores.active, on_render=metrics.on_render,
                            on_hit=metrics.on_variant_hit)
    services = Services(
        settings=settings,
        redis=client,
        index=index,
        queue=JobQueue(client, keyspace, settings.job_ttl),
        api_keys=KeyStore(client, keyspace, settings.key_cache_ttl),
        stores=stores,
        rate=RateLimiter(client, keyspace, settings.rate_limit, settings.rate_burst),
        auth_failures=AuthFailures(client, keyspace, settings.auth_failure_limit),
        variants=variants,
        placeholders=PlaceholderQueue(client, keyspace),
        metrics=metrics,
    )
    await services.queue.ensure_group()
    await migrate(client, keyspace)  # an index of casimg 0.1 moves to the current layout before any use
    await stores.start(follow=follow_store)
    blobs = stores.active
    if with_worker:
        services.fetcher = Fetcher(
            tmp_dir=blobs.tmp_dir,
            max_bytes=settings.max_image_bytes,
            total_timeout=settings.fetch_timeout,
            connect_timeout=settings.connect_timeout,
            max_connections=settings.download_concurrency,
            max_per_host=settings.per_host_concurrency,
            max_per_domain=settings.per_domain_concurrency,
            max_redirects=settings.max_redirects,
            max_url_length=settings.max_url_length,
            allow_networks=settings.allow_networks,
            user_agent=settings.user_agent,
            opt_out_tags=settings.opt_out_tags,
        )
        if settings.robots_txt:
            services.fetcher.robots = Robots(client, keyspace, services.fetcher.fetch_robots, settings.robots_ttl)
        await services.fetcher.start()
        metrics = services.metrics
        pace = None
        if settings.origin_rate > 0 or settings.origin_backoff > 0:
            pace = OriginPace(client, keyspace, settings.origin_rate, settings.origin_burst,
                              settings.origin_backoff, settings.origin_backoff_max)
        # Every worker process delivers callbacks, each claimed by one process at a time (webhooks.py).
        # Without a secret none is accepted, and none is sent unsigned: callbacks queued before the secret
        # was removed wait for it to come back.
        webhooks = None
        if settings.webhook_secret:
            webhooks = Deliverer(client, keyspace, services.queue, services.fetcher, settings,
                                 on_result=metrics.on_webhook)
        services.worker = Worker(settings, services.queue, services.index, blobs, services.fetcher,
                                 on_outcome=metrics.on_outcome, on_bytes=metrics.on_bytes, pace=pace,
                                 webhooks=webhooks, stores=stores)
    return services


async def bootstrap_admin_key(settings: Settings, keys: KeyStore) -> None:
    """On the first start with no keys, register an admin key, so the API is usable and never open."""
    if settings.bootstrap_key:
        if await keys.create("admin", Scope.admin, key=settings.bootstrap_key, only_if_empty=True):
            log.info("registered the bootstrap key from CASIMG_BOOTSTRAP_KEY as admin key 'admin'")
        return
    key = await keys.create("admin", Scope.admin, only_if_empty=True)
    if key is None:
        return
    path = Path(settings.data_dir) / "admin.key"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(key + "\n")
    os.chmod(path, 0o600)
    log.info("created the first admin API key; it is in %s (mode 0600)", path.resolve())


@contextlib.contextmanager
def redis_for(settings: Settings, own_data_dir: bool) -> Iterator[str]:
    """The Redis URL to use: the configured one, or the data dir's embedded Redis, started if needed.

    own_data_dir: this process is `casimg serve` and takes the data dir's lock (then it also stops the
    embedded Redis on exit). Other commands use a running server's Redis, or start one just for
    themselves when no server owns the data dir.
    """
    if settings.redis_url:
        yield settings.redis_url
        return
    embedded = EmbeddedRedis(settings.data_dir, settings.redis_server, settings.appendfsync)
    lock = DataDirLock(settings.data_dir)
    if not own_data_dir and embedded.alive():
        yield embedded.url
        return
    with lock:
        how = embedded.start()
        log.info("embedded redis %s at %s", how, embedded.socket)
        try:
            yield embedded.url
        finally:
            embedded.stop()
