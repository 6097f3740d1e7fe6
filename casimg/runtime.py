"""How casimg processes run: ``casimg serve`` (one process per core by default, forked over one port;
``--processes 1`` forks nothing), ``casimg worker``, the event loop they run on, their signals and their
metrics listener. What they serve is built elsewhere: the services in services.py, the HTTP application
in app.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import socket
import sys
from collections.abc import Coroutine
from typing import Any

import tornado.httpserver
import tornado.netutil

from casimg import tracing
from casimg.app import make_app, make_metrics_app
from casimg.config import Settings
from casimg.metrics import Metrics
from casimg.services import Services, bootstrap_admin_key, open_services

log = logging.getLogger("casimg")

M_ARENA_MAX = -8  # glibc's mallopt parameter number (malloc.h)
MALLOC_ARENAS = 2  # see limit_malloc_arenas


async def serve(
    settings: Settings,
    redis_url: str,
    sockets: list[socket.socket] | None = None,
    metrics_sockets: list[socket.socket] | None = None,
) -> None:
    """Run the HTTP server (and, by default, the workers) until SIGTERM or SIGINT.

    `sockets`, `metrics_sockets`: already bound listening sockets (``serve_processes``); None binds here.
    """
    tracing.setup()  # before the application and the download session exist: they are instrumented as made
    metrics = Metrics.shared(settings.data_dir)
    services = await open_services(settings, redis_url, with_worker=settings.workers, metrics=metrics)
    await _check_store(services)
    await bootstrap_admin_key(settings, services.api_keys)
    server = tornado.httpserver.HTTPServer(
        make_app(settings, services), max_body_size=settings.max_body_bytes, xheaders=False
    )
    if sockets is None:
        server.listen(settings.port, settings.host)
    else:
        server.add_sockets(sockets)
    metrics_server = _metrics_listener(settings, services, metrics_sockets)
    if services.worker is not None:
        services.worker.start()
        metrics.start_publishing(services.worker)
    log.info("casimg listening on http://%s:%d (data dir %s)", settings.host, settings.port, settings.data_dir)
    await _until_signalled()
    log.info("stopping: no new connections; finishing in-flight downloads")
    server.stop()
    if metrics_server is not None:
        metrics_server.stop()
    await services.close()
    await metrics.close()
    await server.close_all_connections()
    tracing.shutdown()
    log.info("stopped")


def _metrics_listener(
    settings: Settings, services: Services, sockets: list[socket.socket] | None = None
) -> tornado.httpserver.HTTPServer | None:
    """/metrics on CASIMG_METRICS_PORT, for serve and worker alike; None when it is served on the API port."""
    if not settings.metrics_port:
        return None
    server = tornado.httpserver.HTTPServer(make_metrics_app(services))
    if sockets is None:
        server.listen(settings.metrics_port, settings.host)
    else:
        server.add_sockets(sockets)
    log.info("metrics on http://%s:%d/metrics", settings.host, settings.metrics_port)
    return server


def limit_malloc_arenas() -> None:
    """Cap glibc's malloc arenas (MALLOC_ARENA_MAX=2), unless the environment chose a value.

    Each thread of the blocking pool that allocates a download's bytes gets its own arena, and freed
    blocks stay resident in it: with two arenas an ingest leaves the service at half the RSS, at the
    same rate (BENCHMARKS.md, "Figures behind design choices").
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

    It pays where casimg's per-request work is all that is left, behind the nginx front; on the default
    deployment and on ingest the two loops measured even (BENCHMARKS.md, "Figures behind design choices").
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
    # Every process counts into the data dir's shared metrics, so any of them may answer a scrape.
    metrics_sockets = (tornado.netutil.bind_sockets(settings.metrics_port, settings.host)
                       if settings.metrics_port else None)
    asyncio.run(_bootstrap_only(settings, redis_url))  # once, before any process answers requests
    children: set[int] = set()
    for _ in range(settings.process_count):
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
        await bootstrap_admin_key(settings, services.api_keys)
    finally:
        await services.close()


async def run_worker(settings: Settings, redis_url: str) -> None:
    """Only the download workers, for scaling out beside one or more servers."""
    tracing.setup()
    # On the server's host its downloads count in the server's /metrics; elsewhere it serves its host's own.
    metrics = Metrics.shared(settings.data_dir)
    services = await open_services(settings, redis_url, with_worker=True, metrics=metrics)
    await _check_store(services)
    assert services.worker is not None
    metrics_server = _metrics_listener(settings, services)
    services.worker.start()
    metrics.start_publishing(services.worker)
    log.info("casimg worker %s running", services.worker.name)
    await _until_signalled()
    if metrics_server is not None:
        metrics_server.stop()
    await services.close()
    await metrics.close()
    tracing.shutdown()


async def _check_store(services: Services) -> None:
    """Refuse to start beside an object store that is not there: a missing bucket, refused credentials or
    an endpoint down end the process with the reason (StorageUnavailable), before it takes any work. A
    blob directory is checked by /readyz only, as before: a disk that turns read-only is a state to report,
    not a reason to stay down."""
    if services.blobs.kind == "file":
        return
    try:
        await services.blobs.check()
    except BaseException:
        await services.close()
        raise


async def _until_signalled() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.remove_signal_handler(signum)
