"""Variants through HTTP: the app on a real Redis, images from the real origin, renders in a real pool.

What the renderer does to pixels is tests/test_variants.py's; here, what the API answers: formats in and
out, fits, orientation, animation, presets and limits, errors, caching headers. The one-render count
across processes, the delete cascade and fsck are tests/test_variant_procs.py's.
"""

from __future__ import annotations

import io
import json
from typing import Any
from urllib.parse import quote

import pytest
from PIL import Image

from tests.conftest import make_settings, problem
from tests.origin import oriented_colours


@pytest.fixture
def settings(request, tmp_path, redis_server):
    """The conftest settings, with a test's own overrides: @pytest.mark.settings(variants="presets", ...)."""
    marker = request.node.get_closest_marker("settings")
    return make_settings(tmp_path / "data", redis_server.url, **(marker.kwargs if marker else {}))


async def stored(api: Any, url: str) -> dict[str, Any]:
    response = await api("POST", "/api/images?wait=20", json_body={"image_urls": [url]})
    assert response.code == 200, response.body
    result = json.loads(response.body)["results"][0]
    assert result["status"] in ("stored", "exists"), result
    return result


def image_path(url: str, **params: str) -> str:
    return f"/api/image?url={quote(url, safe='')}" + "".join(f"&{k}={v}" for k, v in params.items())


def opened(body: bytes) -> Image.Image:
    picture = Image.open(io.BytesIO(body))
    picture.load()
    return picture


@pytest.mark.gen_test(timeout=60)
async def test_a_variant_is_rendered_once_then_served_from_its_blob_with_the_originals_http_rules(api, origin,
                                                                                                    services):
    url = origin.url("/img/700.jpg")
    result = await stored(api, url)
    first = await api("GET", image_path(url, w="20", format="webp"))
    assert first.code == 200, first.body
    assert first.headers["Content-Type"] == "image/webp"
    assert first.headers["Cache-Control"] == "private, no-cache"  # as the original's, by URL
    assert "Vary" not in first.headers
    picture = opened(first.body)
    assert picture.format == "WEBP" and picture.width == 20
    etag = first.headers["ETag"].strip('"')
    assert etag != result["sha256"] and len(etag) == 64
    again = await api("GET", image_path(url, format="webp", w="20"))  # another spelling, the same variant
    assert again.body == first.body and again.headers["ETag"] == first.headers["ETag"]
    assert services.variants.renders == 1
    unchanged = await api("GET", image_path(url, w="20", format="webp"), headers={"If-None-Match": f'"{etag}"'})
    assert unchanged.code == 304
    head = await api("HEAD", image_path(url, w="20", format="webp"))
    assert head.code == 200 and head.headers["Content-Length"] == str(len(first.body)) and head.body == b""
    part = await api("GET", image_path(url, w="20", format="webp"), headers={"Range": "bytes=0-9"})
    assert part.code == 206 and part.body == first.body[:10]
    # The variant is a blob of its own, and the same parameters on the source's digest give it too.
    by_digest = await api("GET", f"/api/blobs/{etag}")
    assert by_digest.code == 200 and by_digest.body == first.body
    from_source = await api("GET", f"/api/blobs/{result['sha256']}?w=20&format=webp")
    assert from_source.body == first.body and "immutable" in from_source.headers["Cache-Control"]
    assert services.variants.renders == 1
    # The original is untouched, byte for byte.
    assert (await api("GET", image_path(url))).body == (await api("GET", f"/api/blobs/{result['sha256']}")).body


@pytest.mark.gen_test(timeout=120)
@pytest.mark.parametrize("source", ["jpg", "png", "gif", "webp", "avif"])
async def test_each_format_in_gives_each_format_out(api, origin, source):
    url = origin.url(f"/img/710.{source}")
    await stored(api, url)
    for fmt, pillow in (("jpeg", "JPEG"), ("png", "PNG"), ("webp", "WEBP"), ("avif", "AVIF")):
        response = await api("GET", image_path(url, w="24", format=fmt))
        assert response.code == 200, (fmt, response.body)
        assert response.headers["Content-Type"] == f"image/{fmt}"
        picture = opened(response.body)  # AVIF too: decoded back by Pillow
        assert picture.format == pillow and picture.width == 24, fmt
    # No format: the source's own.
    response = await api("GET", image_path(url, w="24"))
    assert opened(response.body).format == {"jpg": "JPEG"}.get(source, source.upper())


