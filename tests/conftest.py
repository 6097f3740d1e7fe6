"""Fixtures: a real redis-server, a real origin, and a real casimg app in the test's IOLoop.

One redis-server runs for the whole session on a unix socket in a temp dir; each test gets its own
key prefix, so tests never see each other's keys and nothing needs flushing.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import itertools
import json
import os
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import tornado.httpclient
from PIL import Image

from bench.procs import start_redis_server
from casimg.app import make_app
from casimg.config import Settings, load_settings
from casimg.filler import Filler
from casimg.index import Index
from casimg.keys import Scope
from casimg.schema import KeySpace
from casimg.services import Services, connect_redis, open_services
from casimg.storage.file import FileStore
from tests.origin import Origin
from tests.procs import Processes, S3Endpoint

_prefixes = itertools.count()


class RedisProcess:
    """A redis-server child on a unix socket, append-only file on, that a test may stop and start."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.socket = directory / "redis.sock"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def start(self) -> RedisProcess:
        self.process = start_redis_server(self.dir, "--appendonly", "yes")
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
            self.process = None

    def client(self) -> redis.Redis:
        return redis.Redis(unix_socket_path=str(self.socket), decode_responses=True)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    server = RedisProcess(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Endpoint]:
    """An S3 endpoint for the session: moto_server on loopback, or the bucket CASIMG_S3_* name."""
    endpoint = S3Endpoint(tmp_path_factory.mktemp("s3"))
    yield endpoint
    endpoint.stop()


@pytest.fixture
def procs() -> Iterator[Processes]:
    """casimg processes a test starts (tests/procs.py), stopped at its end whatever happened."""
    tracked = Processes()
    yield tracked
    tracked.cleanup()


@pytest.fixture(scope="session")
def origin() -> Iterator[Origin]:
    with Origin() as server:
        yield server


@pytest.fixture
def world(io_loop: Any, redis_server: RedisProcess, tmp_path: Path) -> Iterator[tuple[FileStore, Index]]:
    """A blob store in the test's temp dir and an index under a key prefix of its own."""
    client = connect_redis(redis_server.url, 8)
    blobs = FileStore(tmp_path)
    blobs.create_dirs()
    yield blobs, Index(client, KeySpace(f"world-{os.urandom(4).hex()}:"))
    io_loop.run_sync(client.aclose)


def png(seed: int) -> bytes:
    """A small PNG whose bytes differ for each seed below 65,536."""
    out = io.BytesIO()
    Image.new("RGB", (4, 3), (seed % 256, seed // 256, 0)).save(out, "PNG")
    return out.getvalue()


@pytest.fixture
def settings(tmp_path: Path, redis_server: RedisProcess) -> Settings:
    """Settings for one test: its own data dir and key prefix, downloads allowed from 127.0.0.1 only."""
    return make_settings(tmp_path / "data", redis_server.url)


def make_settings(data_dir: Path, redis_url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "data_dir": data_dir,
        "redis_url": redis_url,
        "key_prefix": f"test{next(_prefixes)}-{time.time_ns()}:",
        "allow_networks": "127.0.0.1/32",
        "fetch_timeout": 5,
        "connect_timeout": 2,
        "worker_heartbeat": 2,
        "shutdown_grace": 2,
        "key_cache_ttl": 0,
        # Tests download hundreds of images from the one local origin; tests/test_politeness.py sets a rate.
        "origin_rate": 0,
    }
    values.update(overrides)
    return load_settings(environ={}, overrides=values)


@pytest.fixture
def services(io_loop: Any, settings: Settings) -> Iterator[Services]:
    """The services of one casimg process, workers running in the test's IOLoop."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)

    async def start() -> Services:
        built = await open_services(settings, settings.redis_url, with_worker=True)
        assert built.worker is not None
        built.worker.start()
        return built

    built = io_loop.run_sync(start)
    # The placeholder filler's loop, as a filler process runs it, in the test's IOLoop.
    stop = asyncio.Event()
    filler = (io_loop.run_sync(lambda: _start_filler(built, stop)) if settings.placeholders else None)
    yield built
    if filler is not None:
        stop.set()
        io_loop.run_sync(lambda: _end(filler), timeout=30)
    io_loop.run_sync(built.close)


async def _end(task: asyncio.Future[None]) -> None:
    task.cancel()  # the stop above ends it at its next turn; cancelling ends it wherever it waits
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _start_filler(services: Services, stop: asyncio.Event) -> asyncio.Future[None]:
    filler = Filler(services.placeholders, lambda: services.blobs, services.settings.placeholder_lease)
    return asyncio.ensure_future(filler.run(stop))


@pytest.fixture
def app(settings: Settings, services: Services) -> Any:
    return make_app(settings, services)


@pytest.fixture
def admin_key(io_loop: Any, services: Services) -> str:
    return io_loop.run_sync(lambda: services.api_keys.create("test-admin", Scope.admin))


Api = Callable[..., Awaitable[tornado.httpclient.HTTPResponse]]


@pytest.fixture
def api(http_client: Any, base_url: str, admin_key: str) -> Api:
    """Call the running app over HTTP: await api("GET", "/api/images", key=..., json=..., headers=...)."""

    async def call(method: str, path: str, *, json_body: Any = None, body: bytes | str | None = None,
                   key: str | None = admin_key, headers: dict[str, str] | None = None,
                   request_timeout: float = 30) -> tornado.httpclient.HTTPResponse:
        sent = dict(headers or {})
        if key is not None:
            sent.setdefault("X-API-Key", key)
        if json_body is not None:
            body = json.dumps(json_body)
            sent.setdefault("Content-Type", "application/json")
        if body is None and method in ("POST", "PUT"):
            body = b""
        return await http_client.fetch(
            base_url + path, method=method, body=body, headers=sent, raise_error=False,
            allow_nonstandard_methods=True, request_timeout=request_timeout, follow_redirects=False,
        )

    return call


def problem(response: tornado.httpclient.HTTPResponse) -> dict[str, Any]:
    """The problem+json body of an error response, checked for shape."""
    assert response.headers["Content-Type"] == "application/problem+json", response.body
    body = json.loads(response.body)
    assert body["status"] == response.code
    assert body["title"] and body["detail"]
    return body


def eventually(condition: Callable[[], Any], what: str, timeout: float = 30.0, every: float = 0.05) -> Any:
    """Wait for `condition()` to be truthy and return it; fail naming `what` after `timeout` seconds.

    For waits on something a test can observe: a fixed sleep is either too short on a loaded machine
    or longer than needed everywhere else."""
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        assert time.monotonic() < deadline, f"still waiting after {timeout:.0f} s: {what}"
        time.sleep(every)
    return result
