"""Child processes, for the benchmark and the end-to-end tests alike: a free port, a process started
with its output in a file, waiting until it answers (a port, HTTP, a Redis PING), and stopping it by
its own id.

casimg is imported only to look up the redis-server binary it runs, inside the one function that needs
it, so tests/procs.py and every bench module import this without a cycle.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import redis

ROOT = Path(__file__).resolve().parent.parent
STARTUP_TIMEOUT = 30.0  # seconds a child may take to answer; generous for a loaded 2-core machine
STOP_TIMEOUT = 20.0  # seconds a child may take to exit after SIGTERM before it gets SIGKILL
LOG_TAIL = 2000  # characters of a child's log quoted when it fails to start
TICK = os.sysconf("SC_CLK_TCK")  # /proc/<pid>/stat counts CPU in these
SETTLED_CPU = 0.05  # of a core: below it over SETTLED_WINDOW, a started server has finished starting
SETTLED_WINDOW = 0.5  # seconds
FILLER_STARTUP = 3.0  # seconds a started placeholder filler counts in a server's settling (its imports)
# config/nginx.conf marks the part of its http block that is the casimg front, for the bench and the test.
FRONT_BEGIN, FRONT_END = "# -- casimg front begins --", "# -- casimg front ends --"

Popen = subprocess.Popen[bytes]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def spawn(args: Sequence[str], log_path: Path, env: dict[str, str] | None = None, *, cwd: Path | None = None,
          new_session: bool = False) -> Popen:
    """`args` started with stdout and stderr appended to `log_path`: a file, not a pipe, since a pipe
    nobody reads blocks the child once its buffer is full. `env` adds to this process's environment; a
    `new_session` child leads its own process group, which `stop` signals whole (a forking server's
    children go with it)."""
    with open(log_path, "ab") as log:  # the child holds its own descriptor
        return subprocess.Popen(list(args), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                cwd=cwd, env={**os.environ, **(env or {})}, start_new_session=new_session)


def start(args: Sequence[str], log_path: Path, ready: Callable[[Popen], None], *,
          env: dict[str, str] | None = None, cwd: Path | None = None, new_session: bool = False) -> Popen:
    """`spawn`, then `ready(process)`, which returns once the child serves. A child that does not get
    there is killed, and the error quotes the end of its log, so no caller tracks a process it never got."""
    process = spawn(args, log_path, env, cwd=cwd, new_session=new_session)
    try:
        ready(process)
    except BaseException as exc:
        stop(process, signal.SIGKILL)
        if not isinstance(exc, Exception):
            raise
        tail = log_path.read_text(errors="replace")[-LOG_TAIL:] if log_path.exists() else ""
        raise RuntimeError(f"{exc}; the end of {log_path}:\n{tail}") from exc
    return process


def stop(process: Popen, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT) -> None:
    """Signal the child (its whole process group when it leads one), wait, and SIGKILL what outlives
    `timeout`."""

    def send(signal_number: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            if os.getpgid(process.pid) == process.pid:
                os.killpg(process.pid, signal_number)
            else:
                process.send_signal(signal_number)

    if process.poll() is None:
        send(sig)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            send(signal.SIGKILL)
            process.wait()


class Procs:
    """The children of a run, each in its own session, stopped (by their own ids) when it ends."""

    def __init__(self) -> None:
        self.children: list[Popen] = []

    def add(self, process: Popen) -> Popen:
        self.children.append(process)
        return process

    def start(self, args: Sequence[str], log_path: Path, env: dict[str, str] | None = None) -> Popen:
        """A child in the repository (where `python -m bench` finds the bench package) and its own session."""
        return self.add(spawn(args, log_path, env, cwd=ROOT, new_session=True))

    def stop(self, process: Popen, sig: int = signal.SIGTERM) -> None:
        stop(process, sig)
        if process in self.children:
            self.children.remove(process)

    def stop_all(self) -> None:
        for process in reversed(list(self.children)):
            self.stop(process)


# -- waiting until a child serves -------------------------------------------------------------------

def _wait(check: Callable[[], bool], what: str, process: Popen | None, timeout: float) -> None:
    """Poll `check` until it holds; fail when `process` exits first or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while not check():
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the child exited {process.returncode} while waiting for {what}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"waited {timeout:.0f} s for {what}")
        time.sleep(0.05)


def wait_port(port: int, process: Popen | None = None, timeout: float = STARTUP_TIMEOUT) -> None:
    """Until 127.0.0.1:`port` accepts a connection (nothing is sent: what answers there may not be up)."""

    def accepts() -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except OSError:
            return False
        return True

    _wait(accepts, f"port {port} to accept", process, timeout)


def wait_http(url: str, process: Popen | None = None, timeout: float = STARTUP_TIMEOUT) -> None:
    """Until `url` answers over HTTP, with any status."""

    def answers() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return True
        except urllib.error.HTTPError:
            return True
        except OSError:
            return False

    _wait(answers, f"{url} to answer", process, timeout)