@pytest.mark.gen_test(timeout=60)
async def test_every_fit(api, origin):
    url = origin.url("/alpha.png")  # 40x30
    await stored(api, url)
    sizes = {}
    for fit in ("inside", "cover", "fill", "pad"):
        response = await api("GET", image_path(url, w="20", h="20", fit=fit, format="png", bg="ff0000"))
        assert response.code == 200, (fit, response.body)
        sizes[fit] = opened(response.body)
    assert sizes["inside"].size == (20, 15)
    assert sizes["cover"].size == sizes["fill"].size == sizes["pad"].size == (20, 20)
    assert sizes["pad"].convert("RGB").getpixel((10, 0)) == (255, 0, 0)  # the letterbox is bg
    assert sizes["cover"].convert("RGBA").getpixel((0, 10))[:3] == (0, 200, 0)  # the centre crop keeps the left half
    assert sizes["fill"].getpixel((19, 10))[3] == 0  # stretched: the transparent half is still there
    # Never upscaled without enlarge=1.
    assert opened((await api("GET", image_path(url, w="80", format="png"))).body).size == (40, 30)
    assert opened((await api("GET", image_path(url, w="80", format="png", enlarge="1"))).body).size == (80, 60)


@pytest.mark.gen_test(timeout=60)
@pytest.mark.parametrize("orientation", range(1, 9))
async def test_exif_orientation_is_applied_and_no_exif_is_kept(api, origin, orientation):
    url = origin.url(f"/oriented/{orientation}.jpg")
    await stored(api, url)
    response = await api("GET", image_path(url, w="20", format="jpeg"))
    picture = opened(response.body)
    red, blue = oriented_colours(orientation)
    width, height = picture.size
    assert (width, height) == ((20, 10) if orientation < 5 else (20, 40))
    spots = {"left": (2, height // 2), "right": (width - 3, height // 2), "top": (width // 2, 2),
             "bottom": (width // 2, height - 3)}
    r, _, b = picture.convert("RGB").getpixel(spots[red])
    assert r > 200 and b < 60, (orientation, "red", red)
    r, _, b = picture.convert("RGB").getpixel(spots[blue])
    assert b > 200 and r < 60, (orientation, "blue", blue)
    assert not picture.getexif() and "exif" not in picture.info and "icc_profile" not in picture.info


@pytest.mark.gen_test(timeout=60)
async def test_animation_is_dropped_by_default_and_kept_with_animated(api, origin):
    url = origin.url("/animated.webp?frames=3")  # three frames of different colours
    await stored(api, url)
    for fmt in ("webp", "gif"):
        still = opened((await api("GET", image_path(url, w="8", format=fmt))).body)
        assert getattr(still, "n_frames", 1) == 1
        moving = opened((await api("GET", image_path(url, w="8", format=fmt, animated="1"))).body)
        assert moving.n_frames == 3, fmt
    gif = origin.url("/animated.gif?frames=3")
    await stored(api, gif)
    assert getattr(opened((await api("GET", image_path(gif, w="4", format="png"))).body), "n_frames", 1) == 1


@pytest.mark.gen_test(timeout=60)
async def test_auto_picks_by_accept_and_says_vary(api, origin):
    url = origin.url("/img/720.jpg")
    await stored(api, url)
    for accept, expected in (("image/avif,image/webp,*/*", "image/avif"), ("image/webp,*/*", "image/webp"),
                             ("*/*", "image/jpeg")):
        response = await api("GET", image_path(url, w="16", format="auto"), headers={"Accept": accept})
        assert response.code == 200, response.body
        assert response.headers["Content-Type"] == expected
        assert response.headers["Vary"] == "Accept"


@pytest.mark.gen_test(timeout=60)
async def test_bad_parameters_and_missing_images(api, origin):
    url = origin.url("/img/730.jpg")
    result = await stored(api, url)
    for params, parameter in (({"w": "0"}, "w"), ({"fit": "squash", "w": "4", "h": "4"}, "fit"),
                              ({"format": "bmp"}, "format"), ({"q": "101"}, "q"), ({"bg": "red"}, "bg"),
                              ({"w": "5000"}, "w"), ({"variant": "nosuch"}, "variant"),
                              ({"animated": "1", "format": "jpeg"}, "animated")):
        response = await api("GET", image_path(url, **params))
        assert response.code == 400, params
        body = problem(response)
        assert body["parameter"] == parameter and parameter in body["detail"], body
    missing = await api("GET", image_path(origin.url("/img/731.jpg"), w="10"))
    assert missing.code == 404
    assert (await api("GET", f"/api/blobs/{'0' * 64}?w=10")).code == 404
    assert (await api("GET", f"/api/blobs/{result['sha256']}?w=x")).code == 400
    # Thousands of digits: int() refuses over 4,300 of them (a 500 before), and leading zeros still count
    # as the number they make.
    for parameter in ("w", "h", "q"):
        for path in (image_path(url, **{parameter: "9" * 5000}),
                     f"/api/blobs/{result['sha256']}?{parameter}={'1' * 5000}"):
            response = await api("GET", path)
            assert response.code == 400 and problem(response)["parameter"] == parameter, path[:80]
            assert "5000 digits" in problem(response)["detail"]
    assert (await api("GET", image_path(url, w="0" * 5000 + "8"))).code == 200


@pytest.mark.gen_test(timeout=60)
@pytest.mark.settings(variants="presets", variant_presets="thumb=w:16 h:16 fit:cover format:webp")
async def test_presets_only_refuses_free_parameters(api, origin):
    url = origin.url("/img/740.jpg")
    await stored(api, url)
    response = await api("GET", image_path(url, variant="thumb"))
    assert response.code == 200 and opened(response.body).size == (16, 16)
    refused = await api("GET", image_path(url, w="16"))
    assert refused.code == 400 and problem(refused)["parameter"] == "w"
    assert "presets" in problem(refused)["detail"]
    mixed = await api("GET", image_path(url, variant="thumb", q="50"))
    assert mixed.code == 400 and problem(mixed)["parameter"] == "q"


@pytest.mark.gen_test(timeout=60)
@pytest.mark.settings(variants_per_original=2, variant_max_pixels=400 * 400)
async def test_limits_name_the_limit(api, origin):
    url = origin.url("/photo/1.jpg?w=800&h=600")
    await stored(api, url)
    big = await api("GET", image_path(url, w="500"))
    assert big.code == 400 and "variant_max_pixels" in problem(big)["detail"]
    for width in ("10", "11"):
        assert (await api("GET", image_path(url, w=width))).code == 200
    third = await api("GET", image_path(url, w="12"))
    assert third.code == 400 and "variants_per_original" in problem(third)["detail"]
    assert (await api("GET", image_path(url, w="10"))).code == 200  # the stored ones are still served


@pytest.mark.gen_test(timeout=60)
@pytest.mark.settings(render_max_memory=1_000_000)
async def test_over_the_memory_estimate_is_422(api, origin):
    url = origin.url("/photo/2.jpg?w=800&h=600")
    await stored(api, url)
    response = await api("GET", image_path(url, w="700", format="png"))
    assert response.code == 422
    assert "render_max_memory" in problem(response)["detail"]
    # The answer is kept a moment for the same variant, without rendering again.
    assert (await api("GET", image_path(url, w="700", format="png"))).code == 422


@pytest.mark.gen_test(timeout=60)
@pytest.mark.settings(render_timeout=0.001)
async def test_a_render_past_its_time_is_503_with_retry_after(api, origin):
    url = origin.url("/photo/3.jpg?w=1600&h=1200")
    await stored(api, url)
    response = await api("GET", image_path(url, w="1500", format="avif"))
    assert response.code == 503
    assert int(response.headers["Retry-After"]) >= 1
    assert "render_timeout" in problem(response)["detail"]


@pytest.mark.gen_test(timeout=60)
async def test_a_variant_known_to_the_process_whose_source_was_deleted_and_stored_again_is_made_again(api, origin,
                                                                                                     services):
    url = origin.url("/img/770.jpg")
    await stored(api, url)
    first = await api("GET", image_path(url, w="12", format="webp"))
    assert first.code == 200
    assert (await api("DELETE", image_path(url))).code == 204  # the variant's blob goes with its source
    await stored(api, url)
    again = await api("GET", image_path(url, w="12", format="webp"))
    assert again.code == 200 and again.body == first.body
    assert services.variants.renders == 2


@pytest.mark.gen_test(timeout=60)
async def test_variants_are_made_of_originals_and_not_of_variants(api, origin, services):
    """Each original makes at most variants_per_original variants. A variant's digest serves its bytes, but
    variant parameters on it are a 400: each level of variants of variants would bring an allowance of its
    own, and a read key could make variants without bound by asking one level deeper each time."""
    url = origin.url("/img/780.jpg")
    await stored(api, url)
    first = await api("GET", image_path(url, w="20", format="webp"))
    assert first.code == 200, first.body
    variant = first.headers["ETag"].strip('"')
    assert (await api("GET", f"/api/blobs/{variant}")).body == first.body
    for query in ("w=10", "format=png", "w=10&format=webp"):
        refused = await api("GET", f"/api/blobs/{variant}?{query}")
        assert refused.code == 400, (query, refused.body)
        assert problem(refused)["parameter"] == "digest" and "originals only" in problem(refused)["detail"]
    assert services.variants.renders == 1
    redis, keys = services.index.redis, services.index.keys
    assert await redis.exists(keys.variants(variant)) == 0

    # Stored from a URL of its own, the same bytes are an original as well, and variants are made of them.
    copy = origin.url("/file/variant-780.webp")
    origin.files["variant-780.webp"] = (first.body, "image/webp")
    assert (await stored(api, copy))["sha256"] == variant
    made = await api("GET", f"/api/blobs/{variant}?w=10")
    assert made.code == 200 and opened(made.body).width == 10
    # That URL gone, they are a variant only again: what was made of them is served, nothing more is made.
    assert (await api("DELETE", image_path(copy))).code == 204
    assert (await api("GET", f"/api/blobs/{variant}?w=10", headers={"Cache-Control": "no-cache"})).body == made.body
    assert (await api("GET", f"/api/blobs/{variant}?w=11")).code == 400
    assert services.variants.renders == 2

    # The original's last URL takes both levels, and their counts of relation references.
    assert (await api("DELETE", image_path(url))).code == 204
    for digest in (variant, made.headers["ETag"].strip('"')):
        assert (await api("GET", f"/api/blobs/{digest}")).code == 404
    assert [key async for key in redis.scan_iter(match=keys.variant_refs("") + "*")] == []


def variant_schemas(document: dict[str, Any]) -> list[dict[str, Any]]:
    """The variant parameter's schema in every operation that takes it."""
    return [param["schema"] for path in ("/api/image", "/api/blobs/{digest}")
            for operation in document["paths"][path].values()
            for param in operation.get("parameters", []) if param["name"] == "variant"]


@pytest.mark.gen_test(timeout=60)
@pytest.mark.settings(variant_presets="thumb=w:16 h:16 fit:cover format:webp; hero=w:1600 format:auto")
async def test_openapi_lists_the_configured_presets(api):
    schemas = variant_schemas(json.loads((await api("GET", "/openapi.json", key=None)).body))
    assert len(schemas) == 4  # GET and HEAD, by URL and by digest
    assert all(schema["enum"] == ["thumb", "hero"] for schema in schemas)


@pytest.mark.gen_test(timeout=60)
@pytest.mark.settings(variants="off")
async def test_openapi_lists_no_presets_when_variants_are_off(api):
    schemas = variant_schemas(json.loads((await api("GET", "/openapi.json", key=None)).body))
    assert schemas and all("enum" not in schema for schema in schemas)
