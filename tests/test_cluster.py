"""casimg on several nodes that share one Redis and one bucket and nothing else (docs/cluster.md).

Real processes: an external redis-server with its append-only file on, the S3 endpoint (moto_server, or
the bucket CASIMG_S3_* name), two `casimg serve --no-workers` and two `casimg worker`, each with a data
directory of its own, the real origin. A 1,000-URL import goes through both servers while readers fetch
from both; one worker is killed with SIGKILL in the middle. Every accepted URL must end stored or failed
with a reason, every stored image read back byte-identical from both servers, and `casimg fsck` be clean.
"""

from __future__ import annotations

import json
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from bench.memory import index_memory
from tests.conftest import RedisProcess
from tests.procs import Server, assert_fsck_clean, casimg, expected_bytes, image_urls, job, settle, submit

pytestmark = pytest.mark.slow

URLS = 1000
OVERLAP = 100  # URLs sent through both servers: the second to arrive finds the first's work
KILL_AFTER = 250  # URLs finished when one worker is killed: well inside the import
FAILING = 10  # URLs the origin answers 404 for: they must fail with a reason, not vanish
READERS = 4  # threads reading stored images from both servers throughout
ENV = {"CASIMG_PER_HOST_CONCURRENCY": "16", "CASIMG_RATE_LIMIT": "0", "CASIMG_WORKER_HEARTBEAT": "2"}


@pytest.fixture
def external_redis(tmp_path: Path) -> Any:
    server = RedisProcess(tmp_path / "redis").start()  # appendonly yes
    yield server
    server.stop()


def read_back(server: Server, url: str) -> tuple[int, bytes]:
    status, body, _ = server.call("GET", f"/api/image?url={quote(url, safe='')}")
    return status, body


class Readers:
    """Threads fetching random stored URLs from random servers until stopped; every read must be exact."""

    def __init__(self, servers: list[Server], jobs: list[tuple[Server, str]]) -> None:
        self.servers, self.jobs = servers, jobs
        self.stored: list[str] = []
        self.reads, self.errors = 0, []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self.run, args=(n,), daemon=True) for n in range(READERS)]
        self.lock = threading.Lock()

    def refresh(self) -> None:
        found = []
        for server, job_id in self.jobs:
            found += [r["url"] for r in job(server, job_id)["results"] if r["status"] == "stored"]
        with self.lock:
            self.stored = found

    def run(self, seed: int) -> None:
        pick = random.Random(seed)
        while not self.stop.is_set():
            with self.lock:
                url = pick.choice(self.stored) if self.stored else None
            if url is None:
                time.sleep(0.05)
                continue
            status, body = read_back(pick.choice(self.servers), url)
            with self.lock:
                self.reads += 1
                if status != 200 or body != expected_bytes(url):
                    self.errors.append((url, status, body[:100]))

    def __enter__(self) -> Readers:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(30)


def test_two_servers_two_workers_share_redis_and_bucket_and_survive_a_worker_kill(
        tmp_path, procs, origin, s3, external_redis):
    env = {**ENV, **s3.env(s3.prefix()), "CASIMG_REDIS_URL": external_redis.url}
    baseline = external_redis.client().info("memory")["used_memory"]
    first = procs.server(tmp_path / "node-a", "--no-workers", env=env)
    (tmp_path / "node-b").mkdir()
    (tmp_path / "node-b" / "admin.key").write_text(first.key)  # one Redis, one set of keys
    second = procs.server(tmp_path / "node-b", "--no-workers", env=env)
    workers = [procs.worker(tmp_path / f"node-w{n}", env=first.env, name=f"worker-{n}") for n in (1, 2)]

    urls = image_urls(origin, URLS, start=40_000, query="delay=0.02")
    half = URLS // 2
    failing = [origin.url(f"/status/404?n={n}") for n in range(FAILING)]
    through_first = urls[:half + OVERLAP // 2] + failing
    through_second = urls[half - OVERLAP // 2:]
    started = time.monotonic()
    jobs = [(first, submit(first, through_first)), (second, submit(second, through_second))]

    with Readers([first, second], jobs) as readers:
        while sum(job(server, job_id)["done"] for server, job_id in jobs) < KILL_AFTER:
            readers.refresh()
            time.sleep(0.2)
        workers[0].kill()  # SIGKILL: its entries in flight wait for the other worker to claim them
        workers[0].wait()
        assert sum(job(server, job_id)["done"] for server, job_id in jobs) < len(through_first + through_second)
        finals = []
        for server, job_id in jobs:
            while job(server, job_id)["status"] != "done":
                readers.refresh()
                time.sleep(0.2)
            finals.append(settle(server, job_id))
    imported = time.monotonic() - started
    assert not readers.errors, readers.errors[:5]
    assert readers.reads > 0

    outcome: dict[str, str] = {}
    for final in finals:
        for result in final["results"]:
            if result["status"] == "failed":
                assert result["error"], result
            outcome.setdefault(result["url"], result["status"])
    assert sorted(outcome) == sorted(set(through_first + through_second))
    assert all(outcome[url] == "failed" for url in failing)
    stored = [url for url in urls if outcome[url] != "failed"]
    assert len(stored) == URLS, [url for url in urls if outcome[url] == "failed"][:5]

    def both(url: str) -> None:
        for server in (first, second):
            status, body = read_back(server, url)
            assert status == 200 and body == expected_bytes(url), (server.base, url, status)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(both, stored))
    read = time.monotonic() - started - imported
    assert_fsck_clean(tmp_path / "node-a", env=env)
    stats = json.loads(casimg("stats", "--json", "--data-dir", str(tmp_path / "node-a"), env=env).stdout)
    assert stats["urls"] == URLS

    # Sizing (docs/cluster.md): Redis bytes per URL, the index's own and with this import's job records.
    client = external_redis.client()
    used = client.info("memory")["used_memory"] - baseline
    index = index_memory(external_redis.url, URLS)
    job_bytes = sum(client.memory_usage(key, samples=0) or 0 for key in client.scan_iter("casimg:job:*"))
    client.close()
    print(f"\n{URLS} URLs through 2 servers and 2 workers (one killed) in {imported:.1f} s, {readers.reads} reads "
          f"meanwhile; read back twice in {read:.1f} s; Redis: index {index['url'] + index['blob']:.0f} bytes "
          f"per URL, job records {job_bytes / URLS:.0f} per URL until they expire; used_memory grew {used} bytes")
