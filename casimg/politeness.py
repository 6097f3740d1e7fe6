"""Politeness to origins: what an origin's owner asks of casimg, and how often casimg may ask it.

- **robots.txt** (``Robots``, RFC 9309): fetched once per origin (scheme, host and port) through the
  download path itself (the address guard but not the caps, ``Fetcher.fetch_robots``: at most
  ``ROBOTS_MAX_BYTES``, ``ROBOTS_REDIRECTS`` redirects, a short time limit), kept in Redis for every
  process for ``robots_ttl`` seconds (``KeySpace.robots``: the file's text, already capped in size) and
  parsed with Protego, the parser Scrapy uses; the group for casimg's token is obeyed, else ``*``.
  A 4xx (the file is unavailable) allows everything. A 5xx, a timeout or no connection (unreachable)
  disallows everything, as RFC 9309 2.3.1.4 asks, but only for ``ROBOTS_UNREACHABLE_TTL`` seconds:
  then the file is asked for again. A process asks for one origin's file once, whatever the number of
  downloads that want it at the same moment (one future per origin), and across processes the first
  to claim ``KeySpace.robots_claim`` fetches while the others wait for its answer in Redis (up to the
  fetch's time limit, after which they fetch themselves). A parsed file is reused in the process for
  ``ROBOTS_LOCAL_TTL`` seconds without asking Redis. A common file is parsed off the event loop, in the
  process's one robots thread (a few ms), and matched on the loop (well under a millisecond a URL). A
  file over ``ROBOTS_HEAVY_BYTES`` (500 KiB of rules took about a second to parse and 54 ms to match one
  long URL) is parsed and matched in a robots process of its own (``HeavyRules``, a one-worker
  render_pool.RenderPool started when the first such file comes): in a thread, its work contended with the
  loop for the GIL, and a GET of another client's image took seconds. An origin's hostile file then slows
  its own URLs and those of other origins with heavy files, queued behind each other for that process
  (those held past their time budget fail as "timeout"; a match past ``ROBOTS_MATCH_TIMEOUT`` disallows
  the URL and restarts the process), and nobody else's.
- **A request rate per origin** (``OriginPace``), shared by every process: a token bucket in Redis per
  origin (``KeySpace.origin_rate``; lua/rate_take.lua, the API keys' bucket), refilled at ``origin_rate``
  requests a second up to ``origin_burst``. An origin is a registrable domain (scheduler.
  registrable_domain: ``a.example.co.uk`` and ``b.example.co.uk`` share one bucket), or for a numeric
  host its address (an IPv6 /64). A name is not resolved to count its address too: that would cost a
  lookup before the token, and the per-address cap of scheduler.OriginCaps bounds it per process.
  Only the URL's first request is paced; redirects it follows are not.
- **Cool-downs** (``OriginPace.cool``): a 429 or 503 makes the whole origin wait, in every process
  (``KeySpace.origin_cool``, a key with a TTL, checked by the same script that takes a token). The wait
  doubles at each cool-down in a row (``KeySpace.origin_backoff`` counts them, forgotten after a quiet
  spell), half of it random so that workers do not come back together, from ``origin_backoff`` up to
  ``origin_backoff_max``, and never shorter than the origin's Retry-After (within the same ceiling).
  The 429s of requests that were in flight when a cool-down began do not lengthen it. A process asks
  about an origin's cool-down only when it refills the origin's lease (at most once per
  ``ORIGIN_LEASE_LIFE``; with the rate off a lease is of unlimited tokens, and the refill is one PTTL),
  and remembers a wait it was given until it ends: a cool-down started by another process reaches this
  one within a lease's life.
- **Opt-out headers** (``opted_out``): an ``X-Robots-Tag`` naming one of the refused directives
  (``noimageindex``, ``noai``, ``noimageai`` by default), for every robot or for casimg's token, fails the
  download before its body is read.

A URL waiting for its origin holds no download slot (it steps away, scheduler.FairSlots.step_away), so
other keys and other origins download meanwhile; in one process a single waiter per origin asks Redis, the others queue
behind it.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import hashlib
import math
import random
import time
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import redis.asyncio as aioredis
from protego import Protego
from yarl import URL

from casimg.errors import RenderTimeout, Unavailable
from casimg.limits import LEASE_SECONDS, Lease
from casimg.lua import source as lua_source
from casimg.render_pool import RenderPool
from casimg.scheduler import origin_address, registrable_domain
from casimg.schema import KeySpace

ROBOTS_MAX_BYTES = 500 * 1024  # RFC 9309 2.5: a parser must read at least the first 500 KiB; the rest is cut
ROBOTS_REDIRECTS = 5  # RFC 9309 2.3.1.2: follow at least five consecutive redirects
ROBOTS_TIMEOUT = 10.0  # seconds for the whole fetch of one robots.txt, redirects included
# An unreachable robots.txt (5xx, timeout, no connection) disallows the whole origin this long, then it is
# fetched again: long enough that a down origin is not asked for it at every URL, short enough that a
# restart of the origin costs its images minutes, not the hours a good file is kept.
ROBOTS_UNREACHABLE_TTL = 300.0
ROBOTS_LOCAL_TTL = 60.0  # seconds a process reuses a parsed file before looking in Redis again
ROBOTS_LOCAL_SIZE = 4096  # origins whose parsed file a process keeps at most
ROBOTS_POLL = 0.1  # seconds between looks in Redis while another process fetches an origin's file
# A file larger than this is parsed and matched in the robots process rather than in this one: about 450
# common rules, 0.3 ms a URL. 500 KiB of rules took 54 ms a URL, and parsing them 0.7 s.
ROBOTS_HEAVY_BYTES = 16 * 1024
# Seconds one call in the robots process may take: a parse of the largest file allowed (ROBOTS_MAX_BYTES) and
# one match, with room for a slow machine. Past it the URL is disallowed and the process started again.
ROBOTS_MATCH_TIMEOUT = 10.0
ROBOTS_PARSED_KEPT = 64  # heavy files the robots process keeps parsed, the least recently used going first
# KEYS: cool-down, bucket   ARGV: rate burst want  ->  {tokens taken, 0}, else {0, ms to wait}
PACE_LUA = """
local cooling = redis.call('PTTL', KEYS[1])
if cooling > 0 then return {0, cooling} end
""" + lua_source("rate_take").replace("KEYS[1]", "KEYS[2]")

# KEYS: cool-down, streak   ARGV: first_ms ceiling_ms retry_after_ms jitter (0 to 1) STREAK_MEMORY
#   ->  ms the origin cools for
COOL_LUA = """
local left = redis.call('PTTL', KEYS[1])
if left > 0 then return left end
local streak = redis.call('INCR', KEYS[2])
local first, ceiling = tonumber(ARGV[1]), tonumber(ARGV[2])
local wait = math.min(ceiling, first * 2 ^ (streak - 1))
wait = math.floor(wait / 2 + wait / 2 * tonumber(ARGV[4]))
wait = math.max(1, wait, math.min(ceiling, tonumber(ARGV[3])))
redis.call('SET', KEYS[1], streak, 'PX', wait)
redis.call('PEXPIRE', KEYS[2], wait * tonumber(ARGV[5]))
return wait
"""
# A streak of cool-downs is forgotten once the origin has gone this many times its last cool-down without
# another: a 429 right after a cool-down doubles the next one, one an hour later starts again from the first.
STREAK_MEMORY = 4
COOLING_STATUSES = frozenset({429, 503})
LEASES_KEPT = 4096  # origins whose lease a process keeps at most; past it they are all dropped
# How long an origin's leased tokens stay spendable. Not limits.LEASE_SECONDS (50 ms): a lease is as many
# tokens as LEASE_SECONDS of the rate, and it is its size (one lease at a time per process and origin)
# that bounds what a process can spend above the rate, so a longer life costs no accuracy. A 50 ms life
# made a lease last a few URLs when a fast origin's URLs come from eight origins at once (the
# benchmark's): the Redis trip of every second or third URL took a tenth of the event loop's time
# (BENCHMARKS.md, "Politeness"). What a longer life does cost: another process's lease may still send up
# to its size of requests (with the rate off: a second's worth) into a cool-down that began meanwhile.
ORIGIN_LEASE_LIFE = 1.0
UNLIMITED = 2**62  # the tokens of a lease when the rate is off (only cool-downs are checked)
PACE_POLL_SLACK = 0.005  # seconds added to each wait for a token, so the retry finds the token there

ROBOTS_TOKEN = "casimg"  # the product token matched against robots.txt groups and X-Robots-Tag prefixes
# X-Robots-Tag directives that carry a value after a colon: their colon is not a user-agent prefix.
VALUED_DIRECTIVES = frozenset({"unavailable_after", "max-snippet", "max-image-preview", "max-video-preview"})


def opted_out(values: Iterable[str], refused: Iterable[str], token: str = ROBOTS_TOKEN) -> str | None:
    """The first refused directive that the X-Robots-Tag header `values` set for casimg, else None.

    Each value is a comma-separated list of directives, optionally after a user-agent prefix
    (``casimg: noai, noimageai``) that applies to the directives after it in that value; directives
    without a prefix are for every robot, those after another robot's prefix are not casimg's.
    """
    wanted = {directive.strip().lower() for directive in refused}
    if not wanted:
        return None
    for value in values:
        agent: str | None = None
        for part in value.split(","):
            directive = part.strip().lower()
            name, colon, rest = directive.partition(":")
            if colon and name.strip() not in VALUED_DIRECTIVES:
                agent, directive = name.strip(), rest.strip()
            if agent not in (None, token):
                continue
            if directive in wanted:
                return directive
    return None


@dataclass(frozen=True)
class RobotsFile:
    """What fetching an origin's robots.txt gave: ``rules`` (its text), ``allow`` (4xx: no rules) or
    ``unreachable`` (its text says why: ``HTTP 503``, ``timeout``, ...; everything is disallowed)."""

    kind: str
    text: str = ""

    def encode(self) -> str:
        """The Redis form: the kind's initial, then the text."""
        return self.kind[0] + self.text

    @classmethod
    def decode(cls, raw: str) -> RobotsFile:
        kind = {"r": "rules", "a": "allow", "u": "unreachable"}.get(raw[:1], "allow")
        return cls(kind, raw[1:])


