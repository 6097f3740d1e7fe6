"""GET /metrics, the access log and the download log lines: in-process for the counts, real servers for the
metrics port and the log formats."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from urllib.parse import quote

import pytest
from prometheus_client.parser import text_string_to_metric_families

from casimg.embedded import EmbeddedRedis
from casimg.handlers import _loggable_uri
from casimg.keys import Scope
from casimg.metrics import host_id, reason_label, shared_root
from tests.conftest import make_settings
from tests.origin import image_bytes
from tests.procs import ROOT, Server, free_port, image_urls

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(body: bytes) -> Samples:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(body.decode()) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def scrape(api, key: str | None = None) -> Samples:
    response = await api("GET", "/metrics", key=key)
    assert response.code == 200, response.body
    assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    return parse(response.body)


@pytest.fixture
def settings(tmp_path, redis_server, request):
    """The conftest settings, with the overrides a test passes through indirect parametrization."""
    return make_settings(tmp_path / "data", redis_server.url, **getattr(request, "param", {}))


@pytest.mark.gen_test(timeout=60)
async def test_counters_and_gauges_follow_requests_and_downloads(api, origin):
    before = await scrape(api)  # no key needed by default
    assert value(before, "casimg_downloads_total", outcome="stored", reason="") == 0
    urls = [origin.url("/img/300.jpg"), origin.url("/dup/a.jpg"), origin.url("/dup/b.jpg"),
            origin.url("/status/404"), origin.url("/truncated.jpg")]
    response = await api("POST", "/api/images?wait=30", json_body={"image_urls": urls})
    assert response.code == 200
    job_id = json.loads(response.body)["job_id"]
    assert (await api("POST", "/api/images?wait=30", json_body={"image_urls": urls[:1]})).code == 200
    assert (await api("GET", f"/api/jobs/{job_id}")).code == 200
    assert (await api("GET", "/no/such/path")).code == 404
    assert (await api("BREW", "/api/images")).code == 405
    assert (await api("GET", "/api/image?url=" + quote(urls[0], safe=""))).code == 200

    after = await scrape(api)
    downloads = {(o, r): value(after, "casimg_downloads_total", outcome=o, reason=r) for o, r in [
        ("stored", ""), ("deduplicated", ""), ("exists", ""), ("failed", "HTTP 404"),
        ("failed", "truncated or corrupt image")]}
    assert downloads == {("stored", ""): 2, ("deduplicated", ""): 1, ("exists", ""): 1, ("failed", "HTTP 404"): 1,
                         ("failed", "truncated or corrupt image"): 1}
    image, dup = len(image_bytes(300)), len(image_bytes(999_999))
    truncated = len(image_bytes(7, "jpg", (400, 300))) // 2
    assert value(after, "casimg_downloaded_bytes_total") == image + 2 * dup + truncated
    assert value(after, "casimg_stored_bytes_total") == image + dup
    assert value(after, "casimg_dedup_hits_total") == 1

    requests = "casimg_http_requests_total"
    assert value(after, requests, route="/api/images", method="POST", status="200") == 2
    assert value(after, requests, route="/api/jobs/{job_id}", method="GET", status="200") == 1
    assert value(after, requests, route="/api/image", method="GET", status="200") == 1
    assert value(after, requests, route="/metrics", method="GET", status="200") == 1  # the first scrape
    assert value(after, requests, route="unmatched", method="GET", status="404") == 1
    assert not any("/no/such" in str(labels) for _, labels in after), "paths no route matched must not be labels"
    assert value(after, requests, route="/api/images", method="other", status="405") == 1
    assert not any("BREW" in str(labels) for _, labels in after), "unknown methods must not be labels"
    latency = "casimg_http_request_duration_seconds"
    assert value(after, latency + "_count", route="/api/images", method="POST") == 2
    assert value(after, latency + "_bucket", route="/api/images", method="POST", le="+Inf") == 2
    assert value(after, latency + "_bucket", route="/api/images", method="POST", le="0.001") < 2
    assert value(after, latency + "_sum", route="/api/images", method="POST") > 0

    assert value(after, "casimg_urls") == 3 and value(after, "casimg_blobs") == 2
    # The disk gauges come from a walk of the blob tree that a scrape waits for only DISK_WALK_WAIT; on a busy
    # machine it may outlast that, and the scrape answers with the previous walk's figures: scrape until it is in.
    usage = after
    for _ in range(80):
        if value(usage, "casimg_blob_store_files") == 2:
            break
        await asyncio.sleep(0.25)
        usage = await scrape(api)
    assert value(usage, "casimg_blob_store_bytes") == image + dup
    assert value(usage, "casimg_blob_store_files") == 2
    assert value(after, "casimg_queue_entries", state="waiting") == 0
    assert value(after, "casimg_queue_entries", state="in_progress") == 0
    assert value(after, "casimg_jobs", status="done") == 2
    assert value(after, "casimg_jobs", status="running") == 0
    assert value(after, "casimg_downloads_in_flight") == 0


@pytest.mark.gen_test(timeout=60)
async def test_queue_depth_and_running_jobs_are_seen_while_downloads_wait(api, origin):
    urls = [origin.url(f"/flaky/depth{n}?fail=99&status=503&retry_after=20") for n in range(3)]
    assert (await api("POST", "/api/images", json_body={"image_urls": urls})).code == 202
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:  # the worker reads the entries and waits out each Retry-After: 20 s
        samples = await scrape(api)
        if value(samples, "casimg_queue_entries", state="in_progress") == 3:
            break
        await asyncio.sleep(0.05)
    assert value(samples, "casimg_queue_entries", state="in_progress") == 3
    assert value(samples, "casimg_downloads_in_flight") == 3
    assert value(samples, "casimg_jobs", status="queued") + value(samples, "casimg_jobs", status="running") == 1


@pytest.mark.gen_test(timeout=60)
@pytest.mark.parametrize("settings", [{"metrics_require_key": True}], indirect=True)
async def test_metrics_can_require_a_key(api, services):
    assert (await api("GET", "/metrics", key=None)).code == 401
    reader = await services.api_keys.create("scraper", Scope.read)
    assert "casimg_http_requests_total" in str(await scrape(api, key=reader))


@pytest.mark.gen_test(timeout=60)
# Rate-limit leases last 50 ms, so how often they are renewed depends on the test's pace, not on metrics.
@pytest.mark.parametrize("settings", [{"rate_limit": 0}], indirect=True)
async def test_the_image_hot_path_makes_no_redis_call_for_metrics(api, origin, redis_server, services):
    url = origin.url("/img/301.jpg")
    assert (await api("POST", "/api/images?wait=30", json_body={"image_urls": [url]})).code == 200
    # Once, so the lookup script is in Redis's cache before counting (its first call loads it).
    assert (await api("GET", "/api/image?url=" + quote(url, safe=""))).code == 200
    client = redis_server.client()
    # The commands a GET /api/image may use (those a Lua script runs count too); an idle worker's own polling
    # (XREADGROUP, SET, XINFO CONSUMERS, EXISTS) is not among them.
    read_commands = ("hget", "hmget", "hgetall", "evalsha", "eval", "get", "zscore", "hlen", "scan", "xlen")

    async def calls_per_5_gets() -> int:
        # The service's own background loops (the worker's polling, leases and process registry) also call some
        # of these, a few times a second, and land in some windows: the fewest calls over ten windows of five
        # GETs is what the GETs themselves cost (a background call only ever adds).
        counts = []
        for _ in range(10):
            stats = client.info("commandstats")
            before = sum(int(stats.get(f"cmdstat_{name}", {}).get("calls", 0)) for name in read_commands)
            for _ in range(5):
                assert (await api("GET", "/api/image?url=" + quote(url, safe=""))).code == 200
            stats = client.info("commandstats")
            counts.append(sum(int(stats.get(f"cmdstat_{name}", {}).get("calls", 0)) for name in read_commands)
                          - before)
        return min(counts)

    with_metrics = await calls_per_5_gets()
    metrics, services.metrics = services.metrics, None
    without_metrics = await calls_per_5_gets()
    services.metrics = metrics
    assert with_metrics == without_metrics > 0
    assert value(await scrape(api), "casimg_http_requests_total", route="/api/image", method="GET",
                 status="200") == 1 + 50  # the warm-up and the 50 counted while metrics were on, only those
    client.close()


def test_reason_labels_keep_a_small_fixed_set_of_values():
    assert reason_label("too large (over 52428800 bytes)") == "too large"
    assert reason_label("truncated or corrupt image (image file is truncated)") == "truncated or corrupt image"
    assert reason_label("unsupported scheme 'ftp'") == "unsupported scheme"
    assert reason_label("storage error: No space left on device") == "storage error"
    assert reason_label("HTTP 404") == "HTTP 404"


# -- real servers ---------------------------------------------------------------------------------------


def fetch(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


@pytest.fixture
def stop_after(tmp_path):
    servers: list[Server] = []
    yield servers.append
    for server in servers:
        assert server.terminate() == 0
        if EmbeddedRedis(server.data_dir).alive():
            EmbeddedRedis(server.data_dir).stop()


def test_metrics_port_and_json_log_lines(tmp_path, origin, stop_after):
    metrics_port = free_port()
    server = Server(tmp_path / "data", "--log-format", "json", env={"CASIMG_METRICS_PORT": str(metrics_port)})
    stop_after(server)
    url = origin.url("/img/302.jpg")
    server.submit([url])
    assert fetch(server.base + "/metrics")[0] == 404  # only on its own port
    status, body = fetch(f"http://127.0.0.1:{metrics_port}/metrics")
    assert status == 200
    samples = parse(body)
    assert value(samples, "casimg_http_requests_total", route="/api/images", method="POST", status="200") == 1
    assert value(samples, "casimg_downloads_total", outcome="stored", reason="") == 1

    logged(server, '"route": "/metrics"')
    entries = [json.loads(line) for line in server.output().splitlines()]  # every line is a JSON object
    posts = [e for e in entries if e.get("event") == "request" and e["route"] == "/api/images"]
    assert len(posts) == 1
    assert posts[0]["method"] == "POST" and posts[0]["status"] == 200 and posts[0]["key"] == "admin"
    assert posts[0]["duration_ms"] > 0 and posts[0]["path"] == "/api/images?wait=30"
    downloads = [e for e in entries if e.get("event") == "download"]
    assert [(e["outcome"], e["url"], e["attempts"]) for e in downloads] == [("stored", url, 1)]
    assert server.key not in server.output()


def logged(server: Server, pattern: str) -> str:
    """The server's log once `pattern` is in it: a request's line is written just after its answer is sent."""
    deadline = time.monotonic() + 10
    while not re.search(pattern, log := server.output()):
        assert time.monotonic() < deadline, f"{pattern!r} not in the log:\n{log}"
        time.sleep(0.05)
    return log


def test_text_log_lines_name_the_key_and_never_show_it(tmp_path, origin, stop_after):
    server = Server(tmp_path / "data")
    stop_after(server)
    url = origin.url("/img/303.jpg")
    server.submit([url, origin.url("/status/404")])
    server.submit([url])
    fetch(server.base + "/api/images?token=" + server.key, {"Authorization": "Bearer " + server.key})
    log = logged(server, r"INFO casimg\.access: GET /api/images\?token=REDACTED 200 [\d.]+ms key=admin")
    assert re.search(r"INFO casimg\.access: POST /api/images\?wait=30 200 [\d.]+ms key=admin 127\.0\.0\.1", log)
    assert f"stored {url} (attempts: 1)" in log
    assert f"failed {origin.url('/status/404')}: HTTP 404 (attempts: 1)" in log
    assert f"exists {url} (already indexed)" in log
    assert server.key not in log


def test_a_worker_process_serves_its_download_counters_on_the_metrics_port(tmp_path, origin, stop_after):
    server = Server(tmp_path / "data", "--no-workers")
    stop_after(server)
    metrics_port = free_port()
    worker = subprocess.Popen([sys.executable, "-m", "casimg", "worker", "--data-dir", str(server.data_dir)],
                              cwd=ROOT, env={**os.environ, **server.env, "CASIMG_METRICS_PORT": str(metrics_port)},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert server.submit([origin.url("/img/304.jpg")])["stored"] == 1
        status, body = fetch(f"http://127.0.0.1:{metrics_port}/metrics")
        assert status == 200
        assert value(parse(body), "casimg_downloads_total", outcome="stored", reason="") == 1
        assert value(parse(body), "casimg_downloads_in_flight") == 0
    finally:
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(15) == 0


def scrape_until(server: Server, expected: dict[tuple[str, frozenset[tuple[str, str]]], float]) -> Samples:
    """A scrape once it shows `expected`: a request is counted just after its answer is sent."""
    deadline = time.monotonic() + 15
    while True:
        status, body, _ = server.call("GET", "/metrics")
        assert status == 200
        samples = parse(body)
        if all(samples.get(k, 0.0) == v for k, v in expected.items()) or time.monotonic() > deadline:
            return samples
        time.sleep(0.1)


def sample(name: str, **labels: str) -> tuple[str, frozenset[tuple[str, str]]]:
    return name, frozenset(labels.items())


def expected_counts(posts: int, gets: int, stored: int, downloaded: int) -> dict:
    return {
        sample("casimg_http_requests_total", route="/api/images", method="POST", status="200"): posts,
        sample("casimg_http_request_duration_seconds_count", route="/api/images", method="POST"): posts,
        sample("casimg_http_request_duration_seconds_bucket", route="/api/images", method="POST", le="+Inf"): posts,
        sample("casimg_http_requests_total", route="/api/image", method="GET", status="200"): gets,
        sample("casimg_downloads_total", outcome="stored", reason=""): stored,
        sample("casimg_downloaded_bytes_total"): downloaded,
        sample("casimg_downloads_in_flight"): 0,
        sample("casimg_urls"): stored,
    }


def drive(server: Server, urls: list[str], per_post: int) -> tuple[int, int]:
    """Submit `urls` a few at a time and read each back: (POSTs, GETs) answered with 200."""
    for n in range(0, len(urls), per_post):
        assert server.submit(urls[n:n + per_post])["stored"] == len(urls[n:n + per_post])
    for url in urls:
        assert server.call("GET", "/api/image?url=" + quote(url, safe=""))[0] == 200
    return -(-len(urls) // per_post), len(urls)


def test_a_scrape_counts_every_process_of_the_host_and_a_restart_neither_loses_nor_doubles(
        tmp_path, origin, redis_server, procs):
    """serve --processes 2 and a worker on one data dir: whichever process answers, a scrape reports the
    totals of all three. After serve restarts (the worker and Redis stay) the totals carry on from where
    they were: nothing counted before is lost or counted again."""
    data_dir = tmp_path / "data"
    env = {"CASIMG_KEY_PREFIX": f"metrics-{os.getpid()}:", "CASIMG_RATE_LIMIT": "0"}
    redis = ("--redis-url", redis_server.url)
    server = procs.server(data_dir, "--processes", "2", *redis, env=env)
    worker = procs.worker(data_dir, *redis, env=server.env)
    shared = shared_root(data_dir) / host_id()
    # The worker must hold its slot before the server stops, or the server, last to leave, takes the counts.
    deadline = time.monotonic() + 30
    while len(list(shared.glob("slot-*.lock"))) < 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    first = image_urls(origin, 12, start=500, query="metrics")
    posts, gets = drive(server, first, per_post=2)
    size = sum(len(image_bytes(n)) for n in range(500, 512))
    expected = expected_counts(posts, gets, stored=12, downloaded=size)
    for _ in range(6):  # any of the two server processes may answer each one
        samples = scrape_until(server, expected)
        assert {k: samples.get(k, 0.0) for k in expected} == expected

    assert server.terminate() == 0
    # The worker alone downloads now: its counts must reach the new server's scrape.
    server = procs.server(data_dir, "--processes", "2", "--no-workers", *redis, env=env)
    second = image_urls(origin, 4, start=512, query="metrics")
    more_posts, more_gets = drive(server, second, per_post=1)
    size += sum(len(image_bytes(n)) for n in range(512, 516))
    expected = expected_counts(posts + more_posts, gets + more_gets, stored=16, downloaded=size)
    for _ in range(6):
        samples = scrape_until(server, expected)
        assert {k: samples.get(k, 0.0) for k in expected} == expected
    # The new server processes took the slots the old ones left: a restart adds no file.
    assert sorted(p.name for p in shared.glob("slot-*.lock")) == ["slot-0.lock", "slot-1.lock", "slot-2.lock"]

    assert server.terminate() == 0
    assert len(list(shared.glob("gauge_livesum_*.db"))) == 1  # the worker's, which runs on
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(15) == 0
    # The last process of the data dir to stop cleanly takes the directory with it: none is left behind.
    assert not shared_root(data_dir).exists()


def test_a_killed_process_leaves_no_downloads_in_flight_and_boots_gone_leave_no_files(tmp_path, origin, procs):
    """A worker killed with -9 cannot remove its in-flight gauge: the next scrape does. The directory of an
    earlier boot goes when a process joins, unless a process still holds a slot in it."""
    data_dir = tmp_path / "data"
    gone = shared_root(data_dir) / "an-earlier-boot"
    held = shared_root(data_dir) / "another-host"
    for directory in (gone, held):
        directory.mkdir(parents=True)
        (directory / "slot-0.lock").touch()
        (directory / "counter_0.db").write_bytes(b"\0" * 16)
    with open(held / "slot-0.lock") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # as a process of that host would
        server = procs.server(data_dir, "--no-workers")
        assert not gone.exists() and (held / "counter_0.db").exists()
    worker = procs.worker(data_dir, env=server.env)
    urls = [origin.url(f"/img/{n}.jpg?delay=60") for n in range(520, 523)]
    assert server.call("POST", "/api/images", {"image_urls": urls})[0] == 202
    in_flight = sample("casimg_downloads_in_flight")
    assert scrape_until(server, {in_flight: 3})[in_flight] == 3  # published by the worker
    worker.kill()
    worker.wait()
    assert scrape_until(server, {in_flight: 0})[in_flight] == 0
    shared = shared_root(data_dir) / host_id()
    assert sorted(p.name for p in shared.glob("gauge_livesum_*.db")) == ["gauge_livesum_0.db"]  # the server's


@pytest.mark.parametrize(("query", "logged_as"), [
    ("url=http%3A%2F%2Fa%2Fb.jpg%3Ftoken%3Dx", "url=http%3A%2F%2Fa%2Fb.jpg%3Ftoken%3Dx"),  # a value, not a name
    ("token=abc&limit=5", "token=REDACTED&limit=5"),
    ("%74oken=abc", "token=REDACTED"),  # a name percent-encoded is still the name
    ("API_KEY=abc", "API_KEY=REDACTED"),
    *[(f"{name}=abc&limit=5", f"{name}=REDACTED&limit=5") for name in (
        "key", "x-api-key", "X-API-Key", "api-key", "apikey", "apiKey", "x_api_key", "access_token", "auth",
        "Authorization", "client_secret", "password", "X-Amz-Signature", "sig", "session_id", "refresh-token")],
    ("x%2Dapi%2Dkey=abc", "x-api-key=REDACTED"),
    ("url=http%3A%2F%2Fh%2F&wait=5&cursor=ab", "url=http%3A%2F%2Fh%2F&wait=5&cursor=ab"),  # casimg's own
    ("limit=5&cursor", "limit=5&cursor"),
])
def test_the_access_log_masks_credential_parameters_by_name(query, logged_as):
    assert _loggable_uri("/api/images", query) == f"/api/images?{logged_as}"


def test_the_access_log_remembers_short_parameter_names_only():
    """Every request's line is looked at, 401s included: a long name is judged each time, not kept, so no
    client can fill the remembered names with big ones; it is masked all the same."""
    from casimg.handlers import _is_secret_short
    _is_secret_short.cache_clear()
    long_name = "x" * 5000 + "token"
    assert _loggable_uri("/api/images", f"{long_name}=abc&w=1") == f"/api/images?{long_name}=REDACTED&w=1"
    assert _is_secret_short.cache_info().currsize == 1  # "w" only


def test_the_directory_of_a_data_dir_that_is_gone_goes_when_a_process_joins(tmp_path, procs):
    """A data dir deleted while its directory stayed (its last process killed with -9, as a test's
    temporary one may be) leaves nothing for good: the next process to start on this host removes it,
    unless a process still holds a slot there."""
    gone, held, kept = (tmp_path / name for name in ("gone", "held", "kept"))
    kept.mkdir()
    roots = {name: shared_root(path) for name, path in (("gone", gone), ("held", held), ("kept", kept))}
    for name, root in roots.items():
        (root / host_id()).mkdir(parents=True)
        (root / host_id() / "slot-0.lock").touch()
        (root / "data-dir").write_text(str(tmp_path / name))
    with open(roots["held"] / host_id() / "slot-0.lock") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # as a process on it would
        server = procs.server(tmp_path / "data", "--no-workers")
        assert not roots["gone"].exists()
        assert roots["held"].exists() and roots["kept"].exists()
    assert server.terminate() == 0
    assert not shared_root(tmp_path / "data").exists()
    for root in roots.values():
        shutil.rmtree(root, ignore_errors=True)


def test_a_metric_file_not_yet_sized_is_skipped_not_a_failed_scrape(tmp_path):
    """A process creates its metric file empty and sizes it a moment later; a scrape in between raised
    struct.error and answered 500 (a CI run, while a worker started). A file left empty by a process killed
    in that moment would have failed every scrape after it."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.mmap_dict import MmapedDict, mmap_key

    from casimg.metrics import SizedFilesCollector

    written = MmapedDict(str(tmp_path / "counter_4242.db"))  # a live process's file, sized, with a sample
    written.write_value(mmap_key("casimg_probe", "casimg_probe_total", [], [], "a probe"), 3.0, 0.0)
    written.close()
    (tmp_path / "counter_9999.db").touch()  # another's, created and not yet sized
    registry = CollectorRegistry()
    SizedFilesCollector(registry, str(tmp_path))
    assert b"casimg_probe_total 3.0" in generate_latest(registry)
