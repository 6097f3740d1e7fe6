"""How casimg processes run: ``casimg serve`` (one process per core by default, forked over one port;
``--processes 1`` forks nothing), ``casimg worker``, the event loop they run on, their signals and their
metrics listener. What they serve is built elsewhere: the services in services.py, the HTTP application
in app.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import logging
import os
import signal
import socket
import sys
from collections.abc import Coroutine
from typing import Any, TypeVar

import tornado.httpserver
import tornado.netutil

from casimg import affinity, tracing
from casimg.app import make_app, make_metrics_app
from casimg.config import Settings
from casimg.filler import FillerProcess
from casimg.metrics import Metrics
from casimg.services import Services, bootstrap_admin_key, open_services

log = logging.getLogger("casimg")
T = TypeVar("T")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)

M_ARENA_MAX = -8  # glibc's mallopt parameter number (malloc.h)
MALLOC_ARENAS = 2  # see limit_malloc_arenas
# The collector's young generation runs after this many more container objects than it last saw
# (Python's default is 700): see tune_gc.
GC_YOUNG_THRESHOLD = 10_000


async def serve(
    settings: Settings,
    redis_url: str,
    sockets: list[socket.socket] | None = None,
    metrics_sockets: list[socket.socket] | None = None,
    own_filler: bool = True,
) -> None:
    """Run the HTTP server (and, by default, the workers) until SIGTERM or SIGINT.

    `sockets`, `metrics_sockets`: already bound listening sockets (``serve_processes``); None binds here.
    `own_filler`: start the host's placeholder filler (with placeholders on); serve_processes starts one
    for all its processes instead.
    """
    stop = _stop_on_signals()  # first: a signal during the startup below stops the server once it is up
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
    # The render processes start now, beside the first requests, rather than under the first variant's.
    pool_start = asyncio.ensure_future(services.variants.start()) if settings.variants != "off" else None
    if services.worker is not None:
        services.worker.start()
        metrics.start_publishing(services.worker)
    filler = _start_filler(settings, redis_url) if own_filler else None
    log.info("casimg listening on http://%s:%d (data dir %s)", settings.host, settings.port, settings.data_dir)
    await _until_signalled(stop)
    if pool_start is not None:
        await asyncio.gather(pool_start, return_exceptions=True)
    log.info("stopping: no new connections; finishing in-flight downloads")
    await _stop_filler(filler)
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


def tune_gc() -> None:
    """Have the cycle collector's young generation wait for 10,000 new container objects instead of 700,
    and skip what the imports made.

    A download holds its request, response, buffers, futures and task while in flight, and reference
    counting frees them when it ends. With Python's default threshold a young collection ran every 700
    more container objects: about 200 times per 3,000 images, at 0.25 ms each, finding nothing to
    collect, and promoting the live downloads to the older generations, whose full collections then
    walked every object of the process. Together 4.5-5.5% of a server's CPU during an ingest; with this
    threshold 3 collections and 5-7 ms per 3,000 images (BENCHMARKS.md, "Figures behind design
    choices"). Cycles are still collected, at most 10,000 container objects later. `gc.freeze` moves
    what exists now (modules, classes, settings) out of the collector's sight for good: full collections
    then walk only what the process made since.
    """
    gen1, gen2 = gc.get_threshold()[1:]
    gc.set_threshold(GC_YOUNG_THRESHOLD, gen1, gen2)
    gc.freeze()


def run_loop(main: Coroutine[Any, Any, T]) -> T:
    """Run `main` on uvloop when it is installed (a dependency where it builds), else on asyncio's loop;
    what it returns. The process's malloc and cycle collector are set up first (limit_malloc_arenas,
    tune_gc).

    It pays where casimg's per-request work is all that is left, behind the nginx front; on the default
    deployment and on ingest the two loops measured even (BENCHMARKS.md, "Figures behind design choices").
    """
    limit_malloc_arenas()
    tune_gc()
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


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
    filler = FillerProcess(settings, redis_url) if settings.placeholders else None

    def forward(signum: int, _frame: object) -> None:
        if filler is not None and filler.process is not None:
            filler.stopping = True
            with contextlib.suppress(ProcessLookupError):
                os.kill(filler.process.pid, signal.SIGTERM)
        for child in list(children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signum)

    # Until each process handles them, SIGTERM and SIGINT are held back (blocked), not left to their
    # default action, which ends a process on the spot: the parent lets them in once every child is
    # forked and forwards them to all; a child inherits the mask and lets them in when its event loop
    # handles them (_stop_on_signals), so one sent while it starts stops it once it is up.
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    previous = {signum: signal.signal(signum, forward) for signum in STOP_SIGNALS}
    try:
        return _fork_and_wait(settings, redis_url, sockets, metrics_sockets, children, previous, forward, filler)
    finally:
        if filler is not None:
            filler.stop()
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _fork_and_wait(settings: Settings, redis_url: str, sockets: list[socket.socket],
                   metrics_sockets: list[socket.socket] | None, children: set[int],
                   previous: dict[int, Any], forward: Any, filler: FillerProcess | None) -> int:
    """serve_processes' forks and wait, with SIGTERM and SIGINT blocked on entry. The host's placeholder
    filler, if any, starts after the forks (no server process inherits it) and is restarted if it dies."""
    cpus = affinity.serve_plan(settings.process_count, settings.pin_processes)
    for index in range(settings.process_count):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child, which never returns here
            if cpus is not None and not affinity.pin(cpus[index]):  # before any thread: each inherits it
                log.warning("server process %d could not be pinned to CPU %d; it runs on any", os.getpid(),
                            cpus[index])
            for signum, handler in previous.items():  # the parent's forwarding is not the child's to run
                signal.signal(signum, handler)
            # Its own process group: a Ctrl-C at the terminal reaches the parent only, which forwards it
            # once; a second signal arriving after shutdown began would end the child uncleanly.
            os.setpgid(0, 0)
            status = 0
            try:
                run_loop(serve(settings, redis_url, sockets, metrics_sockets, own_filler=False))
            except BaseException:
                log.exception("server process failed")
                status = 1
            finally:
                logging.shutdown()
                os._exit(status)
        children.add(pid)
    for sock in [*sockets, *(metrics_sockets or [])]:
        sock.close()
    if filler is not None:
        filler.start()
    failed = False
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # one sent meanwhile is forwarded now
    while children:
        pid, status = os.wait()
        if filler is not None and pid == filler.pid:
            filler.process.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
            filler.died(filler.process.returncode)
            continue
        children.discard(pid)
        if os.waitstatus_to_exitcode(status) != 0 and not failed:
            failed = True
            log.error("server process %d exited with status %d; stopping the others",
                      pid, os.waitstatus_to_exitcode(status))
            forward(signal.SIGTERM, None)
    return 1 if failed else 0


async def _bootstrap_only(settings: Settings, redis_url: str) -> None:
    services = await open_services(settings, redis_url, with_worker=False)
    try:
        await bootstrap_admin_key(settings, services.api_keys)
    finally:
        await services.close()


async def run_worker(settings: Settings, redis_url: str) -> None:
    """Only the download workers, for scaling out beside one or more servers."""
    stop = _stop_on_signals()
    tracing.setup()
    # On the server's host its downloads count in the server's /metrics; elsewhere it serves its host's own.
    metrics = Metrics.shared(settings.data_dir)
    services = await open_services(settings, redis_url, with_worker=True, metrics=metrics)
    await _check_store(services)
    assert services.worker is not None
    metrics_server = _metrics_listener(settings, services)
    services.worker.start()
    metrics.start_publishing(services.worker)
    filler = _start_filler(settings, redis_url)
    log.info("casimg worker %s running", services.worker.name)
    await _until_signalled(stop)
    await _stop_filler(filler)
    if metrics_server is not None:
        metrics_server.stop()
    await services.close()
    await metrics.close()
    tracing.shutdown()


def _start_filler(settings: Settings, redis_url: str) -> tuple[FillerProcess, asyncio.Task[None]] | None:
    """The host's placeholder filler process (filler.py), watched and restarted if it dies; None with
    placeholders off."""
    if not settings.placeholders:
        return None
    filler = FillerProcess(settings, redis_url)
    filler.start()
    return filler, asyncio.ensure_future(filler.watch())


async def _stop_filler(started: tuple[FillerProcess, asyncio.Task[None]] | None) -> None:
    if started is None:
        return
    filler, watch = started
    filler.stopping = True
    watch.cancel()
    await asyncio.to_thread(filler.stop)


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


def _stop_on_signals() -> asyncio.Event:
    """An event SIGTERM and SIGINT set from now on; then lets them in, if serve_processes held them back
    (a child is forked with them blocked, so one sent while it starts waits for this, never kills it)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in STOP_SIGNALS:
        loop.add_signal_handler(signum, stop.set)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    return stop


async def _until_signalled(stop: asyncio.Event) -> None:
    await stop.wait()
    loop = asyncio.get_running_loop()
    for signum in STOP_SIGNALS:
        loop.remove_signal_handler(signum)
