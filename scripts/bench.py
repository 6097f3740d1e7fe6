#!/usr/bin/env python3
"""casimg against the physical limit of this machine, measured side by side in one run.

    python scripts/bench.py                      # the full run: 5,000 images, listing at 100k and 1M URLs
    python scripts/bench.py --images 1000 --listing 100000 --duration 5     # a quicker one

It sets everything up itself in a temp directory (a generated image set, a local origin, a Redis, the
casimg servers, the reference servers), prints a markdown table and writes it to BENCHMARKS.md with the
machine's core count and the date. Every figure comes with the reference it is compared to, measured in
the same run, because absolute numbers on a shared machine drift; the ratios are what count.

What it measures:

0. Validation cost per image and format: a full decode against casimg's two modes (CASIMG_VALIDATION).
1. Ingest: N distinct generated images (about 80% photo-like JPEG, 10% PNG, 10% WebP, 20-300 KB) from a
   local origin (nginx when installed, else an aiohttp static server), spread over 8 loopback addresses
   so casimg's per-host limit (8) times the hosts makes its default download concurrency (64), submitted
   in one job and timed until the job is done. The limit: a plain aiohttp fetch-and-write of the same
   URLs at the same concurrency, with no validation, hashing or index. Beside it, the required work:
   the limit plus casimg's default validation, a SHA-256 and a shared syncfs per body, and nothing else.
2. The same with half the URLs pointing at content that another URL of the job also has.
3. Retrieval with wrk (``apt-get install wrk``): casimg's GET /api/image; a bare Tornado handler doing
   one Redis HGET and one file read (in a thread, as casimg must) with the same process count; nginx
   serving the same blob files from disk; and the nginx front (config/nginx.conf, CASIMG_ACCEL_REDIRECT).
4. Listing: first page latency and a full walk with limit=1000 at each --listing size, Redis filled
   through casimg's own Index.store, over one kept-alive connection (and the first page with a new
   connection for each request, beside it).
5. Memory: Redis bytes per indexed URL (INFO memory, about 80-character URLs, with metadata) and the
   service's RSS after the ingest.

Retrieval and the distinct ingest also run with one casimg process per core (``--multi``), beside the
default single process. Only loopback addresses are used. Tools: the project's .venv (``bash scripts/test``
makes it), wrk for retrieval (skipped with a note when absent), nginx optional (``apt-get install nginx wrk``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import http.client
import io
import json
import os
import random
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV_PYTHON = ROOT / ".venv" / "bin" / "python"

try:
    import aiohttp
    import redis
    from PIL import Image, ImageDraw, ImageFilter
except ImportError:  # run with a python that lacks the project: use the project's venv
    if VENV_PYTHON.exists() and Path(sys.executable) != VENV_PYTHON:
        os.execv(str(VENV_PYTHON), [str(VENV_PYTHON), *sys.argv])
    sys.exit("bench.py needs casimg installed: run `bash scripts/test` once (it creates .venv), then retry")

HOSTS = [f"127.0.0.{i}" for i in range(1, 9)]  # 8 origin hosts x casimg's 8 per host = its 64 downloads
CONCURRENCY = 64
PER_HOST = 8
SIZE_RANGE = (20 * 1024, 300 * 1024)
# Rough encoded bytes per pixel of the generated pictures, to aim at a file size.
BYTES_PER_PIXEL = {"JPEG": 0.16, "PNG": 0.9, "WEBP": 0.06}
FORMAT_MIX = [("JPEG", 0.8), ("PNG", 0.1), ("WEBP", 0.1)]
EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
BASES = {"JPEG": 400, "PNG": 100}  # encoded pictures per format; the rest differ by a comment (see variant)
LIST_URL_LENGTH = 80
FILL_IN_FLIGHT = 256  # Index.store calls in flight while filling Redis for the listing measurements
STARTUP_TIMEOUT = 30.0
# config/nginx.conf marks the part of its http block that is the casimg front, for the bench and the test.
FRONT_BEGIN, FRONT_END = "# -- casimg front begins --", "# -- casimg front ends --"


# -- helpers ----------------------------------------------------------------------------------------

def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_http(url: str, timeout: float = STARTUP_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{url} did not answer within {timeout:.0f} s")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


class Procs:
    """Child processes of the run, stopped (by their own ids) when it ends."""

    def __init__(self) -> None:
        self.children: list[subprocess.Popen[bytes]] = []

    def start(self, args: list[str], log_path: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        handle = open(log_path, "ab")  # the child writes to it
        proc = subprocess.Popen(args, stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**os.environ, **(env or {})}, start_new_session=True)
        self.children.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
        """Signal the child's process group (its own session): a forking child's children go with it."""
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if proc in self.children:
            self.children.remove(proc)

    def stop_all(self) -> None:
        for proc in reversed(list(self.children)):
            self.stop(proc)


# -- the image set ----------------------------------------------------------------------------------

def _picture(width: int, height: int, rng: random.Random) -> Image.Image:
    """A photo-like picture: a rotated gradient, grain, shapes, a slight blur (compresses like a photo)."""
    base = Image.linear_gradient("L").resize((width, height)).rotate(rng.uniform(0, 360))
    channels = [Image.blend(base, Image.effect_noise((width, height), rng.uniform(20, 60)), rng.uniform(0.2, 0.6))
                for _ in range(3)]
    picture = Image.merge("RGB", channels)
    draw = ImageDraw.Draw(picture)
    for _ in range(6):
        x, y = rng.randrange(width), rng.randrange(height)
        draw.ellipse([x, y, x + rng.randrange(20, max(21, width // 2)), y + rng.randrange(20, max(21, height // 2))],
                     fill=tuple(rng.randrange(256) for _ in range(3)))
    return picture.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 1.5)))


def _encode(fmt: str, rng: random.Random) -> bytes:
    """A picture of `fmt` whose encoded size is drawn from SIZE_RANGE (resized until it lands there)."""
    target = rng.uniform(*SIZE_RANGE)
    pixels = target / BYTES_PER_PIXEL[fmt]
    picture = None
    for _ in range(4):
        width = max(64, int((pixels * 4 / 3) ** 0.5))
        height = max(48, int(width * 3 / 4))
        picture = _picture(width, height, rng) if picture is None else picture.resize((width, height))
        out = io.BytesIO()
        if fmt == "PNG":
            picture.save(out, "PNG", compress_level=6)
        else:
            picture.save(out, fmt, quality=85)
        data = out.getvalue()
        if SIZE_RANGE[0] <= len(data) <= SIZE_RANGE[1]:
            break
        pixels *= target / len(data)
    return data


def variant(fmt: str, data: bytes, tag: int) -> bytes:
    """Distinct bytes for the same picture: a JPEG comment segment, or a PNG tEXt chunk. Decoding (and so
    validation) costs exactly what the picture costs; only the content hash differs."""
    text = f"casimg-bench {tag}".encode()
    if fmt == "JPEG":
        return data[:2] + b"\xff\xfe" + (len(text) + 2).to_bytes(2, "big") + text + data[2:]
    if fmt == "PNG":
        body = b"tEXt" + b"Comment\x00" + text
        chunk = (len(body) - 4).to_bytes(4, "big") + body + zlib.crc32(body).to_bytes(4, "big")
        return data[:-12] + chunk + data[-12:]  # before IEND
    raise ValueError(fmt)


def make_images(directory: Path, count: int, seed: int = 6) -> list[tuple[str, int]]:
    """(file name, size) of `count` distinct images in `directory`, generated once and kept (cached)."""
    manifest = directory / "manifest.json"
    if manifest.exists():
        return [tuple(item) for item in json.loads(manifest.read_text())]  # type: ignore[misc]
    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    bases: dict[str, list[bytes]] = {"JPEG": [], "PNG": []}
    files: list[tuple[str, int]] = []
    started = time.monotonic()
    for number in range(count):
        pick, fmt = rng.random(), "JPEG"
        for name, share in FORMAT_MIX:
            if pick < share:
                fmt = name
                break
            pick -= share
        if fmt == "WEBP":  # no cheap way to vary WebP bytes without changing the picture: encode each
            data = _encode(fmt, rng)
        elif len(bases[fmt]) < BASES[fmt]:
            data = _encode(fmt, rng)
            bases[fmt].append(data)
        else:
            data = variant(fmt, rng.choice(bases[fmt]), number)
        name = f"{number:06d}.{EXT[fmt]}"
        (directory / name).write_bytes(data)
        files.append((name, len(data)))
        if number and number % 1000 == 0:
            log(f"generated {number} images ({time.monotonic() - started:.0f} s)")
    manifest.write_text(json.dumps(files))
    return files


# -- origins, Redis, casimg -------------------------------------------------------------------------

NGINX_MAIN = """
worker_processes {workers};
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
{user}
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {prefix}/body;
  proxy_temp_path {prefix}/proxy;
  fastcgi_temp_path {prefix}/fastcgi;
  uwsgi_temp_path {prefix}/uwsgi;
  scgi_temp_path {prefix}/scgi;
  sendfile on;
  tcp_nopush on;
  keepalive_requests 1000000;
  default_type application/octet-stream;
  {servers}
}}
"""


def nginx_config(prefix: Path, servers: str, workers: int = 1) -> Path:
    for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (prefix / sub).mkdir(parents=True, exist_ok=True)
    user = "user root root;" if os.geteuid() == 0 else ""  # the files live in a private temp dir
    path = prefix / "nginx.conf"
    path.write_text(NGINX_MAIN.format(prefix=prefix, servers=servers, user=user, workers=workers))
    return path


def start_nginx(
    procs: Procs, prefix: Path, servers: str, ports: list[int], workers: int = 1
) -> subprocess.Popen[bytes]:
    conf = nginx_config(prefix, servers, workers)
    proc = procs.start([shutil.which("nginx") or "nginx", "-p", str(prefix), "-c", str(conf)], prefix / "out.log")
    for port in ports:
        wait_http(f"http://127.0.0.1:{port}/")
    return proc


def start_origin(procs: Procs, work: Path, images: Path) -> tuple[int, str]:
    """The image origin on all HOSTS: nginx if installed, else an aiohttp static server. (port, kind)"""
    port = free_port()
    if shutil.which("nginx"):
        listens = " ".join(f"listen {host}:{port};" for host in HOSTS)
        server = f"""server {{ {listens}
          location /img/ {{ alias {images}/; }}
          location /dup/ {{ alias {images}/; }}
          location = / {{ return 200 "origin"; }} }}"""
        start_nginx(procs, work / "nginx-origin", server, [port])
        return port, "nginx 1 worker"
    procs.start([sys.executable, __file__, "_origin", str(port), str(images)], work / "origin.log")
    wait_http(f"http://127.0.0.1:{port}/")
    return port, "aiohttp static server (nginx not installed)"


def run_origin(port: int, images: str) -> None:
    from aiohttp import web

    app = web.Application()
    app.router.add_get("/", lambda request: web.Response(text="origin"))
    app.router.add_static("/img/", images)
    app.router.add_static("/dup/", images)

    async def main() -> None:
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        for host in HOSTS:
            await web.TCPSite(runner, host, port).start()
        await asyncio.Event().wait()

    asyncio.run(main())


def start_redis(procs: Procs, directory: Path, persistent: bool) -> tuple[subprocess.Popen[bytes], str]:
    """A redis-server like casimg's embedded one (AOF, everysec) or, for the listing fill, without AOF."""
    from casimg.embedded import COMPACT_HASH_ENTRIES, COMPACT_HASH_VALUE, find_redis_server

    directory.mkdir(parents=True, exist_ok=True)
    sock = directory / "redis.sock"
    args = [find_redis_server(), "--port", "0", "--unixsocket", str(sock), "--unixsocketperm", "700",
            "--dir", str(directory), "--save", "", "--appendonly", "yes" if persistent else "no",
            "--appendfsync", "everysec", "--hash-max-ziplist-entries", str(COMPACT_HASH_ENTRIES),
            "--hash-max-ziplist-value", str(COMPACT_HASH_VALUE)]
    proc = procs.start(args, directory / "redis.log")
    client = redis.Redis(unix_socket_path=str(sock))
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while True:
        try:
            client.ping()
            break
        except (redis.ConnectionError, FileNotFoundError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    return proc, f"unix://{sock}"


@dataclass
class Casimg:
    proc: subprocess.Popen[bytes]
    port: int
    key: str
    data_dir: Path

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"


BENCH_KEY = "bench_" + secrets.token_hex(16)  # one admin key for every server of the run (bootstrap)


def start_casimg(procs: Procs, data_dir: Path, redis_url: str, *, workers: bool = True,
                 extra_env: dict[str, str] | None = None, key_prefix: str = "casimg:",
                 processes: int = 1) -> Casimg:
    port = free_port()
    key = BENCH_KEY
    data_dir.mkdir(parents=True, exist_ok=True)
    env = {
        "CASIMG_DATA_DIR": str(data_dir), "CASIMG_PORT": str(port), "CASIMG_REDIS_URL": redis_url,
        "CASIMG_BOOTSTRAP_KEY": key, "CASIMG_ALLOW_NETWORKS": "127.0.0.0/8", "CASIMG_KEY_PREFIX": key_prefix,
        "CASIMG_WORKERS": "true" if workers else "false",
        # One key drives thousands of requests a second here, which the per-key rate limit exists to refuse.
        "CASIMG_RATE_LIMIT": "0", **(extra_env or {}),
    }
    args = [sys.executable, "-m", "casimg", "serve"]
    if processes > 1:
        args += ["--processes", str(processes)]
    proc = procs.start(args, data_dir.parent / f"casimg-{port}.log", env)
    wait_http(f"http://127.0.0.1:{port}/healthz")
    return Casimg(proc, port, key, data_dir)


def service_rss_kib(proc: subprocess.Popen[bytes]) -> int:
    """RSS of the casimg process and its forked server processes (not the Redis it may start)."""
    total = rss_kib(proc.pid)
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
    if children.exists():
        for pid in children.read_text().split():
            try:
                if "casimg" in Path(f"/proc/{pid}/cmdline").read_text() or "python" in Path(
                        f"/proc/{pid}/cmdline").read_text():
                    total += rss_kib(int(pid))
            except OSError:
                pass
    return total


# -- 1 and 2: ingest --------------------------------------------------------------------------------

@dataclass
class IngestResult:
    seconds: float
    images: int
    bytes: int
    stored: int = 0
    existed: int = 0
    failed: int = 0
    failures: list[str] = field(default_factory=list)

    @property
    def per_second(self) -> float:
        return self.images / self.seconds

    @property
    def mb_per_second(self) -> float:
        return self.bytes / self.seconds / 1e6


def write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)


