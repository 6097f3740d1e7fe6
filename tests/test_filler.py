"""Placeholders made after the store by the host's filler process, across real processes: `casimg serve`,
its filler, `casimg fsck`, the embedded Redis and the origin.

- A stored image's placeholder arrives shortly after the store, made by a filler running at the lowest
  CPU priority; the queue is empty afterwards; a content deleted while queued gets none.
- A filler killed (-9) in the middle of a batch loses nothing: serve starts another, and the batch's
  entries, leased to the dead one, are claimed again when the lease ends.
- fsck notes a content with neither a placeholder nor a queue entry, and --repair queues it.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import time
from pathlib import Path
from urllib.parse import quote

import pytest
import redis

from casimg.placeholder import placeholder
from tests.origin import image_bytes
from tests.procs import Server, casimg, embedded_client, forked_children

pytestmark = pytest.mark.slow

TODO = "casimg:placeholder-todo"
WAIT = 60.0  # seconds placeholders may take on a loaded 2-core machine
BIG = "w=2500&h=2500"  # a PNG whose placeholder takes a good part of a second: a batch of them, several


def filler_pid(server: Server, other_than: int | None = None) -> int:
    """The pid of the server's filler process (another than `other_than`, once it has been restarted)."""
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        for pid in forked_children(server.process.pid):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except (FileNotFoundError, ProcessLookupError):  # gone since the listing (reading a zombie's raises)
                continue
            if b"casimg.filler" in cmdline and pid != other_than:
                return pid
        time.sleep(0.05)
    raise AssertionError(f"no filler process under {server.process.pid}:\n{server.output()}")


def placeholders(client: redis.Redis, digests: list[str]) -> list[str | None]:
    return [client.hget(f"casimg:placeholder:{digest[:3]}", bytes.fromhex(digest)) for digest in digests]


def until_filled(client: redis.Redis, digests: list[str]) -> list[str]:
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        found = placeholders(client, digests)
        if all(found) and client.zcard(TODO) == 0:
            return [value for value in found if value]
        time.sleep(0.1)
    raise AssertionError(f"placeholders {placeholders(client, digests)}, queue {client.zrange(TODO, 0, -1)}")


def test_placeholders_arrive_after_the_store_from_an_idle_priority_filler(procs, tmp_path, origin):
    server = procs.server(tmp_path / "data")
    pid = filler_pid(server)
    deadline = time.monotonic() + WAIT  # it lowers its priority first thing once started
    while os.sched_getscheduler(pid) != os.SCHED_IDLE and time.monotonic() < deadline:
        time.sleep(0.05)
    assert os.sched_getscheduler(pid) == os.SCHED_IDLE
    client = embedded_client(server.data_dir)
    urls = [origin.url(f"/img/{n}.png") for n in range(500, 505)]
    digests = [result["sha256"] for result in server.submit(urls)["results"]]
    made = until_filled(client, digests)
    assert made == [placeholder(image_bytes(n, "png")) for n in range(500, 505)]
    assert all(len(base64.b64decode(value)) < 40 for value in made)
    listed = {row["url"]: row["placeholder"] for row in json.loads(server.call("GET", "/api/images")[1])}
    assert [listed[url] for url in urls] == made
    again = server.submit(urls[:1])["results"][0]  # the job result of a URL stored already carries it
    assert again["status"] == "exists" and again["placeholder"] == made[0]

    # A content deleted while it waits for its placeholder gets none, and its entry goes.
    os.kill(pid, signal.SIGSTOP)
    try:
        url = origin.url("/img/506.png")
        digest = server.submit([url])["results"][0]["sha256"]
        assert client.zscore(TODO, digest) is not None
        assert server.call("DELETE", f"/api/image?url={quote(url, safe='')}")[0] in (200, 204)
    finally:
        os.kill(pid, signal.SIGCONT)
    deadline = time.monotonic() + WAIT
    while client.zcard(TODO) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert client.zcard(TODO) == 0 and placeholders(client, [digest]) == [None]


