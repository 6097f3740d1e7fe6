"""Job callbacks end to end: `casimg serve` and `casimg worker` processes, their embedded Redis, and the real
origin as the receiver (tests/origin.py, POST /hook/KEY). Signatures are checked with the client's helper."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from bench.procs import free_port
from casimg.client import verify_signature
from casimg.metrics import Metrics
from casimg.webhooks import INLINE_BYTES, Deliverer, sign
from tests.conftest import eventually
from tests.procs import Processes, Server, embedded_client, job

SECRET = "whsec-" + "k" * 32
# Retries in fractions of a second, given up 4 s after the job ends: a test sees every state in seconds.
FAST_RETRY = {"CASIMG_WEBHOOK_SECRET": SECRET, "CASIMG_WEBHOOK_BACKOFF": "0.2", "CASIMG_WEBHOOK_BACKOFF_MAX": "0.5",
              "CASIMG_WEBHOOK_RETRY_FOR": "4"}


def hook(name: str) -> str:
    """A receiver key of its own on the session's origin (shared by every test)."""
    return f"{name}-{os.urandom(4).hex()}"


@pytest.fixture(scope="module")
def procs() -> Any:
    tracked = Processes()
    yield tracked
    tracked.cleanup()


@pytest.fixture(scope="module")
def server(procs: Processes, tmp_path_factory: pytest.TempPathFactory) -> Server:
    return procs.server(tmp_path_factory.mktemp("hooks") / "data", env=FAST_RETRY)


def submit(server: Server, urls: list[str], callback: str | None) -> str:
    body: dict[str, Any] = {"image_urls": urls}
    if callback is not None:
        body["callback_url"] = callback
    status, answer, _ = server.call("POST", "/api/images", body)
    assert status == 202, answer
    return json.loads(answer)["job_id"]


def callback_of(server: Server, job_id: str, state: str) -> dict[str, Any]:
    """The job's callback once it is in `state`."""
    def reached() -> dict[str, Any] | None:
        callback = job(server, job_id)["callback"]
        return callback if callback["state"] == state else None

    return eventually(reached, f"callback {state}", timeout=60)


# -- the signature ----------------------------------------------------------------------------------

def test_the_client_helper_verifies_what_the_server_signs():
    body, now = b'{"job_id":"x","status":"done"}', int(time.time())
    header = sign(SECRET, body, now)
    assert verify_signature(SECRET, header, body)
    assert verify_signature(SECRET.encode(), header, body.decode())
    assert not verify_signature("another secret", header, body)
    assert not verify_signature(SECRET, header, body + b" ")
    assert not verify_signature(SECRET, header.replace(f"t={now}", f"t={now + 1}"), body)
    assert not verify_signature(SECRET, sign(SECRET, body, now - 301), body)  # a replay of an old callback
    assert verify_signature(SECRET, sign(SECRET, body, now - 301), body, tolerance=0)
    rotated = f"{header},v1={'0' * 64}"  # several v1 values: any one may match
    assert verify_signature(SECRET, rotated, body)
    for broken in ("", "t=1", f"v1={'0' * 64}", "garbage"):
        assert not verify_signature(SECRET, broken, body)


# -- delivery ---------------------------------------------------------------------------------------

def test_a_finished_job_is_posted_to_its_callback_signed(server, origin):
    key = hook("ok")
    job_id = submit(server, [origin.url("/img/70001.jpg"), origin.url("/status/404")], origin.url(f"/hook/{key}"))
    assert callback_of(server, job_id, "delivered") == {"state": "delivered", "attempts": 1, "last_status": 200}
    [(headers, body)] = origin.posts[key]
    assert verify_signature(SECRET, headers["x-casimg-signature"], body)
    assert headers["content-type"] == "application/json" and headers["x-casimg-job"] == job_id
    answered = job(server, job_id)
    del answered["callback"]
    assert json.loads(body) == answered  # the job as GET /api/jobs/{id} gives it, results and all
    assert answered["stored"] == answered["failed"] == 1


def test_a_job_without_callback_answers_as_before(server, origin):
    job_id = submit(server, [origin.url("/img/70002.jpg")], None)
    eventually(lambda: job(server, job_id)["status"] == "done", "job done")
    assert "callback" not in job(server, job_id)
    assert embedded_client(server.data_dir).zcard("casimg:webhooks") == 0