async def fetch_and_keep(urls: list[str], out_dir: Path, keep=write_file, flusher=None) -> IngestResult:
    """Fetch every URL with aiohttp at casimg's concurrency, and hand each body to `keep(path, body)` in
    a thread; with a `flusher` (blobs.FlushGroup), wait for its flush after that, as a blob does.

    Bodies being kept are bounded as casimg's worker bounds its stores (STORE_DEPTH places per download
    slot, taken before the slot is given back), so a reference holds no more in memory, and batches no
    more into one flush, than casimg may.
    """
    from casimg.worker import STORE_DEPTH

    connector = aiohttp.TCPConnector(limit=CONCURRENCY, limit_per_host=PER_HOST)
    loop = asyncio.get_running_loop()
    total = 0
    slots = asyncio.Semaphore(CONCURRENCY)
    storing = asyncio.Semaphore(STORE_DEPTH * CONCURRENCY)

    async def one(session: aiohttp.ClientSession, number: int, url: str) -> None:
        nonlocal total
        async with slots:
            async with session.get(url) as response:
                response.raise_for_status()
                data = await response.read()
            await storing.acquire()
        try:
            total += len(data)
            await loop.run_in_executor(None, keep, out_dir / f"{number}.bin", data)
            if flusher is not None:
                await flusher.flush()
        finally:
            storing.release()

    started = time.monotonic()
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(one(session, number, url) for number, url in enumerate(urls)))
    return IngestResult(time.monotonic() - started, len(urls), total)


