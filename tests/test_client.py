"""casimg.client against a real `casimg serve` and the real origin; its retries against the origin's flaky paths."""

from __future__ import annotations

import time

import pytest

from casimg.client import ApiError, ApiUnreachable, AuthError, Client, Image, Job, JobTimeout, NotFoundError
from casimg.embedded import EmbeddedRedis
from tests.origin import image_bytes
from tests.procs import Server, casimg, free_port


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("client") / "data"
    running = Server(data_dir, env={"CASIMG_FETCH_TIMEOUT": "2"})  # /slow ends soon
    yield running
    assert running.terminate() == 0
    if EmbeddedRedis(data_dir).alive():
        EmbeddedRedis(data_dir).stop()


@pytest.fixture(scope="module")
def client(server) -> Client:
    return Client(server.base, server.key)


def test_submit_wait_get_list_and_delete(client, origin):
    urls = [origin.url(f"/img/{n}.png") for n in range(200, 205)]
    accepted = client.submit([*urls, urls[0], origin.url("/status/404")])
    assert isinstance(accepted, Job) and accepted.status == "queued" and accepted.total == 6  # duplicate dropped
    job = client.wait(accepted.job_id, timeout=30)
    assert (job.status, job.done, job.stored, job.failed) == ("done", 6, 5, 1)
    assert [r.url for r in job.results] == [*urls, origin.url("/status/404")]
    assert job.results[-1].status == "failed" and job.results[-1].error == "HTTP 404"
    assert all(len(r.sha256 or "") == 64 for r in job.results[:5])

    assert client.image(urls[2]) == image_bytes(202, "png")
    listed = list(client.images(limit=2))  # three pages
    assert all(isinstance(image, Image) for image in listed)
    assert sorted(image.url for image in listed) == urls  # each once, in the order they were stored
    first = next(image for image in listed if image.url == urls[0])
    assert first.content_type == "image/png" and first.size == len(image_bytes(200, "png"))
    assert client.count() == 5

    assert client.delete(urls[0]) is True
    assert client.delete(urls[0]) is False
    with pytest.raises(NotFoundError) as caught:
        client.image(urls[0])
    assert caught.value.status == 404 and urls[0] in caught.value.detail
    assert client.count() == 4


def test_submit_with_wait_returns_the_finished_job(client, origin):
    job = client.submit([origin.url("/img/210.jpg")], wait=30)
    assert job.is_done and job.results[0].status == "stored"
    again = client.submit([origin.url("/img/210.jpg")], wait=30)
    assert again.existed == 1 and again.results[0].status == "exists"


def test_wait_gives_up_with_the_last_state(client, origin):
    job = client.submit([origin.url("/slow")])
    started = time.monotonic()
    with pytest.raises(JobTimeout) as caught:
        client.wait(job.job_id, timeout=0.5, poll=0.1)
    assert time.monotonic() - started < 5
    assert caught.value.job.job_id == job.job_id and not caught.value.job.is_done


def test_errors_are_typed(server, client):
    with pytest.raises(AuthError) as refused:
        Client(server.base, "casimg_000000000000_not-a-real-key-at-all").count()
    assert refused.value.status == 401
    created = casimg("keys", "create", "--name", "reader", "--scope", "read", "--data-dir", str(server.data_dir))
    reader = Client(server.base, created.stdout.strip().splitlines()[-1])
    assert reader.count() == client.count()  # a read key sees the same store
    with pytest.raises(AuthError) as forbidden:
        reader.submit(["http://127.0.0.1/x.jpg"])
    assert forbidden.value.status == 403 and "write" in forbidden.value.detail
    with pytest.raises(ApiError) as bad:
        client.submit([])
    assert bad.value.status == 400 and "empty" in bad.value.detail
    with pytest.raises(NotFoundError):
        client.job("0" * 24)


def test_unreachable_api_raises_after_its_retries():
    client = Client(f"http://127.0.0.1:{free_port()}", "k", retries=2, backoff=0.05)
    started = time.monotonic()
    with pytest.raises(ApiUnreachable, match="no answer from"):
        client.count()
    assert time.monotonic() - started < 5


def test_503_and_429_are_retried_with_backoff_and_retry_after(origin):
    client = Client(origin.url(""), "k", retries=3, backoff=0.01)
    assert client.request("GET", "/flaky/client-503?fail=2&status=503").status == 200
    assert origin.hits["flaky:client-503"] == 3
    started = time.monotonic()
    assert client.request("GET", "/flaky/client-429?fail=1&status=429&retry_after=1").status == 200
    assert time.monotonic() - started >= 0.9  # the origin's Retry-After, not the 10 ms backoff
    with pytest.raises(ApiError) as caught:
        client.request("GET", "/flaky/client-always?fail=99&status=503")
    assert caught.value.status == 503 and origin.hits["flaky:client-always"] == 4  # one try and three retries


def test_other_errors_are_not_retried(origin):
    client = Client(origin.url(""), "k", retries=3, backoff=0.01)
    with pytest.raises(ApiError) as caught:
        client.request("GET", "/flaky/client-500?fail=99&status=500")
    assert caught.value.status == 500 and origin.hits["flaky:client-500"] == 1


def test_an_api_behind_a_path_prefix_keeps_it(origin):
    client = Client(origin.url("/flaky/"), "k")  # the origin's /flaky/KEY stands in for https://host/casimg/...
    assert client.request("GET", "/prefixed?fail=0").status == 200
    assert origin.hits["flaky:prefixed"] == 1
