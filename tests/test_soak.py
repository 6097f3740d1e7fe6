"""Soak: one import of thousands of URLs into a real `casimg serve` while 16 readers list and fetch.

Checked: no server error and no failed request, every byte read back equals the origin's, every URL
stored, fsck clean. Reported (run with -s): import rate, read latency p50/p99/max, peak RSS of the
server and of its Redis. Thresholds for those figures belong in a benchmark, not here.

CI runs the short form (3,000 URLs). The longer variant: ``SOAK_URLS=30000 pytest -m soak -s``
(``SOAK_READERS`` changes the number of readers).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import random
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import pytest

from tests.procs import (
    Processes,
    assert_fsck_clean,
    assert_nothing_grows,
    embedded_client,
    embedded_redis_pid,
    expected_bytes,
    image_urls,
    peak_rss_kib,
    settle,
    submit,
)

pytestmark = [pytest.mark.soak, pytest.mark.slow]

SOAK_URLS = int(os.environ.get("SOAK_URLS", "3000"))
READERS = int(os.environ.get("SOAK_READERS", "16"))
PAGE = 100  # listing page size the readers walk with
FETCHES_PER_PAGE = 4  # images fetched (and compared) from each page listed
# A ceiling on the server's peak RSS that only unbounded growth would reach: the import holds 3,000+
# results and the readers' responses, a few tens of MiB more than the 55 MiB it starts with.
RSS_CEILING_MIB = 512


@pytest.fixture
def procs() -> Any:
    tracked = Processes()
    yield tracked
    tracked.cleanup()


class Reader(threading.Thread):
    """Walks the listing page by page (starting over at the end) and fetches images from each page."""

    def __init__(self, port: int, key: str, stop: threading.Event, seed: int) -> None:
        super().__init__(daemon=True)
        self.port, self.key, self.stop, self.rng = port, key, stop, random.Random(seed)
        self.latencies: dict[str, list[float]] = {"list": [], "fetch": []}
        self.statuses: dict[int, int] = {}
        self.problems: list[str] = []
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)

    def get(self, kind: str, path: str) -> tuple[int, bytes, http.client.HTTPMessage] | None:
        started = time.monotonic()
        try:
            self.connection.request("GET", path, headers={"X-API-Key": self.key})
            response = self.connection.getresponse()
            body = response.read()
        except (OSError, http.client.HTTPException) as exc:
            self.problems.append(f"{path}: {exc!r}")
            self.connection.close()
            self.connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
            return None
        self.latencies[kind].append(time.monotonic() - started)
        self.statuses[response.status] = self.statuses.get(response.status, 0) + 1
        if response.status != 200:
            self.problems.append(f"{path}: {response.status} {body[:200]!r}")
            return None
        return response.status, body, response.headers

    def run(self) -> None:
        cursor = None
        while not self.stop.is_set():
            listed = self.get("list", f"/api/images?limit={PAGE}" + (f"&cursor={cursor}" if cursor else ""))
            if listed is None:
                continue
            _, body, headers = listed
            page = json.loads(body)
            link = headers.get("Link")
            cursor = parse_qs(urlsplit(link.split(">")[0].lstrip("<")).query)["cursor"][0] if link else None
            if not page:
                time.sleep(0.05)  # nothing stored yet
                continue
            for image in self.rng.sample(page, min(FETCHES_PER_PAGE, len(page))):
                fetched = self.get("fetch", f"/api/image?url={quote(image['url'], safe='')}")
                if fetched is None:
                    continue
                data = fetched[1]
                if data != expected_bytes(image["url"]) or hashlib.sha256(data).hexdigest() != image["sha256"]:
                    self.problems.append(f"wrong bytes for {image['url']}")
        self.connection.close()


class MemoryWatch(threading.Thread):
    """Samples the server's resident memory (VmRSS) while the soak runs, for the report."""

    def __init__(self, pid: int, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.pid, self.stop = pid, stop
        self.samples: list[int] = []

    def run(self) -> None:
        while not self.stop.is_set():
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    self.samples.append(int(line.split()[1]))
            time.sleep(0.5)


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def test_soak_import_while_16_readers_list_and_fetch(tmp_path, procs, origin):
    data_dir = tmp_path / "data"
    # 16 readers on one key go past the default request rate; this measures the service, not the limit.
    server = procs.server(data_dir, env={"CASIMG_RATE_LIMIT": "0"})
    urls = image_urls(origin, SOAK_URLS, start=100_000)
    for url in urls:
        expected_bytes(url)  # drawn before the clock starts, so the origin answers at full speed
    stop = threading.Event()
    memory = MemoryWatch(server.process.pid, stop)
    readers = [Reader(server.port, server.key, stop, seed) for seed in range(READERS)]
    memory.start()
    for reader in readers:
        reader.start()

    started = time.monotonic()
    limit = 10_000  # CASIMG_MAX_URLS_PER_REQUEST
    job_ids = [submit(server, urls[i:i + limit]) for i in range(0, len(urls), limit)]
    finals = [settle(server, job_id, timeout=max(300.0, SOAK_URLS / 10)) for job_id in job_ids]
    import_seconds = time.monotonic() - started
    stop.set()
    for reader in readers:
        reader.join(60)
        assert not reader.is_alive(), "a reader hung"
    memory.join(5)

    serve_peak = peak_rss_kib(server.process.pid)
    redis_pid = embedded_redis_pid(data_dir)
    redis_peak = peak_rss_kib(redis_pid) if redis_pid else 0
    lists = [s for r in readers for s in r.latencies["list"]]
    fetches = [s for r in readers for s in r.latencies["fetch"]]
    reads = lists + fetches
    statuses: dict[int, int] = {}
    for reader in readers:
        for status, count in reader.statuses.items():
            statuses[status] = statuses.get(status, 0) + count
    problems = [p for r in readers for p in r.problems]
    print(
        f"\nsoak: {SOAK_URLS} URLs imported in {import_seconds:.1f} s ({SOAK_URLS / import_seconds:.0f}/s) "
        f"while {READERS} readers made {len(reads)} reads ({len(lists)} list pages, {len(fetches)} images); "
        f"statuses {statuses}\n"
        f"soak: read latency p50 {percentile(reads, 0.5) * 1000:.1f} ms, p99 {percentile(reads, 0.99) * 1000:.1f} ms, "
        f"max {max(reads) * 1000:.1f} ms (list p99 {percentile(lists, 0.99) * 1000:.1f} ms, "
        f"image p99 {percentile(fetches, 0.99) * 1000:.1f} ms)\n"
        f"soak: peak RSS casimg serve {serve_peak / 1024:.0f} MiB (sampled: start "
        f"{memory.samples[0] / 1024:.0f} MiB, last {memory.samples[-1] / 1024:.0f} MiB), "
        f"embedded redis-server {redis_peak / 1024:.0f} MiB"
    )
    assert not problems, problems[:5]
    assert set(statuses) == {200}
    assert fetches, "the readers never fetched an image"
    assert sum(f["stored"] for f in finals) == SOAK_URLS
    assert serve_peak / 1024 < RSS_CEILING_MIB
    assert_fsck_clean(data_dir)
    assert_nothing_grows(embedded_client(data_dir))
    assert server.terminate() == 0