def test_a_filler_killed_mid_batch_loses_nothing(procs, tmp_path, origin):
    server = procs.server(tmp_path / "data", env={"CASIMG_PLACEHOLDER_LEASE": "3"})
    first = filler_pid(server)
    client = embedded_client(server.data_dir)
    os.kill(first, signal.SIGSTOP)  # nothing is claimed while the images are stored
    urls = [origin.url(f"/img/{n}.png?{BIG}") for n in range(600, 612)]
    digests = [result["sha256"] for result in server.submit(urls)["results"]]
    assert client.zcard(TODO) == len(digests)
    os.kill(first, signal.SIGCONT)
    deadline = time.monotonic() + WAIT
    while not leased(client) and time.monotonic() < deadline:  # the filler's claim
        time.sleep(0.002)
    time.sleep(0.3)  # into the batch: each of these placeholders takes 0.1-0.5 s
    os.kill(first, signal.SIGKILL)
    held = leased(client)
    assert held, "the filler finished its batch before it was killed"
    assert not any(placeholders(client, held))  # claimed, not made, and still in the queue
    second = filler_pid(server, other_than=first)  # serve starts another
    assert second != first
    until_filled(client, digests)
    assert server.process.poll() is None


def test_a_stop_does_not_wait_long_for_a_filler_the_machine_gives_no_cpu(redis_server, tmp_path):
    """At its idle priority, the filler may get no CPU for seconds on a busy machine (stopped here, which
    is the same to it): SIGTERM waits STOP_GRACE for it, then it is killed, and the stop goes on."""
    from casimg.filler import STOP_GRACE, FillerProcess
    from tests.conftest import make_settings

    settings = make_settings(tmp_path / "data", redis_server.url)
    filler = FillerProcess(settings, redis_server.url)
    filler.start()
    assert filler.process is not None and filler.pid is not None
    try:
        time.sleep(1)  # under way: its signal handlers set, or nearly
        os.kill(filler.pid, signal.SIGSTOP)
        started = time.monotonic()
        filler.stop()
        took = time.monotonic() - started
    finally:
        if filler.process.poll() is None:
            filler.process.kill()
            filler.process.wait()
    assert filler.process.returncode == -signal.SIGKILL
    assert STOP_GRACE <= took < STOP_GRACE + 3


def leased(client: redis.Redis) -> list[str]:
    """Queue entries under a filler's lease (due in the future)."""
    return list(client.zrangebyscore(TODO, time.time() * 1000 + 1, "+inf"))


def test_fsck_notes_a_missing_placeholder_and_repair_queues_it(procs, tmp_path, origin):
    server = procs.server(tmp_path / "data")
    client = embedded_client(server.data_dir)
    digest = server.submit([origin.url("/img/700.png")])["results"][0]["sha256"]
    made = until_filled(client, [digest])
    env = {"CASIMG_PLACEHOLDERS": "true"}
    assert "no placeholder" not in casimg("fsck", "--data-dir", str(server.data_dir), env=env).stdout
    client.hdel(f"casimg:placeholder:{digest[:3]}", bytes.fromhex(digest))  # lost, and not queued

    checked = casimg("fsck", "--data-dir", str(server.data_dir), env=env, check=False)
    assert checked.returncode == 0, checked.stdout + checked.stderr  # a note, not a problem
    assert f"no placeholder for {digest}, and none queued" in checked.stdout
    repaired = casimg("fsck", "--data-dir", str(server.data_dir), "--repair", env=env)
    assert f"queued the placeholder of {digest}" in repaired.stdout
    assert until_filled(client, [digest]) == made


def test_with_placeholders_off_there_is_no_filler_and_nothing_queued(procs, tmp_path, origin):
    server = procs.server(tmp_path / "data", env={"CASIMG_PLACEHOLDERS": "false"})
    client = embedded_client(server.data_dir)
    result = server.submit([origin.url("/img/800.png")])["results"][0]
    assert result["status"] == "stored" and result["placeholder"] is None
    assert not client.exists(TODO)
    assert [row["placeholder"] for row in json.loads(server.call("GET", "/api/images")[1])] == [None]
    children = [Path(f"/proc/{pid}/cmdline").read_bytes() for pid in forked_children(server.process.pid)]
    assert not any(b"casimg.filler" in cmdline for cmdline in children)


def test_a_filler_started_by_a_parent_that_has_gone_exits_at_once(tmp_path):
    """A parent killed while its filler still imports has gone before the filler asks for a death signal:
    the filler must see that and end, not run on as an orphan (here its parent's pid is not its own)."""
    import pickle
    import subprocess
    import sys

    from tests.conftest import make_settings
    settings = make_settings(tmp_path / "data", "redis://127.0.0.1:9/0")  # nothing listens: it must not get that far
    payload = pickle.dumps((settings, settings.redis_url, os.getpid() + 1_000_000))
    done = subprocess.run([sys.executable, "-m", "casimg.filler"], input=payload, capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert b"Traceback" not in done.stderr
