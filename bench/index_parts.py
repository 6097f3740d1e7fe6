"""The index's parts at one size, and the listing's filters: each part's Redis bytes per URL, what a
placeholder per content and a digest -> URLs reverse lookup would add, and each filter's page latency
and longest Redis call, both orders.

    .venv/bin/python -m bench.index_parts fill --urls 1000000 --work /tmp/casimg-parts
    .venv/bin/python -m bench.index_parts filters --work /tmp/casimg-parts

``fill`` indexes the URLs through casimg's Index.store (bench.listing's URLs: 80 characters, one digest
each, over 16 hosts here), prints the memory table, then the simulations, and saves the Redis to the work
directory; ``filters`` starts a Redis on that save and a casimg on it and times the filtered listings.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import http.client
import json
import re
import statistics
import time
import urllib.parse
from pathlib import Path

import redis

from bench import log
from bench.listing import fill_index
from bench.memory import index_memory, redis_used_memory
from bench.procs import Procs
from bench.stack import start_casimg, start_redis

PLACEHOLDER = "x" * 44  # a ThumbHash in base64: 25-35 bytes raw, 36-48 characters (casimg/placeholder.py)


def parts(redis_url: str, size: int, base: int) -> dict[str, float]:
    """Bytes per URL of each part, and the total from INFO memory."""
    found = index_memory(redis_url, size)
    found["total"] = (redis_used_memory(redis_url) - base) / size
    return found


def simulate_placeholders(redis_url: str, size: int) -> float:
    """Bytes per URL that a placeholder in each URL's value adds (as the listing would carry it), measured
    by appending one to every value and taking it off again."""
    from casimg.schema import BUCKETS, KeySpace

    keys, client = KeySpace(), redis.Redis.from_url(redis_url, decode_responses=True)
    before = redis_used_memory(redis_url)
    for suffix, strip in ((" " + PLACEHOLDER, False), ("", True)):
        for bucket in BUCKETS:
            entries = client.hgetall(keys.url(bucket))
            if not entries:
                continue
            if strip:
                changed = {url: value[:-len(PLACEHOLDER) - 1] for url, value in entries.items()}
            else:
                changed = {url: value + suffix for url, value in entries.items()}
            client.hset(keys.url(bucket), mapping=changed)
        if not strip:
            added = (redis_used_memory(redis_url) - before) / size
    client.close()
    return added


def simulate_reverse(redis_url: str, size: int) -> dict[str, float]:
    """Bytes per URL of a digest -> URLs lookup: hashes named by the digest's first 3 hex digits, raw digest
    -> the URLs (here one each, as bench.listing gives each URL its own content); measured, then deleted."""
    from bench.listing import list_url

    client = redis.Redis.from_url(redis_url)
    before = redis_used_memory(redis_url)
    with client.pipeline(transaction=False) as pipe:
        for number in range(size):
            digest = hashlib.sha256(number.to_bytes(8, "big")).digest()
            pipe.hset(b"bench-rev:" + digest.hex()[:3].encode(), digest, list_url(number))
            if number % 20_000 == 19_999:
                pipe.execute()
        pipe.execute()
    added = (redis_used_memory(redis_url) - before) / size
    names = [f"bench-rev:{n:03x}" for n in range(4096)]
    client.delete(*names)
    client.close()
    return {"reverse": added}


def fill(work: Path, urls: int) -> None:
    procs = Procs()
    try:
        _, redis_url = start_redis(procs, work / "redis", persistent=False)
        base = redis_used_memory(redis_url)
        started = time.monotonic()
        asyncio.run(fill_index(redis_url, 0, urls))
        log(f"filled {urls:,} URLs in {time.monotonic() - started:.0f} s")
        found = parts(redis_url, urls, base)
        found["placeholder"] = simulate_placeholders(redis_url, urls)
        found |= simulate_reverse(redis_url, urls)
        print(json.dumps({"urls": urls, **{k: round(v, 1) for k, v in found.items()}}))
        redis.Redis.from_url(redis_url).save()
    finally:
        procs.stop_all()


# -- filters --------------------------------------------------------------------------------------

def slowest_call_ms(client: redis.Redis) -> float:
    """The longest command Redis ran since the last reset, from its slow log (set to log every command)."""
    entries = client.slowlog_get(128)
    return max((entry["duration"] for entry in entries), default=0) / 1000


def time_backfill(redis_url: str) -> None:
    """The migration of an index from before the newest-first order: the order dropped, then rebuilt by
    migrate.backfill_recent as a process start runs it; its time and its longest Lua call."""
    from casimg.migrate import backfill_recent
    from casimg.schema import KeySpace
    from casimg.services import connect_redis

    keys, client = KeySpace(), redis.Redis.from_url(redis_url)
    for leaf in list(client.scan_iter(keys.recent_leaf("*"), count=1000)):
        client.delete(leaf)
    client.delete(keys.recent, keys.migrations)
    client.config_set("slowlog-log-slower-than", 1000)
    client.config_set("slowlog-max-len", 1024)
    client.slowlog_reset()

    async def run() -> int:
        index_client = connect_redis(redis_url, 2)
        try:
            return await backfill_recent(index_client, keys)
        finally:
            await index_client.aclose()

    started = time.monotonic()
    added = asyncio.run(run())
    calls = sorted(entry["duration"] / 1000 for entry in client.slowlog_get(1024))
    print(f"backfill: {added:,} URLs placed in {time.monotonic() - started:.1f} s; calls over 1 ms: {len(calls)}, "
          f"p50 of those {statistics.median(calls) if calls else 0:.1f} ms, longest {max(calls, default=0):.1f} ms")
    client.close()


def filters(work: Path, queries: list[str], pages: int, backfill: bool) -> None:
    procs = Procs()
    try:
        _, redis_url = start_redis(procs, work / "redis", persistent=False)  # loads the fill's save
        client = redis.Redis.from_url(redis_url)
        urls = int(client.hget("casimg:count", "urls") or 0)
        if backfill:
            time_backfill(redis_url)
        client.hset("casimg:migrations", "recent", 1)  # the fill placed every URL: no migration at start
        server = start_casimg(procs, work / "data", redis_url, workers=False)
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
        client.config_set("slowlog-log-slower-than", 0)
        client.config_set("slowlog-max-len", 128)
        print(f"| query | {urls:,} URLs: pages walked | rows | page p50 ms | page max ms | longest Redis call ms |")
        print("|---|---|---|---|---|---|")
        for query in queries:
            target: str | None = f"/api/images?{query}"
            times, calls, rows = [], [], 0
            for _ in range(pages):
                if target is None:
                    break
                client.slowlog_reset()
                started = time.perf_counter()
                connection.request("GET", target, headers={"X-API-Key": server.key})
                response = connection.getresponse()
                body = response.read()
                times.append((time.perf_counter() - started) * 1000)
                calls.append(slowest_call_ms(client))
                assert response.status == 200, body
                rows += len(json.loads(body))
                link = response.getheader("Link")
                reference = re.match(r"<([^>]+)>", link).group(1) if link else None  # type: ignore[union-attr]
                target = urllib.parse.urljoin(target, reference) if reference else None
            print(f"| `{query}` | {len(times)} | {rows} | {statistics.median(times):.1f} | {max(times):.1f} | "
                  f"{max(calls):.2f} |")
    finally:
        procs.stop_all()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=["fill", "filters"])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--urls", type=int, default=1_000_000)
    parser.add_argument("--pages", type=int, default=20, help="pages walked per filtered listing")
    parser.add_argument("--query", action="append", help="listing queries to time (repeatable)")
    parser.add_argument("--backfill", action="store_true", help="first drop the newest-first order and time "
                                                               "its rebuild by the start's migration")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.step == "fill":
        fill(args.work, args.urls)
    else:
        filters(args.work, args.query or DEFAULT_QUERIES, args.pages, args.backfill)


# bench.listing's URLs are all on images.example.com, numbered 0..N-1 in their path: a host that matches
# all, one that matches none (the worst case: every page looks at its whole budget), a prefix that matches
# 1% (numbers 0..9,999 of 1,000,000), a substring in every URL and one in none.
_FILTERS = ["", "&host=images.example.com", "&host=nowhere.example",
            "&prefix=" + urllib.parse.quote("https://images.example.com/photos/2026/11/0000", safe=""),
            "&contains=-original", "&contains=nowhere"]
DEFAULT_QUERIES = [f"limit=100{order}{where}" for where in _FILTERS for order in ("", "&order=recent")]

if __name__ == "__main__":
    main()
