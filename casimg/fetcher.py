"""The download path: one aiohttp session, its limits and timeouts, redirects, and the address guard.

``Fetcher.fetch(url)`` returns one image's body, or raises ``DownloadFailed`` with a short reason for the
job's results ("HTTP 404", "timeout", "blocked address (127.0.0.2 is loopback)", ...) and whether the
failure is worth retrying. A body of up to ``IN_MEMORY`` bytes (nearly every image) is handed over in
memory, so that hashing, validating and writing it take one trip to a worker thread; a larger one
streams to ``<data-dir>/tmp/dl-*.part``, hashed as it is written, so memory per download stays bounded.
Neither is durable yet: the blob store makes it so before the index counts it (casimg.storage).

The address guard (server-side request forgery): casimg must not be made to fetch from the machine it
runs on or from the networks behind it. Every address is checked where it is *used*, in two places:

- ``GuardedResolver`` drops blocked answers from DNS, so a name that resolves to a private address is
  refused, and the address checked is the very one the connection is made to (DNS rebinding, where a
  second lookup answers differently, gets nowhere: there is no second lookup).
- ``socket_factory`` checks the numeric address of every socket right before it connects. aiohttp skips
  the resolver for hosts that look like IP addresses (including ``127.1`` and ``2130706433``), so this
  is where those are refused; it is also the last word for everything else.

Redirects are followed here, not by aiohttp, so each hop gets the scheme check and the guard, and the
whole chain shares one total timeout.

Each hop also holds a place under two caps (scheduler.OriginCaps): one per resolved address, one per
registrable domain. A wait for a place there stops the timeout (``_TurnWait``): it is a wait for a turn,
not the origin's slowness to answer. The address counted is the one connected to: the hop's name is
resolved through ``CachingResolver`` before the request, and aiohttp's connector asks the same cache, so
both see the same answers (aiohttp's own per-host limit counts host:port, which eight ports of one
machine get around).
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import os
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from functools import lru_cache, partial
from pathlib import Path
from typing import Any, Protocol

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver
from yarl import URL

from casimg import tracing
from casimg.config import DEFAULT_USER_AGENT
from casimg.errors import DownloadFailed
from casimg.politeness import ROBOTS_MAX_BYTES, ROBOTS_REDIRECTS, ROBOTS_TIMEOUT, Robots, RobotsFile, opted_out
from casimg.scheduler import OriginCaps, OriginTurn
from casimg.storage import open_temp
from casimg.userinfo import CREDENTIALS

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

SCHEMES = ("http", "https")
REDIRECTS = (301, 302, 303, 307, 308)
READ_CHUNK = 64 * 1024
# A body up to this size stays in memory; past it, chunks go to a temp file in pieces of this size, each
# hashed and written in one trip to a thread. 64 downloads in flight hold at most 32 MiB.
IN_MEMORY = 512 * 1024
# The longest wait an origin's Retry-After is taken for, in seconds: longer than any retry budget or
# cool-down ceiling (the worker and politeness.OriginPace cut it further), and always finite.
RETRY_AFTER_MAX = 24 * 3600.0

# Every range a download must not reach, with the name used in the failure reason. Anything else that
# Python does not call global (is_global) is refused as "non-public" after these.
BLOCKED_NETWORKS: list[tuple[IPNetwork, str]] = [
    (ipaddress.ip_network(cidr), name)
    for cidr, name in (
        ("0.0.0.0/8", "unspecified"),
        ("10.0.0.0/8", "private"),
        ("100.64.0.0/10", "shared address space"),
        ("127.0.0.0/8", "loopback"),
        ("169.254.0.0/16", "link-local"),
        ("172.16.0.0/12", "private"),
        ("192.0.0.0/24", "reserved"),
        ("192.0.2.0/24", "documentation"),
        ("192.168.0.0/16", "private"),
        ("198.18.0.0/15", "benchmarking"),
        ("198.51.100.0/24", "documentation"),
        ("203.0.113.0/24", "documentation"),
        ("224.0.0.0/4", "multicast"),
        ("240.0.0.0/4", "reserved"),
        ("::/128", "unspecified"),
        ("::1/128", "loopback"),
        # IPv6 forms holding an IPv4 address that are refused whole, not unwrapped (see NAT64 below).
        ("::/96", "IPv4-compatible"),
        ("::ffff:0:0:0/96", "IPv4-translated"),
        ("64:ff9b:1::/48", "local-use NAT64"),
        ("100::/64", "discard"),
        ("2001::/23", "reserved"),
        ("2001:db8::/32", "documentation"),
        ("2002::/16", "6to4"),
        ("fc00::/7", "private"),
        ("fe80::/10", "link-local"),
        ("fec0::/10", "site-local"),
        ("ff00::/8", "multicast"),
    )
]
DNS_CACHE_TTL = 10.0  # seconds an answer is reused, as aiohttp's own cache does by default
DNS_CACHE_SIZE = 4096  # names remembered at most; the expired ones go first when it is full
# IPv6 forms that carry an IPv4 address, where the IPv4 address inside is what gets reached and so is the
# one classified. Only the two forms whose inside is fixed by standard are unwrapped: IPv4-mapped (the
# kernel's own dual-stack spelling) and the well-known NAT64 prefix (RFC 6052: the last 32 bits). The
# other forms are blocked whole, above: IPv4-compatible (::/96, deprecated by RFC 4291) and
# IPv4-translated (::ffff:0:0:0/96, RFC 2765) have no public use, so unwrapping them could only let
# through what some local tunnel or translator makes of them; the local-use NAT64 prefix (64:ff9b:1::/48,
# RFC 8215) puts the IPv4 address where the local operator chose, often in front of private IPv4 space.
# An operator who runs such a translator opens its prefix with CASIMG_ALLOW_NETWORKS.
NAT64 = ipaddress.ip_network("64:ff9b::/96")


class BlockedAddress(OSError):
    """Raised inside aiohttp's connector when an address is refused; carries the reason."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@lru_cache(maxsize=DNS_CACHE_SIZE)
