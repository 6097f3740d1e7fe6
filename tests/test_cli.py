"""`casimg` as an operator runs it: real `casimg serve` processes with their embedded Redis."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote

import pytest
import redis

from bench.procs import tree
from casimg import affinity
from casimg.cli import Formatter
from casimg.config import usable_cores
from casimg.embedded import EmbeddedRedis
from casimg.schema import url_bucket
from tests.conftest import eventually
from tests.procs import ROOT, Server, casimg, command_line, forked_children, free_port


@pytest.fixture
def data_dir(tmp_path: Path):
    directory = tmp_path / "data"
    yield directory
    # Whatever a test left running on this data dir (a Redis adopted after kill -9, say) goes with it.
    embedded = EmbeddedRedis(directory)
    if embedded.alive():
        embedded.stop()


def test_serve_with_embedded_redis_curl_flow_and_restart_persistence(data_dir, origin):
    server = Server(data_dir)
    try:
        url = origin.url("/img/100.jpg")
        job = server.submit([url])
        assert job["results"][0]["status"] == "stored"
        status, first_bytes, _ = server.call("GET", f"/api/image?url={quote(url, safe='')}")
        assert status == 200
        client = redis.Redis(unix_socket_path=str(data_dir / "redis" / "redis.sock"), decode_responses=True)
        assert client.config_get("port")["port"] == "0"  # a unix socket only, no TCP port
        assert client.config_get("appendonly")["appendonly"] == "yes"
        assert client.hget(f"casimg:url:{url_bucket(url)}", url).split()[0] == job["results"][0]["sha256"]
        client.close()
    finally:
        assert server.terminate() == 0
    assert not EmbeddedRedis(data_dir).alive(), "SIGTERM must stop the embedded Redis"
    assert "stopped" in server.output()

    again = Server(data_dir)
    try:
        assert again.key == server.key
        status, body, headers = again.call("GET", f"/api/image?url={quote(url, safe='')}")
        assert status == 200 and body == first_bytes
        status, body, headers = again.call("GET", "/api/images/")
        assert headers["X-Total-Count"] == "1" and json.loads(body)[0]["url"] == url
    finally:
        assert again.terminate() == 0


def test_second_server_on_a_live_data_dir_is_refused_and_touches_nothing(data_dir):
    server = Server(data_dir)
    try:
        before = sorted(p.name for p in data_dir.rglob("*"))
        second = casimg("serve", "--data-dir", str(data_dir), "--port", str(free_port()), check=False)
        assert second.returncode == 2
        assert "in use by another casimg server" in second.stderr
        assert sorted(p.name for p in data_dir.rglob("*")) == before
        assert server.call("GET", "/api/images")[0] == 200
    finally:
        assert server.terminate() == 0


def test_restart_after_kill_9_adopts_a_surviving_redis_or_starts_a_fresh_one(data_dir, origin):
    server = Server(data_dir)
    url = origin.url("/img/101.png")
    server.submit([url])
    server.kill()  # the embedded Redis runs in its own session: it survives
    assert EmbeddedRedis(data_dir).alive()
    adopted = Server(data_dir)
    assert adopted.call("GET", f"/api/image?url={quote(url, safe='')}")[0] == 200
    redis_pid = int((data_dir / "redis" / "redis.pid").read_text())
    adopted.kill()
    os.kill(redis_pid, signal.SIGKILL)  # now the whole tree is gone; a stale socket file stays
    eventually(lambda: not Path(f"/proc/{redis_pid}").exists(), "the killed redis-server to be reaped")
    fresh = Server(data_dir)
    try:
        assert fresh.call("GET", f"/api/image?url={quote(url, safe='')}")[0] == 200
    finally:
        assert fresh.terminate() == 0


def test_keys_commands_work_beside_a_running_server(data_dir):
    server = Server(data_dir)
    try:
        created = casimg("keys", "create", "--name", "ci", "--scope", "read", "--data-dir", str(data_dir))
        key = created.stdout.strip().splitlines()[-1]
        assert server.call("GET", "/api/images", key=key)[0] == 200
        assert server.call("POST", "/api/images", {"image_urls": ["http://x/y"]}, key=key)[0] == 403
        listed = casimg("keys", "list", "--data-dir", str(data_dir)).stdout
        assert "ci" in listed and "admin" in listed and key not in listed
        casimg("keys", "revoke", "ci", "--data-dir", str(data_dir))
        # Refused once the per-process key cache (CASIMG_KEY_CACHE_TTL) runs out.
        eventually(lambda: server.call("GET", "/api/images", key=key)[0] == 401, "the revoked key refused", 15)
        assert casimg("keys", "revoke", "ci", "--data-dir", str(data_dir), check=False).returncode == 1
    finally:
        assert server.terminate() == 0


def test_keys_and_fsck_work_with_no_server_running(data_dir):
    created = casimg("keys", "create", "--name", "first", "--scope", "admin", "--data-dir", str(data_dir))
    assert created.stdout.strip().splitlines()[-1].startswith("casimg_")
    assert "0 problem(s)" in casimg("fsck", "--data-dir", str(data_dir)).stdout
    assert not EmbeddedRedis(data_dir).alive()


def test_fsck_finds_missing_and_damaged_blobs(data_dir, origin):
    server = Server(data_dir)
    try:
        job = server.submit([origin.url("/img/102.jpg"), origin.url("/img/103.jpg")])
        assert casimg("fsck", "--data-dir", str(data_dir)).returncode == 0
        missing, damaged = (r["sha256"] for r in job["results"])
        path_of = lambda d: data_dir / "blobs" / d[:2] / d[2:4] / d  # noqa: E731
        path_of(missing).unlink()
        path_of(damaged).chmod(0o644)
        path_of(damaged).write_bytes(b"rot")
        result = casimg("fsck", "--data-dir", str(data_dir), check=False)
        assert result.returncode == 1
        assert f"missing blob {missing}" in result.stdout
        assert f"damaged blob {damaged}" in result.stdout
    finally:
        assert server.terminate() == 0


def test_worker_process_beside_a_server_without_workers(data_dir, origin):
    server = Server(data_dir, "--no-workers")
    worker = subprocess.Popen([sys.executable, "-m", "casimg", "worker", "--data-dir", str(data_dir)], cwd=ROOT,
                              env={**os.environ, **server.env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        job = server.submit([origin.url("/img/104.gif")])
        assert job["stored"] == 1
    finally:
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(15) == 0
        assert server.terminate() == 0


def test_worker_without_a_server_or_redis_url_fails_clearly(data_dir):
    result = casimg("worker", "--data-dir", str(data_dir), check=False)
    assert result.returncode == 2 and "no Redis" in result.stderr


def test_serve_processes_share_the_port_with_their_workers_and_stop_together(data_dir, origin):
    server = Server(data_dir, "--processes", "2")
    try:
        children = Path(f"/proc/{server.process.pid}/task/{server.process.pid}/children").read_text().split()
        commands = [Path(f"/proc/{pid}/cmdline").read_text() for pid in children]
        assert sum(is_server(command) for command in commands) == 2, commands
        urls = [origin.url(f"/img/{n}.jpg") for n in range(300, 310)]
        job = server.submit(urls)
        assert job["stored"] == 10
        for url in urls:
            assert server.call("GET", f"/api/image?url={quote(url, safe='')}")[0] == 200
        client = redis.Redis(unix_socket_path=str(data_dir / "redis" / "redis.sock"), decode_responses=True)
        heartbeats = client.keys("casimg:worker:*")
        client.close()
        assert len(heartbeats) == 2, "each server process runs its own download worker"
    finally:
        assert server.terminate() == 0
    assert not EmbeddedRedis(data_dir).alive()
    assert server.output().count("stopped") == 2


def test_serve_runs_a_process_per_core_by_default_and_one_when_told(data_dir, tmp_path):
    cores = usable_cores()
    server = Server(data_dir, env={"CASIMG_PROCESSES": "auto"})  # what serve does with nothing set
    try:
        children = Path(f"/proc/{server.process.pid}/task/{server.process.pid}/children").read_text().split()
        commands = [Path(f"/proc/{pid}/cmdline").read_text() for pid in children]
        assert sum(is_server(command) for command in commands) == (cores if cores > 1 else 0), commands
    finally:
        assert server.terminate() == 0
    assert not EmbeddedRedis(data_dir).alive()
    assert server.output().count("stopped") == cores  # each forked process, or the one
    one = Server(tmp_path / "one", "--processes", "1", env={"CASIMG_PROCESSES": "auto"})
    try:
        children = Path(f"/proc/{one.process.pid}/task/{one.process.pid}/children").read_text().split()
        assert not [pid for pid in children if is_server(Path(f"/proc/{pid}/cmdline").read_text())]
    finally:
        assert one.terminate() == 0


def _render_workers(server_pid: int) -> list[int]:
    """The render pool's workers below a server: the children of its forkserver."""
    forkservers = [pid for pid in tree(server_pid)[1:] if "forkserver" in command_line(pid)]
    return [worker for forkserver in forkservers for worker in forked_children(forkserver)]


