"""The render pool: variants and placeholders made in worker processes, off the event loop, in bounded time.

See ``RenderPool``. The work itself is casimg/render.py (``render``) and casimg/placeholder.py. A pool of
one worker also parses and matches large robots.txt files (politeness.Robots), whose work in a thread
contended with the event loop for the GIL.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import multiprocessing
import os
import select
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from casimg import affinity
from casimg.errors import RenderTimeout, Unavailable
from casimg.placeholder import placeholder
from casimg.render import Rendered, Source, render
from casimg.variants import VariantSpec

if TYPE_CHECKING:
    from casimg.config import Settings

T = TypeVar("T")
CLOSE_WAIT = 5.0  # seconds close() waits for the killed workers to be reaped and the pool's thread to end


def _end_with(owner: int) -> None:
    """Exit when the process that owns the pool has gone, however it went (in each worker, at its start).

    A pool's workers would otherwise outlive a server killed with SIGKILL (or any end that skips
    ``close()``): they wait on a queue whose write end they hold themselves, and they hold the
    forkserver's liveness pipe (multiprocessing passes it to every child), so the forkserver never
    sees its owner go either. One daemon thread per worker waits on the owner's pidfd."""
    try:
        watched = os.pidfd_open(owner)
    except ProcessLookupError:
        os._exit(0)
    except OSError:  # no pidfd (Linux before 5.3): look once a second
        def poll() -> None:
            while True:
                time.sleep(1.0)
                try:
                    os.kill(owner, 0)
                except ProcessLookupError:
                    os._exit(0)
        threading.Thread(target=poll, name="casimg-owner-watch", daemon=True).start()
        return

    def wait() -> None:
        select.select([watched], [], [])
        os._exit(0)
    threading.Thread(target=wait, name="casimg-owner-watch", daemon=True).start()


def _start_worker(owner: int, cpus: frozenset[int] | None) -> None:
    """Each worker's initializer: on the CPUs its server could use before it was pinned (affinity.py), and
    ending with its owner (``_end_with``)."""
    affinity.release(cpus)
    _end_with(owner)


def _ready() -> int:
    """A no-op run in each new worker so the pool's processes exist (and have imported Pillow) early."""
    return os.getpid()