def parse_address(host: str) -> IPAddress | None:
    """The IP address a numeric host means, in every spelling a resolver accepts; None for a name.

    Besides the usual forms this reads what inet_aton reads (``127.1``, ``2130706433``, ``0x7f000001``,
    ``017700000001``), because that is what the connection would go to. Remembered per spelling: the
    answer depends on the text alone, and a download asks it of the same host several times (its URL,
    its hop, its socket), which parsed it afresh each time (4-5% of the ingest's event loop, py-spy).
    """
    text = host.strip("[]")
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        pass
    try:
        return ipaddress.IPv4Address(socket.inet_aton(text))
    except (OSError, ValueError):  # ValueError: a NUL inside, which no resolver would read either
        return None


class AddressGuard:
    """Says which addresses downloads may reach: public ones, plus the networks in `allow_networks`."""

    def __init__(self, allow_networks: Iterable[str] = ()) -> None:
        self.allowed: tuple[IPNetwork, ...] = tuple(ipaddress.ip_network(cidr, strict=False) for cidr in allow_networks)
        # The verdict per host as written: it depends on the text and the (fixed) allowed networks alone.
        self._verdicts: dict[str, str | None] = {}

    def refusal(self, host: str) -> str | None:
        """None if `host` (a numeric address) may be connected to, else the reason it may not."""
        try:
            return self._verdicts[host]
        except KeyError:
            pass
        verdict = self._judge(host)
        if len(self._verdicts) >= DNS_CACHE_SIZE:
            self._verdicts.clear()
        self._verdicts[host] = verdict
        return verdict

    def _judge(self, host: str) -> str | None:
        address = parse_address(host)
        if address is None:
            return f"blocked address ({host} is not a numeric address)"
        inner = _embedded_ipv4(address)
        if inner is not None:
            address = inner
        if any(address in network for network in self.allowed if network.version == address.version):
            return None
        for network, name in BLOCKED_NETWORKS:
            if network.version == address.version and address in network:
                return f"blocked address ({address} is {name})"
        if not address.is_global:
            return f"blocked address ({address} is non-public)"
        return None


