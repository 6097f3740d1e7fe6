"""The HTTP API end to end: a real app, real workers, a real redis-server and a real origin."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import time
import urllib.request
from typing import Any
from urllib.parse import quote, urlencode, urljoin, urlsplit

import pytest

from casimg.keys import Scope
from tests.conftest import problem


async def submit(api: Any, urls: list[str], wait: float = 20) -> dict[str, Any]:
    response = await api("POST", f"/api/images?wait={wait}", json_body={"image_urls": urls})
    assert response.code == 200, response.body
    job = json.loads(response.body)
    assert job["status"] == "done"
    return job


PLACEHOLDER_WAIT = 20  # seconds the filler may take on a busy machine


async def until_placeholder(api: Any, url: str) -> str:
    """The URL's placeholder once the filler has made it (the image's meta shows what a listing row does)."""
    deadline = time.monotonic() + PLACEHOLDER_WAIT
    while True:
        meta = json.loads((await api("GET", f"/api/image/meta?url={quote(url, safe='')}")).body)
        if meta["placeholder"] or time.monotonic() > deadline:
            assert meta["placeholder"], f"no placeholder for {url} after {PLACEHOLDER_WAIT} s"
            return meta["placeholder"]
        await asyncio.sleep(0.05)


def by_url(job: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {result["url"]: result for result in job["results"]}


# -- health and docs --------------------------------------------------------------------------------

@pytest.mark.gen_test
async def test_health_ready_and_openapi_need_no_key(api):
    for path in ("/healthz", "/readyz", "/openapi.json"):
        response = await api("GET", path, key=None)
        assert response.code == 200, path
    assert json.loads((await api("GET", "/readyz", key=None)).body)["redis"] == "ok"


@pytest.mark.gen_test
async def test_unknown_route_is_a_problem_404(api):
    response = await api("GET", "/nope")
    assert response.code == 404
    assert "no route" in problem(response)["detail"]


# -- auth -------------------------------------------------------------------------------------------

@pytest.mark.gen_test
async def test_missing_and_unknown_keys_are_401(api):
    for path in ("/api/images", "/api/image?url=x", "/api/jobs/0123456789abcdef01234567"):
        assert (await api("GET", path, key=None)).code == 401
    response = await api("GET", "/api/images", key="casimg_000000000000_notarealsecretnotarealsecret")
    assert response.code == 401
    assert response.headers["WWW-Authenticate"].startswith("Token")
    assert "casimg_000000000000" not in problem(response)["detail"]


@pytest.mark.gen_test
@pytest.mark.parametrize("parameter", ["key", "api_key", "apikey", "x-api-key", "token", "access_token"])
async def test_a_key_in_the_query_string_is_never_accepted(api, admin_key, parameter):
    """A key in a URL ends up in logs, browser history and Referer headers: only headers carry keys."""
    response = await api("GET", f"/api/images?{parameter}={quote(admin_key, safe='')}", key=None)
    assert response.code == 401, parameter
    assert (await api("GET", "/api/images", key=admin_key)).code == 200


@pytest.mark.gen_test
async def test_token_and_bearer_headers_work_like_x_api_key(api, admin_key):
    for header in (f"Token {admin_key}", f"Bearer {admin_key}", f"token {admin_key}"):
        response = await api("GET", "/api/images", key=None, headers={"Authorization": header})
        assert response.code == 200, header
    assert (await api("GET", "/api/images", key=None, headers={"Authorization": f"Basic {admin_key}"})).code == 401


@pytest.mark.gen_test
async def test_scopes(api, services, origin):
    read_key = await services.api_keys.create("reader", Scope.read)
    write_key = await services.api_keys.create("writer", Scope.write)
    body = {"image_urls": [origin.url("/img/1.jpg")]}
    assert (await api("GET", "/api/images", key=read_key)).code == 200
    denied = await api("POST", "/api/images", key=read_key, json_body=body)
    assert denied.code == 403
    assert "write" in problem(denied)["detail"]
    assert (await api("DELETE", "/api/image?url=x", key=read_key)).code == 403
    assert (await api("POST", "/api/images", key=write_key, json_body=body)).code == 202
    assert (await api("DELETE", "/api/image?url=x", key=write_key)).code == 404


@pytest.mark.gen_test
async def test_revoked_key_is_refused(api, services):
    key = await services.api_keys.create("temp", Scope.read)
    assert (await api("GET", "/api/images", key=key)).code == 200
    await services.api_keys.revoke("temp")
    assert (await api("GET", "/api/images", key=key)).code == 401


# -- submit: request validation --------------------------------------------------------------------

@pytest.mark.gen_test
@pytest.mark.parametrize(("body", "fragment"), [
    ("not json", "must be JSON"),
    ("[1, 2]", "JSON object"),
    ('{"urls": []}', "image_urls"),
    ('{"image_urls": "http://a/b.jpg"}', "list"),
    ('{"image_urls": []}', "empty"),
    ('{"image_urls": ["http://a/b.jpg", 3]}', "[1] is not a string"),
    ('{"image_urls": ["http://a/\\ud800.jpg"]}', "[0] is not valid Unicode"),
    ('{"image_urls": ["http://a/b.jpg", "\\udfff"]}', "[1] is not valid Unicode"),
    ("[" * 100_000 + "]" * 100_000, "must be JSON"),
])
async def test_bad_submit_bodies_are_400(api, body, fragment):
    response = await api("POST", "/api/images", body=body, headers={"Content-Type": "application/json"})
    assert response.code == 400
    assert fragment in problem(response)["detail"]


@pytest.mark.gen_test
async def test_too_many_urls_is_413(api, settings):
    urls = [f"http://127.0.0.1/{i}.jpg" for i in range(settings.max_urls_per_request + 1)]
    response = await api("POST", "/api/images", json_body={"image_urls": urls})
    assert response.code == 413
    assert "at most" in problem(response)["detail"]


@pytest.mark.gen_test
async def test_bad_wait_is_400(api):
    response = await api("POST", "/api/images?wait=61", json_body={"image_urls": ["http://x/y.jpg"]})
    assert response.code == 400
    assert "wait" in problem(response)["detail"]


# -- submit and jobs ----------------------------------------------------------------------------

@pytest.mark.gen_test(timeout=60)
async def test_a_url_too_long_fails_in_its_job_and_redis_keeps_only_a_prefix(api, origin, services):
    """Not a request error (an import must not abort on it); the job keeps its first 2,048 characters. Five
    such URLs of 15 million characters took Redis from 1.8 to 122 MB when the job kept them whole."""
    long_url = origin.url("/img/1.jpg?") + "x" * 15_000_000
    redis = services.redis
    before = (await redis.info("memory"))["used_memory"]
    job = await submit(api, [origin.url("/img/30.jpg"), long_url])
    grown = (await redis.info("memory"))["used_memory"] - before
    assert grown < 1_000_000, f"Redis grew by {grown} bytes"
    assert (job["stored"], job["failed"]) == (1, 1)
    cut = job["results"][1]
    assert (cut["status"], cut["error"]) == ("failed", "URL too long")
    assert cut["url"].startswith(long_url[:2048]) and len(cut["url"]) < 2100


@pytest.mark.gen_test(timeout=60)
async def test_log_lines_cut_long_urls(api, origin, caplog):
    url = origin.url("/status/404?") + "x" * 8000  # as long as a URL may be
    with caplog.at_level(logging.INFO):
        job = await submit(api, [url])
        assert job["results"][0]["error"] == "HTTP 404"
        assert (await api("GET", "/api/image?" + urlencode({"url": url}))).code == 404
    lines = [record.getMessage() for record in caplog.records]
    assert any("x" * 100 in line and "failed" in line for line in lines)  # the worker's line
    assert any("x" * 100 in line and "GET /api/image" in line for line in lines)  # the access log's
    assert max(len(line) for line in lines) < 1000

@pytest.mark.gen_test
async def test_submit_answers_202_with_location_and_the_job_completes(api, origin):
    urls = [origin.url("/img/10.jpg"), origin.url("/img/11.png")]
    response = await api("POST", "/api/images/", json_body={"image_urls": urls})
    assert response.code == 202
    accepted = json.loads(response.body)
    assert accepted["status"] == "queued" and accepted["total"] == 2
    assert response.headers["Location"] == f"/api/jobs/{accepted['job_id']}"
    for _ in range(200):
        job = json.loads((await api("GET", response.headers["Location"])).body)
        if job["status"] == "done":
            break
        await asyncio.sleep(0.05)
    assert job["status"] == "done"
    assert (job["total"], job["done"], job["stored"], job["failed"]) == (2, 2, 2, 0)
    assert [r["url"] for r in job["results"]] == urls
    assert all(r["status"] == "stored" and len(r["sha256"]) == 64 for r in job["results"])


@pytest.mark.gen_test
async def test_every_supported_format_is_stored_with_metadata(api, origin):
    extensions = {"image/jpeg": "jpg", "image/png": "png", "image/gif": "gif", "image/webp": "webp",
                  "image/avif": "avif"}
    urls = {fmt: origin.url(f"/img/20.{ext}") for fmt, ext in extensions.items()}
    job = await submit(api, list(urls.values()))
    assert job["stored"] == 5, job
    listing = {image["url"]: image for image in json.loads((await api("GET", "/api/images")).body)}
    for content_type, url in urls.items():
        image = listing[url]
        assert image["content_type"] == content_type
        assert image["width"] > 0 and image["height"] > 0
        assert image["stored_at"].endswith("Z")
        got = await api("GET", f"/api/image?url={quote(url, safe='')}")
        assert got.code == 200
        assert got.headers["Content-Type"] == content_type
        assert got.headers["Content-Disposition"].endswith(f'.{extensions[content_type]}"')
        assert hashlib.sha256(got.body).hexdigest() == image["sha256"] == by_url(job)[url]["sha256"]
        assert int(got.headers["Content-Length"]) == image["size"] == len(got.body)
        blob = await api("GET", f"/api/blobs/{image['sha256']}")  # the type read from the file's header
        assert (blob.headers["Content-Type"], blob.body) == (content_type, got.body)


@pytest.mark.gen_test
async def test_bad_links_fail_with_reasons_and_are_not_stored(api, origin):
    cases = {
        origin.url("/status/404"): "404",
        origin.url("/html"): "not an image",
        origin.url("/truncated.jpg"): "truncated",
        origin.url("/bomb.png"): "pixels",
        origin.url("/loop"): "redirects",
        origin.url("/img/1.bmp"): "not allowed",
        "ftp://127.0.0.1/a.jpg": "scheme",
        "not a url": "not an absolute http(s) URL",
        origin.url("/img/1.jpg").replace("127.0.0.1", "127.0.0.2"): "blocked",
    }
    job = await submit(api, list(cases))
    results = by_url(job)
    assert job["failed"] == len(cases) and job["stored"] == 0
    for url, fragment in cases.items():
        assert results[url]["status"] == "failed", results[url]
        assert fragment in results[url]["error"], results[url]
    assert json.loads((await api("GET", "/api/images")).body) == []


@pytest.mark.gen_test
async def test_oversized_body_fails_as_too_large(api, origin, services):
    small = services.settings.max_image_bytes
    job = await submit(api, [origin.url(f"/big?bytes={small + 1}")])
    assert "too large" in job["results"][0]["error"]


@pytest.mark.gen_test
async def test_redirect_chain_within_limit_is_stored_under_the_submitted_url(api, origin):
    url = origin.url("/redirect/3")
    job = await submit(api, [url])
    assert job["results"][0]["status"] == "stored"
    assert (await api("GET", f"/api/image?url={quote(url, safe='')}")).code == 200


@pytest.mark.gen_test
async def test_repeated_url_in_one_request_is_fetched_once(api, origin):
    url = origin.url("/img/30.jpg")
    before = origin.hits["/img/30.jpg"]
    job = await submit(api, [url, url, url])
    assert job["total"] == 1 and len(job["results"]) == 1
    assert origin.hits["/img/30.jpg"] == before + 1


@pytest.mark.gen_test
async def test_known_url_is_not_fetched_again(api, origin):
    url = origin.url("/img/31.jpg")
    first = await submit(api, [url])
    hits = origin.hits["/img/31.jpg"]
    second = await submit(api, [url])
    assert second["results"][0]["status"] == "exists"
    assert second["results"][0]["sha256"] == first["results"][0]["sha256"]
    assert second["existed"] == 1
    assert origin.hits["/img/31.jpg"] == hits


@pytest.mark.gen_test
async def test_identical_bytes_at_two_urls_share_one_blob(api, origin, services):
    a, b = origin.url("/dup/a.jpg"), origin.url("/dup/b.jpg")
    first = await submit(api, [a])
    second = await submit(api, [b])
    digest = first["results"][0]["sha256"]
    result = second["results"][0]
    assert {**result, "placeholder": None} == {"url": b, "status": "stored", "sha256": digest, "deduplicated": True,
                                               "attempts": 1, "width": first["results"][0]["width"],
                                               "height": first["results"][0]["height"], "placeholder": None}
    # Made after the store, by the filler: once per content, the same for both URLs.
    assert await until_placeholder(api, a) == await until_placeholder(api, b)
    assert result["placeholder"] in (None, await until_placeholder(api, a))
    assert await services.index.refs_of(digest) == 2
    meta = json.loads((await api("GET", f"/api/image/meta?url={quote(b, safe='')}")).body)
    listed = json.loads((await api("GET", "/api/images?limit=1000")).body)
    assert meta == {**next(image for image in listed if image["url"] == b), "references": 2}
    blob_files = list(services.blobs.root.rglob("*"))
    assert sum(1 for path in blob_files if path.is_file()) == 1
    # Deleting one URL keeps the bytes for the other.
    assert (await api("DELETE", f"/api/image?url={quote(a, safe='')}")).code == 204
    assert (await api("GET", f"/api/image?url={quote(a, safe='')}")).code == 404
    assert (await api("GET", f"/api/image/meta?url={quote(a, safe='')}")).code == 404
    assert json.loads((await api("GET", f"/api/image/meta?url={quote(b, safe='')}")).body)["references"] == 1
    assert (await api("GET", f"/api/image?url={quote(b, safe='')}")).code == 200
    assert services.blobs.exists(digest)
    assert (await api("DELETE", f"/api/image?url={quote(b, safe='')}")).code == 204
    assert not services.blobs.exists(digest)
    assert await services.index.refs_of(digest) == 0


@pytest.mark.gen_test
async def test_wait_that_runs_out_answers_202_with_the_job(api, origin):
    response = await api("POST", "/api/images?wait=0.3", json_body={"image_urls": [origin.url("/slow")]})
    assert response.code == 202
    job = json.loads(response.body)
    assert job["status"] in ("queued", "running") and job["results"][0]["status"] == "pending"


@pytest.mark.gen_test
async def test_unknown_job_is_404(api):
    assert (await api("GET", "/api/jobs/0123456789abcdef01234567")).code == 404
    assert problem(await api("GET", "/api/jobs/..%2f..%2fetc"))["status"] == 404


# -- get, head, conditional and range -----------------------------------------------------------

@pytest.mark.gen_test
async def test_get_image_headers_conditional_and_ranges(api, origin):
    url = origin.url("/img/40.jpg")
    job = await submit(api, [url])
    digest = job["results"][0]["sha256"]
    path = f"/api/image?url={quote(url, safe='')}"
    full = await api("GET", path)
    assert full.headers["ETag"] == f'"{digest}"'
    # The served-content headers hold without a front: nginx is optional (config/nginx.conf).
    assert full.headers["Cache-Control"] == "private, no-cache"
    assert full.headers["Content-Security-Policy"].split("; ")[-1] == "sandbox"
    assert "default-src 'none'" in full.headers["Content-Security-Policy"]
    assert full.headers["Last-Modified"].endswith("GMT")
    assert full.headers["X-Content-Type-Options"] == "nosniff"
    assert full.headers["Content-Disposition"].startswith("inline")
    size = len(full.body)

    head = await api("HEAD", path)
    assert head.code == 200 and head.body == b"" and int(head.headers["Content-Length"]) == size

    assert (await api("GET", path, headers={"If-None-Match": f'"{digest}"'})).code == 304
    assert (await api("GET", path, headers={"If-None-Match": '"other"'})).code == 200

    part = await api("GET", path, headers={"Range": "bytes=10-19"})
    assert part.code == 206 and part.body == full.body[10:20]
    assert part.headers["Content-Range"] == f"bytes 10-19/{size}"
    tail = await api("GET", path, headers={"Range": "bytes=-5"})
    assert tail.code == 206 and tail.body == full.body[-5:]
    open_ended = await api("GET", path, headers={"Range": f"bytes={size - 3}-"})
    assert open_ended.body == full.body[-3:]
    beyond = await api("GET", path, headers={"Range": f"bytes={size}-"})
    assert beyond.code == 416 and beyond.headers["Content-Range"] == f"bytes */{size}"
    several = await api("GET", path, headers={"Range": "bytes=0-1,5-6"})
    assert several.code == 200 and several.body == full.body
    # Bounds of thousands of digits (past int()'s digit limit) are bounds past the end, not a 500.
    huge = "9" * 5000
    whole = await api("GET", path, headers={"Range": f"bytes=0-{huge}"})
    assert whole.code == 200 and whole.body == full.body
    assert (await api("GET", path, headers={"Range": f"bytes=-{huge}"})).body == full.body
    past = await api("GET", path, headers={"Range": f"bytes={huge}-"})
    assert past.code == 416 and past.headers["Content-Range"] == f"bytes */{size}"
    padded = await api("GET", path, headers={"Range": f"bytes={'0' * 5000}10-19"})
    assert padded.code == 206 and padded.body == full.body[10:20]

    blob = await api("GET", f"/api/blobs/{digest}")
    assert blob.code == 200 and blob.body == full.body
    assert blob.headers["Cache-Control"] == "private, max-age=31536000, immutable"
    assert blob.headers["Content-Security-Policy"] == full.headers["Content-Security-Policy"]
    assert blob.headers["X-Content-Type-Options"] == "nosniff"
    assert (blob.headers["Content-Type"], int(blob.headers["Content-Length"])) == ("image/jpeg", size)
    blob_head = await api("HEAD", f"/api/blobs/{digest}")
    assert blob_head.code == 200 and blob_head.body == b"" and int(blob_head.headers["Content-Length"]) == size
    assert (await api("GET", f"/api/blobs/{digest}", headers={"If-None-Match": f'"{digest}"'})).code == 304
    blob_part = await api("GET", f"/api/blobs/{digest}", headers={"Range": "bytes=10-19"})
    assert blob_part.code == 206 and blob_part.body == full.body[10:20]
    assert (await api("GET", "/api/blobs/" + "0" * 64)).code == 404


@pytest.mark.gen_test
async def test_a_blob_whose_bytes_are_damaged_or_gone_by_digest(api, origin, services):
    job = await submit(api, [origin.url("/img/41.jpg"), origin.url("/img/42.png")])
    damaged, gone = (result["sha256"] for result in job["results"])
    path = services.blobs.blob_path(damaged)
    path.chmod(0o644)
    path.write_bytes(path.read_bytes()[:-40])  # the scans cut short: the header still names a JPEG
    blob = await api("GET", f"/api/blobs/{damaged}")
    assert (blob.code, blob.headers["Content-Type"], blob.body) == (200, "image/jpeg", path.read_bytes())
    path.write_bytes(b"no longer an image")
    assert (await api("GET", f"/api/blobs/{damaged}")).headers["Content-Type"] == "application/octet-stream"
    services.blobs.blob_path(gone).unlink()
    missing = await api("GET", f"/api/blobs/{gone}")
    assert missing.code == 404 and "fsck" in problem(missing)["detail"]


@pytest.mark.gen_test
async def test_get_and_delete_errors(api):
    for method in ("GET", "DELETE"):
        missing = await api(method, "/api/image")
        assert missing.code == 400 and "url" in problem(missing)["detail"]
        unknown = await api(method, "/api/image?url=http%3A%2F%2Fnowhere%2Fx.jpg")
        assert unknown.code == 404


@pytest.mark.gen_test
async def test_url_is_matched_exactly_as_submitted(api, origin):
    url = origin.url("/img/41.jpg") + "?a=1&b=%20x"
    await submit(api, [url])
    assert (await api("GET", f"/api/image?url={quote(url, safe='')}")).code == 200
    assert (await api("GET", f"/api/image?url={quote(url.replace('a=1&b', 'b'), safe='')}")).code == 404
    assert (await api("GET", f"/api/image?url={quote(url + ' ', safe='')}")).code == 404  # not trimmed


# -- listing ----------------------------------------------------------------------------------------

@pytest.mark.gen_test
async def test_listing_pages_with_link_and_total(api, origin):
    urls = [origin.url(f"/img/{50 + i}.png") for i in range(7)]
    await submit(api, urls)
    seen: list[str] = []
    path = "/api/images?limit=3"
    pages = 0
    while path:
        response = await api("GET", path)
        assert response.code == 200
        assert response.headers["X-Total-Count"] == "7"
        seen += [image["url"] for image in json.loads(response.body)]
        link = response.headers.get("Link")
        if link:
            # Query-only, so it can name no other scheme or host, and keeps a proxy's path prefix.
            assert re.fullmatch(r'<\?limit=3&cursor=[0-9a-f]{40}>; rel="next"', link), link
        path = urljoin(path, link[1:link.index(">")]) if link else ""
        pages += 1
    assert pages == 3
    assert sorted(seen) == sorted(urls)


@pytest.mark.gen_test
async def test_newest_first_listing_pages_with_its_own_cursor(api, origin):
    urls = [origin.url(f"/img/{70 + i}.png") for i in range(7)]
    for url in urls[:4]:
        await submit(api, [url])
    await submit(api, urls[4:])
    seen: list[dict] = []
    path = "/api/images?limit=3&order=recent"
    while path:
        response = await api("GET", path)
        assert response.code == 200 and response.headers["X-Total-Count"] == "7"
        seen += json.loads(response.body)
        link = response.headers.get("Link")
        if link:
            assert re.fullmatch(r'<\?limit=3&order=recent&cursor=r\.[0-9a-f]{52}>; rel="next"', link), link
        path = urljoin(path, link[1:link.index(">")]) if link else ""
    assert sorted(image["url"] for image in seen) == sorted(urls)
    keys = [(image["stored_at"], hashlib.sha1(image["url"].encode()).hexdigest()) for image in seen]
    assert keys == sorted(keys, reverse=True)
    assert [image["url"] for image in seen[-4:]] == urls[:4][::-1]  # stored one job after another
    default = json.loads((await api("GET", "/api/images?order=sha1")).body)
    assert [image["url"] for image in default] == sorted(urls, key=lambda url: hashlib.sha1(url.encode()).hexdigest())


@pytest.mark.gen_test
async def test_filtered_listing_pages_carry_the_filters_in_their_link(api, origin):
    urls = [origin.url(f"/img/{80 + i}.png") for i in range(6)] + [origin.url(f"/img/{90 + i}.jpg") for i in range(3)]
    await submit(api, urls)
    host = urlsplit(urls[0]).hostname
    for query, expected in [(f"contains={quote('.png')}", urls[:6]), (f"host={host.upper()}", urls),
                            ("host=localhost", []), (f"prefix={quote(origin.url('/img/9'), safe='')}", urls[6:]),
                            (f"prefix={quote(origin.url('/img/8'), safe='')}&contains=80.", urls[:1])]:
        for order in ("", "&order=recent"):
            seen: list[str] = []
            path = f"/api/images?limit=2{order}&{query}"
            while path:
                response = await api("GET", path)
                assert response.code == 200 and response.headers["X-Total-Count"] == "9"
                seen += [image["url"] for image in json.loads(response.body)]
                link = response.headers.get("Link")
                if link:
                    assert link.startswith(f"<?limit=2{order}&{query}&cursor="), link
                path = urljoin(path, link[1:link.index(">")]) if link else ""
            assert sorted(seen) == sorted(expected), (query, order)


@pytest.mark.gen_test
@pytest.mark.parametrize("query", ["limit=0", "limit=1001", "limit=x", "cursor=-1", "cursor=1764612345123456",
                                   "cursor=" + "A" * 40, "cursor=" + "a" * 39, "cursor=" + "a" * 41, "cursor=",
                                   "cursor=r." + "a" * 52, "order=newest", "order=recent&cursor=" + "a" * 40,
                                   "order=recent&cursor=r." + "a" * 51, "order=recent&cursor=R." + "a" * 52,
                                   "prefix=%ff", "host=%c3"])
async def test_bad_listing_parameters_are_400(api, query):
    body = problem(await api("GET", f"/api/images?{query}"))
    assert body["status"] == 400
    if query.startswith("cursor"):
        assert "cursor must be 40 lowercase hex digits" in body["detail"]
    elif "cursor" in query:
        assert "cursor must be 'r.' and 52 lowercase hex digits with order=recent" in body["detail"]


@pytest.mark.gen_test
async def test_the_older_services_curl_flow_with_token_header(api, admin_key, origin):
    """The seed's clients: Authorization: Token, /api/images/ with a trailing slash, the array shape."""
    token = {"Authorization": f"Token {admin_key}"}
    url = origin.url("/img/60.jpg")
    posted = await api("POST", "/api/images/?wait=20", key=None, headers=token, json_body={"image_urls": [url]})
    assert posted.code == 200
    listed = json.loads((await api("GET", "/api/images/", key=None, headers=token)).body)
    assert isinstance(listed, list) and listed[0]["url"] == url
    assert set(listed[0]) == {"url", "sha256", "size", "content_type", "width", "height", "stored_at", "placeholder"}
    assert await until_placeholder(api, url)
    got = await api("GET", f"/api/image?url={quote(url, safe='')}", key=None, headers=token)
    original = await asyncio.get_running_loop().run_in_executor(None, lambda: urllib.request.urlopen(url).read())
    assert got.code == 200 and got.body == original
    assert (await api("DELETE", f"/api/image?url={quote(url, safe='')}", key=None, headers=token)).code == 204
