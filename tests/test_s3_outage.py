"""The S3 endpoint away for seconds in the middle of an import and reads, then back.

`casimg serve` stores through a relay process (tests/relay.py) in front of the emulator; killing the relay
refuses every connection, as a stopped endpoint does, while the objects stay behind it. Meanwhile: reads
answer 503 with Retry-After (never a hang, never another error), downloads that cannot store fail with a
reason, nothing accepted is lost, and once the relay is back the service works again on its own.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import Counter
from typing import Any
from urllib.parse import quote, urlsplit

import pytest

from bench.procs import ROOT, free_port, spawn, wait_port
from tests.procs import (
    Processes,
    Server,
    assert_fsck_clean,
    assert_retrievable,
    expected_bytes,
    image_urls,
    settle,
    submit,
)

pytestmark = pytest.mark.slow

OUTAGE = 10.0  # seconds the endpoint is away: longer than a read's retries (storage/s3.py)
ENV = {"CASIMG_PER_HOST_CONCURRENCY": "8", "CASIMG_RATE_LIMIT": "0"}


class Relay:
    def __init__(self, procs: Processes, target: str, log_dir: Any) -> None:
        self.port, self.target_port = free_port(), urlsplit(target).port
        self.procs, self.log_dir = procs, log_dir
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.start()

    def start(self) -> None:
        self.process = spawn([sys.executable, "-m", "tests.relay", str(self.port), str(self.target_port)],
                             self.log_dir / "relay.log", cwd=ROOT)
        self.procs.started.append(self.process)
        wait_port(self.port, self.process)

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()


class Reads(threading.Thread):
    """Reads stored URLs in a loop and counts the answers: (status, has Retry-After)."""

    def __init__(self, server: Server, urls: list[str]) -> None:
        super().__init__(daemon=True)
        self.server, self.urls = server, urls
        self.stop, self.answers, self.wrong = threading.Event(), Counter(), []
        self.slowest = 0.0

    def run(self) -> None:
        while not self.stop.is_set():
            for url in self.urls:
                began = time.monotonic()
                status, body, headers = self.server.call("GET", f"/api/image?url={quote(url, safe='')}")
                self.slowest = max(self.slowest, time.monotonic() - began)
                self.answers[(status, "Retry-After" in headers)] += 1
                if status == 200 and body != expected_bytes(url):
                    self.wrong.append(url)
                if self.stop.is_set():
                    return


def test_reads_answer_503_while_the_endpoint_is_away_nothing_accepted_is_lost_and_it_recovers(
        s3, procs, origin, tmp_path):
    if not s3.emulated:
        pytest.skip("the relay runs in front of the local emulator only")
    relay = Relay(procs, s3.endpoint, tmp_path)
    env = {**ENV, **s3.env(s3.prefix()), "CASIMG_S3_ENDPOINT": relay.endpoint}
    server = procs.server(tmp_path / "data", env=env)
    before = image_urls(origin, 30, start=90_000)
    assert settle(server, submit(server, before))["stored"] == len(before)

    urls = image_urls(origin, 300, start=91_000, query="delay=0.1")
    job_id = submit(server, urls)
    reads = Reads(server, before[:10])
    reads.start()
    time.sleep(1)
    relay.kill()
    time.sleep(OUTAGE)
    during = Counter(reads.answers)
    status, _, headers = server.call("GET", "/readyz")
    assert status == 503 and "Retry-After" in headers
    relay.start()
    final = settle(server, job_id)
    time.sleep(2)
    reads.stop.set()
    reads.join(60)

    # Reads: whole bytes or 503 with Retry-After, nothing else, and none hung past the retries.
    assert not reads.wrong
    assert set(reads.answers) <= {(200, False), (503, True)}, reads.answers
    assert during[(503, True)] > 0, during
    assert reads.answers[(200, False)] > during[(200, False)], "reads did not come back with the endpoint"
    assert reads.slowest < 30, reads.slowest
    # Downloads: each URL stored or failed with the storage's reason; none pending, none lost.
    failed = [r for r in final["results"] if r["status"] == "failed"]
    assert all("storage error" in r["error"] for r in failed), failed[:3]
    print(f"\n{len(failed)} of {len(urls)} URLs failed while the endpoint was away; reads: {dict(reads.answers)}; "
          f"slowest read {reads.slowest:.1f} s")
    assert server.call("GET", "/readyz")[0] == 200
    # The service works on its own again: what failed stores now, and everything reads back whole.
    retried = [r["url"] for r in failed]
    if retried:
        assert settle(server, submit(server, retried))["failed"] == 0
    assert_retrievable(server, before + urls)
    assert_fsck_clean(tmp_path / "data", env=server.env)
    assert server.terminate() == 0
