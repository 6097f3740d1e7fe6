"""The application: the services it is built from, ``make_app``, and the server's start and stop."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import re
import signal
import socket
import sys
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
import tornado.httpserver
import tornado.netutil
import tornado.web

from casimg import handlers
from casimg.blobs import BlobStore
from casimg.config import Settings
from casimg.embedded import DataDirLock, EmbeddedRedis
from casimg.fetcher import Fetcher
from casimg.index import Index, KeySpace
from casimg.keys import KeyStore, Scope
from casimg.limits import AuthFailures, RateLimiter
from casimg.metrics import Metrics
from casimg.migrate import migrate
from casimg.queue import JobQueue
from casimg.worker import Worker

log = logging.getLogger("casimg")

REDIS_CONNECT_TIMEOUT = 2.0  # a Redis that is down must turn into a quick 503, not a hung request
REDIS_SOCKET_TIMEOUT = 10.0
REDIS_POOL_WAIT = 5.0  # seconds a request waits for a free Redis connection before a 503
M_ARENA_MAX = -8  # glibc's mallopt parameter number (malloc.h)
MALLOC_ARENAS = 2  # see limit_malloc_arenas
BLOCKING_THREADS = 32  # the blocking pool of each process (see open_services)


def routes(services: Services, with_metrics: bool = True) -> list[tornado.web.URLSpec]:
    """The route table; /openapi.json documents exactly these (tests/test_openapi.py holds them together).

    Each handler gets its route's name, the label its requests are counted under in /metrics.
    """
    table: list[tuple[str, type[handlers.BaseHandler]]] = [
        (r"/healthz", handlers.HealthHandler),
        (r"/readyz", handlers.ReadyHandler),
        (r"/openapi\.json", handlers.OpenApiHandler),
        (r"/api/images/?", handlers.ImagesHandler),
        (r"/api/jobs/(?P<job_id>[^/]+)", handlers.JobHandler),
        (r"/api/image", handlers.ImageHandler),
        (r"/api/blobs/(?P<digest>[0-9a-f]{64})", handlers.BlobHandler),
    ]
    if with_metrics:
        table.append((r"/metrics", handlers.MetricsHandler))
    return [
        tornado.web.url(pattern, handler, {"services": services, "route": route_name(pattern)})
        for pattern, handler in table
    ]


def route_name(pattern: str) -> str:
    """The route as a label: /api/images/? -> /api/images, /api/jobs/(?P<job_id>...) -> /api/jobs/{job_id}."""
    name = re.sub(r"\(\?P<(\w+)>[^)]*\)", r"{\1}", pattern).replace("\\.", ".")
    return name.removesuffix("/?")


def make_app(settings: Settings, services: Services) -> tornado.web.Application:
    """The API; /metrics is part of it unless CASIMG_METRICS_PORT gives metrics a listener of their own."""
    return tornado.web.Application(
        routes(services, with_metrics=not settings.metrics_port),
        default_handler_class=handlers.NotFoundHandler,
        default_handler_args={"services": services},
        compress_response=False,
        log_function=handlers.log_request,
    )


def make_metrics_app(services: Services) -> tornado.web.Application:
    """/metrics alone, for CASIMG_METRICS_PORT."""
    return tornado.web.Application(
        [tornado.web.url(r"/metrics", handlers.MetricsHandler, {"services": services, "route": "/metrics"})],
        default_handler_class=handlers.NotFoundHandler,
        default_handler_args={"services": services},
        log_function=handlers.log_request,
    )


@dataclass
class Services:
    """Everything a handler or worker needs, created once per process and closed at stop."""

    settings: Settings
    redis: aioredis.Redis
    index: Index
    queue: JobQueue
    keys: KeyStore
    blobs: BlobStore
    rate: RateLimiter
    auth_failures: AuthFailures
    fetcher: Fetcher | None = None
    worker: Worker | None = None
    metrics: Metrics | None = None

    async def close(self) -> None:
        if self.worker is not None:
            await self.worker.stop(self.settings.shutdown_grace)
        if self.fetcher is not None:
            await self.fetcher.close()
        await self.redis.aclose()


def connect_redis(url: str, max_connections: int) -> aioredis.Redis:
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=REDIS_POOL_WAIT,
        decode_responses=True,
        socket_connect_timeout=REDIS_CONNECT_TIMEOUT,
        socket_timeout=REDIS_SOCKET_TIMEOUT,
    )
    return aioredis.Redis(connection_pool=pool)


async def open_services(settings: Settings, redis_url: str, with_worker: bool) -> Services:
    """Connect to Redis and build the services; with_worker adds the fetcher and a (not yet started) worker."""
    # Each in-flight download holds a connection only briefly, but requests and workers share the pool.
    # Blocking file work (blob reads, the downloads' validate-write-link step) waits on the disk far
    # more than it computes; asyncio's default of cores + 4 threads left downloads queueing for a thread.
    asyncio.get_running_loop().set_default_executor(
        ThreadPoolExecutor(max_workers=BLOCKING_THREADS, thread_name_prefix="casimg-io"))
    client = connect_redis(redis_url, settings.download_concurrency + 64)
    keyspace = KeySpace(settings.key_prefix)
    blobs = BlobStore(settings.data_dir)
    services = Services(
        settings=settings,
        redis=client,
        index=Index(client, keyspace),
        queue=JobQueue(client, keyspace, settings.job_ttl),
        keys=KeyStore(client, keyspace, settings.key_cache_ttl),
        blobs=blobs,
        rate=RateLimiter(client, keyspace, settings.rate_limit, settings.rate_burst),
        auth_failures=AuthFailures(client, keyspace, settings.auth_failure_limit),
        metrics=Metrics(),
    )
    # Every process makes sure of the directories it may write: a delete renames into trash/, and a
    # missing trash/ would leave the blob in place.
    blobs.create_dirs()
    await services.queue.ensure_group()
    await migrate(services.index)  # an index of casimg 0.1 moves to the current layout before any use
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
        )
        await services.fetcher.start()
        metrics = services.metrics
        services.worker = Worker(settings, services.queue, services.index, blobs, services.fetcher,
                                 on_outcome=metrics.on_outcome, on_bytes=metrics.on_bytes)
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
def redis_for(settings: Settings, own_data_dir: bool):
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


async def serve(
    settings: Settings,
    redis_url: str,
    sockets: list[socket.socket] | None = None,
    metrics_sockets: list[socket.socket] | None = None,
) -> None:
    """Run the HTTP server (and, by default, the workers) until SIGTERM or SIGINT.

    `sockets`, `metrics_sockets`: already bound listening sockets (``serve_processes``); None binds here.
    """
    services = await open_services(settings, redis_url, with_worker=settings.workers)
    await bootstrap_admin_key(settings, services.keys)
    server = tornado.httpserver.HTTPServer(
        make_app(settings, services), max_body_size=settings.max_body_bytes, xheaders=False
    )
    if sockets is None:
        server.listen(settings.port, settings.host)
    else:
        server.add_sockets(sockets)
    metrics_server = None
    if settings.metrics_port:
        metrics_server = tornado.httpserver.HTTPServer(make_metrics_app(services))
        if metrics_sockets is None:
            metrics_server.listen(settings.metrics_port, settings.host)
        else:
            metrics_server.add_sockets(metrics_sockets)
        log.info("metrics on http://%s:%d/metrics", settings.host, settings.metrics_port)
    if services.worker is not None:
        services.worker.start()
    log.info("casimg listening on http://%s:%d (data dir %s)", settings.host, settings.port, settings.data_dir)
    await _until_signalled()
    log.info("stopping: no new connections; finishing in-flight downloads")
    server.stop()
    if metrics_server is not None:
        metrics_server.stop()
    await services.close()
    await server.close_all_connections()
    log.info("stopped")


def limit_malloc_arenas() -> None:
    """Cap glibc's malloc arenas (MALLOC_ARENA_MAX=2), unless the environment chose a value.

    Each thread of the blocking pool that allocates a download's bytes gets its own arena, and freed
    blocks stay resident in it: an ingest of 5,000 images (scripts/bench.py) left the service at 279
    MiB RSS, 133 MiB with two arenas, at the same ingest rate (547 vs 560 images/s).
    """
    if os.environ.get("MALLOC_ARENA_MAX") or not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(M_ARENA_MAX, MALLOC_ARENAS)
    except (OSError, AttributeError):  # not glibc (musl has no mallopt): nothing to cap
        return


def run_loop(main: Coroutine[Any, Any, None]) -> None:
    """Run `main` on uvloop when it is installed (a dependency where it builds), else on asyncio's loop.

    Measured with the retrieval harness behind the nginx front, where casimg's per-request work is all
    that is left: 2,169 -> 2,752 requests/s; on the default deployment and on ingest it was even.
    """
    limit_malloc_arenas()
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
        return
    uvloop.run(main)


def serve_processes(settings: Settings, redis_url: str) -> int:
    """`casimg serve --processes N`: bind the port once, fork N servers (workers included) that share it.

    The parent only forwards SIGTERM and SIGINT and waits; when one child fails the others are stopped,
    so a supervisor sees the failure. Returns the exit status.
    """
    sockets = tornado.netutil.bind_sockets(settings.port, settings.host)
    # Each process has its own counters, so a scrape of a shared metrics port sees one process's share.
    metrics_sockets = (tornado.netutil.bind_sockets(settings.metrics_port, settings.host)
                       if settings.metrics_port else None)
    asyncio.run(_bootstrap_only(settings, redis_url))  # once, before any process answers requests
    children: set[int] = set()
    for _ in range(settings.processes):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child, which never returns here
            # Its own process group: a Ctrl-C at the terminal reaches the parent only, which forwards it
            # once; a second signal arriving after shutdown began would end the child uncleanly.
            os.setpgid(0, 0)
            status = 0
            try:
                run_loop(serve(settings, redis_url, sockets, metrics_sockets))
            except BaseException:
                log.exception("server process failed")
                status = 1
            finally:
                logging.shutdown()
                os._exit(status)
        children.add(pid)
    for sock in [*sockets, *(metrics_sockets or [])]:
        sock.close()

    def forward(signum: int, _frame: object) -> None:
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signum)

    previous = {signum: signal.signal(signum, forward) for signum in (signal.SIGTERM, signal.SIGINT)}
    failed = False
    try:
        while children:
            pid, status = os.wait()
            children.discard(pid)
            if os.waitstatus_to_exitcode(status) != 0 and not failed:
                failed = True
                log.error("server process %d exited with status %d; stopping the others",
                          pid, os.waitstatus_to_exitcode(status))
                forward(signal.SIGTERM, None)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return 1 if failed else 0


async def _bootstrap_only(settings: Settings, redis_url: str) -> None:
    services = await open_services(settings, redis_url, with_worker=False)
    try:
        await bootstrap_admin_key(settings, services.keys)
    finally:
        await services.close()


async def run_worker(settings: Settings, redis_url: str) -> None:
    """Only the download workers, for scaling out beside one or more servers."""
    services = await open_services(settings, redis_url, with_worker=True)
    assert services.worker is not None
    metrics_server = None
    if settings.metrics_port:  # a worker's download counters live in the worker: it serves its own /metrics
        metrics_server = tornado.httpserver.HTTPServer(make_metrics_app(services))
        metrics_server.listen(settings.metrics_port, settings.host)
        log.info("metrics on http://%s:%d/metrics", settings.host, settings.metrics_port)
    services.worker.start()
    log.info("casimg worker %s running", services.worker.name)
    await _until_signalled()
    if metrics_server is not None:
        metrics_server.stop()
    await services.close()


async def _until_signalled() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.remove_signal_handler(signum)
