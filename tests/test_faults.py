"""Fault injection against real processes: what a crash, an outage or a full disk may not lose.

Every test runs real `casimg serve` / `casimg worker` processes, real `redis-server` and the real local
origin (on 127.0.0.1 only), injects a fault while work is under way, and ends with the same checks:
every accepted URL is stored (bytes identical to the origin's) or failed with a reason, none pending;
`casimg fsck` finds no problem; the queue stream is empty, job keys expire and only live workers stay
in the consumer group. Run them alone with `pytest -m faults` (add -s to see the figures they print).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import threading
import time
import urllib.error
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import pytest

from casimg.embedded import EmbeddedRedis
from casimg.worker import MAX_DELIVERIES
from tests.conftest import RedisProcess, eventually
from tests.procs import (
    JOB_TIMEOUT,
    PREFIX,
    Processes,
    Server,
    assert_fsck_clean,
    assert_nothing_grows,
    assert_retrievable,
    casimg,
    embedded_client,
    expected_bytes,
    image_urls,
    job,
    kill_tree,
    queue_streams,
    queued,
    settle,
    submit,
    wait_for_progress,
)

pytestmark = [pytest.mark.faults, pytest.mark.slow]

IMPORT = 500  # URLs in the import a fault interrupts
FAULT_AFTER = 100  # the fault goes in once this many are finished: well inside the import
# Each image takes this long at the origin, so the import is still running when the fault goes in
# (8 at a time: about 6 s for 500) without making the suite slow.
SLOW_ORIGIN = "delay=0.1"
SHUTDOWN_BOUND = 10.0  # seconds SIGTERM may take to end `casimg serve` (the bound)
REQUEST_BOUND = 15.0  # no request may hang longer than this while Redis is away (socket timeout is 10 s)
# The clients here hammer one key far past the default request rate on purpose; the rate limit has its
# own tests (tests/test_limits.py) and would only turn these into tests of it.
ENV = {"CASIMG_PER_HOST_CONCURRENCY": "8", "CASIMG_RATE_LIMIT": "0"}


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


def durable_state(data_dir: Path, job_id: str) -> tuple[int, int, int]:
    """(finished URLs, entries left in the queue, job total) as the data dir's Redis has them on disk.

    Read with only Redis running, after the fault and before the restart: proves the fault really hit
    the middle of the import, and that exactly the unfinished URLs are still queued.
    """
    embedded = EmbeddedRedis(data_dir)
    embedded.start()
    try:
        client = embedded_client(data_dir)
        state = client.hgetall(f"{PREFIX}job:{job_id}")
        left = queued(client)
        client.close()
    finally:
        embedded.stop()
    return int(state["done"]), left, int(state["total"])


def assert_all_stored(server: Server, job_id: str, urls: list[str]) -> dict[str, Any]:
    final = settle(server, job_id)
    assert [r["url"] for r in final["results"]] == urls
    failed = [r for r in final["results"] if r["status"] != "stored"]
    assert not failed, failed[:5]
    assert_retrievable(server, urls)
    return final


def test_a_url_whose_worker_dies_every_time_fails_after_max_deliveries(data_dir, procs, origin):
    """A URL that ends its worker each time (killed mid-download here, as a crashing decoder would) fails
    with a reason after MAX_DELIVERIES, instead of taking every worker down in turn for ever."""
    env = {**ENV, "CASIMG_WORKER_HEARTBEAT": "1"}  # a dead worker's entries are taken over within a second
    server = procs.server(data_dir, "--no-workers", env=env)
    job_id = submit(server, [origin.url("/slow")])  # trickles for a minute: always mid-download when killed
    client = embedded_client(data_dir)
    for delivery in range(1, MAX_DELIVERIES + 1):
        worker = procs.worker(data_dir, env=server.env, name=f"worker-{delivery}")
        deadline = time.monotonic() + 30
        while True:
            holders = [(stream, c) for stream in queue_streams(client)
                       for c in client.xinfo_consumers(stream, "workers") if c["pending"]]
            if holders and f"-{worker.pid}-" in holders[0][1]["name"]:
                break
            assert time.monotonic() < deadline, f"worker {delivery} never took the entry: {holders}"
            time.sleep(0.1)
        [pending] = client.xpending_range(holders[0][0], "workers", min="-", max="+", count=10)
        assert pending["times_delivered"] == delivery
        worker.kill()
        worker.wait()
    assert job(server, job_id)["done"] == 0

    last = procs.worker(data_dir, env=server.env, name="worker-last")
    [result] = settle(server, job_id)["results"]
    assert result["status"] == "failed"
    assert result["error"] == f"abandoned: {MAX_DELIVERIES} workers stopped while on it"
    assert_nothing_grows(client)
    last.send_signal(signal.SIGTERM)
    assert last.wait(SHUTDOWN_BOUND + 5) == 0
    assert server.terminate() == 0


@pytest.mark.parametrize("appendfsync", ["everysec", "always"])
def test_kill_9_of_server_and_its_redis_mid_import_then_restart_completes_the_job(data_dir, procs, origin,
                                                                                  appendfsync):
    env = {**ENV, "CASIMG_APPENDFSYNC": appendfsync}
    server = procs.server(data_dir, env=env)
    assert embedded_client(data_dir).config_get("appendfsync")["appendfsync"] == appendfsync
    urls = image_urls(origin, IMPORT, start=10_000 if appendfsync == "everysec" else 11_000, query=SLOW_ORIGIN)
    job_id = submit(server, urls)
    wait_for_progress(server, job_id, FAULT_AFTER)
    kill_tree(server)

    done, left, total = durable_state(data_dir, job_id)
    assert FAULT_AFTER <= done < total == IMPORT
    assert left == total - done, "every unfinished URL must still be in the queue"

    restarted = procs.server(data_dir, env=env)
    assert_all_stored(restarted, job_id, urls)
    assert_fsck_clean(data_dir)
    assert_nothing_grows(embedded_client(data_dir))
    assert restarted.terminate() == 0


def test_kill_9_of_the_worker_mid_import_a_second_worker_takes_over(data_dir, procs, origin):
    server = procs.server(data_dir, "--no-workers", env=ENV)
    assert server.call("GET", "/readyz")[0] == 200  # ready before any worker has touched the data dir
    first = procs.worker(data_dir, env=server.env, name="worker-1")
    urls = image_urls(origin, IMPORT, start=20_000, query=SLOW_ORIGIN)
    job_id = submit(server, urls)
    wait_for_progress(server, job_id, FAULT_AFTER)
    first.kill()
    first.wait()

    client = embedded_client(data_dir)
    orphaned = sum(c["pending"] for stream in queue_streams(client) for c in client.xinfo_consumers(stream, "workers"))
    assert orphaned > 0, "the killed worker held no entries: the takeover would not be tested"
    assert job(server, job_id)["done"] < IMPORT

    second = procs.worker(data_dir, env=server.env, name="worker-2")
    assert_all_stored(server, job_id, urls)
    assert_fsck_clean(data_dir)
    assert_nothing_grows(client)
    second.send_signal(signal.SIGTERM)
    assert second.wait(SHUTDOWN_BOUND + 5) == 0
    assert server.terminate() == 0


def test_sigterm_mid_import_exits_within_10_s_and_the_restart_resumes(data_dir, procs, origin):
    server = procs.server(data_dir, env=ENV)  # the default CASIMG_SHUTDOWN_GRACE (7 s)
    # A few downloads outlast the shutdown grace: they are cut off and must come back on the restart.
    stalled = [origin.url(f"/img/{n}.jpg?delay=12") for n in range(30_000, 30_003)]
    urls = stalled + image_urls(origin, IMPORT, start=30_100, query=SLOW_ORIGIN)
    job_id = submit(server, urls)
    wait_for_progress(server, job_id, FAULT_AFTER)

    started = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    code = server.process.wait(60)
    took = time.monotonic() - started
    print(f"\nSIGTERM mid-import: exited {code} after {took:.1f} s")
    assert code == 0 and took <= SHUTDOWN_BOUND
    assert not EmbeddedRedis(data_dir).alive()
    assert list((data_dir / "tmp").iterdir()) == [], "a cut-off download left its temp file"

    done, left, total = durable_state(data_dir, job_id)
    assert FAULT_AFTER <= done < total and left == total - done

    restarted = procs.server(data_dir, env=ENV)
    final = assert_all_stored(restarted, job_id, urls)
    assert all(r["status"] == "stored" for r in final["results"][:3])
    assert_fsck_clean(data_dir)
    assert_nothing_grows(embedded_client(data_dir))
    assert restarted.terminate() == 0


# -- Redis away ------------------------------------------------------------------------------------------

class Client(threading.Thread):
    """Calls the API in a loop until told to stop, recording (status, seconds, headers, body) per call."""

    def __init__(self, server: Server, calls: list[tuple[str, str, Any]], stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.server, self.calls, self.stop = server, calls, stop
        self.records: list[tuple[str, int, float, dict[str, str], bytes]] = []
        self.errors: list[str] = []

    def run(self) -> None:
        while not self.stop.is_set():
            for method, path, body in self.calls:
                payload = body() if callable(body) else body
                started = time.monotonic()
                try:
                    status, data, headers = self.server.call(method, path, payload)
                except (urllib.error.URLError, OSError) as exc:  # a hang past urllib's 30 s lands here
                    self.errors.append(f"{method} {path}: {exc!r} after {time.monotonic() - started:.1f} s")
                    continue
                self.records.append((f"{method} {path}", status, time.monotonic() - started, headers, data))
            time.sleep(0.05)


def test_redis_away_for_seconds_answers_503_and_loses_nothing(tmp_path, data_dir, procs, origin):
    external = RedisProcess(tmp_path / "redis").start()
    try:
        server = procs.server(data_dir, "--redis-url", external.url, env=ENV)
        redis_args = ("--redis-url", external.url)
        seeded = image_urls(origin, 10, start=40_000)
        assert server.submit(seeded)["stored"] == 10
        urls = image_urls(origin, 400, start=40_100, query=SLOW_ORIGIN)
        job_id = submit(server, urls)
        counter = iter(range(41_000, 50_000))

        def small_job() -> dict[str, Any]:
            return {"image_urls": [origin.url(f"/img/{next(counter)}.jpg") for _ in range(2)]}

        stop = threading.Event()
        readers = [
            Client(server, [("GET", "/api/images?limit=50", None),
                            ("GET", f"/api/image?url={quote(seed, safe='')}", None),
                            ("GET", f"/api/jobs/{job_id}", None),
                            ("GET", "/readyz", None)], stop)
            for seed in seeded[:3]
        ]
        writer = Client(server, [("POST", "/api/images", small_job)], stop)
        for thread in [*readers, writer]:
            thread.start()
        time.sleep(1.5)
        assert job(server, job_id)["done"] < len(urls), "the import ended before Redis went away"
        external.stop()
        away_from = time.monotonic()
        time.sleep(5)
        external.start()
        back_at = time.monotonic()
        time.sleep(3)
        stop.set()
        for thread in [*readers, writer]:
            thread.join(REQUEST_BOUND * 3)
            assert not thread.is_alive(), "a request hung"

        records = [r for thread in [*readers, writer] for r in thread.records]
        errors = [e for thread in [*readers, writer] for e in thread.errors]
        assert not errors, errors[:5]
        statuses: dict[int, int] = {}
        for _, status, _, _, _ in records:
            statuses[status] = statuses.get(status, 0) + 1
        slowest = max(seconds for _, _, seconds, _, _ in records)
        print(f"\nRedis away {back_at - away_from:.1f} s: {len(records)} requests, statuses {statuses}, "
              f"slowest {slowest:.2f} s")
        assert set(statuses) <= {200, 202, 503}, statuses
        assert statuses.get(503), "no request saw Redis away"
        assert slowest < REQUEST_BOUND
        for what, status, _, headers, body in records:
            if status == 503:
                assert headers["Content-Type"] == "application/problem+json", (what, body)
                assert json.loads(body)["status"] == 503
                assert int(headers["Retry-After"]) >= 1, what
            elif what.startswith("GET /api/image?"):
                assert body == expected_bytes(unquote(what.split("url=", 1)[1])), what
        accepted = [json.loads(body)["job_id"] for _, status, _, _, body in writer.records if status == 202]
        assert accepted, "no submission was accepted"

        assert_all_stored(server, job_id, urls)
        for accepted_id in accepted:
            final = settle(server, accepted_id)
            assert final["stored"] == final["total"], final
            assert_retrievable(server, [r["url"] for r in final["results"]])
        assert "unavailable" in server.output(), "the worker never noticed Redis was away"
        assert_fsck_clean(data_dir, *redis_args)
        assert_nothing_grows(external.client())
        assert server.terminate() == 0
    finally:
        external.stop()


# -- the blob disk full or read-only -------------------------------------------------------------------

DISK_BYTES = 4 * 1024 * 1024  # the tmpfs that holds the data dir (blobs, tmp and trash must share one)
HEADROOM = 48 * 1024  # room left once the disk is filled: a few images fit, then the disk is full


@pytest.fixture
def small_disk(tmp_path: Path, procs: Processes) -> Any:
    """A data dir on its own small tmpfs. Mounting needs root (CI runs as root); otherwise: skip, saying why."""
    mount_point = tmp_path / "data"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK_BYTES},mode=0755", "tmpfs",
                              str(mount_point)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to fill or make read-only (needs root): {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        procs.cleanup()  # nothing may hold the mount when it goes
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def fill(disk: Path, leave: int) -> Path:
    """Fill the file system with one file, then give back `leave` bytes."""
    filler = disk / "filler"
    block = b"\0" * 65536
    with open(filler, "wb") as handle:
        try:
            while True:
                handle.write(block)
                handle.flush()
        except OSError:
            pass
    os.truncate(filler, max(0, filler.stat().st_size - leave))
    return filler


def assert_nothing_half_written(disk: Path, fsck_output: str) -> None:
    assert list((disk / "tmp").iterdir()) == [], "a failed download left its temp file"
    assert list((disk / "trash").iterdir()) == [], "an interrupted delete left its trash file"
    assert "orphan" not in fsck_output, fsck_output


def test_full_blob_disk_fails_items_with_a_reason_and_recovers(tmp_path, small_disk, procs, origin):
    external = RedisProcess(tmp_path / "redis").start()
    try:
        server = procs.server(small_disk, "--redis-url", external.url, env=ENV)
        redis_args = ("--redis-url", external.url)
        before = image_urls(origin, 5, start=50_000)
        assert server.submit(before)["stored"] == 5
        filler = fill(small_disk, HEADROOM)

        urls = image_urls(origin, 60, start=50_100)
        final = settle(server, submit(server, urls))
        stored = [r["url"] for r in final["results"] if r["status"] == "stored"]
        failed = [r for r in final["results"] if r["status"] == "failed"]
        print(f"\ndisk full: {len(stored)} stored, {len(failed)} failed: {failed[0]['error'] if failed else ''}")
        assert failed, "the disk never filled up"
        assert {r["error"] for r in failed} == {"storage error: No space left on device"}, failed[:3]
        assert all(r["attempts"] == 1 for r in failed)
        assert server.call("GET", "/healthz")[0] == 200
        assert server.call("GET", "/api/images?limit=1000")[0] == 200
        assert_retrievable(server, before + stored)
        assert_nothing_half_written(small_disk, assert_fsck_clean(small_disk, *redis_args))

        filler.unlink()
        again = settle(server, submit(server, [r["url"] for r in failed]))
        assert again["stored"] == len(failed), again
        assert_retrievable(server, urls)
        assert_nothing_half_written(small_disk, assert_fsck_clean(small_disk, *redis_args))
        assert_nothing_grows(external.client())
        assert server.terminate() == 0
    finally:
        external.stop()


def test_read_only_blob_disk_fails_items_with_a_reason_and_recovers(tmp_path, small_disk, procs, origin):
    external = RedisProcess(tmp_path / "redis").start()
    try:
        server = procs.server(small_disk, "--redis-url", external.url, env=ENV)
        redis_args = ("--redis-url", external.url)
        before = image_urls(origin, 6, start=60_000)
        assert server.submit(before)["stored"] == 6
        subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)

        status, body, headers = server.call("GET", "/readyz")
        assert status == 503 and headers["Content-Type"] == "application/problem+json", body
        assert "not writable" in json.loads(body)["detail"]
        urls = image_urls(origin, 10, start=60_100)
        final = settle(server, submit(server, urls))
        assert {(r["status"], r["error"]) for r in final["results"]} == {
            ("failed", "storage error: Read-only file system")}, final["results"][:3]
        assert_retrievable(server, before)  # reads go on
        status, body, _ = server.call("DELETE", f"/api/image?url={quote(before[0], safe='')}")
        assert status == 204, body
        assert server.call("GET", f"/api/image?url={quote(before[0], safe='')}")[0] == 404

        subprocess.run(["mount", "-o", "remount,rw", str(small_disk)], check=True)
        assert server.call("GET", "/readyz")[0] == 200
        again = settle(server, submit(server, urls))
        assert again["stored"] == len(urls), again
        assert_retrievable(server, before[1:] + urls)
        # The delete could not move its blob away while the disk was read-only: what is left is an
        # unreferenced blob, which fsck notes and --repair (or the periodic sweep) removes.
        repaired = casimg("fsck", "--repair", "--data-dir", str(small_disk), *redis_args, check=False)
        assert repaired.returncode == 0, repaired.stdout + repaired.stderr
        assert_nothing_half_written(small_disk, assert_fsck_clean(small_disk, *redis_args))
        assert server.terminate() == 0
    finally:
        external.stop()


# -- stores and deletes of shared content, at scale -----------------------------------------------------

SHARED_CONTENTS = 3  # distinct images; every client has its own URL for each, so clients share the bytes
CLIENTS = 8
ROUNDS = 30


def test_concurrent_stores_and_deletes_of_shared_content_never_lose_a_referenced_blob(data_dir, procs, origin):
    """Each client stores and deletes only its own URLs, but all URLs share a few contents, so references
    to one blob come and go from every client (and from two worker processes) at once. A URL that its
    owner stored must answer with its bytes until its owner deletes it, whatever the others do.

    This is the invariant under real load, not a proof of the narrow windows: a delete's few
    file-system steps rarely land inside a store's. tests/test_lifecycle.py runs every one of those
    interleavings deterministically."""
    server = procs.server(data_dir, env=ENV)
    procs.worker(data_dir, env=server.env, name="second-worker")  # stores happen in two processes
    problems: list[tuple[Any, ...]] = []
    operations = [0] * CLIENTS

    def client(me: int) -> None:
        rng = random.Random(me)
        mine = [origin.url(f"/img/{70_000 + c}.jpg?owner={me}") for c in range(SHARED_CONTENTS)]
        held: set[str] = set()  # this client's URLs that are stored now: only this client deletes them
        for round_ in range(ROUNDS + 1):
            last = round_ == ROUNDS
            batch = [] if last else [u for u in mine if rng.random() < 0.8] or mine[:1]
            if batch:
                status, body, _ = server.call("POST", "/api/images?wait=60", {"image_urls": batch})
                operations[me] += 1
                if status != 200:
                    problems.append(("submit", status, body[:200]))
                    continue
                outcomes = {r["status"] for r in json.loads(body)["results"]}
                if not outcomes <= {"stored", "exists"}:
                    problems.append(("outcome", json.loads(body)["results"]))
                held.update(batch)
            for url in sorted(held):
                status, data, _ = server.call("GET", f"/api/image?url={quote(url, safe='')}")
                operations[me] += 1
                if status != 200 or data != expected_bytes(url):
                    problems.append(("lost", url, status, data[:200]))
            # Often the whole batch, so a blob's last reference goes and comes back while others store it.
            doomed = mine if last else batch if rng.random() < 0.5 else rng.sample(batch, k=max(1, len(batch) // 2))
            for url in doomed:
                status, body, _ = server.call("DELETE", f"/api/image?url={quote(url, safe='')}")
                after = server.call("GET", f"/api/image?url={quote(url, safe='')}")[0]
                operations[me] += 2
                if status != (204 if url in held else 404) or after != 404:
                    problems.append(("delete", url, status, after, body[:200]))
                held.discard(url)

    started = time.monotonic()
    threads = [threading.Thread(target=client, args=(me,), daemon=True) for me in range(CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(JOB_TIMEOUT)
        assert not thread.is_alive(), "a client hung"
    print(f"\nshared content: {sum(operations)} operations from {CLIENTS} clients in "
          f"{time.monotonic() - started:.1f} s")
    assert not problems, problems[:5]

    # Everything was deleted: the index is empty, and so is the disk.
    client_ = embedded_client(data_dir)
    assert client_.hlen(f"{PREFIX}urls") == client_.hlen(f"{PREFIX}refs") == client_.hlen(f"{PREFIX}meta") == 0
    output = assert_fsck_clean(data_dir)
    assert " 0 note(s)" in output, output
    assert [p for p in (data_dir / "blobs").rglob("*") if p.is_file()] == []
    assert list((data_dir / "trash").iterdir()) == [] and list((data_dir / "tmp").iterdir()) == []
    assert_nothing_grows(client_)
    assert server.terminate() == 0


# -- the periodic sweep ----------------------------------------------------------------------------------

def test_periodic_sweep_clears_crash_leftovers_but_nothing_an_import_in_progress_needs(data_dir, procs, origin):
    """What a crash leaves (an orphan blob, old temp and trash files) goes; a fresh temp file, which may be
    a download in progress, stays; an import running through many sweeps loses nothing."""
    env = {**ENV, "CASIMG_SWEEP_INTERVAL": "0.5", "CASIMG_TMP_GRACE": "30", "CASIMG_FETCH_TIMEOUT": "20"}
    server = procs.server(data_dir, env=env)
    orphan_bytes = expected_bytes(origin.url("/img/80000.jpg"))
    orphan = hashlib.sha256(orphan_bytes).hexdigest()
    orphan_path = data_dir / "blobs" / orphan[:2] / orphan[2:4] / orphan
    orphan_path.parent.mkdir(parents=True, exist_ok=True)
    orphan_path.write_bytes(orphan_bytes)
    (data_dir / "trash").mkdir(exist_ok=True)
    old_temp, fresh_temp = data_dir / "tmp" / "dl-crashed.part", data_dir / "tmp" / "dl-in-progress.part"
    old_trash = data_dir / "trash" / f"{orphan}.crashed"
    for leftover in (old_temp, fresh_temp, old_trash):
        leftover.write_bytes(b"partial")
    an_hour_ago = time.time() - 3600
    for leftover in (old_temp, old_trash):
        os.utime(leftover, (an_hour_ago, an_hour_ago))

    urls = image_urls(origin, 300, start=80_100, query="delay=0.02")
    job_id = submit(server, urls)
    assert_all_stored(server, job_id, urls)
    deadline = time.monotonic() + 30
    while (orphan_path.exists() or old_temp.exists() or old_trash.exists()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not orphan_path.exists() and not old_temp.exists() and not old_trash.exists()
    assert fresh_temp.exists(), "a temp file younger than the grace period was swept"
    assert "sweep:" in server.output()
    assert_retrievable(server, urls)
    fresh_temp.unlink()
    assert " 0 note(s)" in assert_fsck_clean(data_dir)
    assert server.terminate() == 0


def test_worker_goes_on_when_redis_comes_back_without_its_data(tmp_path, data_dir, procs, origin):
    """A Redis restarted empty (no persistence; a failover to a replica that lacks the data) has lost the
    queue's consumer group. The worker must recreate it and go on reading; a worker that stopped reading
    while its heartbeat still said it was alive would leave every later job stuck."""
    external = RedisProcess(tmp_path / "redis").start()
    try:
        data_dir.mkdir()
        key = "casimg-fault-test-bootstrap-key"
        (data_dir / "admin.key").write_text(key)  # a bootstrap key is registered again on every start
        args = ("--no-workers", "--redis-url", external.url)
        env = {**ENV, "CASIMG_BOOTSTRAP_KEY": key}
        server = procs.server(data_dir, *args, env=env)
        worker = procs.worker(data_dir, "--redis-url", external.url, env=server.env)
        assert server.submit(image_urls(origin, 5, start=90_000))["stored"] == 5

        external.stop()
        for path in external.dir.iterdir():
            if path.name != "redis.log":
                subprocess.run(["rm", "-rf", str(path)], check=True)
        external.start()
        # Empty of what was stored. Not dbsize() == 0: the live server and worker write their heartbeats and
        # store acknowledgements as soon as it answers (a CI run found one key there).
        fresh = external.client()
        assert not fresh.exists(f"{PREFIX}count") and not list(fresh.scan_iter(f"{PREFIX}url:*"))
        fresh.close()
        # The worker notices the queue is gone and recreates its consumer group, without any restart.
        watcher = external.client()
        eventually(lambda: watcher.exists(f"{PREFIX}queue"), "the worker to recreate the queue group")
        watcher.close()
        assert server.terminate() == 0
        server = procs.server(data_dir, *args, env=env)  # the operator restarts the server: the key is back

        urls = image_urls(origin, 5, start=90_100)
        final = settle(server, submit(server, urls), timeout=60)
        assert final["stored"] == len(urls), final
        assert_retrievable(server, urls)
        assert worker.poll() is None
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(SHUTDOWN_BOUND + 5) == 0
        assert server.terminate() == 0
    finally:
        external.stop()
