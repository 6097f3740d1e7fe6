"""Politeness to origins: the X-Robots-Tag grammar, robots.txt, and the per-origin rate and cool-downs."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from casimg.errors import DownloadFailed
from casimg.fetcher import Fetcher
from casimg.index import KeySpace
from casimg.politeness import Robots, opted_out
from casimg.services import connect_redis
from tests.origin import Origin
from tests.test_fetcher import started

REFUSED = ("noimageindex", "noai", "noimageai")


def test_x_robots_tag_directives_are_read_per_robot():
    assert opted_out(["noai"], REFUSED) == "noai"
    assert opted_out(["noindex , NOIMAGEAI"], REFUSED) == "noimageai"
    assert opted_out(["casimg: noimageindex"], REFUSED) == "noimageindex"
    assert opted_out(["otherbot: noai, noimageai"], REFUSED) is None
    assert opted_out(["otherbot: noindex", "noai"], REFUSED) == "noai"  # each header value starts anew
    assert opted_out(["max-image-preview: none, noai"], REFUSED) == "noai"  # a valued directive, not a robot
    assert opted_out(["unavailable_after: 25 Jun 2030 15:00:00 PST"], REFUSED) is None
    assert opted_out(["noai"], ()) is None
    assert opted_out([], REFUSED) is None


# -- robots.txt -------------------------------------------------------------------------------------

@contextlib.asynccontextmanager
async def polite_fetchers(tmp_path: Path, redis_server: Any, count: int = 1, robots_timeout: float = 5.0
                          ) -> AsyncIterator[list[Fetcher]]:
    """`count` fetchers obeying robots.txt through one Redis, as `count` processes would."""
    client = connect_redis(redis_server.url, 16)
    keys = KeySpace(f"polite-{os.urandom(4).hex()}:")
    fetchers = []
    try:
        for _ in range(count):
            fetcher = await started(tmp_path, robots_timeout=robots_timeout)
            fetcher.robots = Robots(client, keys, fetcher.fetch_robots, ttl=60.0, fetch_timeout=robots_timeout)
            fetchers.append(fetcher)
        yield fetchers
    finally:
        for fetcher in fetchers:
            await fetcher.close()
        await client.aclose()


async def reasons(fetcher: Fetcher, urls: list[str]) -> list[str]:
    async def one(url: str) -> str:
        try:
            await fetcher.fetch(url)
            return "ok"
        except DownloadFailed as failed:
            return failed.reason
    return list(await asyncio.gather(*(one(url) for url in urls)))


@pytest.mark.gen_test
async def test_robots_txt_is_obeyed_and_fetched_once_for_every_process(tmp_path, redis_server):
    with Origin() as origin:
        origin.robots_txt = "User-agent: *\nDisallow: /img/1\n\nUser-agent: otherbot\nDisallow: /\n"
        async with polite_fetchers(tmp_path, redis_server, count=2) as (first, second):
            urls = [origin.url(f"/img/{n}.jpg") for n in (1, 2, 3, 10, 4)]
            assert await reasons(first, urls) == ["disallowed by robots.txt", "ok", "ok",
                                                  "disallowed by robots.txt", "ok"]
            assert await reasons(second, urls[:2]) == ["disallowed by robots.txt", "ok"]
        assert origin.hits["/robots.txt"] == 1
        assert origin.hits["/img/1.jpg"] == origin.hits["/img/10.jpg"] == 0
        assert origin.agents["/robots.txt"].startswith("casimg/")


@pytest.mark.gen_test
async def test_a_group_for_casimg_overrides_the_one_for_every_robot(tmp_path, redis_server):
    with Origin() as origin:
        origin.robots_txt = "User-agent: *\nDisallow: /\n\nUser-agent: casimg\nDisallow: /img/5\n"
        async with polite_fetchers(tmp_path, redis_server) as (fetcher,):
            assert await reasons(fetcher, [origin.url("/img/5.jpg"), origin.url("/img/6.jpg")]) == \
                ["disallowed by robots.txt", "ok"]


@pytest.mark.gen_test
async def test_a_missing_robots_txt_allows_everything(tmp_path, redis_server):
    with Origin() as origin:  # robots_txt None: a 404
        async with polite_fetchers(tmp_path, redis_server) as (fetcher,):
            assert await reasons(fetcher, [origin.url("/img/7.jpg"), origin.url("/img/8.jpg")]) == ["ok", "ok"]
        assert origin.hits["/robots.txt"] == 1


@pytest.mark.gen_test
async def test_an_unreachable_robots_txt_disallows_the_origin_for_a_while(tmp_path, redis_server):
    with Origin() as failing, Origin() as stalling:
        failing.robots_txt, failing.robots_status = "User-agent: *\nAllow: /\n", 503
        stalling.robots_stall = 3.0
        async with polite_fetchers(tmp_path, redis_server, robots_timeout=0.5) as (fetcher,):
            assert await reasons(fetcher, [failing.url("/img/9.jpg")] * 2) == \
                ["disallowed by robots.txt (robots.txt unreachable: HTTP 503)"] * 2
            assert await reasons(fetcher, [stalling.url("/img/9.jpg")]) == \
                ["disallowed by robots.txt (robots.txt unreachable: timeout)"]
        assert failing.hits["/robots.txt"] == stalling.hits["/robots.txt"] == 1
        assert failing.hits["/img/9.jpg"] == stalling.hits["/img/9.jpg"] == 0
