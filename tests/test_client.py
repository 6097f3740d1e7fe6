"""casimg.client against a real `casimg serve` and the real origin; its retries against the origin's flaky paths;
where its key may go, with real servers on other loopback ports that record what reaches them."""

from __future__ import annotations

import http.client
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import pytest

from casimg.client import (
    ApiError,
    ApiUnreachable,
    AuthError,
    Client,
    ForeignOrigin,
    Image,
    Job,
    JobTimeout,
    NotFoundError,
    origin_of,
)
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

    # A ThumbHash, base64, made shortly after the store by the server's placeholder filler.
    deadline = time.monotonic() + 60
    while first.placeholder is None and time.monotonic() < deadline:
        time.sleep(0.1)
        first = next(image for image in client.images() if image.url == urls[0])
    assert first.placeholder
    thumb = client.get(urls[1], w=10, format="webp")
    assert thumb.headers["content-type"] == "image/webp" and thumb.body[8:12] == b"WEBP"
    assert client.get(urls[1]).body == image_bytes(201, "png")
    auto = client.get(urls[1], w=10, format="auto", accept="image/avif")
    assert auto.headers["content-type"] == "image/avif" and auto.headers["vary"] == "Accept"
    with pytest.raises(ApiError) as bad:
        client.get(urls[1], w=0)
    assert bad.value.status == 400 and "w" in bad.value.detail

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


# -- where the key goes -----------------------------------------------------------------------------

Answer = tuple[int, dict[str, str], bytes]


class Recorder:
    """A real HTTP server on 127.0.0.1 that records every request (method, path and query, headers) and
    answers with `respond(path, headers)`."""

    def __init__(self, respond: Callable[[str, dict[str, str]], Answer]) -> None:
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                headers = {name.lower(): value for name, value in self.headers.items()}
                recorder.requests.append(("GET", self.path, headers))
                status, extra, body = respond(self.path, headers)
                self.send_response(status)
                for name, value in extra.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Recorder:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def keys_seen(self) -> list[str]:
        return [value for _, _, headers in self.requests for name, value in headers.items()
                if name in ("x-api-key", "authorization")]


def _empty_page(path: str, headers: dict[str, str]) -> Answer:
    return 200, {"Content-Type": "application/json"}, b"[]"


@pytest.fixture
def bystander() -> Iterator[Recorder]:
    """A server that must never see the key."""
    with Recorder(_empty_page) as server:
        yield server


def _proxy(upstream: str, prefix: str, host: str) -> Callable[[str, dict[str, str]], Answer]:
    """A reverse proxy that serves `upstream` under `prefix` and passes on a Host of its choosing (as
    nginx does with `proxy_set_header Host`, or a misconfigured one with another name)."""

    def respond(path: str, headers: dict[str, str]) -> Answer:
        assert path.startswith(prefix + "/"), path
        parts = urlsplit(upstream)
        connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
        try:
            connection.request("GET", path[len(prefix):], headers={
                "Host": host, **{name: value for name, value in headers.items() if name in ("x-api-key", "accept")},
            })
            answer = connection.getresponse()
            return answer.status, {name: value for name, value in answer.getheaders()
                                   if name.lower() in ("content-type", "link", "x-total-count")}, answer.read()
        finally:
            connection.close()

    return respond


def test_pages_stay_behind_a_prefixing_proxy_whatever_host_it_passes(server, client, origin, bystander):
    """The Link is resolved against the URL asked for: same scheme, host and path prefix. casimg cannot
    trust Host (the proxy may pass another name, and TLS ends before it): here Host names the bystander."""
    urls = [origin.url(f"/img/{n}.png") for n in range(300, 304)]
    job = client.submit(urls, wait=30)
    assert job.is_done and all(result.status in ("stored", "exists") for result in job.results)
    host = urlsplit(bystander.base).netloc
    with Recorder(_proxy(server.base, "/casimg", host)) as proxy:
        listed = [image.url for image in Client(proxy.base + "/casimg", server.key).images(limit=1)]
        asked = [path for _, path, _ in proxy.requests]
    assert set(urls) <= set(listed) and len(listed) == len(set(listed)) == client.count()
    assert len(asked) == len(listed) and all(path.startswith("/casimg/api/images?limit=1") for path in asked)
    assert bystander.requests == []


@pytest.mark.parametrize("link", [
    "<{other}/api/images?limit=1&cursor=" + "a" * 40 + '>; rel="next"',  # another port
    "<//{other_netloc}/api/images?cursor=" + "a" * 40 + '>; rel="next"',  # a network-path reference
    '<http://localhost:{port}/api/images?cursor=x>; rel="next"',  # the same server by another name
])
def test_a_link_to_another_origin_is_refused_before_anything_is_sent(bystander, link):
    other = bystander.base
    with Recorder(lambda path, headers: (200, {"Link": link.format(
            other=other, other_netloc=urlsplit(other).netloc, port=urlsplit(api.base).port)}, b"[]")) as api:
        client = Client(api.base, "casimg_abc_secret")
        with pytest.raises(ForeignOrigin, match="refusing to send the API key"):
            list(client.images())
        assert len(api.requests) == 1
        with pytest.raises(ForeignOrigin):
            client.request("GET", other + "/api/images")
    assert bystander.requests == []


def test_redirects_to_another_origin_lose_the_key(server, bystander):
    """urllib copies every header to a redirected request; the client drops the key on a hop to another
    origin, and keeps it on a hop within its own."""
    target = {"/away": bystander.base + "/api/images", "/casimg-away": server.base + "/api/images",
              "/here": "/api/images"}

    def respond(path: str, headers: dict[str, str]) -> Answer:
        if path in target:
            return 307, {"Location": target[path]}, b""
        return 200, {"Content-Type": "application/json"}, b"[]"

    with Recorder(respond) as api:
        client = Client(api.base, server.key, retries=0)
        assert client.request("GET", "/here").status == 200
        assert [headers.get("x-api-key") for _, _, headers in api.requests] == [server.key, server.key]
        assert client.request("GET", "/away").status == 200
        with pytest.raises(AuthError) as refused:  # the real server got no key
            client.request("GET", "/casimg-away")
        assert refused.value.status == 401
    assert [path for _, path, _ in bystander.requests] == ["/api/images"]
    assert bystander.keys_seen() == []


def test_origins_compare_scheme_host_and_port():
    assert origin_of("http://Example.COM/x") == origin_of("http://example.com:80/y?z") == ("http", "example.com", 80)
    assert origin_of("https://example.com/") != origin_of("http://example.com:443/")  # no downgrade to plain HTTP
    assert origin_of("http://[::1]:9000/") == ("http", "::1", 9000)
    assert origin_of("http://h:x/")[2] == -1


def test_a_key_never_goes_over_plain_http_from_an_https_client():
    client = Client("https://127.0.0.1:9", "casimg_abc_secret", retries=0)
    with pytest.raises(ForeignOrigin, match=r"to http://127\.0\.0\.1:9:"):
        client.request("GET", "http://127.0.0.1:9/api/images")
