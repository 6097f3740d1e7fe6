"""Download workers: retries of transient failures, none of permanent ones, and the attempts reported."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time

import pytest

import casimg.worker as worker_module
from casimg.fetcher import Fetcher
from casimg.queue import Limits
from casimg.services import open_services
from casimg.storage import file as blobs_module
from casimg.worker import FINISH_DEPTH, READ_AHEAD, STORE_DEPTH, Worker
from tests.conftest import make_settings
from tests.origin import Origin
from tests.procs import Processes, settle, submit


@pytest.fixture
def settings(tmp_path, redis_server, request):
    """The conftest settings, with the overrides a test passes through indirect parametrization."""
    return make_settings(tmp_path / "data", redis_server.url, **getattr(request, "param", {}))


async def outcome(api, url: str) -> dict:
    response = await api("POST", "/api/images?wait=30", json_body={"image_urls": [url]})
    assert response.code == 200, response.body
    return json.loads(response.body)["results"][0]


@pytest.mark.gen_test(timeout=60)
async def test_transient_failure_is_retried_and_the_attempts_are_reported(api, origin):
    result = await outcome(api, origin.url("/flaky/once?fail=1&status=503"))
    assert (result["status"], result["attempts"]) == ("stored", 2)
    assert origin.hits["flaky:once"] == 2


@pytest.mark.gen_test(timeout=60)
async def test_429_retry_after_is_honoured(api, origin):
    started = time.monotonic()
    result = await outcome(api, origin.url("/flaky/limited?fail=1&status=429&retry_after=2"))
    assert (result["status"], result["attempts"]) == ("stored", 2)
    # Without it, the retry would come after the jittered backoff of at most RETRY_BASE (0.5 s).
    assert time.monotonic() - started >= 2


@pytest.mark.gen_test(timeout=60)
@pytest.mark.parametrize("settings", [{"origin_backoff_max": 1.0}], indirect=True)  # the cool-down's ceiling
# The test origin writes its headers in Latin-1: "Â²" goes out as C2 B2, the UTF-8 bytes of "²".
@pytest.mark.parametrize("retry_after", ["9" * 400, "%C3%82%C2%B2"], ids=["infinite-as-float", "superscript-two"])
async def test_an_unreadable_retry_after_leaves_a_503_retryable(api, origin, retry_after):
    """400 digits (float() makes them infinite) and "²" (a digit to str.isdigit, not to float) failed
    the URL at once as an internal error, with no retry and no cool-down of the origin. The first is now the
    longest wait there is: the origin cools down for origin_backoff_max (1 s here), then the retry stores it."""
    url = origin.url(f"/flaky/odd-{len(retry_after)}?fail=1&status=503&retry_after={retry_after}")
    result = await outcome(api, url)
    assert (result["status"], result["attempts"]) == ("stored", 2), result


@pytest.mark.gen_test(timeout=60)
async def test_a_blob_is_flushed_to_disk_before_its_url_is_indexed(tmp_path, redis_server, origin, monkeypatch):
    """Durability: while the flush that makes a blob durable is held, the blob is linked in but its URL is not
    in the index yet; a worker that indexed first could lose an indexed image to a power cut."""
    entered, release = threading.Event(), threading.Event()
    real = blobs_module.sync_filesystem

    def held(directory):
        entered.set()
        release.wait(30)
        return real(directory)

    monkeypatch.setattr(blobs_module, "sync_filesystem", held)
    settings = make_settings(tmp_path / "data", redis_server.url)
    services = await open_services(settings, settings.redis_url, with_worker=True)
    assert services.worker is not None
    url = origin.url("/img/913001.jpg")
    try:
        services.worker.start()
        job_id, _ = await services.queue.submit([url])
        for _ in range(400):
            if entered.is_set():
                break
            await asyncio.sleep(0.05)
        assert entered.is_set(), "the flush never started"
        linked = list((settings.data_dir / "blobs").rglob("*"))
        assert await services.index.digest_of(url) is None
        assert any(path.is_file() for path in linked), "the blob is linked in before the flush"
        release.set()
        for _ in range(400):
            if (await services.queue.get(job_id)).status == "done":
                break
            await asyncio.sleep(0.05)
        assert await services.index.digest_of(url) is not None
    finally:
        release.set()
        await services.close()


@pytest.mark.gen_test(timeout=60)
async def test_a_failure_that_persists_ends_after_three_attempts(api, origin):
    result = await outcome(api, origin.url("/flaky/always?fail=99&status=500"))
    assert (result["status"], result["error"], result["attempts"]) == ("failed", "HTTP 500", 3)
    assert origin.hits["flaky:always"] == 3


@pytest.mark.gen_test(timeout=60)
@pytest.mark.parametrize(("path", "reason"), [("/status/404", "HTTP 404"), ("/html", "not an image")])
async def test_permanent_failures_are_not_retried(api, origin, path, reason):
    before = origin.hits[path]
    result = await outcome(api, origin.url(path))
    assert (result["status"], result["error"], result["attempts"]) == ("failed", reason, 1)
    assert origin.hits[path] == before + 1


@pytest.mark.gen_test(timeout=60)
async def test_connection_reset_is_retried(api, origin):
    # aiohttp itself resends an idempotent request once on a reset connection (RFC 9112 9.3.1), so one
    # casimg attempt can be two hits; two resets are what it takes to need a second attempt.
    result = await outcome(api, origin.url("/reset/twice?fail=2"))
    assert (result["status"], result["attempts"]) == ("stored", 2)
    assert origin.hits["reset:twice"] == 3


@pytest.mark.gen_test(timeout=60)
async def test_connection_reset_every_time_fails_after_three_attempts(api, origin):
    result = await outcome(api, origin.url("/reset/always?fail=99"))
    assert (result["status"], result["error"], result["attempts"]) == ("failed", "connection lost", 3)
    assert origin.hits["reset:always"] <= 2 * 3  # bounded: at most aiohttp's one resend per attempt


@pytest.mark.gen_test(timeout=60)
@pytest.mark.parametrize(("path", "reason"), [
    ("/big?bytes=60000000", "too large"),
    ("/truncated.jpg", "truncated or corrupt image"),
])
async def test_more_permanent_failures_are_not_retried(api, origin, path, reason):
    before = origin.hits[path.split("?")[0]]
    result = await outcome(api, origin.url(path))
    assert result["status"] == "failed" and result["error"].startswith(reason), result
    assert result["attempts"] == 1
    assert origin.hits[path.split("?")[0]] == before + 1


@pytest.mark.gen_test(timeout=60)
async def test_blocked_address_is_not_retried(api):
    result = await outcome(api, "http://127.0.0.2:9/img/1.jpg")
    assert result["status"] == "failed" and result["error"].startswith("blocked address"), result
    assert result["attempts"] == 1


@pytest.mark.gen_test(timeout=60)
async def test_timeout_is_retried(api, origin, settings):
    result = await outcome(api, origin.url("/stall/once?fail=1"))  # the first try outlasts fetch_timeout
    assert (result["status"], result["attempts"]) == ("stored", 2)
    assert origin.hits["stall:once"] == 2
    assert settings.fetch_timeout < 30


@pytest.mark.gen_test(timeout=60)
async def test_a_worker_stopped_right_after_it_starts_stops(settings):
    """stop() used to cancel the heartbeat mid-command; redis-py swallowed it and stop() waited for ever."""
    services = await open_services(settings, settings.redis_url, with_worker=True)
    try:
        for delay in (0, 0, 0.001, 0.005, 0.01, 0.02):
            worker = Worker(settings, services.queue, services.index, services.blobs, services.fetcher)
            worker.start()
            await asyncio.sleep(delay)
            await asyncio.wait_for(worker.stop(grace=1), timeout=10)
            assert all(task.done() for task in (worker._heart, worker._runner))
    finally:
        await services.close()


@pytest.mark.gen_test(timeout=60)
async def test_a_worker_takes_back_entries_read_under_its_name_whose_reply_it_never_got(settings, origin):
    """Redis ran a read and stopped before sending the reply (CI: a job stuck at 398/400 after Redis came
    back): the entries were pending under a live worker's name, and no worker ever took them."""
    services = await open_services(settings, settings.redis_url, with_worker=True)
    try:
        worker, queue = services.worker, services.queue
        job_id, _ = await queue.submit([origin.url(f"/img/{914_000 + n}.png") for n in range(6)])
        await queue.heartbeat(worker.name, settings.worker_heartbeat)
        lost = await queue.read(worker.name, {"": 4})  # the read whose reply the worker never got
        assert len(lost) == 4
        worker.start()
        for _ in range(100):
            job = await queue.get(job_id)
            if job.status == "done":
                break
            await asyncio.sleep(0.1)
        assert (job.status, job.stored) == ("done", 6)
        assert await queue.depth() == {"waiting": 0, "in_progress": 0}
    finally:
        await services.close()


