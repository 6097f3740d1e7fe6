"""What the gallery needs from the server, without a browser: the page and its assets with their headers,
CASIMG_UI=off, and the two API calls it makes beyond listing (GET /api/key, GET /api/blobs/{digest}/urls)."""

from __future__ import annotations

import configparser
import json
import re
from typing import Any
from urllib.parse import quote

import pytest

from bench.procs import ROOT
from casimg.app import make_app
from casimg.keys import Scope
from tests.conftest import make_settings, problem


@pytest.mark.gen_test
async def test_page_and_assets_headers_and_the_api_keeps_its_own(api):
    page = await api("GET", "/", key=None)
    assert page.code == 200
    csp = page.headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "'unsafe-inline'" not in csp and "'unsafe-eval'" not in csp
    assert page.headers["Cache-Control"] == "no-cache"
    assert page.headers["Content-Type"] == "text/html; charset=utf-8"
    assert b"<script>" not in page.body and b" style=" not in page.body  # nothing inline for the CSP to allow
    assets = re.findall(rb'(?:src|href)="(/ui/[0-9a-f]{12}/[a-z.]+)"', page.body)
    assert {a.rsplit(b"/", 1)[1] for a in assets} == {b"main.js", b"style.css", b"icon.svg"}
    for path in assets:
        asset = await api("GET", path.decode(), key=None)
        assert asset.code == 200, path
        assert asset.headers["Cache-Control"] == "public, max-age=31536000, immutable"
    module = await api("GET", assets[0].decode().rsplit("/", 1)[0] + "/vendor/thumbhash.js", key=None)
    assert module.code == 200 and module.headers["Content-Type"] == "text/javascript; charset=utf-8"
    assert (await api("GET", "/ui/000000000000/main.js", key=None)).code == 404  # another release's
    assert (await api("GET", assets[0].decode().rsplit("/", 1)[0] + "/nothing.js", key=None)).code == 404
    listing = await api("GET", "/api/images")
    assert listing.code == 200 and "Content-Security-Policy" not in listing.headers


@pytest.mark.gen_test
async def test_ui_off_serves_no_page(services, tmp_path, redis_server):
    # The fixture app serves the gallery; this one, built with CASIMG_UI=off on the same services, does not.
    off = make_app(make_settings(tmp_path / "off", redis_server.url, ui=False), services)
    assert not any(rule.matcher.regex.pattern.startswith(("/$", "/ui/")) for rule in off.wildcard_router.rules)
    assert any(rule.matcher.regex.pattern == "/$"
               for rule in make_app(services.settings, services).wildcard_router.rules)


@pytest.mark.gen_test
async def test_key_names_its_scope(api, services):
    reader = await services.api_keys.create("reader", Scope.read)
    answer = await api("GET", "/api/key", key=reader)
    assert answer.code == 200
    assert json.loads(answer.body) == {"id": reader.split("_")[1], "name": "reader", "scope": "read"}
    assert json.loads((await api("GET", "/api/key")).body)["scope"] == "admin"
    assert problem(await api("GET", "/api/key", key="casimg_000000000000_nope-nope-nope-nope-nope"))["status"] == 401


async def _submit(api: Any, urls: list[str]) -> dict[str, Any]:
    response = await api("POST", "/api/images?wait=20", json_body={"image_urls": urls})
    assert response.code == 200, response.body
    return json.loads(response.body)


@pytest.mark.gen_test
async def test_blob_urls_counts_and_lists_the_urls_sharing_bytes(api, origin):
    shared = [origin.url(f"/dup/{name}.jpg") for name in ("a", "b", "c")]
    job = await _submit(api, [*shared, origin.url("/img/1.jpg")])
    digest = next(r["sha256"] for r in job["results"] if r["url"] == shared[0])
    answer = json.loads((await api("GET", f"/api/blobs/{digest}/urls")).body)
    assert answer == {"sha256": digest, "count": 3, "urls": sorted(shared)}
    two = json.loads((await api("GET", f"/api/blobs/{digest}/urls?limit=2")).body)
    assert two["count"] == 3 and len(two["urls"]) == 2 and set(two["urls"]) < set(shared)
    assert (await api("DELETE", f"/api/image?url={quote(shared[0], safe='')}")).code == 204
    assert json.loads((await api("GET", f"/api/blobs/{digest}/urls")).body)["urls"] == sorted(shared[1:])
    assert problem(await api("GET", f"/api/blobs/{'0' * 64}/urls"))["status"] == 404
    assert json.loads((await api("GET", f"/api/blobs/{digest}/urls?limit=0")).body)["urls"] == []
    assert problem(await api("GET", f"/api/blobs/{digest}/urls?limit=-1"))["status"] == 400


def test_every_gallery_file_ships_with_the_package():
    """setup.cfg's package_data globs cover casimg/web/, so an installed casimg serves the same page."""
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    globs = [g.strip() for g in config["options.package_data"]["casimg"].split(",")]
    package = ROOT / "casimg"
    shipped = {path for pattern in globs for path in package.glob(pattern)}
    files = {path for path in (package / "web").rglob("*") if path.is_file() and "__pycache__" not in path.parts}
    assert files and files <= shipped, sorted(str(p) for p in files - shipped)
