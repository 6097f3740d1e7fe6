"""Variants across real processes: `casimg serve` processes, `casimg fsck`, their Redis and the origin.

- Concurrent requests for one variant, spread over two server processes, make exactly one render (the
  render counter of /metrics, shared by the processes of one data dir).
- Deleting the last URL of a source removes its variants' blobs and relations.
- fsck reports a missing variant blob and a dangling relation, and --repair mends both; the sweep it runs
  keeps the variant blobs that are referenced.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from casimg.storage.file import FileStore
from tests.procs import Processes, Server, assert_fsck_clean, casimg, command_line, embedded_client

pytestmark = pytest.mark.slow
TRACKER_GRACE = 2.0  # seconds a resource tracker may take to report, after its process has exited


@pytest.fixture
def procs() -> Any:
    tracked = Processes()
    yield tracked
    tracked.cleanup()


def image_path(url: str, **params: str) -> str:
    return f"/api/image?url={quote(url, safe='')}" + "".join(f"&{k}={v}" for k, v in params.items())


def renders(server: Server) -> float:
    status, body, _ = server.call("GET", "/metrics")
    assert status == 200, body
    match = re.search(rb"^casimg_variant_renders_total ([0-9.e+]+)$", body, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def etag(headers: dict[str, str]) -> str:
    return {name.lower(): value for name, value in headers.items()}["etag"].strip('"')


def test_concurrent_requests_over_two_processes_make_one_render(procs, tmp_path, redis_server, origin):
    env = {"CASIMG_REDIS_URL": redis_server.url, "CASIMG_KEY_PREFIX": f"one-render-{os.urandom(4).hex()}:"}
    first = procs.server(tmp_path / "data", env=env)
    second = procs.server(tmp_path / "data", env=env)  # the same blobs and Redis: two nodes of one cluster
    url = origin.url("/photo/11.jpg?w=3000&h=2000")
    first.submit([url])
    # A large AVIF takes a good part of a second to render: the requests arrive while it runs.
    path = image_path(url, w="1400", format="avif")
    start = threading.Barrier(8)
    answers: list[tuple[int, bytes, dict[str, str]]] = []

    def ask(server: Server) -> None:
        start.wait()
        answers.append(server.call("GET", path))

    threads = [threading.Thread(target=ask, args=(server,)) for server in [first, second] * 4]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert [status for status, _, _ in answers] == [200] * 8, answers[0][1][:200]
    assert len({body for _, body, _ in answers}) == 1
    assert len({etag(headers) for _, _, headers in answers}) == 1
    assert renders(first) == renders(second) == 1


def test_deleting_the_last_url_of_a_source_removes_its_variants(procs, tmp_path, origin):
    server = procs.server(tmp_path / "data")
    a, b = origin.url("/dup/variant-a.jpg"), origin.url("/dup/variant-b.jpg")  # the same bytes
    results = server.submit([a, b])["results"]
    source = results[0]["sha256"]
    blobs = FileStore(server.data_dir)
    variants = []
    for width in ("10", "12"):
        status, body, headers = server.call("GET", image_path(a, w=width, format="webp"))
        assert status == 200, body
        variants.append(etag(headers))
    assert all(blobs.exists(digest) for digest in variants)
    client = embedded_client(server.data_dir)
    assert client.hlen(f"casimg:variants:{source}") == 2

    assert server.call("DELETE", image_path(a))[0] == 204
    assert all(blobs.exists(digest) for digest in variants)  # b still holds the source, and its variants
    assert etag(server.call("GET", image_path(b, w="10", format="webp"))[2]) == variants[0]

    assert server.call("DELETE", image_path(b))[0] == 204
    assert not any(blobs.exists(digest) for digest in variants)
    assert not blobs.exists(source)
    assert client.exists(f"casimg:variants:{source}") == 0
    for digest in variants:
        assert server.call("GET", f"/api/blobs/{digest}")[0] == 404
    assert client.hgetall("casimg:count") == {"urls": "0", "blobs": "0"}
    assert_fsck_clean(server.data_dir)


def test_fsck_finds_and_repairs_a_missing_variant_blob_and_a_dangling_relation(procs, tmp_path, origin):
    server = procs.server(tmp_path / "data")
    url = origin.url("/img/750.png")
    source = server.submit([url])["results"][0]["sha256"]
    kept = etag(server.call("GET", image_path(url, w="10", format="webp"))[2])
    lost = etag(server.call("GET", image_path(url, w="12", format="webp"))[2])
    assert_fsck_clean(server.data_dir)  # variant blobs are referenced: no orphan, no problem
    blobs = FileStore(server.data_dir)
    os.unlink(blobs.blob_path(lost))
    client = embedded_client(server.data_dir)
    stranger = "ab" * 32
    client.hset(f"casimg:variants:{stranger}", "v1:w=1&format=png", f"{kept} 100")

    checked = casimg("fsck", "--data-dir", str(server.data_dir), check=False)
    assert checked.returncode == 1, checked.stdout
    assert f"missing variant blob {lost}" in checked.stdout
    assert f"variant relation(s) of {stranger} dangle" in checked.stdout

    repaired = casimg("fsck", "--data-dir", str(server.data_dir), "--repair", check=False)
    assert "dropped the variant relations of " + stranger in repaired.stdout, repaired.stdout
    assert f"its variant blob {lost} is missing" in repaired.stdout, repaired.stdout
    assert_fsck_clean(server.data_dir)
    assert blobs.exists(kept) and blobs.exists(source)  # the sweep kept the referenced variant blob
    # The dropped variant is made again on its next request.
    status, _, headers = server.call("GET", image_path(url, w="12", format="webp"))
    assert status == 200 and etag(headers) == lost and blobs.exists(lost)
    deadline = time.monotonic() + 60  # the placeholder comes from the filler, after the store
    while not json.loads(server.call("GET", "/api/images")[1])[0]["placeholder"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert json.loads(server.call("GET", "/api/images")[1])[0]["placeholder"]
    assert_fsck_clean(server.data_dir)


def test_a_variant_blob_survives_the_periodic_sweep(procs, tmp_path, origin):
    server = procs.server(tmp_path / "data", env={"CASIMG_SWEEP_INTERVAL": "0.5"})
    url = origin.url("/img/760.jpg")
    server.submit([url])
    variant = etag(server.call("GET", image_path(url, w="10", format="png"))[2])
    log = Path(server.log)
    until = time.monotonic() + 60
    while log.read_text().count("sweep:") < 2 and time.monotonic() < until:
        time.sleep(0.2)
    assert log.read_text().count("sweep:") >= 2, "the sweep did not run"
    assert FileStore(server.data_dir).exists(variant)
    assert server.call("GET", f"/api/blobs/{variant}")[0] == 200


def test_serve_with_render_processes_stops_without_leaking_semaphores(procs, tmp_path, origin):
    """Each render pool's queues hold named semaphores; a server process that exits before they are
    freed leaves them to multiprocessing's resource tracker, which warns of them on stderr. Two
    processes, stopped twice, since whether the pool's thread had ended by then was a race."""
    url = origin.url("/img/761.jpg")
    for turn in range(2):
        server = procs.server(tmp_path / "data", env={"CASIMG_PROCESSES": "2"})
        if turn == 0:
            server.submit([url])
        for _ in range(4):  # over both processes (the kernel spreads connections), each rendering or not
            assert server.call("GET", image_path(url, w=str(20 + turn), format="png"))[0] == 200
        assert server.terminate(30) == 0
        # The tracker writes once its server process has gone, a moment after: look for a while.
        until = time.monotonic() + TRACKER_GRACE
        while "leaked semaphore" not in server.output() and time.monotonic() < until:
            time.sleep(0.1)
        output = server.output()
        assert "stopped" in output
        assert "leaked semaphore" not in output, output[-2000:]


