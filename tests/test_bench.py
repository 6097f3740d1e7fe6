"""The benchmark's two ingest references (bench/references.py), against the real origin, and its command.

The limit and the required work are what casimg's ingest is measured against, so each must do what
its row in BENCHMARKS.md says: the limit keeps any body as it came; the required work validates each
with casimg's settings, hashes it and waits for a flush before it counts.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from bench import references
from bench.procs import ROOT
from bench.report import BEGIN, END, splice
from casimg import validation
from casimg.config import load_settings
from casimg.errors import InvalidImage
from casimg.storage import file as blobs
from tests.origin import Origin, image_bytes

URLS = ["/img/1.jpg", "/img/2.png", "/img/3.webp", "/img/4.gif"]


@pytest.mark.parametrize("fetch", [references.plain_fetch, references.required_work_fetch])
def test_a_reference_keeps_every_body(fetch, origin: Origin, tmp_path: Path) -> None:
    result = asyncio.run(fetch([origin.url(path) for path in URLS], tmp_path))
    bodies = [image_bytes(n, path.rsplit(".", 1)[1]) for n, path in enumerate(URLS, 1)]
    assert result.images == len(URLS)
    assert result.bytes == sum(map(len, bodies))
    assert sorted(path.read_bytes() for path in tmp_path.glob("*.bin")) == sorted(bodies)


def test_the_required_work_does_what_a_blob_needs(origin: Origin, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Every body: validated with casimg's settings, hashed, and flushed before it counts."""
    checked: list[dict[str, Any]] = []
    hashed: list[bytes] = []
    flushes = 0
    real_validate, real_flush, real_sha256 = validation.validate_image, blobs.FlushGroup.flush, hashlib.sha256

    def validate(data: bytes, **options: Any) -> validation.ImageInfo:
        checked.append(options)
        return real_validate(data, **options)

    async def flush(self: blobs.FlushGroup) -> None:
        nonlocal flushes
        await real_flush(self)
        flushes += 1

    def sha256(data: bytes = b"") -> Any:
        hashed.append(data)
        return real_sha256(data)

    monkeypatch.setattr(validation, "validate_image", validate)
    monkeypatch.setattr(blobs.FlushGroup, "flush", flush)
    monkeypatch.setattr(references.hashlib, "sha256", sha256)
    asyncio.run(references.required_work_fetch([origin.url(path) for path in URLS], tmp_path))

    settings = load_settings()
    assert checked == [{"max_pixels": settings.max_pixels, "allowed_formats": frozenset(settings.allowed_formats),
                        "max_frames": settings.max_frames, "mode": settings.validation}] * len(URLS)
    assert sorted(hashed) == sorted(path.read_bytes() for path in tmp_path.glob("*.bin"))
    assert flushes == len(URLS)


def test_the_required_work_refuses_what_casimg_refuses(origin: Origin, tmp_path: Path) -> None:
    urls = [origin.url("/img/1.jpg"), origin.url("/truncated.jpg")]
    (tmp_path / "limit").mkdir()
    (tmp_path / "required").mkdir()
    assert asyncio.run(references.plain_fetch(urls, tmp_path / "limit")).images == 2  # the limit keeps the half JPEG
    with pytest.raises(InvalidImage, match="truncated"):
        asyncio.run(references.required_work_fetch(urls, tmp_path / "required"))


