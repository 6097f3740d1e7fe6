"""`casimg serve` with CASIMG_STORAGE=s3, end to end: real processes (casimg, its embedded Redis, the
origin, the S3 endpoint of tests/procs.S3Endpoint, a recording proxy in front of it), over HTTP only."""

from __future__ import annotations

import io
import json
import re
import urllib.request
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote, urlsplit

import pytest
from PIL import Image

from bench.procs import S3Proxy
from casimg.client import Client
from tests.procs import (
    assert_fsck_clean,
    assert_retrievable,
    casimg,
    embedded_client,
    expected_bytes,
    image_urls,
    settle,
    submit,
)

pytestmark = pytest.mark.slow  # each test starts a server


@pytest.fixture
def proxy(s3: Any) -> Iterator[S3Proxy]:
    front = S3Proxy(s3.endpoint)
    yield front
    front.close()


def s3_env(s3: Any, endpoint: str, prefix: str, **extra: str) -> dict[str, str]:
    return {**s3.env(prefix, **extra), "CASIMG_S3_ENDPOINT": endpoint}


def test_an_import_lands_in_the_bucket_and_reads_back_byte_identical(s3, proxy, procs, origin, tmp_path):
    prefix = s3.prefix()
    env = s3_env(s3, proxy.endpoint, prefix)
    server = procs.server(tmp_path / "data", env=env)
    urls = image_urls(origin, 12)
    done = settle(server, submit(server, urls))
    assert done["stored"] == 12, done
    again = image_urls(origin, 3, query="again")  # new URLs, known contents: indexed with no upload
    assert settle(server, submit(server, again))["stored"] == 3
    urls += again
    assert_retrievable(server, urls)
    digests = {result["sha256"] for result in done["results"]}
    listed = casimg("stats", "--json", "--data-dir", str(server.data_dir), env=env, check=False)
    assert listed.returncode == 0, (listed.returncode, listed.stdout, listed.stderr)
    assert json.loads(listed.stdout)["blob_files"] == len(digests) == 12
    puts = [path for method, path, _ in proxy.seen if method == "PUT"]
    assert len(puts) == 12  # one PUT per content, none for the later URLs that share one
    assert all(urlsplit(path).path.startswith(f"/{s3.bucket}/{prefix}blobs/") for path in puts)
    # the same HTTP rules as from files: ETag, 304, Range, HEAD
    url = quote(urls[0], safe="")
    status, body, headers = server.call("GET", f"/api/image?url={url}", headers={"Range": "bytes=10-19"})
    assert status == 206 and body == expected_bytes(urls[0])[10:20]
    etag = {name.lower(): value for name, value in headers.items()}["etag"]
    assert server.call("GET", f"/api/image?url={url}", headers={"If-None-Match": etag})[0] == 304
    status, body, headers = server.call("HEAD", f"/api/blobs/{etag.strip(chr(34))}")
    assert status == 200 and body == b"" and int(headers["Content-Length"]) == len(expected_bytes(urls[0]))
    assert headers["Content-Type"] == "image/jpeg"
    assert_fsck_clean(server.data_dir, env=env)
    # a delete answers at once; the object waits for the sweep (a tombstone), the URL is gone
    assert server.call("DELETE", f"/api/image?url={url}")[0] == 204
    assert server.call("GET", f"/api/image?url={url}")[0] == 404
    assert server.terminate() == 0