def serve_image_set(procs: Procs, work: Path, cache: Path) -> tuple[int, str]:
    """The origin (start_origin) serving the image set in `cache` under /img/; (port, kind)."""
    images = work / "images"
    images.symlink_to(cache.resolve())
    cache.resolve().chmod(0o755)
    return start_origin(procs, work, images)


def image_url(port: int, number: int, name: str, prefix: str = "img") -> str:
    """The URL of image `name` of the set, the `number`th URL spread over the origin's HOSTS."""
    return f"http://{HOSTS[number % len(HOSTS)]}:{port}/{prefix}/{name}"


async def plain_fetch(urls: list[str], out_dir: Path) -> IngestResult:
    """The limit: aiohttp fetch and write to a file, same concurrency, no validation, hash or index."""
    return await fetch_and_keep(urls, out_dir)


async def required_work_fetch(urls: list[str], out_dir: Path) -> IngestResult:
    """The limit plus what casimg cannot skip: its validation, SHA-256, and durable bytes.

    Each body goes to a thread once to be validated (casimg's settings: CASIMG_VALIDATION and the
    limits), hashed and written, then waits for a shared syncfs (casimg's FlushGroup) as a blob does
    before it is indexed. No index, queue, temp name, content-named link or log. It runs in one process
    on the limit's event loop and thread pool, so its ratio to the limit is what the required work
    costs there; what is left between it and casimg is casimg's own overhead.
    """
    from casimg.blobs import FlushGroup
    from casimg.config import load_settings
    from casimg.validation import validate_image

    defaults = load_settings()
    allowed = frozenset(f.upper() for f in defaults.allowed_formats)

    def keep(path: Path, data: bytes) -> None:
        validate_image(data, max_pixels=defaults.max_pixels, allowed_formats=allowed,
                       max_frames=defaults.max_frames, mode=defaults.validation)
        hashlib.sha256(data).digest()
        write_file(path, data)

    flusher = FlushGroup(out_dir)
    try:
        return await fetch_and_keep(urls, out_dir, keep, flusher)
    finally:
        flusher.close()


def reference_run(work: Path, urls: list[str], fetch=plain_fetch) -> IngestResult:
    """One run of the limit (plain_fetch) or of another reference, into a new directory under `work`."""
    # Each run keeps its files until the workspace goes at the end: on an ext4 without a journal, files
    # created soon after thousands were deleted cost several times as much (the inode allocator steps
    # over recently freed inodes one by one), and deleting the limit's files between runs slowed
    # whatever wrote next, casimg or the limit.
    out = Path(tempfile.mkdtemp(prefix="plain-", dir=work))
    result = asyncio.run(fetch(urls, out))
    # Untimed: the limit leaves its bytes in the page cache, and casimg, which makes its blobs durable
    # before indexing them (syncfs), would otherwise pay for writing them out.
    os.sync()
    return result