@pytest.mark.gen_test(timeout=60)
@pytest.mark.parametrize("step", ["resume_enqueuing", "tidy_wake_readers"])
async def test_entries_claimed_back_survive_a_redis_error_on_the_claims_turn(settings, origin, monkeypatch, step):
    """A Redis error in the steps around the claim (resuming jobs whose submitter died, tidying the wake
    stream's readers) comes before the claim: entries claimed are never dropped before their tasks start,
    to be claimed again with one more delivery each time, until MAX_DELIVERIES failed them as
    "abandoned"."""
    from redis.exceptions import ConnectionError as RedisConnectionError

    services = await open_services(settings, settings.redis_url, with_worker=True)
    try:
        worker, queue = services.worker, services.queue
        job_id, _ = await queue.submit([origin.url(f"/img/{917_500 + n}.png") for n in range(2)])
        await queue.heartbeat(worker.name, settings.worker_heartbeat)
        assert len(await queue.read(worker.name, {"": 2})) == 2  # a read whose reply the worker never got
        real, calls = getattr(queue, step), [0]

        async def flaky(*args, **kwargs):
            calls[0] += 1
            if calls[0] <= 5:
                raise RedisConnectionError("Redis went away again")
            return await real(*args, **kwargs)

        monkeypatch.setattr(queue, step, flaky)
        monkeypatch.setattr(worker_module, "REDIS_RETRY", 0.05)
        worker.start()
        job = await settled(queue, job_id)
        assert (job.status, job.stored) == ("done", 2), [r.get("error") for r in job.results]
    finally:
        await services.close()