def _embedded_ipv4(address: IPAddress) -> ipaddress.IPv4Address | None:
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return address.ipv4_mapped
        if address in NAT64:
            return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


class GuardedResolver(AbstractResolver):
    """Resolves with `inner` (aiohttp's default unless given) and keeps only the answers the guard allows."""

    def __init__(self, guard: AddressGuard, inner: AbstractResolver | None = None) -> None:
        self.guard = guard
        self.inner = inner if inner is not None else DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        answers = await self.inner.resolve(host, port, family)
        allowed = [answer for answer in answers if self.guard.refusal(answer["host"]) is None]
        if answers and not allowed:
            raise BlockedAddress(self.guard.refusal(answers[0]["host"]) or "blocked address")
        return allowed

    async def close(self) -> None:
        await self.inner.close()


class CachingResolver(AbstractResolver):
    """Answers from `inner`, each reused for DNS_CACHE_TTL seconds.

    The fetcher asks it for the address a hop will count under, and the connector asks it for the
    addresses to connect to: one cache for both is what makes the address counted the one connected to.
    """

    def __init__(self, inner: AbstractResolver) -> None:
        self.inner = inner
        self._answers: dict[tuple[str, int, int], tuple[float, list[ResolveResult]]] = {}

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        key = (host, port, int(family))
        now = asyncio.get_running_loop().time()
        cached = self._answers.get(key)
        if cached is not None and cached[0] > now:
            return cached[1]
        answers = await self.inner.resolve(host, port, family)
        if len(self._answers) >= DNS_CACHE_SIZE:
            self._answers = {k: v for k, v in self._answers.items() if v[0] > now}
            if len(self._answers) >= DNS_CACHE_SIZE:
                self._answers.clear()
        self._answers[key] = (now + DNS_CACHE_TTL, answers)
        return answers

    async def close(self) -> None:
        await self.inner.close()


@dataclass
class Downloaded:
    """A complete body: its bytes in `data`, or, when it was too large to hold, a temp file at `path`.

    The worker sets `data` to None once the bytes are in a temp file of the store, so that they leave
    memory while the store goes on (worker.py, the store steps).
    """

    size: int
    data: bytes | None = None
    path: Path | None = None
    sha256: str | None = None  # of the temp file's bytes, computed as they were written

    def discard(self) -> None:
        if self.path is not None:
            self.path.unlink(missing_ok=True)


