"""DELETE /api/jobs/{id}: a real app and its workers, a real redis-server, the real origin."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from casimg.client import verify_signature
from casimg.config import Settings
from casimg.fsck import fsck
from casimg.keys import Scope
from tests.conftest import RedisProcess, make_settings, problem

SECRET = "cancel-test-secret"
SLOW = 4  # seconds the in-flight image takes to come back: the cancel lands while it is on its way


DEFAULT_HOOK = f"default-{os.urandom(4).hex()}"


@pytest.fixture
def settings(tmp_path: Path, redis_server: RedisProcess, origin: Any) -> Settings:
    """Two download slots, so that of a long job two URLs are in flight and the rest wait in the queue; a
    deployment's default callback URL."""
    return make_settings(tmp_path / "data", redis_server.url, download_concurrency=2, webhook_secret=SECRET,
                         webhook_url=origin.url(f"/hook/{DEFAULT_HOOK}"))


async def wait_until(condition: Any, what: str, within: float = 30) -> Any:
    deadline = time.monotonic() + within
    while not (result := await condition()):
        assert time.monotonic() < deadline, f"still waiting: {what}"
        await asyncio.sleep(0.05)
    return result


async def submit(api: Any, urls: list[str], key: str | None = None, **extra: Any) -> str:
    response = await api("POST", "/api/images", json_body={"image_urls": urls, **extra},
                         **({"key": key} if key else {}))
    assert response.code == 202, response.body
    return json.loads(response.body)["job_id"]


async def get_job(api: Any, job_id: str) -> dict[str, Any]:
    response = await api("GET", f"/api/jobs/{job_id}")
    assert response.code == 200, response.body
    return json.loads(response.body)


@pytest.mark.gen_test(timeout=90)
async def test_cancel_fails_pending_urls_abandons_in_flight_ones_and_keeps_stored_images(api, origin, services):
    seed = int.from_bytes(os.urandom(2), "big") * 100 + 100_000  # fresh bytes: nothing of it is indexed yet
    stored = [origin.url(f"/img/{seed}.jpg"), origin.url(f"/img/{seed + 1}.jpg")]
    slow = origin.url(f"/img/{seed + 2}.jpg?delay={SLOW}")  # an image, once it comes
    stall = origin.url(f"/stall/cancel-{seed}?seconds=30")
    pending = [origin.url(f"/img/{seed + n}.jpg") for n in range(10, 20)]
    hook = f"cancel-{seed}"
    job_id = await submit(api, [*stored, slow, stall, *pending], callback_url=origin.url(f"/hook/{hook}"))

    async def both_in_flight() -> bool:
        return (origin.hits[f"/img/{seed + 2}.jpg"] == 1 and origin.hits[f"/stall/cancel-{seed}"] == 1
                and (await get_job(api, job_id))["stored"] == 2)

    await wait_until(both_in_flight, "the first two stored, the slow and the stalled URL in flight")
    before = await get_job(api, job_id)
    assert [r["status"] for r in before["results"]] == ["stored", "stored", *["pending"] * 12]

    response = await api("DELETE", f"/api/jobs/{job_id}")
    assert response.code == 200, response.body
    cancelled = json.loads(response.body)
    assert cancelled["status"] == "done" and cancelled["finished"]
    assert (cancelled["stored"], cancelled["failed"], cancelled["done"]) == (2, 12, 14)
    assert [r["status"] for r in cancelled["results"][:2]] == ["stored", "stored"]
    assert all(r["status"] == "failed" and r["error"] == "cancelled" for r in cancelled["results"][2:])
    assert cancelled["callback"]["state"] in ("pending", "delivered")

    # The slow image arrives after the cancel, and the stalled URL times out and would be retried: neither
    # is indexed, and the waiting URLs are never fetched.
    async def settled() -> bool:
        return services.worker.busy == 0 and await services.queue.depth() == {"waiting": 0, "in_progress": 0}

    await wait_until(settled, "the worker done with the cancelled job's entries", within=60)
    assert origin.hits[f"/img/{seed + 2}.jpg"] == 1 and origin.hits[f"/stall/cancel-{seed}"] == 1
    assert all(origin.hits[f"/img/{seed + n}.jpg"] == 0 for n in range(10, 20))
    for url, code in [(stored[0], 200), (stored[1], 200), (slow, 404), (pending[0], 404)]:
        assert (await api("GET", f"/api/image?url={quote(url, safe='')}")).code == code, url
    assert await services.index.sizes() == (2, 2)
    report = await fsck(services.index, services.blobs)
    assert report.ok, report.problems  # no blob left unindexed by the abandoned download
    now = await get_job(api, job_id)
    assert {**now, "callback": None} == {**cancelled, "callback": None}  # nothing changed since the cancel

    # The job's end sends its callback, as any other end does.
    async def delivered() -> bool:
        return (await get_job(api, job_id))["callback"]["state"] == "delivered"

    await wait_until(delivered, "the callback delivered")
    [(headers, body)] = origin.posts[hook]
    assert verify_signature(SECRET, headers["x-casimg-signature"], body)
    assert json.loads(body)["failed"] == 12


@pytest.mark.gen_test(timeout=60)
async def test_cancel_is_idempotent_404_for_unknown_jobs_and_403_for_another_keys(api, origin, services):
    writer = await services.api_keys.create("writer", Scope.write)
    other = await services.api_keys.create("other", Scope.write)
    reader = await services.api_keys.create("reader", Scope.read)
    job_id = await submit(api, [origin.url("/stall/idem?seconds=30")], key=writer, callback_url="")
    assert (await api("DELETE", "/api/jobs/0123456789abcdef01234567", key=writer)).code == 404
    assert (await api("DELETE", "/api/jobs/not-a-job", key=writer)).code == 404
    refused = await api("DELETE", f"/api/jobs/{job_id}", key=other)
    assert refused.code == 403 and "another key" in problem(refused)["detail"]
    assert (await api("DELETE", f"/api/jobs/{job_id}", key=reader)).code == 403
    assert (await get_job(api, job_id))["status"] != "done"

    first = await api("DELETE", f"/api/jobs/{job_id}", key=writer)
    assert first.code == 200
    again = await api("DELETE", f"/api/jobs/{job_id}", key=writer)
    assert again.code == 200 and json.loads(again.body) == json.loads(first.body)
    assert "callback" not in json.loads(first.body)  # a job without one answers as it always did

    by_admin = await submit(api, [origin.url("/stall/admin?seconds=30")], key=other)
    assert (await api("DELETE", f"/api/jobs/{by_admin}")).code == 200  # the admin key may cancel any job


@pytest.mark.gen_test(timeout=60)
async def test_jobs_sent_without_callback_url_get_the_deployment_default(api, origin):
    job_id = await submit(api, ["http://user:pw@a.example/default.jpg"])  # fails when read: done at once

    async def delivered() -> bool:
        return (await get_job(api, job_id))["callback"]["state"] == "delivered"

    await wait_until(delivered, "the callback delivered to CASIMG_WEBHOOK_URL")
    assert any(json.loads(body)["job_id"] == job_id for _, body in origin.posts[DEFAULT_HOOK])
    without = await submit(api, ["http://user:pw@a.example/none.jpg"], callback_url=None)
    assert "callback" not in await get_job(api, without)
