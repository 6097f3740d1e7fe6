"""The placeholder filler: makes the placeholders of stored contents after the store, off the ingest's path.

Each ``casimg serve`` or ``casimg worker`` host with placeholders on runs one filler process beside it
(``FillerProcess``, restarted if it dies), at the lowest CPU priority the system has (SCHED_IDLE, else
nice 19): a busy ingest keeps the CPU, and the placeholders follow when there is CPU to spare. Fillers of
all hosts share the queue in Redis (placeholder_queue.py): a claimed batch is leased, so one that dies,
or is killed, mid-batch leaves its batch to the next claim, and a content deleted meanwhile gets nothing.

``Filler`` is the loop itself, which also runs inside a test's event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import pickle
import signal
import subprocess
import sys
import time
from collections.abc import Callable

from casimg.config import Settings
from casimg.errors import REDIS_ERRORS, NotFound, Unrenderable
from casimg.placeholder import placeholder
from casimg.placeholder_queue import PlaceholderQueue
from casimg.services import open_services
from casimg.storage import BlobNotFound, Storage, StorageUnavailable
from casimg.variant_store import source_for_render

log = logging.getLogger("casimg.filler")

BATCH = 16  # contents claimed at once: one claim's round trip per 16 placeholders
IDLE_POLL = 0.5  # seconds between claims while the queue is empty (one small Redis call each)
RESTART_DELAY = 1.0  # seconds before a filler process that died is started again
# Seconds a stop waits for the filler to end on SIGTERM before it kills it. At the idle priority it runs
# at, a machine whose cores are busy may give it no CPU for seconds, and a longer wait was the whole of a
# worker's stop under load (BENCHMARKS.md, "Figures behind design choices"). A kill loses nothing: the
# batch it was on is leased, and comes back to the next claim.
STOP_GRACE = 2.0
PR_SET_PDEATHSIG = 1  # prctl option (linux/prctl.h): a signal for this process when its parent ends
NICEST = 19


class Filler:
    """Claims leased batches from the queue and fills them, until `stop` is set."""

    def __init__(self, queue: PlaceholderQueue, blobs: Callable[[], Storage], lease: float) -> None:
        self.queue = queue
        self.blobs = blobs  # the active store, asked each time (a store migration is followed)
        self.lease = lease

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                filled = await self.fill_batch()
            except (*REDIS_ERRORS, OSError, StorageUnavailable) as exc:  # Redis or the store away: the
                # batch's lease brings it back
                log.warning("placeholder filler: %s", exc)
                filled = 0
            if not filled:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), IDLE_POLL)

    async def fill_batch(self) -> int:
        """One claim and its placeholders. Returns how many entries it ended."""
        digests = await self.queue.claim(BATCH, self.lease)
        for digest in digests:
            try:
                # An object store that does not answer raises StorageUnavailable: the batch waits for
                # its lease to end (run).
                source = await source_for_render(self.blobs(), digest)
                # Run here, not in a thread: this process does nothing else, and at its priority a
                # thread would only add the GIL's hand-offs.
                made = placeholder(source)
            except (BlobNotFound, NotFound):  # deleted since it was queued: the entry goes, nothing is kept
                await self.queue.drop(digest)
                continue
            except (*REDIS_ERRORS, StorageUnavailable, MemoryError):
                raise
            except (Unrenderable, ValueError, SyntaxError, EOFError) as exc:  # the bytes: none can ever be made
                log.info("placeholder of %s: none can be made: %s", digest, exc)
                made = None
            except OSError as exc:
                if exc.errno is not None:  # the system's (EIO, EMFILE, ...), not the image's: the lease retries
                    raise
                made = None  # Pillow's own (a truncated or unreadable image)
            except Exception:  # an image no decode path expected must not end the filler, which
                # would be restarted, claim the same entry when its lease ended, and end again
                log.exception("placeholder of %s: none can be made", digest)
                made = None
            await self.queue.fill(digest, made)
        return len(digests)


def lower_priority() -> None:
    """The lowest CPU priority for this process (and the threads it makes from now on): SCHED_IDLE
    runs only when no other task wants the CPU; where it is refused, nice 19."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        with contextlib.suppress(OSError):
            os.nice(NICEST - os.nice(0))


def _end_with_parent() -> None:
    """SIGTERM for this process when the process that started it ends, even by kill -9 (Linux)."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


async def run(settings: Settings, redis_url: str) -> None:
    """The filler process's life: its services, the loop until SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    # serve_processes may start this process while it holds them blocked, and exec keeps the mask.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, (signal.SIGTERM, signal.SIGINT))
    services = await open_services(settings, redis_url, with_worker=False)
    try:
        filler = Filler(services.placeholders, lambda: services.blobs,
                        settings.placeholder_lease)
        await filler.run(stop)
    finally:
        await services.close()


def main() -> None:
    """`python -m casimg.filler`: the settings and Redis URL come pickled on stdin (not in the
    environment or the command line, where other users could read secrets)."""
    lower_priority()
    _end_with_parent()
    settings, redis_url, parent = pickle.loads(sys.stdin.buffer.read())
    if os.getppid() != parent:  # the parent went before the death signal was asked for: nothing would send it
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    asyncio.run(run(settings, redis_url))


class FillerProcess:
    """One host's filler process: started, restarted when it dies, stopped."""

    def __init__(self, settings: Settings, redis_url: str) -> None:
        self.settings = settings
        self.redis_url = redis_url
        self.process: subprocess.Popen[bytes] | None = None
        self.stopping = False
        self.started = 0.0

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def start(self) -> None:
        self.started = time.monotonic()
        # Not in the host's shared metrics (metrics.SharedDir): prometheus_client would write files of its
        # own there for this process, which counts nothing /metrics shows.
        env = {name: value for name, value in os.environ.items() if name != "PROMETHEUS_MULTIPROC_DIR"}
        self.process = subprocess.Popen([sys.executable, "-m", "casimg.filler"], stdin=subprocess.PIPE, env=env)
        assert self.process.stdin is not None
        self.process.stdin.write(pickle.dumps((self.settings, self.redis_url, os.getpid())))
        self.process.stdin.close()
        log.info("placeholder filler started (pid %d)", self.process.pid)

    def died(self, status: int | None = None) -> None:
        """The process ended (reaped elsewhere with `status`, or seen by ``poll``): start another."""
        if self.stopping:
            return
        log.warning("placeholder filler %s ended (status %s); starting another", self.pid, status)
        time.sleep(max(0.0, self.started + RESTART_DELAY - time.monotonic()))  # one that fails at start
        self.start()

    async def watch(self) -> None:
        """In an event loop: restart the process whenever it dies, until ``stop``."""
        while not self.stopping:
            await asyncio.sleep(RESTART_DELAY)
            if self.process is not None and self.process.poll() is not None and not self.stopping:
                self.died(self.process.returncode)

    def stop(self, timeout: float = STOP_GRACE) -> None:
        self.stopping = True
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.process.terminate()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        except ChildProcessError:  # reaped by serve_processes' os.wait
            pass


if __name__ == "__main__":
    main()