@pytest.mark.gen_test(timeout=60)
async def test_an_idle_worker_starts_a_new_keys_first_job_without_waiting_out_its_block(settings, origin,
                                                                                       monkeypatch):
    """An idle worker blocks on the streams of the keys it knows. A key it has never seen wakes it through
    the wake stream, instead of waiting for its next look at the list of keys: here the block is 3 s, and
    the new key's job is done before one block is over."""
    monkeypatch.setattr(worker_module, "IDLE_BLOCK_MS", 3_000)
    services = await open_services(settings, settings.redis_url, with_worker=True)
    try:
        services.worker.start()
        await asyncio.sleep(0.5)  # idle, blocked in Redis
        started = time.monotonic()
        job_id, _ = await services.queue.submit([origin.url(f"/img/{918_000 + n}.png") for n in range(3)],
                                                key_id="newcomer")
        job = await settled(services.queue, job_id, seconds=2.5)
        assert (job.status, job.stored) == ("done", 3)
        assert time.monotonic() - started < 3
    finally:
        await services.close()


@pytest.mark.gen_test(timeout=60)
async def test_a_busy_worker_starts_a_new_keys_url_without_waiting_for_its_next_look_at_the_keys(
        tmp_path, redis_server, origin, monkeypatch):
    """Key A's slow downloads hold 7 of 8 slots and more of its URLs wait in its queue, so the worker
    reads on without blocking. Key B, new, wakes it through the wake stream read with A's entries: B's
    URL takes the free slot long before the worker's next look at the list of keys (made 30 s here)."""
    monkeypatch.setattr(worker_module, "OWNERS_REFRESH", 30.0)
    with Origin("127.0.0.5") as other:
        settings = make_settings(tmp_path / "data", redis_server.url, download_concurrency=8,
                                 per_host_concurrency=8, allow_networks="127.0.0.1/32,127.0.0.5/32")
        services = await open_services(settings, settings.redis_url, with_worker=True)
        try:
            services.worker.start()
            busy, _ = await services.queue.submit(
                [origin.url(f"/img/{918_100 + n}.jpg?delay=6") for n in range(24)], key_id="a")
            await asyncio.sleep(1.0)  # A's downloads hold their slots
            newcomer, _ = await services.queue.submit([other.url("/img/918200.jpg")], key_id="b")
            job = await settled(services.queue, newcomer, seconds=4)
            assert (job.status, job.stored) == ("done", 1)
            assert (await services.queue.get(busy, with_results=False)).done == 0  # the worker was busy
        finally:
            await services.close()


@pytest.mark.gen_test(timeout=60)
async def test_downloads_go_on_while_earlier_ones_are_stored_and_stop_when_storing_falls_behind(
    tmp_path, redis_server, origin, monkeypatch
):
    """A download gives its slot back once its body is in, and a body its place once its bytes are in a
    temp file; what waits to be stored stays bounded.

    With the disk flush held, stores cannot finish: 2 slots x FINISH_DEPTH stores wait for the flush
    holding no body, 2 x STORE_DEPTH bodies wait for one of their places, and 2 more bodies wait for a
    body's place, holding their slots. So 2 + 4 + 8 downloads happen and then no more, while 2 x
    READ_AHEAD entries read ahead wait for a slot.
    """
    release = threading.Event()
    real = blobs_module.sync_filesystem
    monkeypatch.setattr(blobs_module, "sync_filesystem", lambda directory: (release.wait(30), real(directory)))
    settings = make_settings(tmp_path / "data", redis_server.url, download_concurrency=2, per_host_concurrency=2)
    services = await open_services(settings, settings.redis_url, with_worker=True)
    assert services.worker is not None
    paths = [f"/img/{912_000 + n}.jpg" for n in range(24)]
    before = sum(origin.hits[path] for path in paths)  # the origin is shared by the whole session
    try:
        services.worker.start()
        job_id, _ = await services.queue.submit([origin.url(path) for path in paths])
        expected = 2 + STORE_DEPTH * 2 + FINISH_DEPTH * 2

        def fetched() -> int:
            return sum(origin.hits[path] for path in paths) - before

        worker = services.worker

        def saturated() -> bool:
            """Every place of both store steps taken, both slots held by bodies waiting for a place, and
            the entries read ahead waiting for a slot: no download can start."""
            return (worker._finishing.locked() and worker._storing.locked() and worker._slots.free == 0
                    and worker.busy == expected + READ_AHEAD * 2)

        for _ in range(400):
            if fetched() >= expected and saturated():
                break
            await asyncio.sleep(0.05)
        assert saturated(), (worker.busy, worker._slots.free)
        await asyncio.sleep(0.3)  # nothing more comes
        assert fetched() == expected
        release.set()
        for _ in range(200):
            job = await services.queue.get(job_id)
            if job.status == "done":
                break
            await asyncio.sleep(0.05)
        assert (job.status, job.stored, fetched()) == ("done", len(paths), len(paths))
    finally:
        release.set()
        await services.close()