def mean_result(runs: list[IngestResult]) -> IngestResult:
    """One result whose rate is the mean rate of `runs` (each of the same URLs)."""
    rate = statistics.mean(run.per_second for run in runs)
    return IngestResult(runs[0].images / rate, runs[0].images, runs[0].bytes,
                        failures=[f"{run.per_second:.0f}" for run in runs])


def casimg_ingest(server: Casimg, redis_url: str, urls: list[str], sizes: dict[str, int]) -> IngestResult:
    """Submit the URLs in one job and time it until the job is done (polled in Redis, not over HTTP)."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    body = json.dumps({"image_urls": urls}).encode()
    request = urllib.request.Request(f"{server.base}/api/images", data=body, method="POST",
                                     headers={"X-API-Key": server.key, "Content-Type": "application/json"})
    started = time.monotonic()
    with urllib.request.urlopen(request) as response:
        job_id = json.loads(response.read())["job_id"]
    while client.hget(f"casimg:job:{job_id}", "status") != "done":
        time.sleep(0.02)
    seconds = time.monotonic() - started
    info = client.hgetall(f"casimg:job:{job_id}")
    failures = [v for v in client.hvals(f"casimg:job:{job_id}:results") if '"failed"' in v][:5]
    return IngestResult(seconds, len(urls), sum(sizes[u] for u in urls), int(info["stored"]),
                        int(info["existed"]), int(info["failed"]), failures)


def file_creation_cost(directory: Path, count: int = 300) -> float:
    """Microseconds to create one empty file in a new directory under `directory`: a fact of the file
    system that the ingest pays for every blob (one new inode each, and a new fan-out directory for most
    blobs of a fresh store). On an ext4 without a journal it swings tenfold with how many files were
    deleted shortly before, so the table prints it beside the ingest figures. The files are left in
    place: deleting them would slow what creates files next."""
    probe = directory / "create-probe"
    probe.mkdir()
    started = time.perf_counter()
    for number in range(count):
        os.close(os.open(probe / f"f{number}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    return (time.perf_counter() - started) / count * 1e6


def validation_costs(directory: Path, files: list[tuple[str, int]], per_format: int = 200) -> list[tuple[str, ...]]:
    """ms per image of each check, per format, over a sample of the set: full decode, casimg's two modes."""
    from casimg.validation import validate_image

    def full_decode(path: Path) -> None:
        with Image.open(path) as image:
            image.load()

    checks = [("full decode (load)", full_decode),
              ("casimg decode mode", lambda p: validate_image(p, max_pixels=10**9, mode="decode")),
              ("casimg structure mode (default)", lambda p: validate_image(p, max_pixels=10**9, mode="structure"))]
    rows = []
    for fmt, ext in EXT.items():
        paths = [directory / name for name, _ in files if name.endswith("." + ext)][:per_format]
        if not paths:
            continue
        cells = []
        for _, check in checks:
            for path in paths[:5]:  # warm the page cache and Pillow's plugins
                check(path)
            started = time.perf_counter()
            for path in paths:
                check(path)
            cells.append(f"{(time.perf_counter() - started) / len(paths) * 1000:.2f}")
        rows.append((fmt, str(len(paths)), *cells))
    return rows


# -- 3: retrieval -----------------------------------------------------------------------------------

WRK_SCRIPT = """
local paths, i = {}, 0
function init(args)
  for line in io.lines(args[1]) do paths[#paths + 1] = line end
  if args[2] then wrk.headers["X-API-Key"] = args[2] end
  i = math.random(#paths)
end
function request()
  i = i + 1
  if i > #paths then i = 1 end
  return wrk.format("GET", paths[i])
end
"""


@dataclass
class WrkResult:
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    mb_per_second: float


def _ms(text: str) -> float:
    match = re.match(r"([\d.]+)(us|ms|s)", text)
    if not match:
        return float("nan")
    value, unit = float(match.group(1)), match.group(2)
    return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value


def _mb(text: str) -> float:
    match = re.match(r"([\d.]+)(B|KB|MB|GB)", text)
    if not match:
        return float("nan")
    scale = {"B": 1, "KB": 1024, "MB": 1024**2, "GB": 1024**3}[match.group(2)]
    return float(match.group(1)) * scale / 1e6