def _on_every_cpu(pids: list[int], cpus: list[int]) -> bool:
    """Whether there are `pids` and each may run on all of `cpus` (a worker is pinned as its forkserver is
    until its initializer has run)."""
    try:
        return bool(pids) and all(os.sched_getaffinity(pid) == set(cpus) for pid in pids)
    except ProcessLookupError:
        return False


@pytest.mark.skipif(len(affinity.usable()) < 2, reason="one usable CPU: there is nothing to pin the servers to")
def test_each_forked_server_runs_on_a_core_of_its_own_and_its_render_workers_on_every_core(data_dir, tmp_path):
    cpus = affinity.usable()
    server = Server(data_dir, env={"CASIMG_PROCESSES": "auto"})
    try:
        servers = [int(pid) for pid in _forks(server.process.pid)]
        assert len(servers) == len(cpus)
        # Each pins itself as soon as it is forked, long before the first of them answers.
        assert sorted(os.sched_getaffinity(pid) for pid in servers) == [{cpu} for cpu in cpus]
        for pid in servers:  # the pool starts with each server; its workers use every CPU once they run
            eventually(lambda pid=pid: _on_every_cpu(_render_workers(pid), cpus),
                       f"the render workers of {pid} on every CPU")
        assert os.sched_getaffinity(server.process.pid) == set(cpus)  # the parent, and so the filler, are free
    finally:
        assert server.terminate() == 0
    free = Server(tmp_path / "free", env={"CASIMG_PROCESSES": "auto", "CASIMG_PIN_PROCESSES": "false"})
    try:
        servers = [int(pid) for pid in _forks(free.process.pid)]
        assert len(servers) == len(cpus)
        assert [os.sched_getaffinity(pid) for pid in servers] == [set(cpus)] * len(cpus)
    finally:
        assert free.terminate() == 0


