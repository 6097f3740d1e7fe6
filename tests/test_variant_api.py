"""Variants through HTTP, in-process (the app on a real Redis, the real origin, a real render pool)."""

from __future__ import annotations

import io
import json
from urllib.parse import quote

import pytest
from PIL import Image

from tests.conftest import problem


async def stored(api, url: str) -> dict:
    response = await api("POST", "/api/images?wait=20", json_body={"image_urls": [url]})
    assert response.code == 200, response.body
    result = json.loads(response.body)["results"][0]
    assert result["status"] in ("stored", "exists"), result
    return result


def image_path(url: str, **params: str) -> str:
    return f"/api/image?url={quote(url, safe='')}" + "".join(f"&{k}={v}" for k, v in params.items())


@pytest.mark.gen_test(timeout=60)
async def test_a_thumbnail_is_rendered_once_and_then_served_from_its_blob(api, origin, services):
    url = origin.url("/img/700.jpg")
    result = await stored(api, url)
    first = await api("GET", image_path(url, w="20", format="webp"))
    assert first.code == 200, first.body
    assert first.headers["Content-Type"] == "image/webp"
    picture = Image.open(io.BytesIO(first.body))
    assert picture.format == "WEBP" and picture.width == 20
    etag = first.headers["ETag"]
    assert etag.strip('"') != result["sha256"]
    again = await api("GET", image_path(url, format="webp", w="20"))
    assert again.body == first.body and again.headers["ETag"] == etag
    assert services.variants.renders == 1
    assert (await api("GET", image_path(url, w="20", format="webp"), headers={"If-None-Match": etag})).code == 304
    by_digest = await api("GET", f"/api/blobs/{etag.strip(chr(34))}")
    assert by_digest.code == 200 and by_digest.body == first.body
    bad = await api("GET", image_path(url, w="0"))
    assert bad.code == 400 and problem(bad)["parameter"] == "w"