class RenderPool:
    """Renders in worker processes, at most ``workers`` at once, each within ``timeout`` seconds.

    Processes, not threads: a thread cannot be stopped, so a render that runs away (a pathological
    image, an encoder stuck on a frame) would hold its thread and its memory until it finished, and
    enough of them would stall every render. A process can be killed. On a timeout the pool kills its
    workers and starts new ones: the cost is that start (the forkserver forks a process that has
    already imported Pillow, tens of milliseconds) and the other renders that were running in the
    killed pool, which are submitted once more to the new one. The timeout counts only the render:
    a render is submitted only when a worker is free (``_slots``), so none waits inside the pool.

    Workers come from a forkserver, not a fork of the server: forking a process that runs an event
    loop, Redis and HTTP clients and their threads copies their locks in whatever state they are.
    Memory is bounded by refusal (``render``'s estimate, ``max_memory``) rather than an rlimit, which
    would turn an over-budget image into a crash rather than a 422.

    Owned by whoever holds the service's lifetime: ``start()`` at start, ``close()`` at stop.
    """

    def __init__(self, workers: int, timeout: float, *, max_memory: int, max_frames: int = 1000) -> None:
        self.workers = workers
        self.timeout = timeout
        self.max_memory = max_memory
        self.max_frames = max_frames
        self.restarts = 0  # pools killed after a timeout or a dead worker, for metrics
        self._executor: concurrent.futures.ProcessPoolExecutor | None = None
        self._slots: asyncio.Semaphore | None = None
        self._slots_loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings) -> RenderPool:
        return cls(settings.render_workers, settings.render_timeout, max_memory=settings.render_max_memory,
                   max_frames=settings.max_frames)

    @property
    def started(self) -> bool:
        return self._executor is not None

    def start(self) -> None:
        with self._lock:
            if self._executor is None:
                self._executor = self._new_executor()

    def _new_executor(self) -> concurrent.futures.ProcessPoolExecutor:
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["casimg.render_pool"])  # Pillow imported once, in the server
        executor = concurrent.futures.ProcessPoolExecutor(self.workers, mp_context=context,
                                                        initializer=_start_worker,
                                                        initargs=(os.getpid(), affinity.before_pin()))
        for _ in range(self.workers):
            executor.submit(_ready)
        return executor

    def close(self) -> None:
        """Stop the pool for good, and wait (``CLOSE_WAIT`` at most) until its workers are reaped and its
        manager thread has ended: the pool's queues hold named semaphores, unlinked only when the queues
        are freed, so a process that exits before then leaves them to the resource tracker, which warns
        of "leaked semaphore objects" (and removes them) when the process stops."""
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is None:
            return
        manager = getattr(executor, "_executor_manager_thread", None)
        deadline = time.monotonic() + CLOSE_WAIT
        for thread in (_kill(executor), manager):
            if thread is not None:
                thread.join(max(0.0, deadline - time.monotonic()))

    def pids(self) -> list[int]:
        """The worker processes' ids (for tests and diagnostics)."""
        processes = getattr(self._executor, "_processes", None) or {}
        return sorted(processes)

    def _recycle(self, broken: concurrent.futures.ProcessPoolExecutor) -> None:
        with self._lock:
            if self._executor is not broken:
                return  # another render already replaced it
            self.restarts += 1
            self._executor = self._new_executor()
        _kill(broken)

    def _semaphore(self) -> asyncio.Semaphore:
        loop = asyncio.get_running_loop()
        if self._slots is None or self._slots_loop is not loop:
            self._slots, self._slots_loop = asyncio.Semaphore(self.workers), loop
        return self._slots

    async def run(self, function: Callable[..., T], *args: Any, time_limit: float | None = None) -> T:
        """``function(*args)`` in a worker, or RenderTimeout after ``time_limit`` s (default: ``timeout``)."""
        limit = self.timeout if time_limit is None else time_limit
        async with self._semaphore():
            for attempt in (1, 2):
                executor = self._executor
                if executor is None:
                    raise Unavailable("the render pool is not running")
                try:
                    future = executor.submit(function, *args)
                except (concurrent.futures.process.BrokenProcessPool, RuntimeError):
                    self._recycle(executor)  # broken, or shut down by another render's recycle
                    continue
                try:
                    return await asyncio.wait_for(asyncio.wrap_future(future), limit)
                except TimeoutError:
                    self._recycle(executor)
                    raise RenderTimeout(f"the render took more than {limit:g} s (render_timeout)") from None
                except concurrent.futures.process.BrokenProcessPool:
                    # Killed under this render by another one's timeout, or a worker died (the kernel's
                    # out-of-memory killer): once more on a fresh pool, then give up.
                    self._recycle(executor)
                    if attempt == 2:
                        break
        raise Unavailable("the render worker died")

    async def render(self, source: Source, spec: VariantSpec, *, time_limit: float | None = None) -> Rendered:
        return await self.run(_render_in_worker, source, spec, self.max_memory, self.max_frames, time_limit=time_limit)

    async def placeholder(self, source: Source, *, time_limit: float | None = None) -> str:
        return await self.run(placeholder, source, time_limit=time_limit)


def _render_in_worker(source: Source, spec: VariantSpec, max_memory: int, max_frames: int) -> Rendered:
    return render(source, spec, max_memory=max_memory, max_frames=max_frames)


def _kill(executor: concurrent.futures.ProcessPoolExecutor) -> threading.Thread:
    """Stop a pool now, running work included (shutdown alone would wait for it), and reap its workers in
    a thread, which is returned."""
    processes = list((getattr(executor, "_processes", None) or {}).values())
    for process in processes:
        process.kill()
    executor.shutdown(wait=False, cancel_futures=True)
    reaper = threading.Thread(target=lambda: [process.join(5) for process in processes], daemon=True)
    reaper.start()
    return reaper