class _TempSink:
    """A temp file that is written and hashed in one step, meant to run in a worker thread."""

    def __init__(self, tmp_dir: Path) -> None:
        self.tmp_dir = tmp_dir
        self.path: Path | None = None
        self._fd: int | None = None
        self._hash = hashlib.sha256()

    def write(self, data: bytes) -> None:
        if self._fd is None:
            self._fd, self.path = open_temp(self.tmp_dir)
        self._hash.update(data)
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view):]

    def finish(self, data: bytes) -> str:
        """Write the last bytes and close the file; returns the hex SHA-256."""
        self.write(data)
        assert self._fd is not None
        os.close(self._fd)
        self._fd = None
        return self._hash.hexdigest()

    def abort(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self.path is not None:
            self.path.unlink(missing_ok=True)


class Aside(Protocol):
    """What a download's caller lends while the download waits for a turn at its origin: the worker's
    download slot (worker.py). ``waited`` gets the seconds the download's clock stood still."""

    waited: float

    def lend(self) -> None:
        """The wait for a turn begins."""

    def forgo(self) -> None:
        """The wait ended without a turn (a cancel): what was lent is not taken back."""

    async def reclaim(self) -> None:
        """The turn came: take back what was lent, while the turn is held."""


class _TurnWait:
    """A request's turn at its origin (a place under ``Fetcher.caps``) when it must be waited for: the
    attempt's timeout stands still meanwhile, and the caller's `aside` is lent.

    Without this, a URL queued behind a slow origin's downloads (8 at a time per address, each up to a
    fetch timeout) spent its attempts waiting for a turn, and failed as "timeout" with no request sent.
    """

    __slots__ = ("_aside", "_clock")

    def __init__(self, clock: asyncio.Timeout, aside: Aside | None = None) -> None:
        self._clock = clock
        self._aside = aside

    async def take(self, turn: OriginTurn) -> None:
        if not turn.would_wait() or self._clock.expired():  # (expired: its cancel is on the way)
            await turn.take()
            return
        loop = asyncio.get_running_loop()
        paused = loop.time()
        when = self._clock.when()
        left = None if when is None else when - paused
        self._clock.reschedule(None)
        try:
            await self._take(turn)
        finally:
            now = loop.time()
            if self._aside is not None:
                self._aside.waited += now - paused
            if left is not None:
                self._clock.reschedule(now + left)

    async def _take(self, turn: OriginTurn) -> None:
        aside = self._aside
        if aside is None:
            await turn.take()
            return
        aside.lend()
        try:
            await turn.take()
        except BaseException:
            aside.forgo()
            raise
        try:
            await aside.reclaim()
        except BaseException:
            turn.release()
            raise


class Fetcher:
    """Downloads for one process: one ClientSession, created in ``start`` and closed in ``close``."""

    def __init__(
        self,
        *,
        tmp_dir: Path,
        max_bytes: int,
        total_timeout: float,
        connect_timeout: float,
        max_connections: int,
        max_per_host: int,
        max_redirects: int,
        max_url_length: int,
        allow_networks: Iterable[str] = (),
        resolver: AbstractResolver | None = None,
        max_per_domain: int | None = None,
        user_agent: str = DEFAULT_USER_AGENT,
        opt_out_tags: Iterable[str] = (),
        robots_timeout: float = ROBOTS_TIMEOUT,
    ) -> None:
        self.tmp_dir = Path(tmp_dir)
        self.max_bytes = max_bytes
        self.total_timeout = total_timeout
        self.connect_timeout = connect_timeout
        self.max_connections = max_connections
        self.max_per_host = max_per_host
        self.max_redirects = max_redirects
        self.max_url_length = max_url_length
        self.user_agent = user_agent
        self.opt_out_tags = tuple(opt_out_tags)
        self.robots_timeout = robots_timeout
        self.guard = AddressGuard(allow_networks)
        # Per address and per registrable domain; a domain's cap defaults to twice an address's.
        self.caps = OriginCaps(max_per_host, max_per_domain or 2 * max_per_host)
        self.robots: Robots | None = None  # set by the owner of the Redis connection, when robots.txt is obeyed
        self._resolver = CachingResolver(GuardedResolver(self.guard, resolver))
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        connector = aiohttp.TCPConnector(
            limit=self.max_connections,
            limit_per_host=0,  # self.caps counts per address and per domain instead
            resolver=self._resolver,
            use_dns_cache=False,  # the CachingResolver is the cache, shared with self._address_of
            socket_factory=self._socket_factory,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            # The total limit is applied around the whole redirect chain in fetch(); sock_read ends a
            # body that stalls (a body that trickles forever is ended by the total).
            timeout=aiohttp.ClientTimeout(sock_connect=self.connect_timeout, sock_read=self.total_timeout),
            headers={"User-Agent": self.user_agent, "Accept": "image/*, */*;q=0.5"},
            cookie_jar=aiohttp.DummyCookieJar(),  # one origin's cookies must not reach another download
            trust_env=False,  # no proxy from the environment: it would get around the address guard
        )

    async def close(self) -> None:
        if self.robots is not None:
            self.robots.close()
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _socket_factory(self, addr_info: Any) -> socket.socket:
        family, kind, proto, _, sockaddr = addr_info
        reason = self.guard.refusal(str(sockaddr[0]))
        if reason is not None:
            raise BlockedAddress(reason)
        return socket.socket(family=family, type=kind, proto=proto)

    async def fetch(self, url: str, budget: float | None = None, aside: Aside | None = None) -> Downloaded:
        """Download `url` within `budget` seconds (the fetch timeout if None), or raise DownloadFailed.

        A wait for a turn at the origin (``self.caps``) does not count against `budget`; `aside` is lent
        meanwhile (the worker lends the download's slot to others).
        """
        if not tracing.enabled:
            return await self._fetch(url, budget, aside)
        with tracing.span("casimg.download", {"url.full": url, "http.request.method": "GET"}, client=True):
            try:
                downloaded = await self._fetch(url, budget, aside)
            except DownloadFailed as failed:
                tracing.annotate({"casimg.outcome": "failed", "casimg.reason": failed.reason})
                raise
            tracing.annotate({"casimg.outcome": "downloaded", "casimg.size": downloaded.size})
            return downloaded

    async def _fetch(self, url: str, budget: float | None, aside: Aside | None) -> Downloaded:
        target = self._check_url(url)
        try:
            async with asyncio.timeout(self.total_timeout if budget is None else budget) as clock:
                return await self._follow(target, _TurnWait(clock, aside))
        except TimeoutError:
            raise DownloadFailed("timeout", permanent=False) from None
        except aiohttp.ClientConnectorError as exc:
            raise _connect_failure(exc) from None
        except aiohttp.InvalidURL as exc:
            raise DownloadFailed(f"invalid URL ({exc.description or exc.url})") from None
        except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError, aiohttp.ClientOSError):
            raise DownloadFailed("connection lost", permanent=False) from None
        except aiohttp.ClientResponseError as exc:
            raise DownloadFailed(f"bad response ({exc.message})") from None
        except aiohttp.ClientError as exc:
            raise DownloadFailed(f"download error ({type(exc).__name__})", permanent=False) from None

    def _check_url(self, url: str) -> URL:
        if len(url) > self.max_url_length:
            raise DownloadFailed(f"URL too long (over {self.max_url_length} characters)")
        return _usable_url(lambda: URL(url), "invalid URL")

    def _check_hop(self, url: URL) -> None:
        """What can be refused from the URL alone, for the first URL and every redirect target."""
        if not url.scheme:
            raise DownloadFailed("not an absolute http(s) URL")
        if url.scheme not in SCHEMES:
            raise DownloadFailed(f"unsupported scheme {url.scheme!r}")
        if not url.host:
            raise DownloadFailed("invalid URL (no host)")
        # A numeric host is refused here with its reason; aiohttp would refuse some spellings
        # (127.1) as "not canonical" before the socket factory ever saw them.
        if parse_address(url.host) is not None:
            reason = self.guard.refusal(url.host)
            if reason is not None:
                raise DownloadFailed(reason)
        # Submitted URLs with credentials are refused at submit (queue.py); this catches redirects to one,
        # and entries queued before that check, so aiohttp never sends a URL's userinfo as Basic auth.
        if url.raw_user is not None or url.raw_password is not None:
            raise DownloadFailed(CREDENTIALS)

    async def _follow(self, url: URL, waiting: _TurnWait) -> Downloaded:
        for _ in range(self.max_redirects + 1):
            self._check_hop(url)
            if self.robots is not None:
                refusal = await self.robots.refusal(url)
                if refusal is not None:
                    raise DownloadFailed(refusal)
            address = await self._address_of(url)
            if tracing.enabled:
                tracing.annotate({"network.peer.address": address})  # the address connected to, after the guard
            turn = self.caps.hold(url.raw_host or "", address)
            await waiting.take(turn)
            try:
                hop = await self._hop(url)
            finally:
                turn.release()
            if isinstance(hop, Downloaded):
                return hop
            url = hop
        raise DownloadFailed(f"too many redirects (over {self.max_redirects})")

    async def post(self, url: str, body: bytes, headers: dict[str, str], budget: float) -> int:
        """POST `body` to `url` (a job's callback) through the same guard as downloads, within `budget` seconds;
        its HTTP status.

        No redirect is followed (a 3xx is the answer), so the guard sees the one address posted to. Raises
        DownloadFailed with a reason when no answer came: permanent for a refused address or URL, not
        for a timeout or a connection that failed.
        """
        assert self._session is not None, "Fetcher.start() was not called"
        target = _usable_url(lambda: URL(url), "invalid URL")
        try:
            async with asyncio.timeout(budget):
                self._check_hop(target)
                await self._address_of(target)
                async with self._session.post(target, data=body, headers=headers, allow_redirects=False) as answer:
                    return answer.status
        except TimeoutError:
            raise DownloadFailed("timeout", permanent=False) from None
        except aiohttp.ClientConnectorError as exc:
            raise _connect_failure(exc) from None
        except aiohttp.ClientError as exc:
            raise DownloadFailed(f"connection failed ({type(exc).__name__})", permanent=False) from None

    async def fetch_robots(self, url: str) -> RobotsFile:
        """An origin's robots.txt at `url`, through the guard like any download but outside the caps (RFC 9309)."""
        try:
            async with asyncio.timeout(self.robots_timeout):
                return await self._follow_robots(_usable_url(lambda: URL(url), "invalid URL"))
        except DownloadFailed as failed:
            return RobotsFile("unreachable", failed.reason)
        except TimeoutError:
            return RobotsFile("unreachable", "timeout")
        except aiohttp.ClientError as exc:
            return RobotsFile("unreachable", f"connection failed ({type(exc).__name__})")

    async def _follow_robots(self, url: URL) -> RobotsFile:
        """The robots.txt fetch takes no turn under ``self.caps``: the downloads of its origin wait for it
        holding their slots (politeness.Robots), and an entry that has its turn may be waiting for a slot
        (worker.py's ``_Lent``), so a turn waited for here could be waited for by both sides at once.
        It is one request per origin per ``robots_ttl``, beside the origin's capped downloads."""
        assert self._session is not None, "Fetcher.start() was not called"
        for _ in range(ROBOTS_REDIRECTS + 1):
            self._check_hop(url)
            await self._address_of(url)  # the guard's answer (and the connector's, from the same cache)
            async with tracing.request_span(url), self._session.get(url, allow_redirects=False) as response:
                if tracing.enabled:
                    tracing.annotate({"http.response.status_code": response.status})
                location = response.headers.get("Location")
                if response.status in REDIRECTS and location:
                    url = _usable_url(partial(_join, response.url, location), "invalid redirect")
                    continue
                if 200 <= response.status < 300:
                    body = bytearray()
                    async for chunk in response.content.iter_chunked(READ_CHUNK):
                        body += chunk
                        if len(body) >= ROBOTS_MAX_BYTES:
                            break
                    return RobotsFile("rules", bytes(body[:ROBOTS_MAX_BYTES]).decode("utf-8", "replace"))
                if 400 <= response.status < 500:
                    return RobotsFile("allow")
                return RobotsFile("unreachable", f"HTTP {response.status}")
        return RobotsFile("allow")  # RFC 9309 2.3.1.2: past five redirects, the file may count as unavailable

    async def _hop(self, url: URL) -> Downloaded | URL:
        """One request: the body, or the URL it redirects to."""
        assert self._session is not None, "Fetcher.start() was not called"
        async with self._session.get(url, allow_redirects=False) as response:
            if tracing.enabled:  # the download's span is the request's: a hop is an event of it
                tracing.annotate({"http.response.status_code": response.status})
            if response.status in REDIRECTS:
                location = response.headers.get("Location")
                if not location:
                    raise DownloadFailed(f"HTTP {response.status} without Location")
                if tracing.enabled:
                    tracing.event("redirect", {"url.full": str(url), "http.response.status_code": response.status})
                return _usable_url(partial(_join, response.url, location), "invalid redirect")
            _check_status(response)
            refused = opted_out(response.headers.getall("X-Robots-Tag", ()), self.opt_out_tags)
            if refused is not None:  # before the body is read: nothing of it is kept
                raise DownloadFailed(f"opted out (X-Robots-Tag: {refused})")
            declared = response.content_length
            if declared is not None and declared > self.max_bytes:
                raise DownloadFailed(f"too large ({declared} bytes, over {self.max_bytes})")
            return await self._save(response)

    async def _address_of(self, url: URL) -> str:
        """The address a request to `url` connects to: the host itself if numeric, else the first
        answer the guard allows, from the cache the connector reads too."""
        host = url.raw_host or ""
        numeric = parse_address(host)
        if numeric is not None:
            return str(numeric)
        try:
            answers = await self._resolver.resolve(host, url.port or 0, socket.AF_UNSPEC)
        except BlockedAddress as blocked:
            raise DownloadFailed(blocked.reason) from None
        except OSError as exc:
            raise _resolve_failure(exc) from None
        if not answers:
            raise DownloadFailed("host not found")
        return str(answers[0]["host"])

    async def _save(self, response: aiohttp.ClientResponse) -> Downloaded:
        """Read the body, in memory while it is small; cut off past max_bytes whatever was declared."""
        declared = response.content_length
        if declared is not None and declared <= IN_MEMORY and "Content-Encoding" not in response.headers:
            # The parser stops at the declared length, so the cut-off needs no chunk loop: one read.
            data = await response.read()
            return Downloaded(len(data), data=data)
        loop = asyncio.get_running_loop()
        sink: _TempSink | None = None
        pending: list[bytes] = []
        pending_bytes = size = 0
        try:
            async for chunk in response.content.iter_chunked(READ_CHUNK):
                size += len(chunk)
                if size > self.max_bytes:
                    raise DownloadFailed(f"too large (over {self.max_bytes} bytes)")
                pending.append(chunk)
                pending_bytes += len(chunk)
                if pending_bytes > IN_MEMORY:
                    sink = sink or _TempSink(self.tmp_dir)
                    await loop.run_in_executor(None, sink.write, b"".join(pending))
                    pending.clear()
                    pending_bytes = 0
            body = b"".join(pending)
            if sink is None:
                return Downloaded(size, data=body)
            digest = await loop.run_in_executor(None, partial(sink.finish, body))
        except BaseException:
            if sink is not None:
                sink.abort()
            raise
        assert sink.path is not None
        return Downloaded(size, path=sink.path, sha256=digest)