def test_a_cpu_the_system_refuses_leaves_the_process_as_it_was():
    before = os.sched_getaffinity(0)
    assert affinity.pin(max(affinity.usable()) + 4096) is False
    assert os.sched_getaffinity(0) == before
    assert affinity.before_pin() is None  # its render workers are left as they are too


def test_servers_are_pinned_only_when_there_is_one_per_usable_cpu():
    cpus = affinity.usable()
    assert affinity.serve_plan(len(cpus), pin=False) is None
    assert affinity.serve_plan(1, pin=True) is None  # one process: its threads may use every CPU
    assert affinity.serve_plan(len(cpus) + 1, pin=True) is None  # more processes than CPUs: none would fit
    if len(cpus) > 1:
        assert affinity.serve_plan(len(cpus), pin=True) == cpus


GC_PROBE = """
import gc, json, weakref
from casimg import runtime

class Node:
    pass

def young_collections_while_holding(count):
    runs = []
    gc.callbacks.append(lambda phase, info: phase == "stop" and info["generation"] == 0 and runs.append(1))
    held = [[] for _ in range(count)]  # live containers, as downloads in flight are
    gc.callbacks.pop()
    return len(runs)

before = young_collections_while_holding(5000)
runtime.tune_gc()
after = young_collections_while_holding(5000)
freed = []
for n in range(30000):  # cycles no reference count frees, and no gc.collect() call
    a, b = Node(), Node()
    a.other, b.other = b, a
    weakref.finalize(a, freed.append, n)
    del a, b
print(json.dumps({"threshold": gc.get_threshold()[0], "frozen": gc.get_freeze_count(), "before": before,
                  "after": after, "freed": len(freed)}))
"""