def _children() -> dict[int, list[int]]:
    """Each process's children, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
        children.setdefault(ppid, []).append(int(entry.name))
    return children


def _descendants(pid: int) -> set[int]:
    tree, found, todo = _children(), set(), [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def test_render_processes_end_with_a_server_killed_with_sigkill(procs, tmp_path, origin):
    """A server killed outright runs no close(): its render pool's workers (and their forkserver, which
    they keep alive) must still go, not pile up as orphans of every kill -9."""
    server = procs.server(tmp_path / "data")
    url = origin.url("/img/762.jpg")
    server.submit([url])
    assert server.call("GET", image_path(url, w="16", format="png"))[0] == 200
    renderers = {pid for pid in _descendants(server.process.pid) if "multiprocessing" in command_line(pid)}
    assert any("forkserver" in command_line(pid) for pid in renderers), "the render pool did not start"
    redis = {pid for pid in _descendants(server.process.pid) if "redis-server" in command_line(pid)}
    os.kill(server.process.pid, signal.SIGKILL)
    server.process.wait(10)
    try:
        until = time.monotonic() + 15
        while time.monotonic() < until and any(Path(f"/proc/{pid}").exists() for pid in renderers):
            time.sleep(0.1)
        left = {pid: command_line(pid)[:80] for pid in renderers if Path(f"/proc/{pid}").exists()}
        assert not left, left
    finally:
        for pid in redis:  # the embedded Redis outlives a killed server by design (the next start takes it over)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
