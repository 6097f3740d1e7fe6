"""The nginx front (config/nginx.conf, CASIMG_ACCEL_REDIRECT): casimg checks the key and looks the URL up,
nginx sends the bytes. The X-Accel-Redirect answer is tested always; the whole path through a real nginx
when one is installed (skipped otherwise)."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from urllib.parse import quote

import pytest

from bench.procs import free_port, nginx_front_config, start_nginx, stop
from casimg.config import Settings
from tests.conftest import RedisProcess, make_settings, problem
from tests.origin import image_bytes


@pytest.fixture
def settings(tmp_path: Path, redis_server: RedisProcess) -> Settings:
    return make_settings(tmp_path / "data", redis_server.url, accel_redirect="/_blobs/")


async def stored(api, origin, seed: int) -> tuple[str, bytes]:
    url = origin.url(f"/img/{seed}.jpg")
    response = await api("POST", "/api/images?wait=20", json_body={"image_urls": [url]})
    assert response.code == 200, response.body
    return url, image_bytes(seed, "jpg")


@pytest.mark.gen_test
async def test_get_answers_with_x_accel_redirect_and_casimg_headers(api, origin):
    url, data = await stored(api, origin, 41)
    digest = hashlib.sha256(data).hexdigest()
    response = await api("GET", f"/api/image?url={quote(url, safe='')}")
    assert response.code == 200
    assert response.body == b""
    assert response.headers["X-Accel-Redirect"] == f"/_blobs/{digest[0:2]}/{digest[2:4]}/{digest}"
    assert response.headers["ETag"] == f'"{digest}"'
    assert response.headers["Content-Type"] == "image/jpeg"
    # HEAD, 304 and an unsatisfiable range stay casimg's own answers.
    head = await api("HEAD", f"/api/image?url={quote(url, safe='')}")
    assert head.code == 200 and "X-Accel-Redirect" not in head.headers
    assert int(head.headers["Content-Length"]) == len(data)
    cached = await api("GET", f"/api/image?url={quote(url, safe='')}", headers={"If-None-Match": f'"{digest}"'})
    assert cached.code == 304 and "X-Accel-Redirect" not in cached.headers
    beyond = await api("GET", f"/api/image?url={quote(url, safe='')}", headers={"Range": "bytes=99999999-"})
    assert beyond.code == 416
    blob = await api("GET", f"/api/blobs/{digest}")
    assert blob.headers["X-Accel-Redirect"].endswith(digest)


@pytest.fixture
def nginx_front(tmp_path: Path, base_url: str, settings: Settings):
    """A real nginx running config/nginx.conf's front, with only its three marked lines replaced."""
    if shutil.which("nginx") is None:
        pytest.skip("nginx is not installed (apt-get install nginx)")
    port = free_port()
    casimg_port = int(base_url.rsplit(":", 1)[1])
    # Ready once it accepts connections: an HTTP request would wait on casimg, which serves in the
    # test's IOLoop and so not before the test runs.
    servers = nginx_front_config(casimg_port, port, settings.data_dir.resolve() / "blobs")
    process = start_nginx(tmp_path / "nginx", servers, [port])
    yield f"http://127.0.0.1:{port}"
    stop(process)


@pytest.mark.gen_test
async def test_real_nginx_sends_the_bytes_after_casimg_checked_key_and_url(api, origin, nginx_front, http_client,
                                                                           admin_key):
    url, data = await stored(api, origin, 42)
    digest = hashlib.sha256(data).hexdigest()
    path = f"/api/image?url={quote(url, safe='')}"

    async def get(target: str, **headers: str):
        return await http_client.fetch(nginx_front + target, headers=headers, raise_error=False)

    admin = admin_key
    response = await get(path, **{"X-API-Key": admin})
    assert response.code == 200
    assert response.body == data
    assert response.headers["ETag"] == f'"{digest}"'
    assert response.headers["Content-Type"] == "image/jpeg"
    assert response.headers["Cache-Control"] == "private, no-cache"
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert "sandbox" in response.headers["Content-Security-Policy"]
    assert "X-Accel-Redirect" not in response.headers
    assert response.headers.get_list("ETag") == [f'"{digest}"']

    partial = await get(path, **{"X-API-Key": admin, "Range": "bytes=0-9"})
    assert partial.code == 206
    assert partial.body == data[:10]
    assert partial.headers["Content-Range"] == f"bytes 0-9/{len(data)}"

    cached = await get(path, **{"X-API-Key": admin, "If-None-Match": f'"{digest}"'})
    assert cached.code == 304

    refused = await get(path)
    assert refused.code == 401
    problem(refused)
    missing = await get("/api/image?url=" + quote(origin.url("/img/999.jpg"), safe=""), **{"X-API-Key": admin})
    assert missing.code == 404
    # The blob directory is reachable only through casimg's answer.
    direct = await get(f"/_blobs/{digest[0:2]}/{digest[2:4]}/{digest}", **{"X-API-Key": admin})
    assert direct.code == 404
    assert (await get("/healthz")).code == 200