def test_python_m_bench_imports_every_scenario_and_keeps_its_options() -> None:
    result = subprocess.run([sys.executable, "-m", "bench", "--help"], cwd=ROOT, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    for option in ("--images", "--listing", "--duration", "--connections", "--retrieval-urls", "--processes",
                   "--multi", "--repeat", "--cache", "--output", "--keep"):
        assert option in result.stdout, option


def test_a_run_replaces_only_its_own_tables_in_benchmarks_md() -> None:
    document = f"{BEGIN}\n# old tables\n{END}\n\n## Validation worst cases\nhand-written\n"
    spliced = splice(document, "# new tables\n")
    assert spliced == f"{BEGIN}\n# new tables\n{END}\n\n## Validation worst cases\nhand-written\n"
    assert splice("", "# first\n") == f"{BEGIN}\n# first\n{END}\n"
    assert splice("## kept\n", "# first\n") == f"{BEGIN}\n# first\n{END}\n\n## kept\n"
    checked_in = (ROOT / "BENCHMARKS.md").read_text()
    assert checked_in.count(BEGIN) == checked_in.count(END) == 1


def test_the_parts_meter_splits_a_process_tree_and_counts_what_each_part_spent(tmp_path: Path) -> None:
    """bench.parts reads each part's CPU from /proc: a child forked below a part counts in it (as casimg's
    forked servers do), a child started from another thread too (as the render pool's forkserver is), a
    process named casimg.filler counts apart, and a process gone meanwhile keeps
    what it was read at; the machine's figure holds them all."""
    from bench.parts import Meter
    from bench.procs import tree

    burn = "import time\nend = time.process_time() + 0.3\nwhile time.process_time() < end: pass\ntime.sleep(30)\n"
    # The first child is started from a thread that lives on, as the render pool's forkserver is started
    # from a thread of the blocking pool (a thread that has ended leaves its children to the main thread).
    parent_code = ("import subprocess, sys, threading, time\n"
                   "def start_and_stay():\n"
                   f"    subprocess.Popen([sys.executable, '-c', {burn!r}])\n"
                   "    time.sleep(30)\n"
                   "threading.Thread(target=start_and_stay, daemon=True).start()\n"
                   f"subprocess.Popen([sys.executable, '-c', {burn!r}, 'casimg.filler'])\n"
                   "time.sleep(30)\n")
    parent = subprocess.Popen([sys.executable, "-c", parent_code])
    other = subprocess.Popen([sys.executable, "-c", "import time\ntime.sleep(30)\n"])
    try:
        meter = Meter({"own": [parent], "redis": [other]})
        before = meter.read()
        deadline = time.monotonic() + 20
        spent = Meter.spent(before, meter.read())
        while (spent["own"] < 0.25 or spent["filler"] < 0.25) and time.monotonic() < deadline:
            time.sleep(0.05)
            spent = Meter.spent(before, meter.read())
        assert 0.25 <= spent["own"] < 0.6 and 0.25 <= spent["filler"] < 0.6, spent
        assert spent["redis"] < 0.1 and spent["origin"] == 0, spent
        assert spent["machine"] >= spent["own"] + spent["filler"] - 0.05, spent  # /proc/stat holds them all
        counted = meter.read()
        _open_loopback_connections(20)
        _hand_a_token_between_threads(200)
        spent = Meter.spent(counted, meter.read())
        assert spent["connections"] >= 20, spent  # machine-wide counters: other work can only add
        assert spent["switches"] >= 400, spent  # each hand-over puts one thread to sleep and wakes the other
    finally:
        for pid in [*tree(parent.pid), other.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        parent.wait()
        other.wait()


def _open_loopback_connections(count: int) -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        for _ in range(count):
            with socket.create_connection(server.getsockname()):
                server.accept()[0].close()


def _hand_a_token_between_threads(count: int) -> None:
    """`count` round trips of one byte between two threads over pipes, each end blocking in read."""
    there, back = os.pipe(), os.pipe()

    def echo() -> None:
        for _ in range(count):
            os.write(back[1], os.read(there[0], 1))

    thread = threading.Thread(target=echo)
    thread.start()
    for _ in range(count):
        os.write(there[1], b"x")
        os.read(back[0], 1)
    thread.join()
    for end in (*there, *back):
        os.close(end)


def test_a_server_is_settled_once_its_start_has_ended_and_its_filler_after_its_own_start() -> None:
    """bench.procs.wait_settled waits out a process tree's start (a child that works for a while after its
    parent is up), and the filler's only for its own start: a filler busy with a backlog does not hold
    the run back."""
    from bench.procs import tree, wait_settled

    burn = "import time\nend = time.monotonic() + {seconds}\nwhile time.monotonic() < end: pass\ntime.sleep(60)\n"
    parent_code = ("import subprocess, sys, time\n"
                   f"subprocess.Popen([sys.executable, '-c', {burn.format(seconds=1.5)!r}])\n"
                   "time.sleep(60)\n")
    filler_code = ("import subprocess, sys, time\n"
                   f"subprocess.Popen([sys.executable, '-c', {burn.format(seconds=60)!r}, 'casimg.filler'])\n"
                   "time.sleep(60)\n")
    for code, at_least, at_most in ((parent_code, 1.2, 6.0), (filler_code, 1.0, 4.0)):
        parent = subprocess.Popen([sys.executable, "-c", code])
        try:
            waited = wait_settled(parent, window=0.25, filler_startup=1.0, timeout=20)
            assert at_least <= waited <= at_most, (code, waited)
        finally:
            for pid in tree(parent.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            parent.wait()


def test_the_python_floor_measures_each_part_of_a_stored_urls_least_python_and_sums_them() -> None:
    """bench.python_floor runs casimg's own batcher, log line and counter against a redis-server of its own."""
    result = subprocess.run([sys.executable, "-m", "bench.python_floor", "--count", "5000"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    rows = [line.strip("|").split("|") for line in result.stdout.splitlines() if line.startswith("| ")]
    figures = {name.strip(): (float(total.strip(" *")), float(user.strip(" *"))) for name, total, user in rows[1:]}
    parts = {name: value for name, value in figures.items() if not name.startswith("**")}
    assert len(parts) == 5 and all(0 <= user <= total and total > 0 for total, user in parts.values()), figures
    total, user = figures["**the floor: their sum**"]
    assert abs(total - sum(t for t, _ in parts.values())) < 0.3 and abs(user - sum(u for _, u in parts.values())) < 0.3


def test_each_rung_of_the_ladder_adds_the_step_its_row_names(origin: Origin, redis_server: Any,
                                                             tmp_path: Path) -> None:
    """bench.ladder: each rung does the rung above's work and its own step, with casimg's code for it; the
    last is casimg's own worker, which stores as the rungs below it do."""
    from bench.ladder import RUNGS, Rung, one_run
    from casimg.index import Index
    from casimg.runtime import run_loop
    from casimg.schema import KeySpace
    from casimg.storage.file import FileStore

    paths = URLS[:3]  # the formats casimg accepts by default
    urls = [origin.url(path) for path in paths]
    bodies = {origin.url(path): image_bytes(n, path.rsplit(".", 1)[1]) for n, path in enumerate(paths, 1)}
    digests = {url: hashlib.sha256(body).hexdigest() for url, body in bodies.items()}
    client = redis_server.client()

    def indexed(prefix: str) -> dict[str, str | None]:
        async def lookups() -> dict[str, str | None]:
            index = Index(aioredis.Redis.from_url(redis_server.url, decode_responses=True), KeySpace(prefix))
            records = {url: await index.lookup(url) for url in urls}
            await index.redis.aclose()
            return {url: record.sha256 if record else None for url, record in records.items()}
        return asyncio.run(lookups())

    for name in RUNGS:
        out, prefix = tmp_path / name, f"ladder-test-{name}:"
        out.mkdir()
        result = run_loop(one_run(Rung(name), load_settings(), urls, out, redis_server.url,
                                  redis_server.process.pid, prefix, made_fan_out=False))
        assert result.rate > 0 and result.cpu_ms > 0, (name, result)
        agent = "casimg/" if name != "required" else "aiohttp/"
        assert all(agent in origin.agents[path] for path in paths), (name, origin.agents)
        store = FileStore(out / ("casimg" if name == "worker" else "data"))
        plain = sorted(path.read_bytes() for path in out.glob("*.bin"))
        temps = sorted(path.read_bytes() for path in store.tmp_dir.glob("*")) if store.tmp_dir.exists() else []
        blobs = {url: store.blob_path(digest).read_bytes() for url, digest in digests.items()
                 if store.blob_path(digest).exists()}
        if name in ("required", "fetcher", "index"):
            assert plain == sorted(bodies.values()) and not temps and not blobs, name
        else:
            assert not plain, name
        if name in ("temp", "link"):  # kept under a temp name, until the settle rung settles it
            assert temps == sorted(bodies.values()), name
        assert blobs == (bodies if name in ("link", "settle", "worker") else {}), name
        if name in ("settle", "worker"):
            assert temps == [], f"{name}: the settle removes every temp name"
        with_index = name not in ("required", "fetcher")
        assert indexed(prefix) == (digests if with_index else dict.fromkeys(urls)), name
        statuses = [client.hget(key, "status") for key in client.scan_iter(f"{prefix}job:*")
                    if client.type(key) == "hash" and client.hexists(key, "status")]
        assert statuses == (["done"] if with_index else []), (name, statuses)


def test_confine_moves_every_thread_of_a_process_tree_and_what_it_starts_later() -> None:
    """bench.per_core keeps the origin and Redis off the CPU of the run under test with bench.procs.confine."""
    from bench.procs import confine
    from casimg import affinity

    cpus = affinity.usable()
    if len(cpus) < 2:
        pytest.skip("confining to one CPU of one changes nothing to see")
    target = {cpus[-1]}
    sleeper = "import time; time.sleep(60)"
    # A child with a second thread and a child of its own; on a line from stdin, it starts one more thread.
    code = ("import subprocess, sys, threading, time\n"
            "threading.Thread(target=time.sleep, args=(60,), daemon=True).start()\n"
            f"grandchild = subprocess.Popen([sys.executable, '-c', {sleeper!r}])\n"
            "print(grandchild.pid, flush=True)\n"
            "sys.stdin.readline()\n"
            "threading.Thread(target=time.sleep, args=(60,), daemon=True).start()\n"
            "print('started', flush=True)\n"
            "time.sleep(60)\n")
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert child.stdin is not None and child.stdout is not None
    try:
        grandchild = int(child.stdout.readline())

        def affinities() -> dict[int, set[int]]:
            return {int(thread): os.sched_getaffinity(int(thread)) for pid in (child.pid, grandchild)
                    for thread in os.listdir(f"/proc/{pid}/task")}

        before = affinities()
        assert len(before) == 3 and all(cpus_of != target for cpus_of in before.values()), before
        confine(child.pid, target)
        assert affinities() == dict.fromkeys(before, target)
        child.stdin.write("go\n")
        child.stdin.flush()
        assert child.stdout.readline() == "started\n"
        after = affinities()
        assert len(after) == 4 and set(map(frozenset, after.values())) == {frozenset(target)}, after
    finally:
        child.kill()
        child.wait()
        with contextlib.suppress(ProcessLookupError):
            os.kill(grandchild, signal.SIGKILL)


def test_the_per_core_report_puts_each_tool_against_the_required_work_and_sizes_redis() -> None:
    import argparse

    from bench.ingest import Series
    from bench.per_core import report

    runs = {key: Series(key) for key in ("limit", "required", "own", "wall", "casimg")}
    for key, rates in {"limit": [3000, 2800], "required": [2000, 1600], "own": [1500, 1200], "wall": [500, 400],
                       "casimg": [1200, 1120]}.items():
        runs[key].rates += rates
        runs[key].cpu_ms += [] if key == "own" else [0.5, 0.5]
    args = argparse.Namespace(images=3000, rounds=2, workspace=None)
    text = report(args, runs, [0.1, 0.12], 0, {1})
    rows = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in text.splitlines() if line.startswith("| ")}
    assert rows["casimg"][2].strip() == "0.65 (0.60-0.70)"  # 1200/2000, 1120/1600
    assert rows["own"][1].strip() == "" and rows["wall"][1].strip() == "0.50 (0.50-0.50)"
    assert "casimg against img2dataset's own figure: 0.87 (0.80-0.93)" in text  # 1200/1500, 1120/1200
    assert "1.5x img2dataset's own figure is 1.12 (1.12-1.12) of the required work" in text
    # Redis at 0.11 ms per image (the median) and casimg at 1,160/s: 1000 / (0.11 * 1160) = 7.8 processes.
    assert "one Redis core keeps up with about 8 casimg processes" in text