def test_a_large_job_is_sent_without_its_results_and_with_a_link(server, origin):
    key = hook("large")
    # URLs with credentials fail at submit, so the job is done at once, without a download.
    urls = [f"http://user:pw@a.example/{n}/{'p' * 200}" for n in range(INLINE_BYTES // 200)]
    job_id = submit(server, urls, origin.url(f"/hook/{key}"))
    callback_of(server, job_id, "delivered")
    [(headers, body)] = origin.posts[key]
    assert verify_signature(SECRET, headers["x-casimg-signature"], body)
    sent = json.loads(body)
    assert len(body) < INLINE_BYTES and "results" not in sent
    assert sent["results_url"] == f"/api/jobs/{job_id}" and sent["failed"] == sent["total"] == len(urls)


def test_a_receiver_answering_500_is_retried_until_it_takes_the_callback(server, origin):
    key = hook("flaky")
    job_id = submit(server, [origin.url("/img/70003.jpg")], origin.url(f"/hook/{key}?fail=2&status=500"))
    assert callback_of(server, job_id, "delivered") == {"state": "delivered", "attempts": 3, "last_status": 200}
    posts = origin.posts[key]
    assert len(posts) == 3
    assert [headers["x-casimg-attempt"] for headers, _ in posts] == ["1", "2", "3"]
    assert all(verify_signature(SECRET, headers["x-casimg-signature"], body) for headers, body in posts)


def test_a_receiver_failing_past_the_bound_leaves_the_callback_failed_with_its_last_status(server, origin):
    key = hook("down")
    refusing = submit(server, [origin.url("/img/70004.jpg")], origin.url(f"/hook/{key}?fail=1000&status=503"))
    closed = submit(server, [origin.url("/img/70005.jpg")], f"http://127.0.0.1:{free_port()}/hook")
    failed = callback_of(server, refusing, "failed")
    assert failed["last_status"] == 503 and failed["attempts"] >= 2
    assert len(origin.posts[key]) == failed["attempts"]
    down = callback_of(server, closed, "failed")
    assert down["last_status"] is None and down["last_error"].startswith("connection failed"), down
    time.sleep(1.5)  # a failed callback is never tried again
    assert len(origin.posts[key]) == failed["attempts"]
    assert embedded_client(server.data_dir).zscore("casimg:webhooks", refusing) is None


# -- the address guard ------------------------------------------------------------------------------

def test_a_callback_to_a_refused_address_is_refused_before_any_packet(procs, tmp_path, origin):
    """127.0.0.1 is refused here (only 127.0.0.2 is allowed): a numeric callback URL at submit, with a 400; a
    name that resolves to it (localhost) at delivery, before connecting: the receiver never hears of it."""
    server = procs.server(tmp_path / "data", env={**FAST_RETRY, "CASIMG_ALLOW_NETWORKS": "127.0.0.2/32"})
    status, body, _ = server.call("POST", "/api/images", {"image_urls": ["http://a.example/x.jpg"],
                                                          "callback_url": origin.url("/hook/never")})
    assert status == 400 and b"127.0.0.1 is loopback" in body and b"CASIMG_ALLOW_NETWORKS" in body
    key = hook("ssrf")
    # A URL with credentials fails at submit: the job is done at once, and its callback due.
    job_id = submit(server, ["http://user:pw@a.example/x.jpg"], f"http://localhost:{origin.port}/hook/{key}")
    failed = callback_of(server, job_id, "failed")
    assert failed["attempts"] == 1 and failed["last_status"] is None
    assert failed["last_error"].startswith("blocked address") and "loopback" in failed["last_error"]
    assert key not in origin.posts and origin.hits["hook:" + key] == 0
    server.terminate()


def test_callback_url_is_refused_while_the_server_has_no_secret(procs, tmp_path, origin):
    server = procs.server(tmp_path / "data")
    status, body, _ = server.call("POST", "/api/images", {"image_urls": [origin.url("/img/1.jpg")],
                                                          "callback_url": origin.url("/hook/x")})
    assert status == 400 and b"CASIMG_WEBHOOK_SECRET" in body
    for bad in ("ftp://h/x", "/relative", "http://user:pw@h/x", 42):
        status, body, _ = server.call("POST", "/api/images", {"image_urls": ["http://h/x"], "callback_url": bad})
        assert status == 400, bad
    server.terminate()


# -- durability -------------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_worker_killed_mid_delivery_leaves_the_callback_to_the_next_one(tmp_path: Path, origin):
    """kill -9 of the only worker while its POST waits for the receiver: the callback stays pending, and the
    worker started after it delivers once the claim's lease (timeout + 5 s) runs out."""
    tracked = Processes()
    try:
        env = {**FAST_RETRY, "CASIMG_WEBHOOK_TIMEOUT": "2", "CASIMG_WORKER_HEARTBEAT": "1"}
        server = tracked.server(tmp_path / "data", "--no-workers", env=env)
        first = tracked.worker(server.data_dir, env=server.env, name="worker-1")
        key = hook("kill")
        job_id = submit(server, [origin.url("/img/70006.jpg")], origin.url(f"/hook/{key}?stall=1&seconds=60"))
        eventually(lambda: origin.posts.get(key), "the first POST reaching the receiver")
        first.kill()
        first.wait()
        assert job(server, job_id)["callback"] == {"state": "pending", "attempts": 1, "last_status": None}
        tracked.worker(server.data_dir, env=server.env, name="worker-2")
        assert callback_of(server, job_id, "delivered") == {"state": "delivered", "attempts": 2, "last_status": 200}
        assert len(origin.posts[key]) == 2
        assert all(verify_signature(SECRET, headers["x-casimg-signature"], body) for headers, body in origin.posts[key])
        assert server.terminate() == 0
    finally:
        tracked.cleanup()


# -- claims, in one process against the test's redis-server ------------------------------------------

def deliverer(services: Any, metrics: Metrics | None = None, **changes: Any) -> Deliverer:
    """A deliverer of its own beside the services' worker (which, without a secret, delivers nothing)."""
    settings = dataclasses.replace(services.settings, webhook_secret=SECRET, webhook_timeout=2.0, **changes)
    return Deliverer(services.redis, services.queue.keys, services.queue, services.fetcher, settings,
                     on_result=metrics.on_webhook if metrics is not None else None)


async def finished_job(services: Any, callback: str) -> str:
    """A job done at once (its URL has credentials, so it fails when read), its callback due."""
    job_id, _ = await services.queue.submit(["http://user:pw@a.example/x.jpg"], callback=callback)
    assert await services.redis.zscore(services.queue.keys.webhooks, job_id) is not None
    return job_id


@pytest.mark.gen_test(timeout=30)
async def test_two_processes_looking_at_once_deliver_a_callback_once(services, origin):
    key = hook("once")
    job_id = await finished_job(services, origin.url(f"/hook/{key}"))
    first, second = deliverer(services), deliverer(services)
    claimed = await asyncio.gather(first.deliver_due(), second.deliver_due(), first.deliver_due())
    assert sum(claimed) == 1
    assert len(origin.posts[key]) == 1
    assert (await services.queue.get(job_id)).callback == {"state": "delivered", "attempts": 1, "last_status": 200}
    assert await services.redis.zscore(services.queue.keys.webhooks, job_id) is None


@pytest.mark.gen_test(timeout=30)
async def test_a_claim_holds_for_its_lease_and_only_the_latest_claimant_records(services, origin):
    job_id = await finished_job(services, origin.url(f"/hook/{hook('lease')}"))
    hooks, keys, lease_ms = deliverer(services), services.queue.keys, 1000
    now = time.time_ns() // 1_000_000

    async def claim(at_ms: int, token: str) -> list[Any]:
        return await hooks._claim(keys=[keys.webhooks], args=[at_ms, lease_ms, 16, keys.job(""), token])

    async def record(token: str) -> int:
        return await hooks._done(keys=[keys.job(job_id), keys.webhooks],
                                 args=[job_id, token, "delivered", 200, "", 0])

    assert (await claim(now, "first"))[:2] == [job_id, 1]
    assert await claim(now + lease_ms - 1, "early") == []  # held: no one else takes it meanwhile
    assert (await claim(now + lease_ms, "second"))[:2] == [job_id, 2]  # the first one's lease ran out
    assert await record("first") == 0  # too late: its outcome is not recorded
    assert await record("second") == 1
    assert (await services.queue.get(job_id)).callback == {"state": "delivered", "attempts": 2, "last_status": 200}
    assert await claim(now + 10 * lease_ms, "third") == []


@pytest.mark.gen_test(timeout=30)
async def test_each_recorded_attempt_is_counted_by_its_result(services, origin):
    key = hook("counted")
    retried = await finished_job(services, origin.url(f"/hook/{key}?fail=2&status=500"))
    refused = await finished_job(services, "http://10.0.0.1/hook")  # a refused address: given up at once
    metrics = Metrics()
    hooks = deliverer(services, metrics, webhook_backoff=0.05, webhook_backoff_max=0.05, webhook_retry_for=60.0)
    while (await services.queue.get(retried)).callback["state"] == "pending":
        await hooks.deliver_due()
        await asyncio.sleep(0.06)
    await hooks.deliver_due()

    def count(result: str) -> float:
        return metrics.registry.get_sample_value("casimg_webhook_deliveries_total", {"result": result}) or 0

    assert (await services.queue.get(refused)).callback["state"] == "failed"
    assert (count("retried"), count("delivered"), count("failed")) == (2, 1, 1)