@dataclass(frozen=True)
class HeavyRules:
    """An origin's robots.txt over ``ROBOTS_HEAVY_BYTES``, parsed and matched in the robots process only:
    `name` (the SHA-256 of `text`) is what that process keeps it parsed under."""

    name: str
    text: str


Verdict = Protego | HeavyRules | str | None  # rules, the reason everything is disallowed, or None: all allowed


class Robots:
    """robots.txt per origin for every download of a process (see the module docstring)."""

    def __init__(self, redis: aioredis.Redis, keys: KeySpace, get: Callable[[str], Awaitable[RobotsFile]],
                 ttl: float, token: str = ROBOTS_TOKEN, fetch_timeout: float = ROBOTS_TIMEOUT) -> None:
        self.redis = redis
        self.keys = keys
        self.get = get
        self.ttl = ttl
        self.token = token
        self.fetch_timeout = fetch_timeout
        self._local: dict[str, tuple[float, Verdict]] = {}
        self._loading: dict[str, asyncio.Future[Verdict]] = {}
        # One thread for the common files' parse: a few ms each, contending with the loop for the GIL.
        self._thread: ThreadPoolExecutor | None = None
        self._process: RenderPool | None = None  # for the heavy files, started with the first one
        self._starting: asyncio.Future[None] | None = None

    def _in_thread(self, call: Callable[..., Any], *args: Any) -> Awaitable[Any]:
        if self._thread is None:
            self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="casimg-robots")
        return asyncio.get_running_loop().run_in_executor(self._thread, call, *args)

    def close(self) -> None:
        if self._thread is not None:
            self._thread.shutdown(wait=False, cancel_futures=True)
            self._thread = None
        if self._process is not None:
            self._process.close()
            self._process = None

    async def refusal(self, url: URL) -> str | None:
        """None if robots.txt lets casimg fetch `url`, else the failure reason."""
        verdict = await self._verdict(str(url.origin()))
        if verdict is None:
            return None
        if isinstance(verdict, str):
            return f"disallowed by robots.txt (robots.txt unreachable: {verdict})"
        if isinstance(verdict, HeavyRules):
            try:
                allowed = await self._match_heavy(verdict, str(url))
            except RenderTimeout:
                return f"disallowed by robots.txt (matching it took over {ROBOTS_MATCH_TIMEOUT:g} s)"
            except Unavailable:  # the robots process died twice, or is closed: this process is stopping
                return "disallowed by robots.txt (the robots process is not running)"
        else:
            allowed = verdict.can_fetch(str(url), self.token)
        return None if allowed else "disallowed by robots.txt"

    async def _match_heavy(self, rules: HeavyRules, url: str) -> bool:
        """``can_fetch`` in the robots process. The file's text goes there only when that process does not
        have it parsed already (its first URL, or a process started again since)."""
        pool = await self._robots_process()
        allowed = await pool.run(match_heavy, rules.name, None, url, self.token, time_limit=ROBOTS_MATCH_TIMEOUT)
        if allowed is None:
            allowed = await pool.run(match_heavy, rules.name, rules.text, url, self.token,
                                     time_limit=ROBOTS_MATCH_TIMEOUT)
        return bool(allowed)

    async def _robots_process(self) -> RenderPool:
        """The robots process, started (in a thread: a fork from the forkserver) by the first caller."""
        if self._process is None:
            self._process = RenderPool(1, ROBOTS_MATCH_TIMEOUT, max_memory=0)
        if not self._process.started:
            if self._starting is None or self._starting.done():
                self._starting = asyncio.ensure_future(asyncio.to_thread(self._process.start))
            await asyncio.shield(self._starting)
        return self._process

    async def _verdict(self, origin: str) -> Verdict:
        cached = self._local.get(origin)
        if cached is not None and cached[0] > time.monotonic():
            return cached[1]
        loading = self._loading.get(origin)
        if loading is None:
            loading = self._loading[origin] = asyncio.ensure_future(self._load(origin))
            loading.add_done_callback(lambda _: self._loading.pop(origin, None))
        # Shielded: a download that is cancelled must not cancel the answer the others wait for.
        return await asyncio.shield(loading)

    async def _load(self, origin: str) -> Verdict:
        key = self.keys.robots(quote(origin, safe=""))
        raw = await self.redis.get(key)
        if raw is None:
            raw = await self._fetch_once(origin, key)
        found = RobotsFile.decode(raw)
        verdict = await self._in_thread(_verdict_of, found) if found.kind == "rules" else _verdict_of(found)
        if len(self._local) >= ROBOTS_LOCAL_SIZE:
            now = time.monotonic()
            self._local = {name: held for name, held in self._local.items() if held[0] > now}
            if len(self._local) >= ROBOTS_LOCAL_SIZE:
                self._local.clear()
        self._local[origin] = (time.monotonic() + min(ROBOTS_LOCAL_TTL, self.ttl), verdict)
        return verdict

    async def _fetch_once(self, origin: str, key: str) -> str:
        """The file, fetched by this process if it claims the origin first, else by the claimant."""
        claim_ms = int((self.fetch_timeout + 1) * 1000)
        if not await self.redis.set(self.keys.robots_claim(quote(origin, safe="")), "1", nx=True, px=claim_ms):
            deadline = time.monotonic() + claim_ms / 1000
            while time.monotonic() < deadline:
                await asyncio.sleep(ROBOTS_POLL)
                raw = await self.redis.get(key)
                if raw is not None:
                    return str(raw)
        found = await self.get(origin + "/robots.txt")
        ttl = self.ttl if found.kind != "unreachable" else min(self.ttl, ROBOTS_UNREACHABLE_TTL)
        raw = found.encode()
        await self.redis.set(key, raw, px=max(1, int(ttl * 1000)))
        return raw


