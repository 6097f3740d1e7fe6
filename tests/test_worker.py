"""Download workers: retries of transient failures, none of permanent ones, and the attempts reported."""

from __future__ import annotations

import asyncio
import json

import pytest

from casimg.app import open_services
from casimg.worker import Worker


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
    result = await outcome(api, origin.url("/flaky/limited?fail=1&status=429&retry_after=1"))
    assert (result["status"], result["attempts"]) == ("stored", 2)


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