def test_presigned_redirects_are_followed_by_the_client_without_its_key(s3, proxy, procs, origin, tmp_path):
    env = s3_env(s3, proxy.endpoint, s3.prefix(), CASIMG_S3_REDIRECT="presigned")
    server = procs.server(tmp_path / "data", env=env)
    urls = image_urls(origin, 2, start=40)
    assert settle(server, submit(server, urls))["stored"] == 2
    opener = urllib.request.build_opener(_NoRedirects())
    request = urllib.request.Request(f"{server.base}/api/image?url={quote(urls[0], safe='')}",
                                     headers={"X-API-Key": server.key})
    with pytest.raises(urllib.error.HTTPError) as answer:
        opener.open(request, timeout=30)
    assert answer.value.code == 302 and answer.value.headers["Location"].startswith(proxy.endpoint + "/")
    assert answer.value.headers["Cache-Control"] == "no-store"
    # A HEAD is answered here, not sent away; the served OpenAPI document says so.
    status, _, headers = server.call("HEAD", f"/api/image?url={quote(urls[0], safe='')}")
    assert status == 200 and "Location" not in headers
    document = json.loads(server.call("GET", "/openapi.json")[1])
    for path in ("/api/image", "/api/blobs/{digest}"):
        assert "Location" in document["paths"][path]["get"]["responses"]["302"]["headers"]
        assert "302" not in document["paths"][path]["head"]["responses"]
    before = len(proxy.seen)
    assert Client(server.base, server.key).image(urls[1]) == expected_bytes(urls[1])
    followed = [headers for method, _, headers in proxy.seen[before:] if method == "GET"]
    assert followed and all(server.key not in " ".join(h.values()) for h in followed)
    assert all("x-api-key" not in {name.lower() for name in h} for h in followed)
    assert server.terminate() == 0


def test_a_missing_bucket_stops_the_start_with_the_reason(s3, procs, tmp_path):
    env = {**s3.env(s3.prefix()), "CASIMG_S3_BUCKET": "no-such-bucket-here"}
    result = casimg("serve", "--data-dir", str(tmp_path / "data"), "--port", "0", env=env, check=False)
    assert result.returncode != 0
    assert "does not exist" in result.stderr and "no-such-bucket-here" in result.stderr
    assert s3.credentials["AWS_SECRET_ACCESS_KEY"] not in result.stderr + result.stdout


def test_a_variant_is_rendered_from_the_bucket_stored_there_once_and_goes_with_its_source(
        s3, proxy, procs, origin, tmp_path):
    env = s3_env(s3, proxy.endpoint, s3.prefix())
    server = procs.server(tmp_path / "data", env=env)
    url = origin.url("/photo/31.jpg?w=640&h=480")
    source = settle(server, submit(server, [url]))["results"][0]["sha256"]
    path = f"/api/image?url={quote(url, safe='')}&w=64&format=webp"
    status, body, headers = server.call("GET", path)
    assert status == 200, body[:300]
    assert headers["Content-Type"] == "image/webp"
    with Image.open(io.BytesIO(body)) as im:
        assert (im.format, im.size) == ("WEBP", (64, 48))
    variant = _etag(headers)
    objects = [p for m, p, _ in proxy.seen if m == "PUT" and urlsplit(p).path.endswith("/" + variant)]
    assert len(objects) == 1  # the variant's bytes went to the bucket, under their own digest

    # Cached: the same bytes, from the stored object, with no second render and no second upload.
    for again in (path, f"/api/blobs/{variant}"):
        status, cached, headers = server.call("GET", again)
        assert (status, cached, _etag(headers)) == (200, body, variant)
    assert len([p for m, p, _ in proxy.seen if m == "PUT" and p.endswith("/" + variant)]) == 1
    metrics = server.call("GET", "/metrics")[1]
    assert re.search(rb"^casimg_variant_renders_total 1(\.0)?$", metrics, re.MULTILINE), metrics

    # Deleting the source's last URL drops the relation and tombstones both objects; once the grace is
    # over (made so here: 15 minutes is the store's), the sweep deletes the variant's object with the source's.
    assert server.call("DELETE", f"/api/image?url={quote(url, safe='')}")[0] == 204
    client = embedded_client(server.data_dir)
    assert client.exists(f"casimg:variants:{source}") == 0
    assert set(client.zrange("casimg:tomb", 0, -1)) == {source, variant}
    client.zadd("casimg:tomb", {source: 0, variant: 0})
    repaired = casimg("fsck", "--data-dir", str(server.data_dir), "--repair", env=env, check=False)
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    assert f"deleted object {variant}" in repaired.stdout and f"deleted object {source}" in repaired.stdout
    listed = casimg("stats", "--json", "--data-dir", str(server.data_dir), env=env)
    assert json.loads(listed.stdout)["blob_files"] == 0  # the bucket's listing has neither object
    assert server.call("GET", f"/api/blobs/{variant}")[0] == 404
    assert_fsck_clean(server.data_dir, env=env)
    assert server.terminate() == 0


def _etag(headers: dict[str, str]) -> str:
    return {name.lower(): value for name, value in headers.items()}["etag"].strip('"')


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None
