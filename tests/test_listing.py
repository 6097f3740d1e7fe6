"""The listing through `casimg serve` as an operator runs it, on its embedded Redis: the newest-first order,
including on a store written before that order existed (the start's migration places its URLs), and the
filters."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from urllib.parse import urljoin

import pytest

from casimg.embedded import EmbeddedRedis
from tests.procs import Server, embedded_client, image_urls


@pytest.fixture
def data_dir(tmp_path: Path):
    directory = tmp_path / "data"
    yield directory
    embedded = EmbeddedRedis(directory)
    if embedded.alive():
        embedded.stop()


def walk(server: Server, path: str) -> tuple[list[dict], list[str]]:
    """Every image of a listing, following Link: rel=next, and the Link headers seen."""
    images, links = [], []
    while path:
        status, body, headers = server.call("GET", path)
        assert status == 200, body
        images += json.loads(body)
        link = headers.get("Link")
        if link:
            links.append(link)
        path = urljoin(path, link[1:link.index(">")]) if link else ""
    return images, links


def test_a_store_from_before_the_newest_first_order_is_listed_newest_first_after_a_restart(data_dir, origin):
    server = Server(data_dir)
    urls = image_urls(origin, 6, start=300)
    try:
        for url in urls[:3]:  # one job after another: stored in this order
            server.submit([url])
        server.submit(urls[3:])
        # Drop the order and its migration record: the store is then exactly as a casimg without the
        # newest-first order left it (URL buckets, blob records, counts).
        client = embedded_client(data_dir)
        client.delete(*client.keys("casimg:recent*"), "casimg:migrations")
        client.close()
    finally:
        assert server.terminate() == 0
    again = Server(data_dir)  # its start places the six URLs
    try:
        images, links = walk(again, "/api/images?order=recent&limit=4")
        assert sorted(image["url"] for image in images) == sorted(urls)
        keys = [(image["stored_at"], hashlib.sha1(image["url"].encode()).hexdigest()) for image in images]
        assert keys == sorted(keys, reverse=True)
        assert [image["url"] for image in images[-3:]] == urls[:3][::-1]
        assert len(links) == 1
        assert re.fullmatch(r'<\?limit=4&order=recent&cursor=r\.[0-9a-f]{52}>; rel="next"', links[0])
        default, links = walk(again, "/api/images?limit=4")  # the default order and its cursor are as before
        assert [image["url"] for image in default] == sorted(urls, key=lambda u: hashlib.sha1(u.encode()).hexdigest())
        assert re.fullmatch(r'<\?limit=4&cursor=[0-9a-f]{40}>; rel="next"', links[0])
        # Filters through the same server, in either order, following the Links that carry them.
        for order in ("", "&order=recent"):
            found, _ = walk(again, f"/api/images?limit=1{order}&contains=30&host=127.0.0.1")
            assert sorted(image["url"] for image in found) == sorted(u for u in urls if "30" in u)
        assert walk(again, "/api/images?order=recent&host=localhost")[0] == []
        assert again.call("DELETE", f"/api/image?url={urls[0]}")[0] == 204
        assert [image["url"] for image in walk(again, "/api/images?order=recent")[0]][-2:] == [urls[2], urls[1]]
    finally:
        assert again.terminate() == 0