async def settled(queue, job_id: str, seconds: float = 30):
    for _ in range(int(seconds * 20)):
        job = await queue.get(job_id)
        if job.status == "done":
            return job
        await asyncio.sleep(0.05)
    return job


@pytest.mark.gen_test(timeout=60)
async def test_an_entry_waiting_for_a_turn_at_its_origin_lends_its_slot(tmp_path, redis_server, origin):
    """Two slots, one download at a time per address: the second URL of a slow address waits for its turn
    without its slot, and a URL of another address downloads meanwhile instead of after the first."""
    with Origin("127.0.0.5") as other:
        settings = make_settings(tmp_path / "data", redis_server.url, download_concurrency=2,
                                 per_host_concurrency=1, allow_networks="127.0.0.1/32,127.0.0.5/32")
        services = await open_services(settings, settings.redis_url, with_worker=True)
        try:
            slow = [f"/img/{916_400 + n}.jpg" for n in range(2)]
            job_id, _ = await services.queue.submit([*(origin.url(f"{path}?delay=1.5") for path in slow),
                                                     other.url("/img/916410.jpg")])
            services.worker.start()
            job = await settled(services.queue, job_id)
            assert (job.status, job.stored) == ("done", 3)
            first = min(at for at, path in origin.requests if path.split("?")[0] in slow)
            [elsewhere] = [at for at, path in other.requests if path.startswith("/img/")]
            assert elsewhere - first < 1.0, "the other address waited for the slow download to end"
        finally:
            await services.close()


@pytest.mark.gen_test(timeout=90)
@pytest.mark.parametrize("wait", ["turn", "rate"])
async def test_a_key_flooding_one_slow_origin_leaves_the_free_slots_to_another_key(
        tmp_path, redis_server, origin, monkeypatch, wait):
    """Four slots, 2 entries of a key away at most: key A's URLs of one origin wait for it, past that
    bound, either for their turns (one download at a time per address, each 5 s long) or for its rate (a
    request every 5 s). Those past it must not keep the slots, nor hold the reader back, from key B,
    whose URLs of 3 other addresses take the 3 free slots at once. They took one more each time one of
    A's URLs went on (every 5 s here)."""
    monkeypatch.setattr(worker_module, "AWAY_PER_SLOT", 0.5)
    paced = {"origin_rate": 0.2, "origin_burst": 3} if wait == "rate" else {}
    with Origin("127.0.0.6") as b1, Origin("127.0.0.7") as b2, Origin("127.0.0.8") as b3:
        settings = make_settings(tmp_path / "data", redis_server.url, download_concurrency=4, per_host_concurrency=1,
                                 allow_networks="127.0.0.1/32,127.0.0.6/31,127.0.0.8/32", **paced)
        services = await open_services(settings, settings.redis_url, with_worker=True)
        try:
            worker, slots = services.worker, services.worker._slots
            worker.start()
            delay = 5 if wait == "turn" else 0
            flood, _ = await services.queue.submit(
                [origin.url(f"/img/{919_000 + 50 * len(wait) + n}.jpg?delay={delay}") for n in range(30)],
                key_id="A")
            for _ in range(200):
                if slots.held_back("A") and slots.away["A"] + slots.waiting["A"] >= 4:
                    break
                await asyncio.sleep(0.02)
            assert slots.held_back("A"), "A's URLs wait for their origin, enough of them to read no more of A"
            await asyncio.sleep(0.2)
            job_id, _ = await services.queue.submit(
                [server.url(f"/img/{919_200 + 10 * len(wait) + n}.jpg?delay=0.5") for n in range(3)
                 for server in (b1, b2, b3)], key_id="B")
            started, most = time.monotonic(), 0
            while time.monotonic() - started < 3.5 and most < 3:  # (a 4th holds one until it waits for a turn)
                most = max(most, slots.held["B"])
                await asyncio.sleep(0.01)
            assert most >= 3, "B's URLs of three addresses took the three free slots at once"
            job = await settled(services.queue, job_id)
            assert (job.status, job.stored) == ("done", 9)
            await services.queue.cancel(flood)
        finally:
            await services.close()