def wait_redis(socket_path: Path, process: Popen | None = None, timeout: float = STARTUP_TIMEOUT) -> None:
    """Until the Redis on `socket_path` answers PING."""
    client = redis.Redis(unix_socket_path=str(socket_path), socket_timeout=2)

    def answers() -> bool:
        try:
            return bool(client.ping())
        except (redis.ConnectionError, redis.TimeoutError, FileNotFoundError):
            return False

    try:
        _wait(answers, f"redis on {socket_path} to answer PING", process, timeout)
    finally:
        client.close()


# -- the servers both start -------------------------------------------------------------------------

def start_redis_server(directory: Path, *options: str, new_session: bool = False) -> Popen:
    """A redis-server (casimg's own, as `casimg serve` finds it) on the unix socket directory/redis.sock,
    with no TCP port and no RDB snapshots, keeping its files and log in `directory`; `options` are
    further redis-server options. Returns once it answers PING."""
    from casimg.embedded import find_redis_server

    directory.mkdir(parents=True, exist_ok=True)
    sock = directory / "redis.sock"
    args = [find_redis_server(), "--port", "0", "--unixsocket", str(sock), "--dir", str(directory), "--save", "",
            *options]
    return start(args, directory / "redis.log", lambda process: wait_redis(sock, process), new_session=new_session)


def start_serve(args: Sequence[str], port: int, log_path: Path, *, env: dict[str, str] | None = None,
                cwd: Path | None = None, new_session: bool = False) -> Popen:
    """`python -m casimg serve ARGS`, returned once it answers /healthz on 127.0.0.1:`port`."""
    return start([sys.executable, "-m", "casimg", "serve", *args], log_path,
                 lambda process: wait_http(f"http://127.0.0.1:{port}/healthz", process),
                 env=env, cwd=cwd, new_session=new_session)


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


def start_moto(port: int, log_path: Path, *, env: dict[str, str] | None = None,
               new_session: bool = False) -> Popen:
    """moto's standalone S3 server (`moto_server`, from the test extra) on 127.0.0.1:`port`, answering HTTP.

    An emulator: it speaks the S3 API (conditional PUT, ranges, multipart, presigned URLs) but its speed
    says nothing of a real object store. It takes any credentials unless `env` turns its authentication
    on (INITIAL_NO_AUTH_ACTION_COUNT=N: the first N requests pass, every later one is checked).
    """
    binary = Path(sys.executable).parent / "moto_server"
    args = [str(binary) if binary.exists() else "moto_server", "-H", "127.0.0.1", "-p", str(port)]
    return start(args, log_path, lambda process: wait_http(f"http://127.0.0.1:{port}/", process),
                 env=env, new_session=new_session)


def nginx_front_config(casimg_port: int, listen_port: int, blob_dir: Path) -> str:
    """config/nginx.conf's casimg front (between its markers), with only its three site lines replaced:
    the casimg upstream, the port clients connect to, and the blob directory."""
    shipped = (ROOT / "config" / "nginx.conf").read_text()
    front = shipped[shipped.index(FRONT_BEGIN):shipped.index(FRONT_END)]
    return (front.replace("server 127.0.0.1:9000;", f"server 127.0.0.1:{casimg_port};")
            .replace("listen 127.0.0.1:8080;", f"listen 127.0.0.1:{listen_port};")
            .replace("/var/lib/casimg/blobs/", f"{blob_dir}/"))


def start_nginx(prefix: Path, servers: str, ports: Sequence[int], workers: int = 1, *,
                new_session: bool = False) -> Popen:
    """nginx with `servers` in its http block, its files under `prefix`; returned once every port of
    `ports` accepts connections."""
    for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (prefix / sub).mkdir(parents=True, exist_ok=True)
    # As root, nginx's workers would run as nobody, who cannot read a private temp directory.
    user = "user root root;" if os.geteuid() == 0 else ""
    conf = prefix / "nginx.conf"
    conf.write_text(NGINX_MAIN.format(prefix=prefix, servers=servers, user=user, workers=workers))

    def ready(process: Popen) -> None:
        for port in ports:
            wait_port(port, process)

    return start([shutil.which("nginx") or "nginx", "-p", str(prefix), "-c", str(conf)], prefix / "out.log", ready,
                 new_session=new_session)


