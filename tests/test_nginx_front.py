"""The nginx front (config/nginx.conf, CASIMG_ACCEL_REDIRECT): casimg checks the key and looks the URL up,
nginx sends the bytes. The X-Accel-Redirect answer is tested always; the whole path through a real nginx
when one is installed (skipped otherwise)."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from urllib.parse import quote

import pytest

from casimg.config import Settings
from tests.conftest import RedisProcess, make_settings, problem
from tests.origin import image_bytes

ROOT = Path(__file__).resolve().parent.parent
FRONT_BEGIN, FRONT_END = "# -- casimg front begins --", "# -- casimg front ends --"


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


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def nginx_front(tmp_path: Path, base_url: str, settings: Settings):
    """A real nginx running config/nginx.conf's front, with only its three marked lines replaced."""
    binary = shutil.which("nginx")
    if binary is None:
        pytest.skip("nginx is not installed (apt-get install nginx)")
    prefix = tmp_path / "nginx"
    for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (prefix / sub).mkdir(parents=True)
    port = _free_port()
    casimg_port = base_url.rsplit(":", 1)[1]
    shipped = (ROOT / "config" / "nginx.conf").read_text()
    front = shipped[shipped.index(FRONT_BEGIN):shipped.index(FRONT_END)]
    front = (front.replace("server 127.0.0.1:9000;", f"server 127.0.0.1:{casimg_port};")
             .replace("listen 127.0.0.1:8080;", f"listen 127.0.0.1:{port};")
             .replace("/var/lib/casimg/blobs/", f"{settings.data_dir.resolve() / 'blobs'}/"))
    temp_paths = "".join(f"{kind}_temp_path {prefix / sub};\n"
                         for kind, sub in (("client_body", "body"), ("proxy", "proxy"), ("fastcgi", "fastcgi"),
                                           ("uwsgi", "uwsgi"), ("scgi", "scgi")))
    # As root, nginx's workers would run as nobody, who cannot read a private temp directory.
    user = "user root root;\n" if os.geteuid() == 0 else ""
    conf = prefix / "nginx.conf"
    conf.write_text(f"{user}daemon off;\nworker_processes 1;\npid {prefix / 'nginx.pid'};\n"
                    f"error_log {prefix / 'error.log'} warn;\nevents {{ worker_connections 256; }}\n"
                    f"http {{\naccess_log off;\nsendfile on;\n{temp_paths}{front}\n}}\n")
    process = subprocess.Popen([binary, "-p", str(prefix), "-c", str(conf)], stdin=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                output = process.stderr.read().decode() if process.stderr else ""
                raise RuntimeError(f"nginx did not start: {output}") from None
            time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    process.terminate()
    process.wait(10)


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