@pytest.mark.gen_test(timeout=60)
async def test_another_keys_entries_away_do_not_hold_back_a_key_with_one_of_its_own(
        tmp_path, redis_server, origin, monkeypatch):
    """Four slots, 2 entries of a key away at most: key C's 3 URLs wait for one address's turns (one
    download at a time, each 4 s long). Key A's one URL of that address waits too, and A's 10 URLs of
    another address must go on meanwhile: a bound shared by every key would have held A back."""
    monkeypatch.setattr(worker_module, "AWAY_PER_SLOT", 0.5)
    with Origin("127.0.0.9") as other:
        settings = make_settings(tmp_path / "data", redis_server.url, download_concurrency=4, per_host_concurrency=1,
                                 allow_networks="127.0.0.1/32,127.0.0.9/32")
        services = await open_services(settings, settings.redis_url, with_worker=True)
        try:
            worker, slots = services.worker, services.worker._slots
            worker.start()
            await services.queue.submit([origin.url(f"/img/{919_500 + n}.jpg?delay=4") for n in range(3)],
                                        key_id="C")
            for _ in range(200):
                if slots.away["C"] == 2:
                    break
                await asyncio.sleep(0.02)
            assert slots.away["C"] == 2
            job_id, _ = await services.queue.submit(
                [origin.url("/img/919510.jpg?delay=4"), *(other.url(f"/img/{919_520 + n}.jpg") for n in range(10))],
                key_id="A")
            started = time.monotonic()
            for _ in range(150):
                job = await services.queue.get(job_id)
                if job.stored == 10:
                    break
                await asyncio.sleep(0.02)
            assert (job.stored, job.status) == (10, "running"), "A's other URLs went on, its first still waits"
            assert time.monotonic() - started < 3
        finally:
            await services.close()


@pytest.mark.gen_test(timeout=120)
@pytest.mark.parametrize("stop_after", [None, 1.5])
async def test_two_keys_over_two_capped_addresses_leave_no_slot_turn_or_entry_away_behind(
        tmp_path, redis_server, origin, stop_after):
    """Three slots, one download at a time per address, two keys' URLs over two addresses with mixed
    delays: every job finishes (or the worker stops mid-way), and nothing stays counted afterwards."""
    import random

    with Origin("127.0.0.5") as other:
        settings = make_settings(tmp_path / "data", redis_server.url, download_concurrency=3,
                                 per_host_concurrency=1, allow_networks="127.0.0.1/32,127.0.0.5/32")
        services = await open_services(settings, settings.redis_url, with_worker=True)
        try:
            pick = random.Random(7)

            def urls(base: int) -> list[str]:
                return [(origin if pick.random() < 0.6 else other).url(
                    f"/img/{base + n}.jpg?delay={pick.choice([0, 0.01, 0.05, 0.2])}") for n in range(40)]

            jobs = [(await services.queue.submit(urls(base), key_id=key))[0]
                    for base, key in ((918_000, "k1"), (918_100, "k2"))]
            worker = services.worker
            worker.start()
            if stop_after:
                await asyncio.sleep(stop_after)
                await worker.stop(grace=0.3)
            else:
                for job_id in jobs:
                    job = await settled(services.queue, job_id, 60)
                    assert (job.status, job.stored) == ("done", 40)
            await asyncio.sleep(0.1)
            caps = services.fetcher.caps
            assert (dict(worker._slots.away), worker._slots.free, dict(worker._slots.waiting)) == ({}, 3, {})
            assert not worker._slots._takers
            assert not caps.addresses._gates and not caps.domains._gates
        finally:
            await services.close()


@pytest.mark.gen_test(timeout=60)
async def test_an_entry_waiting_for_a_slot_when_a_stop_cancels_it_stays_pending(tmp_path, redis_server, origin):
    """One slot: one entry downloads slowly, the one read ahead waits for the slot. The stop cancels both
    in one go; the holder's give-back meets the waiter's cancelled future, and the waiter must leave
    pending for the next worker (it failed as "internal error (ValueError)", acknowledged)."""
    for trial in range(2):
        settings = make_settings(tmp_path / f"data{trial}", redis_server.url, download_concurrency=1)
        services = await open_services(settings, settings.redis_url, with_worker=True)
        try:
            worker = services.worker
            worker.start()
            job_id, _ = await services.queue.submit(
                [origin.url(f"/img/{918_200 + 10 * trial + n}.jpg?delay=5") for n in range(2)])
            for _ in range(200):
                if len(worker._tasks) == 2 and worker._slots._takers:
                    break
                await asyncio.sleep(0.02)
            assert worker._slots._takers, "the second entry waits for the slot"
            await worker.stop(grace=0.3)
            job = await services.queue.get(job_id)
            assert (job.done, [r["error"] for r in job.results if r and r.get("error")]) == (0, [])
        finally:
            await services.close()