def status_kib(pid: int, field: str) -> int:
    """A memory figure of /proc/PID/status in KiB (VmRSS: resident now; VmHWM: the most it has been), or
    0 when the process has none (a kernel thread)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


class S3Proxy:
    """A loopback HTTP proxy in front of an S3 endpoint, in a thread of the test: it records each request's
    method, path and headers, and answers the next `throttle(n)` requests with 503 SlowDown, as a
    throttled bucket does, or refuses the next `refuse_uploads(n)` PUTs (403 AccessDenied, after reading
    their bodies: an upload the store turned down, which no retry mends)."""

    SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
                 b"<Message>Please reduce your request rate.</Message></Error>")
    ACCESS_DENIED = b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>AccessDenied</Code></Error>'

    def __init__(self, target: str) -> None:
        import http.client
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.target = urlsplit(target)
        self.seen: list[tuple[str, str, dict[str, str]]] = []
        self.throttled = 0
        self._throttle = 0
        self._refuse = 0
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                return

            def _relay(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                with proxy._lock:
                    proxy.seen.append((self.command, self.path, dict(self.headers)))
                    throttle = proxy._throttle > 0
                    proxy._throttle -= throttle
                    proxy.throttled += throttle
                    refused = self.command == "PUT" and proxy._refuse > 0
                    proxy._refuse -= refused
                if throttle or refused:
                    answer = proxy.SLOW_DOWN if throttle else proxy.ACCESS_DENIED
                    self.send_response(503 if throttle else 403)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(answer)))
                    self.end_headers()
                    self.wfile.write(answer)
                    return
                upstream = http.client.HTTPConnection(proxy.target.hostname, proxy.target.port, timeout=60)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
                    upstream.request(self.command, self.path, body=body or None, headers=headers)
                    reply = upstream.getresponse()
                    data = reply.read()
                finally:
                    upstream.close()
                self.send_response(reply.status)
                for name, value in reply.getheaders():
                    if name.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(name, value)
                length = reply.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _relay

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def throttle(self, requests: int) -> None:
        with self._lock:
            self._throttle = requests

    def refuse_uploads(self, puts: int) -> None:
        with self._lock:
            self._refuse = puts

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# -- what a child and the processes below it are doing (/proc) ----------------------------------------

def own_cpu(pid: int) -> float:
    """User and system CPU seconds of one process (its threads included, not its children); 0 once gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK


def tree(pid: int) -> list[int]:
    """`pid` and every process below it (casimg serve's forked servers, their filler, a pool's workers).

    A process's children are listed by the thread that started each (/proc/PID/task/TID/children): the
    render pool's forkserver, started from a thread of the blocking pool, is not among the main thread's.
    """
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        try:
            threads = os.listdir(f"/proc/{current}/task")
        except OSError:
            continue
        for thread in threads:
            try:
                todo += [int(child) for child in Path(f"/proc/{current}/task/{thread}/children").read_text().split()]
            except OSError:
                continue
    return found


def confine(pid: int, cpus: set[int]) -> None:
    """Run `pid`, every process below it and every thread of each on `cpus` from now on (threads and
    children they start later inherit it). A process or thread that exits meanwhile is passed over."""
    for member in tree(pid):
        try:
            threads = os.listdir(f"/proc/{member}/task")
        except OSError:
            continue
        for thread in threads:
            with contextlib.suppress(OSError):  # (ProcessLookupError: it exited)
                os.sched_setaffinity(int(thread), cpus)


def tree_cpu(pid: int) -> float:
    """CPU seconds of `pid` and of the processes below it now (what exited meanwhile is not counted)."""
    return sum(own_cpu(member) for member in tree(pid))


def wait_settled(process: Popen, *, quiet: float = SETTLED_CPU, window: float = SETTLED_WINDOW,
                 filler_startup: float = FILLER_STARTUP, timeout: float = STARTUP_TIMEOUT) -> float:
    """Wait until `process` and the processes below it have finished starting: a `window` in which they
    spent less than `quiet` of a core. Returns the seconds waited.

    A server answers its first request before all of it has started: ``casimg serve`` starts its render
    pool (a forkserver that imports Pillow, then the workers) and its placeholder filler beside its first
    requests, about a second of CPU on a 2-core machine. A run timed from the first answer would charge
    that once-per-start cost to the first job, which the references (forked, already imported) and
    img2dataset's own figure (which starts counting after its start) do not pay. The filler counts for
    its first `filler_startup` seconds only: a server started on a store whose placeholders are not all made
    yet has it working through them at idle priority, for as long as there are some.
    """
    started = time.monotonic()
    deadline = started + timeout
    before = _settling_cpu(process.pid, True)
    while True:
        time.sleep(window)
        with_filler = time.monotonic() - started < filler_startup
        after = _settling_cpu(process.pid, with_filler)
        if sum(after.values()) - sum(before.get(pid, 0.0) for pid in after) < quiet * window:
            return time.monotonic() - started
        if process.poll() is not None:
            raise RuntimeError(f"the child exited {process.returncode} while waiting for it to settle")
        if time.monotonic() > deadline:
            raise RuntimeError(f"waited {timeout:.0f} s for the child to settle")
        before = after


def _settling_cpu(pid: int, with_filler: bool) -> dict[int, float]:
    return {member: own_cpu(member) for member in tree(pid) if with_filler or not is_filler(member)}


def is_filler(pid: int) -> bool:
    """Whether `pid` is a casimg placeholder filler (python -m casimg.filler)."""
    try:
        return b"casimg.filler" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