def _verdict_of(found: RobotsFile) -> Verdict:
    if found.kind == "unreachable":
        return found.text or "unreachable"
    if found.kind == "allow" or not found.text.strip():
        return None
    if len(found.text) > ROBOTS_HEAVY_BYTES:
        return HeavyRules(hashlib.sha256(found.text.encode()).hexdigest(), found.text)
    return Protego.parse(found.text)


_parsed_here: collections.OrderedDict[str, Protego] = collections.OrderedDict()  # in the robots process


def match_heavy(name: str, text: str | None, url: str, token: str) -> bool | None:
    """In the robots process: whether the file `name` lets `token` fetch `url`; None when this process has
    not parsed that file and `text` was not sent."""
    parsed = _parsed_here.get(name)
    if parsed is None:
        if text is None:
            return None
        parsed = _parsed_here[name] = Protego.parse(text)
        while len(_parsed_here) > ROBOTS_PARSED_KEPT:
            _parsed_here.popitem(last=False)
    _parsed_here.move_to_end(name)
    return bool(parsed.can_fetch(url, token))


class OriginPace:
    """The request rate and the cool-downs of every origin, shared through Redis (see the module docstring)."""

    def __init__(self, redis: aioredis.Redis, keys: KeySpace, rate: float, burst: int, backoff: float,
                 backoff_max: float) -> None:
        self.redis = redis
        self.keys = keys
        self.rate = rate
        self.burst = max(1, burst)
        self.backoff = backoff
        self.backoff_max = max(backoff, backoff_max)
        self._take = redis.register_script(PACE_LUA)
        self._cool = redis.register_script(COOL_LUA)
        self._queues: dict[str, asyncio.Lock] = {}
        # As limits.RateLimiter does: a process takes LEASE_SECONDS of a fast origin's rate per trip to Redis
        # (one token at a time below 20 a second), so an origin allowing hundreds a second costs no round
        # trip per URL; the rate then holds give or take one lease per process.
        self.lease_size = max(1, min(self.burst, math.ceil(rate * LEASE_SECONDS)))
        self._leases: dict[str, Lease] = {}
        self._waits: dict[str, float] = {}  # origin -> time.monotonic() until which Redis said to wait
        self._refills: dict[str, asyncio.Future[float]] = {}
        self._queued: dict[str, int] = {}

    async def try_now(self, origin: str) -> float:
        """0 when `origin` may be asked now (its token is taken), else the seconds to wait first."""
        while True:
            # A wait Redis gave (a cool-down, or the time until a token) is remembered until it ends: the
            # origin's other URLs in this process wait it out without asking again. First: a cool-down
            # wins over a lease that a refill begun before it brought back.
            if self._waits:
                until = self._waits.get(origin)
                if until is not None:
                    left = until - time.monotonic()
                    if left > 0:
                        return left
                    del self._waits[origin]
            lease = self._leases.get(origin)
            if lease is not None and lease.spend():
                return 0.0
            if self.rate <= 0 and self.backoff <= 0:
                return 0.0
            # Downloads that find the lease empty at the same moment wait for one trip to Redis: each asking
            # for itself would draw a lease each, and all but the last would be thrown away unspent.
            # A finished refill is never awaited again: awaiting a done future does not yield, so after an
            # event-loop stall longer than a lease's life (its lease expired before its pop callback ran)
            # this loop would spin on it forever and wedge the process.
            refill = self._refills.get(origin)
            if refill is None or refill.done():
                refill = self._refills[origin] = asyncio.ensure_future(self._refill(origin))
                refill.add_done_callback(functools.partial(self._forget_refill, origin))
            wait = await asyncio.shield(refill)
            if wait > 0:
                return wait

    def _forget_refill(self, origin: str, done: asyncio.Future[float]) -> None:
        if self._refills.get(origin) is done:  # not a newer refill of the same origin
            del self._refills[origin]

    async def _refill(self, origin: str) -> float:
        """Lease `origin`'s next tokens; 0 when they are there, else the seconds until there are some.

        With the rate off, the lease is of unlimited tokens, and what is asked is only whether the origin
        cools down: one PTTL per lease, not one per URL.
        """
        name = quote(origin, safe="")
        if self.rate <= 0:
            wait_ms = int(await self.redis.pttl(self.keys.origin_cool(name)))
            granted = UNLIMITED if wait_ms <= 0 else 0
        else:
            granted, wait_ms = await self._take(keys=[self.keys.origin_cool(name), self.keys.origin_rate(name)],
                                                args=[self.rate, self.burst, self.lease_size])
        now = time.monotonic()
        if not granted:
            self._remember_wait(origin, now + int(wait_ms) / 1000)
            return int(wait_ms) / 1000
        if len(self._leases) >= LEASES_KEPT:
            self._leases.clear()
        self._leases[origin] = Lease(int(granted), now + ORIGIN_LEASE_LIFE)
        return 0.0

    def _remember_wait(self, origin: str, until: float) -> None:
        if len(self._waits) >= LEASES_KEPT:
            now = time.monotonic()
            self._waits = {name: end for name, end in self._waits.items() if end > now}
            if len(self._waits) >= LEASES_KEPT:
                self._waits.clear()
        self._waits[origin] = until

    async def turn(self, origin: str, sleep: Callable[[float], Awaitable[bool]]) -> bool:
        """Wait until `origin` may be asked, its token taken; False if `sleep` said to stop meanwhile.

        The waiters of one origin in this process queue up, and only the first asks Redis.
        """
        queue = self._queues.setdefault(origin, asyncio.Lock())
        self._queued[origin] = self._queued.get(origin, 0) + 1
        try:
            async with queue:
                while (wait := await self.try_now(origin)) > 0:
                    if not await sleep(wait + PACE_POLL_SLACK):
                        return False
                return True
        finally:
            self._queued[origin] -= 1
            if self._queued[origin] == 0:
                del self._queued[origin], self._queues[origin]

    async def cool(self, origin: str, retry_after: float | None) -> float:
        """Start `origin`'s cool-down after a 429 or 503 (unless one is on); the seconds it lasts."""
        if self.backoff <= 0:
            return 0.0
        name = quote(origin, safe="")
        self._leases.pop(origin, None)
        wait_ms = await self._cool(
            keys=[self.keys.origin_cool(name), self.keys.origin_backoff(name)],
            args=[int(self.backoff * 1000), int(self.backoff_max * 1000), int((retry_after or 0) * 1000),
                  random.random(), STREAK_MEMORY],
        )
        self._remember_wait(origin, time.monotonic() + int(wait_ms) / 1000)
        return int(wait_ms) / 1000


def origin_of(url: str) -> str | None:
    """The origin a URL is paced under: its registrable domain, or its address for a numeric host."""
    try:
        host = URL(url).raw_host
    except (ValueError, TypeError):
        return None
    if not host:
        return None
    return _origin_of_host(host)


@functools.lru_cache(maxsize=LEASES_KEPT)
def _origin_of_host(host: str) -> str:
    # Cached: parsing a numeric host's address took 7 µs of every URL (ipaddress), the biggest part of what
    # politeness cost an ingest's event loop once the leases lasted.
    return registrable_domain(host) or origin_address(host)
