"""Politeness to origins: what an origin's owner asks of casimg, and how often casimg may ask it.

- **robots.txt** (``Robots``, RFC 9309): fetched once per origin (scheme, host and port) through the
  download path itself (the address guard, the caps, ``Fetcher.fetch_robots``: at most
  ``ROBOTS_MAX_BYTES``, ``ROBOTS_REDIRECTS`` redirects, a short time limit), kept in Redis for every
  process for ``robots_ttl`` seconds (``KeySpace.robots``: the file's text, already capped in size) and
  parsed with Protego, the parser Scrapy uses; the group for casimg's token is obeyed, else ``*``.
  A 4xx (the file is unavailable) allows everything. A 5xx, a timeout or no connection (unreachable)
  disallows everything, as RFC 9309 2.3.1.4 asks, but only for ``ROBOTS_UNREACHABLE_TTL`` seconds:
  then the file is asked for again. A process asks for one origin's file once, whatever the number of
  downloads that want it at the same moment (one future per origin), and across processes the first
  to claim ``KeySpace.robots_claim`` fetches while the others wait for its answer in Redis (up to the
  fetch's time limit, after which they fetch themselves). A parsed file is reused in the process for
  ``ROBOTS_LOCAL_TTL`` seconds without asking Redis.
- **Opt-out headers** (``opted_out``): an ``X-Robots-Tag`` naming one of the refused directives
  (``noimageindex``, ``noai``, ``noimageai`` by default), for every robot or for casimg's token, fails the
  download before its body is read.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from urllib.parse import quote

import redis.asyncio as aioredis
from protego import Protego
from yarl import URL

from casimg.index import KeySpace

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


Verdict = Protego | str | None  # parsed rules, the reason everything is disallowed, or None: all allowed


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

    async def refusal(self, url: URL) -> str | None:
        """None if robots.txt lets casimg fetch `url`, else the failure reason."""
        verdict = await self._verdict(str(url.origin()))
        if verdict is None:
            return None
        if isinstance(verdict, str):
            return f"disallowed by robots.txt (robots.txt unreachable: {verdict})"
        if verdict.can_fetch(str(url), self.token):
            return None
        return "disallowed by robots.txt"

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
        verdict = _verdict_of(RobotsFile.decode(raw))
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
    return Protego.parse(found.text)