def test_a_server_process_runs_the_cycle_collector_seldom_and_still_frees_cycles():
    """runtime.tune_gc, as run_loop applies it to every server and worker, in a fresh interpreter: the
    live objects of 5,000 downloads in flight start no young collection (Python's default started 7),
    what the imports made is frozen, and cyclic garbage is still freed without anyone asking."""
    probe = subprocess.run([sys.executable, "-c", GC_PROBE], capture_output=True, text=True, check=True, cwd=ROOT)
    found = json.loads(probe.stdout)
    assert found["before"] >= 5  # the default threshold (700) collected while the objects grew
    assert found["after"] == 0
    assert found["threshold"] == 10_000
    assert found["frozen"] > 1000
    assert found["freed"] > 20_000  # all but the last threshold's worth


def test_a_sigterm_while_the_forked_processes_start_stops_them_all_cleanly(data_dir):
    """The signal is sent as soon as both processes are forked, before either answers: each stops once up
    (its stop was held back while it started), instead of dying of the signal's default action."""
    log = data_dir.parent / "serve.log"
    env = {**os.environ, "CASIMG_ALLOW_NETWORKS": "127.0.0.1/32", "CASIMG_ORIGIN_RATE": "0"}
    with log.open("wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "casimg", "serve", "--data-dir", str(data_dir),
                                    "--port", str(free_port()), "--processes", "2"],
                                   cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        eventually(lambda: len(_forks(process.pid)) == 2, "two forked server processes", every=0.002)
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0, log.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert not EmbeddedRedis(data_dir).alive()
    assert log.read_text().count("casimg: stopped") == 2, log.read_text()


def is_server(command: str) -> bool:
    """A casimg process serve forked, not the placeholder filler it starts beside them."""
    return "casimg" in command and "casimg.filler" not in command


def _forks(pid: int) -> list[str]:
    """The children of `pid` that are forks of it (the same command line; the embedded Redis is not)."""
    own = Path(f"/proc/{pid}/cmdline").read_bytes()
    forks = []
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        with contextlib.suppress(OSError):
            if Path(f"/proc/{child}/cmdline").read_bytes() == own:
                forks.append(child)
    return forks


@pytest.mark.parametrize("created", [0.0, 0.999, 86_399.5, 1_764_630_000.25, 1_764_630_001.0])
def test_the_log_formatter_writes_the_time_as_loggings_own_does(created):
    ours, logging_own = Formatter("%(asctime)s %(message)s"), logging.Formatter("%(asctime)s %(message)s")
    for at in (created, created + 0.5, created):  # the cached second, the next one, and back
        record = logging.LogRecord("casimg.access", logging.INFO, __file__, 1, "GET /", None, None)
        record.created, record.msecs = at, int((at - int(at)) * 1000)
        assert ours.format(record) == logging_own.format(record)