def _join(base: URL, location: str) -> URL:
    return base.join(URL(location))


def _usable_url(build: Callable[[], URL], reason: str) -> URL:
    """The URL `build` makes, if a request can be sent to it; else DownloadFailed(`reason`).

    What an origin or a client writes in a URL is not trusted to parse: a port past 65535, an unclosed
    IPv6 bracket or bytes that are not UTF-8 (aiohttp hands header bytes over as surrogates) make yarl
    raise ValueError, and a host holding a control character (a NUL, say) parses but names nothing a
    resolver would read. Either ends the URL with `reason` instead of escaping the download task.
    """
    try:
        url = build()
        host = url.raw_host or ""
        host.encode("ascii")
    except (ValueError, TypeError):  # UnicodeError is a ValueError
        raise DownloadFailed(reason) from None
    if any(ord(c) < 0x21 or ord(c) == 0x7F for c in host):
        raise DownloadFailed(reason)
    return url


def _check_status(response: aiohttp.ClientResponse) -> None:
    status = response.status
    if status == 200:
        return
    if status == 429 or status >= 500:
        raise DownloadFailed(
            f"HTTP {status}", permanent=False, retry_after=retry_after_seconds(response.headers.get("Retry-After"))
        )
    raise DownloadFailed(f"HTTP {status}")


def retry_after_seconds(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delay-seconds or HTTP-date), at most RETRY_AFTER_MAX; None when
    absent or unreadable. Only ASCII digits count: str.isdigit() takes "²" too, which float() refuses."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return min(float(value), RETRY_AFTER_MAX)  # 400 digits make float() infinite
    try:
        moment = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return min(max(0.0, (moment - datetime.now(UTC)).total_seconds()), RETRY_AFTER_MAX)


def _connect_failure(exc: aiohttp.ClientConnectorError) -> DownloadFailed:
    return _resolve_failure(exc.os_error)


def _resolve_failure(cause: OSError) -> DownloadFailed:
    if isinstance(cause, BlockedAddress):
        return DownloadFailed(cause.reason)
    if isinstance(cause, socket.gaierror):
        # A name that does not exist will not exist on a retry; a resolver that is busy may answer later.
        permanent = cause.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME))
        return DownloadFailed("host not found", permanent=permanent)
    return DownloadFailed(f"connection failed ({cause.strerror or type(cause).__name__})", permanent=False)
