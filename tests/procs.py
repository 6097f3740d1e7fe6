"""Real casimg processes for the end-to-end tests (`Server`, `casimg`) and the fault and soak tests:
servers, workers, their Redis, and the checks that every fault test ends with (the job settled, the
bytes right, fsck clean, nothing left to grow).

Everything here starts real `casimg serve` / `casimg worker` / `redis-server` processes and talks to
them over loopback HTTP or a unix socket; ``Processes`` ends, by pid, whatever a test left running.
Starting a process and waiting until it answers is bench/procs.py's, which the benchmark shares.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import redis

from bench.procs import ROOT, free_port, spawn, start_moto, start_serve, status_kib
from bench.procs import stop as stop_process
from casimg.metrics import shared_root
from tests.origin import image_bytes


def casimg(*args: str, env: dict[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([sys.executable, "-m", "casimg", *args], capture_output=True, text=True,
                            cwd=ROOT, env={**os.environ, **(env or {})}, timeout=60)
    if check:
        assert result.returncode == 0, result.stderr
    return result


class Server:
    """One `casimg serve` process on a data dir, driven over HTTP."""

    def __init__(self, data_dir: Path, *extra: str, env: dict[str, str] | None = None) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        # CASIMG_ORIGIN_RATE 0: tests fetch hundreds of images from one local origin (as conftest.make_settings)
        # CASIMG_PROCESSES 1: a test drives, signals and counts one server process unless it asks for more
        # (serve's default is one per core).
        self.env = {"CASIMG_ALLOW_NETWORKS": "127.0.0.1/32", "CASIMG_WORKER_HEARTBEAT": "2",
                    "CASIMG_ORIGIN_RATE": "0", "CASIMG_PROCESSES": "1", **(env or {})}
        self.log = data_dir.parent / f"serve-{self.port}.log"
        self.process = start_serve(["--data-dir", str(data_dir), "--port", str(self.port), *extra], self.port,
                                   self.log, env=self.env, cwd=ROOT)
        self.key = (data_dir / "admin.key").read_text().strip()

    def call(self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None,
             key: str | None = None) -> tuple[int, bytes, dict[str, str]]:
        sent = {"Authorization": f"Token {key or self.key}", **(headers or {})}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            sent["Content-Type"] = "application/json"
        request = urllib.request.Request(self.base + path, data=data, method=method, headers=sent)
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, response.read(), dict(response.headers)
        except urllib.error.HTTPError as error:
            return error.code, error.read(), dict(error.headers)

    def submit(self, urls: list[str]) -> dict[str, Any]:
        status, body, _ = self.call("POST", "/api/images?wait=30", {"image_urls": urls})
        assert status == 200, body
        return json.loads(body)

    def terminate(self, timeout: float = 15) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()

    def output(self) -> str:
        return self.log.read_text()



JOB_TIMEOUT = 180.0  # seconds a job may take to settle after a fault; generous for a loaded 2-core CI box
PREFIX = "casimg:"


class Processes:
    """Tracks the processes a test starts, so teardown can end exactly those (by pid) if the test fails."""

    def __init__(self) -> None:
        self.started: list[subprocess.Popen[bytes]] = []
        self.data_dirs: list[Path] = []

    def server(self, data_dir: Path, *extra: str, env: dict[str, str] | None = None) -> Server:
        self.data_dirs.append(data_dir)
        server = Server(data_dir, *extra, env=env)
        self.started.append(server.process)
        return server

    def worker(self, data_dir: Path, *extra: str, env: dict[str, str] | None = None,
               name: str = "worker") -> subprocess.Popen[bytes]:
        process = spawn([sys.executable, "-m", "casimg", "worker", "--data-dir", str(data_dir), *extra],
                        data_dir.parent / f"{name}.log", {"CASIMG_ORIGIN_RATE": "0", **(env or {})}, cwd=ROOT)
        self.started.append(process)
        return process

    def cleanup(self) -> None:
        for process in self.started:
            if process.poll() is None:
                # `serve --processes N` children run in process groups of their own, and a parent killed
                # with -9 forwards nothing: they are ended by pid, or they outlive the test.
                children = forked_children(process.pid)
                process.kill()
                process.wait()
                for child in children:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(child, signal.SIGKILL)
        for data_dir in self.data_dirs:
            pid = embedded_redis_pid(data_dir)
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            # A process killed here cannot remove the data dir's metrics directory (a clean stop does).
            shutil.rmtree(shared_root(data_dir), ignore_errors=True)


def forked_children(pid: int) -> list[int]:
    """The processes `pid` forked (Linux's /proc children list); [] once it is gone."""
    try:
        return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except (OSError, ValueError):
        return []


def command_line(pid: int) -> str:
    """`pid`'s command line, its arguments joined by spaces; "" once it is gone."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def embedded_redis_pid(data_dir: Path) -> int | None:
    """The pid of the data dir's embedded redis-server, if one is running."""
    try:
        pid = int((data_dir / "redis" / "redis.pid").read_text())
    except (FileNotFoundError, ValueError):
        return None
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return None
    return pid if b"redis-server" in cmdline else None  # a pid file left by a dead Redis may name a reused pid


def kill_tree(server: Server) -> None:
    """kill -9 of the server and its embedded Redis (which runs in its own session, so not a group kill)."""
    redis_pid = embedded_redis_pid(server.data_dir)
    server.process.kill()
    if redis_pid is not None:
        os.kill(redis_pid, signal.SIGKILL)
    server.process.wait()
    if redis_pid is not None:
        deadline = time.monotonic() + 10
        while Path(f"/proc/{redis_pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.02)


def embedded_client(data_dir: Path) -> redis.Redis:
    return redis.Redis(unix_socket_path=str(data_dir / "redis" / "redis.sock"), decode_responses=True,
                       socket_timeout=10)


def peak_rss_kib(pid: int) -> int:
    """VmHWM: the most resident memory the process has had, in KiB."""
    peak = status_kib(pid, "VmHWM")
    assert peak, f"no VmHWM for pid {pid}"
    return peak


# -- URLs of the origin and the bytes they must give back ---------------------------------------------

def image_urls(origin: Any, count: int, start: int = 0, query: str = "") -> list[str]:
    return [origin.url(f"/img/{n}.jpg") + (f"?{query}" if query else "") for n in range(start, start + count)]


def expected_bytes(url: str) -> bytes:
    """What the origin serves at an /img/N.EXT URL (the query does not change the bytes)."""
    name = urlsplit(url).path.rsplit("/", 1)[1]
    stem, ext = name.rsplit(".", 1)
    return image_bytes(int(stem), ext)


# -- jobs ---------------------------------------------------------------------------------------------

def submit(server: Server, urls: list[str]) -> str:
    status, body, _ = server.call("POST", "/api/images", {"image_urls": urls})
    assert status == 202, body
    return json.loads(body)["job_id"]


def job(server: Server, job_id: str) -> dict[str, Any]:
    status, body, _ = server.call("GET", f"/api/jobs/{job_id}")
    assert status == 200, body
    return json.loads(body)


def wait_for_progress(server: Server, job_id: str, at_least: int) -> dict[str, Any]:
    """Poll until `at_least` URLs of the job are finished; the fault goes in after that."""
    deadline = time.monotonic() + JOB_TIMEOUT
    while time.monotonic() < deadline:
        status, body, _ = server.call("GET", f"/api/jobs/{job_id}")
        if status == 200:
            current = json.loads(body)
            if current["done"] >= at_least:
                return current
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not reach {at_least} finished URLs")


def settle(server: Server, job_id: str, timeout: float = JOB_TIMEOUT) -> dict[str, Any]:
    """The job once done: every URL stored, existing or failed with a reason; none pending."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        current = job(server, job_id)
        if current["status"] == "done":
            break
        time.sleep(0.2)
    else:
        pending = [r["url"] for r in current["results"] if r["status"] == "pending"]
        raise AssertionError(f"job {job_id} stuck at {current['done']}/{current['total']}; pending: {pending[:5]}")
    assert current["done"] == current["total"] == len(current["results"])
    assert current["stored"] + current["existed"] + current["failed"] == current["total"]
    for result in current["results"]:
        assert result["status"] in ("stored", "exists", "failed"), result
        if result["status"] == "failed":
            assert result["error"], result
        else:
            assert len(result["sha256"]) == 64, result
    return current


def assert_retrievable(server: Server, urls: list[str]) -> None:
    """Every URL answers 200 with exactly the origin's bytes."""
    for url in urls:
        status, body, _ = server.call("GET", f"/api/image?url={quote(url, safe='')}")
        assert status == 200, (url, status, body[:200])
        assert body == expected_bytes(url), url


def assert_fsck_clean(data_dir: Path, *extra: str, env: dict[str, str] | None = None) -> str:
    result = casimg("fsck", "--data-dir", str(data_dir), *extra, env=env, check=False)
    assert result.returncode == 0 and " 0 problem(s)" in result.stdout, result.stdout + result.stderr
    return result.stdout


def queue_streams(client: redis.Redis, prefix: str = PREFIX) -> list[str]:
    """The keyless queue stream and every API key's."""
    return [prefix + "queue", *sorted(client.scan_iter(prefix + "queue:*", count=1000))]


def queued(client: redis.Redis, prefix: str = PREFIX) -> int:
    """Entries left in every queue stream, waiting or in progress."""
    return sum(client.xlen(stream) for stream in queue_streams(client, prefix))


def assert_nothing_grows(client: redis.Redis, prefix: str = PREFIX) -> None:
    """Once every job is done: the queue stream is empty, nothing is pending, job and worker keys expire,
    and the consumer group holds only live workers (a live worker removes a dead one's consumer)."""
    deadline = time.monotonic() + 30
    streams = queue_streams(client, prefix)
    while True:
        consumers = [c["name"] for stream in streams for c in client.xinfo_consumers(stream, "workers")]
        dead = [name for name in consumers if not client.exists(prefix + "worker:" + name)]
        if not dead or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert not dead, f"consumers of dead workers stay in the group: {dead}"
    for stream in streams:
        assert client.xlen(stream) == 0, stream
        assert client.xpending(stream, "workers")["pending"] == 0, stream
    busy = client.zrangebyscore(prefix + "queue-owners", "+inf", "+inf")
    assert not busy, f"keys still marked as having queued entries: {busy}"
    jobs = list(client.scan_iter(prefix + "job:*", count=1000))
    assert jobs, "expected job keys"
    for key in [*jobs, *client.scan_iter(prefix + "worker:*")]:
        assert client.ttl(key) > 0, f"{key} never expires"


# -- an S3 endpoint: moto's server by default, or a real bucket named in the environment ---------------

TEST_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "casimg-test", "AWS_SECRET_ACCESS_KEY": "casimg-test-secret"}


class S3Endpoint:
    """Where the S3 tests store: a `moto_server` started here on loopback, or, when CASIMG_S3_ENDPOINT
    and CASIMG_S3_BUCKET are set (with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY), that endpoint and
    bucket. Each test takes a prefix of its own, so tests never see each other's objects."""

    def __init__(self, directory: Path, environ: dict[str, str] | None = None) -> None:
        env = dict(os.environ if environ is None else environ)
        self.process: subprocess.Popen[bytes] | None = None
        self.log = directory / "moto.log"
        if env.get("CASIMG_S3_ENDPOINT") and env.get("CASIMG_S3_BUCKET"):
            self.endpoint, self.bucket = env["CASIMG_S3_ENDPOINT"], env["CASIMG_S3_BUCKET"]
            self.region = env.get("CASIMG_S3_REGION", "us-east-1")
            self.credentials = {name: env[name] for name in
                                ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN") if name in env}
            self.emulated = False
            return
        self.port = free_port()
        self.endpoint, self.bucket, self.region = f"http://127.0.0.1:{self.port}", "casimg-test", "us-east-1"
        self.credentials = dict(TEST_CREDENTIALS)
        self.emulated = True
        self.start()
        self.create_bucket(self.bucket)

    def start(self, env: dict[str, str] | None = None) -> None:
        """(Re)start moto on the same port: a restarted moto has lost every bucket and object."""
        self.process = start_moto(self.port, self.log, env=env, new_session=True)

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)
            self.process = None

    def create_bucket(self, name: str) -> None:
        # moto takes an unsigned request; a real endpoint's bucket exists already.
        urllib.request.urlopen(urllib.request.Request(f"{self.endpoint}/{name}", method="PUT"), timeout=30).close()

    def prefix(self) -> str:
        return f"t{time.time_ns()}-{os.urandom(3).hex()}/"

    def env(self, prefix: str, **extra: str) -> dict[str, str]:
        """The environment of a `casimg` process storing under `prefix`."""
        return {"CASIMG_STORAGE": "s3", "CASIMG_S3_ENDPOINT": self.endpoint, "CASIMG_S3_BUCKET": self.bucket,
                "CASIMG_S3_REGION": self.region, "CASIMG_S3_PREFIX": prefix, **self.credentials, **extra}

    def settings(self, prefix: str, directory: Path) -> dict[str, Any]:
        """make_settings overrides for an in-process store under `prefix`, its credentials in a file in
        `directory` (the test process's environment holds none)."""
        credentials = directory / "aws-credentials"
        credentials.write_text("[default]\n" + "".join(
            f"{name.lower()} = {value}\n" for name, value in self.credentials.items()))
        return {"storage": "s3", "s3_endpoint": self.endpoint, "s3_bucket": self.bucket,
                "s3_region": self.region, "s3_prefix": prefix, "s3_credentials_file": str(credentials)}

    def store_for(self, tmp_dir: Path, prefix: str | None = None, **options: Any) -> Any:
        from casimg.storage.s3 import S3Store, credentials_from

        store = S3Store(tmp_dir, bucket=options.pop("bucket", self.bucket), prefix=prefix or self.prefix(),
                        endpoint=self.endpoint, region=self.region,
                        credentials=credentials_from("", self.credentials), **options)
        store.create_dirs()
        return store