@pytest.mark.gen_test(timeout=60)
async def test_a_transient_failure_in_a_stop_leaves_the_url_to_the_next_worker(tmp_path, redis_server, origin):
    """Stopped while one URL waits to retry an HTTP 500 (Retry-After: 20) and another's download times out
    in the stop's grace (with 1 s of its retry budget left): neither fails because this worker went away.
    Both stay pending, and the next worker stores both (they failed as "HTTP 500" and "timeout",
    acknowledged)."""
    settings = make_settings(tmp_path / "data", redis_server.url, fetch_timeout=2)  # a budget of 3 s
    key = f"{time.time_ns()}"
    urls = [origin.url(f"/flaky/r{key}?fail=1&status=500&retry_after=20"),
            origin.url(f"/stall/t{key}?fail=1&seconds=6")]
    services = await open_services(settings, settings.redis_url, with_worker=True)
    try:
        services.worker.start()
        job_id, _ = await services.queue.submit(urls)
        for _ in range(200):
            if origin.hits[f"flaky:r{key}"] and origin.hits[f"stall:t{key}"]:
                break
            await asyncio.sleep(0.02)
        assert origin.hits[f"flaky:r{key}"] == origin.hits[f"stall:t{key}"] == 1
        await services.worker.stop(grace=5)  # the stalled download times out 2 s in
        job = await services.queue.get(job_id)
        assert (job.done, [result["status"] for result in job.results]) == (0, ["pending", "pending"])
    finally:
        await services.close()
    services = await open_services(settings, settings.redis_url, with_worker=True)
    try:
        services.worker.start()
        job = await settled(services.queue, job_id)
        assert (job.status, job.stored, job.failed) == ("done", 2, 0)
        assert origin.hits[f"flaky:r{key}"] == origin.hits[f"stall:t{key}"] == 2
    finally:
        await services.close()


@pytest.mark.gen_test(timeout=60)
async def test_entries_lent_for_a_turn_start_no_download_once_the_worker_stops(tmp_path, redis_server, origin):
    """Two slots, one download at a time per address: stopped while one downloads, the entries waiting
    for the address's turn (their slots lent) are left to the next worker when the turn comes."""
    settings = make_settings(tmp_path / "data", redis_server.url, download_concurrency=2, per_host_concurrency=1)
    services = await open_services(settings, settings.redis_url, with_worker=True)
    paths = [f"/img/{917_100 + n}.jpg" for n in range(6)]
    before = sum(origin.hits[path] for path in paths)
    try:
        worker = services.worker
        worker.start()
        await services.queue.submit([origin.url(f"{path}?delay=1") for path in paths])
        for _ in range(200):
            if sum(origin.hits[path] for path in paths) - before >= 1 and worker._slots.away.total() >= 2:
                break
            await asyncio.sleep(0.02)
        assert worker._slots.away.total() >= 2
        await worker.stop(grace=10)
        assert sum(origin.hits[path] for path in paths) - before == 1
        assert worker._slots.away == {}
    finally:
        await services.close()


@pytest.mark.gen_test(timeout=30)
async def test_a_wait_for_a_turn_and_then_a_slot_is_not_charged_to_the_budget(settings):
    """The entry lends its slot while it waits for its turn, and once the turn comes waits for a slot
    holding it: its download's clock stood still for both, and its budget is charged for neither."""
    from types import SimpleNamespace

    from casimg.fetcher import _TurnWait
    from casimg.scheduler import FairSlots, OriginCaps
    from casimg.worker import _Lent, _Slot

    slots = FairSlots(1, reserve=0, away_per_key=4, away_bound=8)
    worker = SimpleNamespace(settings=settings, _stopping=asyncio.Event())
    mine = _Slot(slots, "k")
    mine.try_take()
    caps = OriginCaps(1, 2)
    first = caps.hold("192.0.2.9", "192.0.2.9")
    await first.take()
    seen = {}

    async def entry():
        lent = _Lent(worker, mine)
        started = time.monotonic()
        async with asyncio.timeout(10) as clock:
            turn = caps.hold("192.0.2.9", "192.0.2.9")
            await _TurnWait(clock, lent).take(turn)
            seen["clock"] = 10 - (clock.when() - asyncio.get_running_loop().time())
            turn.release()
        seen["charged"] = time.monotonic() - started - lent.waited
        seen["held"] = mine._held

    task = asyncio.ensure_future(entry())
    await asyncio.sleep(0.3)  # it lent its slot, and waits for the turn
    theirs = _Slot(slots, "k")
    theirs.try_take()  # another download takes the lent slot
    first.release()  # the entry's turn; no slot is free: it waits for one, holding the turn
    await asyncio.sleep(0.3)
    theirs.give_back()
    await task
    assert seen["held"] and slots.away == {} and slots.waiting == {}
    assert seen["clock"] < 0.05 and seen["charged"] < 0.05, seen


