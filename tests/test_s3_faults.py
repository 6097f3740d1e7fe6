"""The s3 driver under bad input and faults, with real procs: a bucket that refuses our credentials
(moto with its authentication on), an endpoint that is down at start or goes away while casimg runs,
uploads the store refuses, and a throttled endpoint (a loopback proxy answering 503 SlowDown)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import pytest

from bench.procs import S3Proxy, free_port
from tests.procs import (
    Processes,
    S3Endpoint,
    assert_retrievable,
    casimg,
    image_urls,
    settle,
    submit,
)

pytestmark = pytest.mark.slow  # each starts servers, some wait for retries to give up


@pytest.fixture
def own_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Endpoint]:
    """An endpoint of the test's own, which it may stop and start (the session's is shared)."""
    endpoint = S3Endpoint(tmp_path_factory.mktemp("own-s3"), environ={})
    yield endpoint
    endpoint.stop()


def test_credentials_the_endpoint_refuses_stop_the_start_with_the_reason(tmp_path):
    endpoint = S3Endpoint(tmp_path, environ={})
    endpoint.stop()
    # Authentication on after two requests: the start-up probe (GET /) and the bucket's creation.
    endpoint.start(env={"INITIAL_NO_AUTH_ACTION_COUNT": "2"})
    try:
        endpoint.create_bucket(endpoint.bucket)
        result = casimg("serve", "--data-dir", str(tmp_path / "data"), "--port", "0",
                        env=endpoint.env(endpoint.prefix()), check=False)
    finally:
        endpoint.stop()
    assert result.returncode != 0
    assert "access denied" in result.stderr, result.stderr
    assert endpoint.credentials["AWS_SECRET_ACCESS_KEY"] not in result.stderr + result.stdout


def test_an_endpoint_down_at_start_stops_the_start(s3, tmp_path):
    env = {**s3.env(s3.prefix()), "CASIMG_S3_ENDPOINT": f"http://127.0.0.1:{free_port()}"}
    result = casimg("serve", "--data-dir", str(tmp_path / "data"), "--port", "0", env=env, check=False)
    assert result.returncode != 0 and "object store: bucket 'casimg-test'" in result.stderr, result.stderr


def test_readyz_and_reads_answer_503_while_the_endpoint_is_away_and_recover_with_it(
        own_s3: S3Endpoint, procs: Processes, origin: Any, tmp_path: Any) -> None:
    server = procs.server(tmp_path / "data", env=own_s3.env(own_s3.prefix()))
    assert server.call("GET", "/readyz")[0] == 200
    url = image_urls(origin, 1, start=80)
    assert settle(server, submit(server, url))["stored"] == 1
    own_s3.stop()
    status, body, headers = server.call("GET", "/readyz")
    assert status == 503 and "object store" in json.loads(body)["detail"]
    assert "Retry-After" in headers
    status, body, headers = server.call("GET", f"/api/image?url={quote(url[0], safe='')}")
    assert status == 503 and "Retry-After" in headers, (status, body)
    own_s3.start()
    own_s3.create_bucket(own_s3.bucket)  # moto keeps nothing across a restart
    assert server.call("GET", "/readyz")[0] == 200
    assert server.terminate() == 0


def test_refused_uploads_fail_their_url_and_leave_no_object_and_slowdown_is_retried(
        s3: Any, procs: Processes, origin: Any, tmp_path: Any) -> None:
    proxy = S3Proxy(s3.endpoint)
    try:
        prefix = s3.prefix()
        server = procs.server(tmp_path / "data", env={**s3.env(prefix), "CASIMG_S3_ENDPOINT": proxy.endpoint})
        proxy.refuse_uploads(1000)
        refused = settle(server, submit(server, image_urls(origin, 3, start=60)))
        assert refused["failed"] == 3, refused
        for result in refused["results"]:
            assert result["error"].startswith("storage error: object store: access denied"), result
        proxy.refuse_uploads(0)
        assert json.loads(casimg("stats", "--json", "--data-dir", str(server.data_dir),
                                 env=s3.env(prefix)).stdout)["blob_files"] == 0  # nothing half-stored
        proxy.throttle(4)  # the next four requests answer 503 SlowDown: retried with backoff
        urls = image_urls(origin, 4, start=70)
        done = settle(server, submit(server, urls))
        assert done["stored"] == 4 and proxy.throttled == 4, done
        assert_retrievable(server, urls)
        assert server.terminate() == 0
    finally:
        proxy.close()