def run_wrk(work: Path, base: str, paths: list[str], key: str | None, duration: int, connections: int) -> WrkResult:
    script = work / "wrk.lua"
    script.write_text(WRK_SCRIPT)
    listing = work / f"paths-{secrets.token_hex(4)}.txt"
    listing.write_text("\n".join(paths) + "\n")
    args = ["wrk", "-t2", f"-c{connections}", f"-d{duration}s", "--latency", "-s", str(script), base, "--",
            str(listing)] + ([key] if key else [])
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = _ms(re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
    errors = 0
    for pattern in (r"Non-2xx or 3xx responses:\s+(\d+)", r"Socket errors:.*?timeout (\d+)"):
        found = re.search(pattern, out)
        if found:
            errors += int(found.group(1))
    transfer = re.search(r"Transfer/sec:\s+(\S+)", out)
    return WrkResult(rps, p50, p99, errors, _mb(transfer.group(1)) if transfer else float("nan"))


def run_bare(port: int, redis_url: str, blob_root: str, processes: int) -> None:
    """The floor of the stack: one Redis HGET (of the URL's bucket) and one file read (in a thread), nothing else."""
    import redis.asyncio as aioredis
    import tornado.httpserver
    import tornado.netutil
    import tornado.process
    import tornado.web

    sockets = tornado.netutil.bind_sockets(port, "127.0.0.1", reuse_port=True)
    if processes > 1:
        tornado.process.fork_processes(processes)

    def read(path: str) -> bytes:
        with open(path, "rb") as handle:
            return handle.read()

    from casimg.index import KeySpace, url_key

    keys = KeySpace()

    class Bare(tornado.web.RequestHandler):
        async def get(self) -> None:
            url = self.get_query_argument("url")
            value = await self.application.settings["redis"].hget(url_key(keys, url), url)
            if value is None:
                raise tornado.web.HTTPError(404)
            digest = value[:64]  # "<sha256 hex> <stored_at>"
            path = f"{blob_root}/{digest[0:2]}/{digest[2:4]}/{digest}"
            self.write(await asyncio.get_running_loop().run_in_executor(None, read, path))

    async def main() -> None:
        client = aioredis.Redis(connection_pool=aioredis.BlockingConnectionPool.from_url(
            redis_url, max_connections=128, decode_responses=True))
        app = tornado.web.Application([(r"/api/image", Bare), (r"/healthz", Bare)], redis=client)
        server = tornado.httpserver.HTTPServer(app)
        server.add_sockets(sockets)
        await asyncio.Event().wait()

    from casimg.app import run_loop

    run_loop(main())  # the same event loop casimg runs on (uvloop when installed): the same stack


# -- 4 and 5: listing and memory --------------------------------------------------------------------

def list_url(number: int) -> str:
    head = f"https://images.example.com/photos/2026/11/{number:09d}/"
    tail = "-original.jpg"
    filler = hashlib.sha256(str(number).encode()).hexdigest()
    return head + filler[: LIST_URL_LENGTH - len(head) - len(tail)] + tail


async def fill_index(redis_url: str, start: int, stop: int) -> None:
    """Index URLs start..stop-1 through casimg's Index.store, each with its own digest and metadata."""
    import redis.asyncio as aioredis

    from casimg.app import connect_redis
    from casimg.index import BlobMeta, Index, KeySpace

    client: aioredis.Redis = connect_redis(redis_url, FILL_IN_FLIGHT + 8)
    index = Index(client, KeySpace("casimg:"))
    slots = asyncio.Semaphore(FILL_IN_FLIGHT)

    async def one(number: int) -> None:
        async with slots:
            digest = hashlib.sha256(number.to_bytes(8, "big")).hexdigest()
            width = 640 + number % 1400
            meta = BlobMeta(size=20_000 + number % 280_000, content_type="image/jpeg", width=width,
                            height=width * 3 // 4)
            await index.store(list_url(number), digest, meta.encode())

    step = 20_000
    for chunk in range(start, stop, step):
        await asyncio.gather(*(one(n) for n in range(chunk, min(stop, chunk + step))))
        if (chunk - start) % 200_000 == 0 and chunk > start:
            log(f"  indexed {chunk:,}")
    await client.aclose()


def http_get(url: str, key: str) -> tuple[bytes, dict[str, str]]:
    request = urllib.request.Request(url, headers={"X-API-Key": key})
    with urllib.request.urlopen(request) as response:
        return response.read(), dict(response.headers)


@dataclass(frozen=True)
class ListingTimes:
    first_ms: float  # first page (limit 100), p50, over one kept-alive connection
    first_new_connection_ms: float  # the same with a new connection for each request (urllib)
    first_1000_ms: float  # first page with limit=1000, p50, kept alive
    walk_seconds: float  # every page with limit=1000, following the Link headers, kept alive


def measure_listing(server: Casimg, expected: int) -> ListingTimes:
    """The listing's latencies over HTTP.

    Measured over one kept-alive connection, as wrk measures retrieval and as a client walking the
    pages does: a new connection per request adds the TCP handshake and urllib's own setup, the
    client's cost (about 0.5 ms on a 2-core VM, against 0.6 ms for all of /healthz). The first page is
    also timed that way, for comparison with runs before.
    """
    connection = http.client.HTTPConnection("127.0.0.1", server.port)
    headers = {"X-API-Key": server.key}

    def get(target: str) -> tuple[bytes, str | None]:
        connection.request("GET", target, headers=headers)
        response = connection.getresponse()
        body = response.read()
        if response.status != 200:
            raise RuntimeError(f"GET {target}: HTTP {response.status}")
        return body, response.getheader("Link")

    def p50_ms(*calls, times: int) -> list[float]:
        """p50 of each call; the calls alternate, so that each meets the machine in the same state (on a
        VM, what ran just before moves a millisecond's latency by a third)."""
        for call in calls:  # untimed: the first answers of a fresh process are slower
            for _ in range(5):
                call()
        samples: list[list[float]] = [[] for _ in calls]
        for _ in range(times):
            for call, taken in zip(calls, samples, strict=True):
                started = time.perf_counter()
                call()
                taken.append((time.perf_counter() - started) * 1000)
        return [statistics.median(taken) for taken in samples]

    try:
        first, first_new = p50_ms(lambda: get("/api/images"),
                                  lambda: http_get(f"{server.base}/api/images", server.key), times=50)
        [first_1000] = p50_ms(lambda: get("/api/images?limit=1000"), times=10)
        started = time.perf_counter()
        target: str | None = "/api/images?limit=1000"
        seen = 0
        while target:
            body, link = get(target)
            seen += len(json.loads(body))
            # A reference to resolve against the page asked for (a query-only one, from casimg).
            reference = re.match(r"<([^>]+)>", link).group(1) if link else None  # type: ignore[union-attr]
            target = urllib.parse.urljoin(target, reference) if reference else None
        walk = time.perf_counter() - started
    finally:
        connection.close()
    if seen != expected:
        raise RuntimeError(f"the walk returned {seen} images, expected {expected}")
    return ListingTimes(first, first_new, first_1000, walk)


def redis_used_memory(redis_url: str) -> int:
    return int(redis.Redis.from_url(redis_url).info("memory")["used_memory"])


def indexed_urls(redis_url: str) -> dict[str, str]:
    """URL -> digest for every indexed URL, read bucket by bucket."""
    from casimg.index import BUCKETS, KeySpace

    keys, client = KeySpace(), redis.Redis.from_url(redis_url, decode_responses=True)
    with client.pipeline(transaction=False) as pipe:
        for bucket in BUCKETS:
            pipe.hgetall(keys.url(bucket))
        buckets = pipe.execute()
    client.close()
    return {url: value[:64] for entries in buckets for url, value in entries.items()}


def index_memory(redis_url: str, size: int) -> dict[str, float]:
    """Bytes per URL of the URL buckets and of the blob buckets, and bytes of the count hash (MEMORY USAGE)."""
    from casimg.index import BUCKETS, KeySpace

    keys, client = KeySpace(), redis.Redis.from_url(redis_url)
    with client.pipeline(transaction=False) as pipe:
        for bucket in BUCKETS:
            pipe.memory_usage(keys.url(bucket), samples=0).memory_usage(keys.blob(bucket), samples=0)
        pipe.memory_usage(keys.count, samples=0)
        *buckets, count = pipe.execute()
    client.close()
    return {"url": sum(int(n or 0) for n in buckets[0::2]) / size,
            "blob": sum(int(n or 0) for n in buckets[1::2]) / size, "count": int(count or 0)}


# -- the run ----------------------------------------------------------------------------------------

@contextlib.contextmanager
def workspace(keep: bool, prefix: str = "casimg-bench-", directory: str | None = None) -> Iterator[Path]:
    """A temp directory for a run (in `directory`, default TMPDIR), removed at the end unless `keep`."""
    work = Path(tempfile.mkdtemp(prefix=prefix, dir=directory))
    work.chmod(0o755)
    try:
        yield work
    finally:
        if keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b else "n/a"


def verdict(ok: bool) -> str:
    return "holds" if ok else "**misses**"


def run(args: argparse.Namespace) -> str:
    procs = Procs()
    lines: list[str] = []
    notes: list[str] = []
    load_before = os.getloadavg()
    started_at = datetime.now(UTC)
    cache = Path(args.cache) / f"images-v1-{args.images}"
    log(f"image set: {cache}")
    files = make_images(cache, args.images)
    os.sync()  # nothing written before the run is left for the run's own flushes to write
    sizes_by_name = dict(files)
    with workspace(args.keep) as work:
        try:
            origin_port, origin_kind = serve_image_set(procs, work, cache)
            log(f"origin: {origin_kind} on port {origin_port}")

            def url_of(number: int, name: str, prefix: str = "img") -> str:
                return image_url(origin_port, number, name, prefix)

            urls = [url_of(n, name) for n, (name, _) in enumerate(files)]
            sizes = {url_of(n, name): size for n, (name, size) in enumerate(files)}
            half = len(files) // 2
            dup_urls = [url_of(n, name) for n, (name, _) in enumerate(files[:half])]
            dup_urls += [url_of(n + 1, name, "dup") for n, (name, _) in enumerate(files[:half])]
            for n, (name, _) in enumerate(files[:half]):
                sizes[url_of(n + 1, name, "dup")] = sizes_by_name[name]
            total_mb = sum(size for _, size in files) / 1e6
            formats = {fmt: sum(1 for name, _ in files if name.endswith(EXT[fmt])) for fmt in EXT}

            log("1. validation cost per image")
            validation = validation_costs(cache, files)
            create_us = file_creation_cost(work)
            log(f"  creating a file in the workspace: {create_us:.0f} µs")

            # 1. Ingest, distinct images: the limit, then casimg.
            # The references take seconds and move with the machine's load: they run before and after
            # casimg, in mirrored order (limit, required work, casimg, required work, limit), after one
            # untimed fetch that brings the origin's files into the page cache.
            log("1. ingest: warming the origin up (untimed)")
            reference_run(work, urls)
            log("1. ingest: plain aiohttp fetch-and-write (the limit)")
            limits = [reference_run(work, urls)]
            log("1. ingest: the limit with casimg's required work (validation, SHA-256, syncfs)")
            required = [reference_run(work, urls, required_work_fetch)]
            _, redis1 = start_redis(procs, work / "redis1", persistent=True)
            log("1. ingest: casimg")
            server = start_casimg(procs, work / "data1", redis1, processes=args.processes)
            rss_start = service_rss_kib(server.proc)
            ingest = casimg_ingest(server, redis1, urls, sizes)
            rss = service_rss_kib(server.proc)
            log("1. ingest: the required work again")
            required.append(reference_run(work, urls, required_work_fetch))
            log("1. ingest: the limit again")
            limits.append(reference_run(work, urls))
            limit = mean_result(limits)
            required_work = mean_result(required)
            if ingest.failed:
                notes.append(f"ingest: {ingest.failed} URL(s) failed, e.g. {ingest.failures[:2]}")

            # 1b. The same with casimg serve --processes (one per core).
            multi: IngestResult | None = None
            if args.multi > args.processes:
                _, redis_multi = start_redis(procs, work / "redis-multi", persistent=True)
                log(f"1. ingest: casimg --processes {args.multi}")
                server_multi = start_casimg(procs, work / "data-multi", redis_multi, processes=args.multi)
                multi = casimg_ingest(server_multi, redis_multi, urls, sizes)
                procs.stop(server_multi.proc)

            # 3. Retrieval, against the images of run 1.
            retrieval: dict[str, WrkResult] = {}
            process_counts = [args.processes] + ([args.multi] if args.multi > args.processes else [])
            stored = indexed_urls(redis1)
            sample = random.Random(3).sample(sorted(stored), min(len(stored), args.retrieval_urls))
            if shutil.which("wrk"):
                image_paths = ["/api/image?url=" + urllib.parse.quote(u, safe="") for u in sample]
                blob_paths = [f"/_static/{d[0:2]}/{d[2:4]}/{d}" for d in (stored[u] for u in sample)]

                def wrk(base: str, paths: list[str], key: str | None = server.key) -> WrkResult:
                    return run_wrk(work, base, paths, key, args.duration, args.connections)

                blob_dir = server.data_dir / "blobs"
                for count in process_counts:
                    # Every server of this process count runs at once, and the wrk runs go round them
                    # --repeat times, so a drift in the machine's load hits all of them alike.
                    started: list[subprocess.Popen[bytes]] = []
                    targets: dict[str, tuple[str, list[str], str | None]] = {}
                    if count == args.processes:
                        targets["casimg"] = (server.base, image_paths, server.key)
                    else:
                        more = start_casimg(procs, server.data_dir, redis1, processes=count)
                        started.append(more.proc)
                        targets["casimg"] = (more.base, image_paths, server.key)
                    bare_port = free_port()
                    started.append(procs.start([sys.executable, __file__, "_bare", str(bare_port), redis1,
                                                str(blob_dir), str(count)], work / "bare.log"))
                    wait_http(f"http://127.0.0.1:{bare_port}/healthz")
                    targets["bare"] = (f"http://127.0.0.1:{bare_port}", image_paths, None)
                    if shutil.which("nginx"):
                        front = start_casimg(procs, server.data_dir, redis1, workers=False,
                                             extra_env={"CASIMG_ACCEL_REDIRECT": "/_blobs/"}, processes=count)
                        static_port, front_port = free_port(), free_port()
                        conf = (ROOT / "config" / "nginx.conf").read_text()
                        server_block = conf[conf.index(FRONT_BEGIN):conf.index(FRONT_END)]
                        server_block = (server_block.replace("127.0.0.1:9000", f"127.0.0.1:{front.port}")
                                        .replace("listen 127.0.0.1:8080", f"listen 127.0.0.1:{front_port}")
                                        .replace("/var/lib/casimg/blobs/", f"{blob_dir}/"))
                        static = f"""server {{ listen 127.0.0.1:{static_port};
                          location /_static/ {{ alias {blob_dir}/; }}
                          location = / {{ return 200 "static"; }} }}"""
                        started += [front.proc, start_nginx(procs, work / f"nginx-serve-{count}",
                                                            static + "\n" + server_block, [static_port],
                                                            workers=count)]
                        wait_http(f"http://127.0.0.1:{front_port}/healthz")
                        targets["nginx"] = (f"http://127.0.0.1:{static_port}", blob_paths, None)
                        targets["front"] = (f"http://127.0.0.1:{front_port}", image_paths, server.key)
                    runs: dict[str, list[WrkResult]] = {kind: [] for kind in targets}
                    for round_number in range(args.repeat):
                        for kind, (base, paths, key) in targets.items():
                            log(f"3. retrieval, {count} process(es), round {round_number + 1}: {kind}")
                            runs[kind].append(wrk(base, paths, key))
                    for kind, results in runs.items():
                        retrieval[f"{kind}@{count}"] = WrkResult(
                            statistics.mean(r.rps for r in results), statistics.mean(r.p50_ms for r in results),
                            statistics.mean(r.p99_ms for r in results), sum(r.errors for r in results),
                            statistics.mean(r.mb_per_second for r in results))
                    for proc in reversed(started):
                        procs.stop(proc)
                if not shutil.which("nginx"):
                    notes.append("nginx is not installed: no nginx static and no nginx front figures "
                                 "(`apt-get install nginx`)")
            else:
                notes.append("wrk is not installed: no retrieval figures (`apt-get install wrk`, Debian package)")
            procs.stop(server.proc)

            # 2. Ingest with half the URLs pointing at duplicate content.
            log("2. ingest with duplicates: the limit")
            limits_dup = [reference_run(work, dup_urls)]
            _, redis2 = start_redis(procs, work / "redis2", persistent=True)
            log("2. ingest with duplicates: casimg")
            server2 = start_casimg(procs, work / "data2", redis2, processes=args.processes)
            ingest_dup = casimg_ingest(server2, redis2, dup_urls, sizes)
            procs.stop(server2.proc)
            log("2. ingest with duplicates: the limit again")
            limits_dup.append(reference_run(work, dup_urls))
            limit_dup = mean_result(limits_dup)

            # 4 and 5. Listing and Redis memory.
            listing: list[tuple[int, ListingTimes, float, dict[str, float]]] = []
            redis_proc3, redis3 = start_redis(procs, work / "redis3", persistent=False)
            base_memory = redis_used_memory(redis3)
            filled = 0
            for size in args.listing:
                log(f"4. listing: filling the index to {size:,} URLs through Index.store")
                fill_started = time.monotonic()
                asyncio.run(fill_index(redis3, filled, size))
                log(f"  filled in {time.monotonic() - fill_started:.0f} s")
                filled = size
                per_url = (redis_used_memory(redis3) - base_memory) / size
                breakdown = index_memory(redis3, size)
                lister = start_casimg(procs, work / f"data-list-{size}", redis3, workers=False)
                times = measure_listing(lister, size)
                procs.stop(lister.proc)
                listing.append((size, times, per_url, breakdown))
            procs.stop(redis_proc3)
        finally:
            procs.stop_all()

    # -- the table --
    load_after = os.getloadavg()
    lines.append(f"# casimg benchmarks\n\nRun {started_at:%Y-%m-%d %H:%M} UTC on {os.cpu_count()} cores "
                 f"({platform_line()}); load average {load_before[0]:.2f} before, {load_after[0]:.2f} after. "
                 f"`python scripts/bench.py {' '.join(sys.argv[1:])}`. casimg processes: {args.processes}.\n")
    lines.append(f"Image set: {len(files):,} distinct images, {total_mb:.0f} MB "
                 f"({formats['JPEG']} JPEG, {formats['PNG']} PNG, {formats['WEBP']} WebP, "
                 f"{min(s for _, s in files) // 1024}-{max(s for _, s in files) // 1024} KB); "
                 f"origin: {origin_kind} on 8 loopback addresses; concurrency {CONCURRENCY} "
                 f"({PER_HOST} per host).\n")
    lines.append("## 1-2. Ingest\n")
    lines.append(f"Creating a file in the run's workspace took {create_us:.0f} µs before the ingest "
                 "(`file_creation_cost`: each blob is one new file, and most blobs of a fresh store make a "
                 "new fan-out directory too).\n")
    lines.append("The required work is the limit plus what casimg cannot skip for a body: its validation, a "
                 "SHA-256 and a shared syncfs before the body counts (`required_work_fetch`; no index, queue "
                 "or log). Its ratio to the limit is the most one casimg process can reach on this stack and "
                 "machine; casimg's ratio to it is casimg's own overhead.\n")
    lines.append("| run | images | images/s | MB/s | seconds | of the limit | of the required work | target |")
    lines.append("|---|---|---|---|---|---|---|---|")

    def row(name: str, result: IngestResult, reference: IngestResult, required: IngestResult | None = None,
            target: bool = False) -> str:
        cells = [name, f"{result.images:,}", f"{result.per_second:.0f}", f"{result.mb_per_second:.1f}",
                 f"{result.seconds:.1f}", "" if result is reference else ratio(result.per_second, reference.per_second),
                 "" if required is None else ratio(result.per_second, required.per_second),
                 f">= 0.7: {verdict(result.per_second >= 0.7 * reference.per_second)}" if target else ""]
        return "| " + " | ".join(cells) + " |"

    lines.append(row(f"limit: aiohttp fetch + write, distinct (runs: {'/s, '.join(limit.failures)}/s)", limit, limit))
    lines.append(row(f"required work: the limit + validation, SHA-256, syncfs (runs: "
                     f"{'/s, '.join(required_work.failures)}/s)", required_work, limit))
    lines.append(row(f"casimg, distinct ({ingest.stored} stored, {ingest.failed} failed)", ingest, limit,
                     required_work, target=True))
    if multi is not None:
        lines.append(row(f"casimg --processes {args.multi}, distinct ({multi.stored} stored, {multi.failed} failed)",
                         multi, limit, required_work, target=True))
    lines.append(row(f"limit, half duplicates (runs: {'/s, '.join(limit_dup.failures)}/s)", limit_dup, limit_dup))
    lines.append(row(f"casimg, half duplicates ({ingest_dup.stored} stored, {ingest_dup.failed} failed)",
                     ingest_dup, limit_dup))
    lines.append("")
    lines.append("Validation cost per image, in-process on one core, ms (what the ingest pays per image in "
                 "worker threads; `CASIMG_VALIDATION` picks the mode):\n")
    lines.append("| format | images | full decode (load) | casimg `decode` (JPEG at 1/8 scale) | "
                 "casimg `structure` (default) |")
    lines.append("|---|---|---|---|---|")
    for row in validation:
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    if retrieval:
        lines.append(f"## 3. Retrieval\n\nwrk -t2 -c{args.connections} -d{args.duration}s, {args.repeat} round(s) "
                     "over all servers of a process count, averaged; "
                     f"{len(sample):,} stored images (average "
                     f"{statistics.mean(sizes_by_name.values()) / 1024:.0f} KB), "
                     f"every server with {args.processes} process(es), wrk on the same cores.\n")
        lines.append("| server | requests/s | MB/s | p50 ms | p99 ms | errors | ratio | target |")
        lines.append("|---|---|---|---|---|---|---|---|")
        names = {"casimg": "casimg GET /api/image", "bare": "bare Tornado: one HGET + one file read (floor)",
                 "nginx": "nginx static, same blob files (physical limit)",
                 "front": "nginx front: casimg X-Accel-Redirect + nginx sendfile"}
        default = f"casimg@{args.processes}"
        for name, result in retrieval.items():
            kind, count = name.split("@")
            label = f"{names[kind]}, {count} process(es)" + (" (default deployment)" if name == default else "")
            text, target = "", ""
            if kind == "casimg" and f"bare@{count}" in retrieval:
                text = f"{ratio(result.rps, retrieval[f'bare@{count}'].rps)} of bare"
                if name == default:
                    target = f">= 0.9: {verdict(result.rps >= 0.9 * retrieval[f'bare@{count}'].rps)}"
            elif kind in ("nginx", "front"):
                text = f"{ratio(result.rps, retrieval[default].rps)}x default"
                if kind == "front":
                    target = f">= 2x: {verdict(result.rps >= 2 * retrieval[default].rps)}"
            lines.append(f"| {label} | {result.rps:,.0f} | {result.mb_per_second:,.0f} | "
                         f"{result.p50_ms:.2f} | {result.p99_ms:.2f} | {result.errors} | {text} | {target} |")
        lines.append("")
    lines.append("## 4-5. Listing and memory\n")
    lines.append("Redis filled through `Index.store` (one digest and metadata per URL, URLs of "
                 f"{LIST_URL_LENGTH} characters), read over HTTP on one kept-alive connection (beside it, the first "
                 "page with a new connection for each request, as earlier runs measured it).\n")
    lines.append("| indexed URLs | first page (limit 100) p50 ms | the same, a new connection each | "
                 "first page limit=1000 p50 ms | full walk limit=1000 s | walk µs per URL | Redis bytes per URL | "
                 "of which url / blob buckets, and the count hash in bytes (MEMORY USAGE) |")
    lines.append("|---|---|---|---|---|---|---|---|")
    for size, times, per_url, parts in listing:
        split = f"{parts['url']:.0f} / {parts['blob']:.0f}, {parts['count']:.0f} B"
        lines.append(f"| {size:,} | {times.first_ms:.2f} | {times.first_new_connection_ms:.2f} | "
                     f"{times.first_1000_ms:.1f} | {times.walk_seconds:.1f} | "
                     f"{times.walk_seconds / size * 1e6:.1f} | {per_url:.0f} | {split} |")
    if listing:
        size, times, per_url, _ = listing[-1]
        lines.append("")
        lines.append(f"- First page under 5 ms at {size:,}: {verdict(times.first_ms < 5)} ({times.first_ms:.2f} ms "
                     f"over a kept-alive connection; {times.first_new_connection_ms:.2f} ms with a new one each).")
        if len(listing) > 1:
            (small, small_times, _, _) = listing[0]
            growth = (times.walk_seconds / small_times.walk_seconds) / (size / small)
            lines.append(f"- Walk growth against linear ({small:,} -> {size:,}): {growth:.2f} "
                         f"(1.00 is linear): {verdict(growth < 1.3)}.")
        lines.append(f"- Redis bytes per URL under 250: {verdict(per_url < 250)} ({per_url:.0f}).")
    lines.append(f"- casimg service RSS after ingesting {len(files):,} images: {rss / 1024:.0f} MiB "
                 f"({rss_start / 1024:.0f} MiB at start).")
    for note in notes:
        lines.append(f"- Note: {note}")
    return "\n".join(lines) + "\n"


def platform_line() -> str:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, Python {sys.version.split()[0]}" if model else f"Python {sys.version.split()[0]}"


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_origin":
        run_origin(int(sys.argv[2]), sys.argv[3])
        return
    if len(sys.argv) > 1 and sys.argv[1] == "_bare":
        run_bare(int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5]))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=5000, help="distinct images to ingest (default 5000)")
    parser.add_argument("--listing", default="100000,1000000",
                        help="comma-separated index sizes for the listing and memory figures (default 100000,1000000)")
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk run (default 10)")
    parser.add_argument("--connections", type=int, default=64, help="wrk connections (default 64)")
    parser.add_argument("--retrieval-urls", type=int, default=1000, help="stored URLs wrk cycles through")
    parser.add_argument("--processes", type=int, default=1, help="casimg (and bare handler) processes (default 1)")
    parser.add_argument("--multi", type=int, default=os.cpu_count() or 1,
                        help="also run casimg, the bare handler and the front with this many processes "
                             "(default: the core count; 1 turns it off)")
    parser.add_argument("--repeat", type=int, default=2,
                        help="rounds of wrk runs over the servers of a retrieval comparison, averaged (default 2)")
    parser.add_argument("--cache", default=str(ROOT / ".bench-cache"), help="where the generated images are kept")
    parser.add_argument("--output", default=str(ROOT / "BENCHMARKS.md"),
                        help="markdown file written (default BENCHMARKS.md)")
    parser.add_argument("--keep", action="store_true", help="keep the temp directory (logs, data) for inspection")
    args = parser.parse_args()
    args.listing = sorted(int(n) for n in args.listing.split(",") if n.strip())
    table = run(args)
    print(table)
    Path(args.output).write_text(table)
    log(f"wrote {args.output}")


if __name__ == "__main__":
    main()