@pytest.mark.gen_test(timeout=60)
async def test_many_entries_of_one_address_through_few_slots_all_finish(tmp_path, redis_server, origin):
    """Entries lent their slots while waiting for a turn (past the bound on those away, counted as waiting
    for one); one that gets its turn and finds no slot free must not hold the turn while it waits for
    one (each side would wait for the other for ever)."""
    settings = make_settings(tmp_path / "data", redis_server.url, download_concurrency=2, per_host_concurrency=1)
    services = await open_services(settings, settings.redis_url, with_worker=True)
    try:
        urls = [origin.url(f"/img/{916_500 + n}.jpg?delay=0.02") for n in range(40)]
        job_id, _ = await services.queue.submit(urls)
        services.worker.start()
        job = await settled(services.queue, job_id, 40)
        assert (job.status, job.stored) == ("done", 40)
        assert services.worker._slots.away == {}
    finally:
        await services.close()


@pytest.mark.gen_test(timeout=60)
async def test_entries_read_ahead_start_no_download_once_the_worker_stops(tmp_path, redis_server, origin):
    """With one slot, the worker reads the next entries ahead; stopped while the first downloads, it
    finishes that one and leaves the others pending, unfetched, for the next worker."""
    settings = make_settings(tmp_path / "data", redis_server.url, download_concurrency=1, per_host_concurrency=1)
    services = await open_services(settings, settings.redis_url, with_worker=True)
    assert services.worker is not None
    paths = [f"/img/{913_100 + n}.jpg" for n in range(4)]
    before = sum(origin.hits[path] for path in paths)  # the origin is shared by the whole session
    try:
        worker = services.worker
        worker.start()
        job_id, _ = await services.queue.submit([origin.url(path) + "?delay=1" for path in paths])
        for _ in range(200):
            if sum(origin.hits[path] for path in paths) - before >= 1 and worker.busy >= 2:
                break
            await asyncio.sleep(0.02)
        assert worker.busy >= 2, "no entry was read ahead"
        await worker.stop(grace=5)
        assert sum(origin.hits[path] for path in paths) - before == 1
        job = await services.queue.get(job_id)
        assert (job.stored, job.done) == (1, 1)
        assert await services.queue.depth() == {"waiting": 2, "in_progress": 1}  # one read ahead, pending
    finally:
        await services.close()


# -- hostile URLs end their entry -----------------------------------------------------------------

@pytest.mark.gen_test(timeout=90)
@pytest.mark.parametrize("location", [b"http://x:99999/", b"http://[::1", b"http://\xff\xfe.example/img.jpg",
                                      b"http://h\xc3(.example/"])
async def test_an_invalid_redirect_location_fails_the_url_and_the_worker_goes_on(api, origin, location):
    url = origin.url(f"/redirect-raw?hex={location.hex()}")
    result = await outcome(api, url)
    assert (result["status"], result["error"]) == ("failed", "invalid redirect"), result
    assert (await outcome(api, origin.url("/img/913001.jpg")))["status"] == "stored"


@pytest.mark.gen_test(timeout=90)
async def test_a_nul_in_the_host_fails_the_url_as_invalid(api, origin):
    result = await outcome(api, f"http://127.0.0.2\u0000:{origin.port}/img/1.jpg")
    assert (result["status"], result["error"], result["attempts"]) == ("failed", "invalid URL", 1), result
    assert (await outcome(api, origin.url("/img/913002.jpg")))["status"] == "stored"


@pytest.mark.gen_test(timeout=90)
async def test_an_unexpected_error_fails_the_url_once_logged_and_the_worker_goes_on(
    api, origin, services, monkeypatch, caplog
):
    """Fault injection: a defect nobody foresaw, met by one URL, in the download path."""
    real = Fetcher._check_hop

    def defective(self: Fetcher, url) -> None:
        if "defect" in str(url):
            raise RuntimeError("a defect")
        real(self, url)

    monkeypatch.setattr(Fetcher, "_check_hop", defective)
    with caplog.at_level(logging.ERROR, logger="casimg.worker"):
        result = await outcome(api, origin.url("/img/913003.jpg?defect"))
    assert (result["status"], result["error"]) == ("failed", "internal error (RuntimeError)"), result
    tracebacks = [r for r in caplog.records if r.exc_info and "913003" in r.getMessage()]
    assert len(tracebacks) == 1
    assert await services.queue.depth() == {"waiting": 0, "in_progress": 0}
    assert (await outcome(api, origin.url("/img/913004.jpg")))["status"] == "stored"


@pytest.fixture
def procs():
    tracked = Processes()
    yield tracked
    tracked.cleanup()


