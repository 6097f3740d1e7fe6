"""The application: the services it is built from, ``make_app``, and the server's start and stop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
from dataclasses import dataclass
from pathlib import Path

import redis.asyncio as aioredis
import tornado.httpserver
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
from casimg.queue import JobQueue
from casimg.worker import Worker

log = logging.getLogger("casimg")

REDIS_CONNECT_TIMEOUT = 2.0  # a Redis that is down must turn into a quick 503, not a hung request
REDIS_SOCKET_TIMEOUT = 10.0
REDIS_POOL_WAIT = 5.0  # seconds a request waits for a free Redis connection before a 503


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
    if with_worker:
        services.fetcher = Fetcher(
            tmp_dir=blobs.tmp_dir,
            max_bytes=settings.max_image_bytes,
            total_timeout=settings.fetch_timeout,
            connect_timeout=settings.connect_timeout,
            max_connections=settings.download_concurrency,
            max_per_host=settings.per_host_concurrency,
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


async def serve(settings: Settings, redis_url: str) -> None:
    """Run the HTTP server (and, by default, the workers) until SIGTERM or SIGINT."""
    services = await open_services(settings, redis_url, with_worker=settings.workers)
    await bootstrap_admin_key(settings, services.keys)
    server = tornado.httpserver.HTTPServer(
        make_app(settings, services), max_body_size=settings.max_body_bytes, xheaders=False
    )
    server.listen(settings.port, settings.host)
    metrics_server = None
    if settings.metrics_port:
        metrics_server = tornado.httpserver.HTTPServer(make_metrics_app(services))
        metrics_server.listen(settings.metrics_port, settings.host)
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