@pytest.mark.slow
def test_hostile_urls_through_casimg_serve_end_their_jobs_and_free_the_key(tmp_path, procs, origin):
    """End to end: jobs of URLs that used to kill their download task finish, and the key that sent them
    is not left at its in-flight limit (it used to answer 429 for the whole job TTL)."""
    limit = 3
    server = procs.server(tmp_path / "data", env={"CASIMG_MAX_JOBS_IN_FLIGHT": str(limit), "CASIMG_RATE_LIMIT": "0"})
    locations = [b"http://x:99999/", b"http://\xff\xfe.example/"]
    hostile = {
        **{origin.url(f"/redirect-raw?hex={location.hex()}"): "invalid redirect" for location in locations},
        f"http://127.0.0.2\u0000:{origin.port}/": "invalid URL",
    }
    jobs = {submit(server, [url]): reason for url, reason in hostile.items()}
    assert len(jobs) == limit
    for job_id, reason in jobs.items():
        finished = settle(server, job_id, timeout=30)
        assert finished["results"][0]["error"] == reason, finished
    accepted = server.submit([origin.url("/img/913005.jpg")])  # 429 while the key is at its limit
    assert accepted["stored"] == 1, accepted
    assert "Traceback" not in server.output()


# -- slots: not held while waiting to retry, bounded per URL -----------------------------------------

@pytest.mark.gen_test(timeout=90)
@pytest.mark.parametrize("settings", [{"download_concurrency": 1}], indirect=True)
async def test_no_slot_is_held_while_a_url_waits_to_be_retried(api, origin, services):
    """One slot: a URL told to come back in 4 s must not keep the next URL waiting for those 4 s.

    The next URL is on another origin (a name for the same server): the 429 cools its own origin down.
    """
    slow_job = json.loads((await api("POST", "/api/images", json_body={
        "image_urls": [origin.url("/flaky/later?fail=1&status=429&retry_after=4")]})).body)["job_id"]
    for _ in range(200):  # its first attempt has been answered: it is waiting to retry
        if origin.hits["flaky:later"] >= 1:
            break
        await asyncio.sleep(0.02)
    other = await outcome(api, f"http://localhost:{origin.port}/img/913010.jpg")
    assert other["status"] == "stored"
    waiting = json.loads((await api("GET", f"/api/jobs/{slow_job}")).body)
    assert waiting["status"] != "done", "the other URL waited for the retry"
    assert origin.hits["flaky:later"] == 1


@pytest.mark.gen_test(timeout=90)
async def test_a_url_that_times_out_gets_one_shorter_retry(api, origin, settings):
    """A timeout is tried once more with what is left of 1.5 fetch timeouts, not twice more in full."""
    started = time.monotonic()
    result = await outcome(api, origin.url("/stall/always?fail=99&seconds=30"))
    elapsed = time.monotonic() - started
    assert (result["status"], result["error"], result["attempts"]) == ("failed", "timeout", 2), result
    assert origin.hits["stall:always"] == 2
    assert elapsed < 3 * settings.fetch_timeout  # three full attempts took at least that


@pytest.mark.gen_test(timeout=60)
async def test_a_worker_finishes_queueing_a_job_whose_submitter_died(services, origin):
    """Published, then the submitting process died before queueing the rest: a worker queues it."""
    queue = services.queue
    queue.resume_after = 0  # 30 s in service: a submitter may still be at it
    urls = [origin.url(f"/img/{913_000 + n}.png") for n in range(5)]
    job_id = "ef" * 12
    await queue._stage(job_id, urls, {})
    await queue._publish_or_refuse(job_id, "", Limits(), total=len(urls), failed=0, size=0)
    await queue.enqueue_step(job_id, 2)  # and no more
    for _ in range(300):
        job = await queue.get(job_id)
        if job.status == "done":
            break
        await asyncio.sleep(0.1)
    assert (job.status, job.stored) == ("done", 5)


@pytest.mark.gen_test(timeout=60)
async def test_a_repeat_of_content_this_worker_validated_is_not_validated_again(api, origin, monkeypatch):
    import casimg.validation as validation_module  # what the worker's validator calls

    checked: list[int] = []
    real = validation_module.validate_image

    def counting(source, **limits):  # type: ignore[no-untyped-def]
        checked.append(len(source))
        return real(source, **limits)

    monkeypatch.setattr(validation_module, "validate_image", counting)
    first = await outcome(api, origin.url("/img/913002.png"))
    repeat = await outcome(api, origin.url("/img/913002.png?copy=1"))
    assert first["status"] == repeat["status"] == "stored" and repeat.get("deduplicated") is True
    assert (repeat["width"], repeat["height"], repeat["sha256"]) == (first["width"], first["height"], first["sha256"])
    assert len(checked) == 1, "the repeat's bytes were validated again"
    other = await outcome(api, origin.url("/img/913003.png"))
    assert other["status"] == "stored" and len(checked) == 2
