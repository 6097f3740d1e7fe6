"""The download path against a real origin: bytes, limits, redirects, failures, and the address guard.

All traffic stays on loopback. Downloads are allowed from 127.0.0.1 only; 127.0.0.2 and ::1 play the
forbidden hosts, each with a real listener that counts connections, so a test shows that the guard
refused *before* connecting rather than that nothing was there to answer. The private and public
ranges beyond loopback are covered on the address classifier itself, which sends nothing.
"""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from urllib.parse import quote

import pytest
from aiohttp.abc import AbstractResolver, ResolveResult

from casimg import __version__
from casimg.errors import DownloadFailed
from casimg.fetcher import RETRY_AFTER_MAX, AddressGuard, BlockedAddress, Fetcher, parse_address, retry_after_seconds
from casimg.scheduler import origin_address, registrable_domain
from tests.origin import Origin, image_bytes

# -- the address classifier (no traffic) ----------------------------------------------------------

@pytest.mark.parametrize(("host", "kind"), [
    ("127.0.0.1", "loopback"), ("127.1", "loopback"), ("2130706433", "loopback"), ("0x7f000001", "loopback"),
    ("017700000001", "loopback"), ("0.0.0.0", "unspecified"), ("0", "unspecified"), ("::", "unspecified"),
    ("[::1]", "loopback"), ("::ffff:127.0.0.1", "loopback"), ("[::ffff:7f00:1]", "loopback"),
    ("64:ff9b::a00:1", "private"), ("10.1.2.3", "private"), ("172.16.0.1", "private"),
    ("172.31.255.255", "private"), ("192.168.1.1", "private"), ("100.64.0.1", "shared address space"),
    ("169.254.169.254", "link-local"), ("fe80::1", "link-local"), ("fc00::1", "private"),
    ("fd12:3456::1", "private"), ("224.0.0.1", "multicast"), ("239.255.255.250", "multicast"),
    ("ff02::1", "multicast"), ("240.0.0.1", "reserved"), ("255.255.255.255", "reserved"),
    ("198.18.0.1", "benchmarking"), ("192.0.2.1", "documentation"), ("2001:db8::1", "documentation"),
    ("2002:7f00:1::", "6to4"),
    # IPv4-compatible, IPv4-translated and local-use NAT64 are blocked whole, whatever IPv4 address is inside
    ("::a9fe:a9fe", "IPv4-compatible"), ("[::169.254.169.254]", "IPv4-compatible"), ("::808:808", "IPv4-compatible"),
    ("::ffff:0:a9fe:a9fe", "IPv4-translated"), ("::ffff:0:808:808", "IPv4-translated"),
    ("64:ff9b:1::a9fe:a9fe", "local-use NAT64"), ("64:ff9b:1:ffff:ffff::808:808", "local-use NAT64"),
])
def test_guard_refuses_every_non_public_address_in_every_spelling(host, kind):
    reason = AddressGuard().refusal(host)
    assert reason is not None and reason.startswith("blocked address") and f"is {kind})" in reason


@pytest.mark.parametrize("host", ["8.8.8.8", "1.1.1.1", "93.184.216.34", "2606:4700:4700::1111", "172.32.0.1"])
def test_guard_lets_public_addresses_through(host):
    assert AddressGuard().refusal(host) is None


def test_allow_networks_opens_exactly_the_listed_networks():
    guard = AddressGuard(["127.0.0.1/32", "10.0.0.0/8"])
    assert guard.refusal("127.0.0.1") is None
    assert guard.refusal("::ffff:127.0.0.1") is None  # the same address, IPv4-mapped
    assert guard.refusal("10.200.0.1") is None
    assert "loopback" in (guard.refusal("127.0.0.2") or "")
    assert "loopback" in (guard.refusal("::1") or "")
    assert "private" in (guard.refusal("192.168.0.1") or "")
    assert guard.refusal("11.0.0.1") is None


def test_allow_networks_opens_the_ipv4_in_ipv6_forms_blocked_whole_only_by_their_own_prefix():
    assert "NAT64" in (AddressGuard(["169.254.0.0/16"]).refusal("64:ff9b:1::a9fe:a9fe") or "")
    guard = AddressGuard(["64:ff9b:1::/48", "::ffff:0:0:0/96"])
    assert guard.refusal("64:ff9b:1::a9fe:a9fe") is None
    assert guard.refusal("::ffff:0:a9fe:a9fe") is None
    assert "IPv4-compatible" in (guard.refusal("::a9fe:a9fe") or "")


def test_parse_address_reads_what_a_resolver_would_and_leaves_names_alone():
    assert str(parse_address("127.1")) == "127.0.0.1"
    assert str(parse_address("0x7f.1")) == "127.0.0.1"
    assert parse_address("example.com") is None
    assert parse_address("127.0.0.1.example.com") is None


# -- fixtures -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def forbidden() -> Iterator[Origin]:
    """A listener on 127.0.0.2: a download must never reach it."""
    with Origin("127.0.0.2") as server:
        yield server


@pytest.fixture(scope="module")
def forbidden6() -> Iterator[Origin]:
    with Origin("::1") as server:
        yield server


class ScriptedResolver(AbstractResolver):
    """A DNS that answers each name from a script: a list of answers, one per lookup, the last repeated."""

    def __init__(self, script: dict[str, list[list[str]]]) -> None:
        self.script = script
        self.lookups: dict[str, int] = {}

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
                      ) -> list[ResolveResult]:
        if host not in self.script:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        count = self.lookups[host] = self.lookups.get(host, 0) + 1
        answers = self.script[host][min(count, len(self.script[host])) - 1]
        return [ResolveResult(hostname=host, host=address, port=port,
                              family=socket.AF_INET6 if ":" in address else socket.AF_INET,
                              proto=0, flags=socket.AI_NUMERICHOST) for address in answers]

    async def close(self) -> None:
        return None


async def started(tmp_path: Path, resolver: AbstractResolver | None = None, **limits: object) -> Fetcher:
    options: dict[str, object] = {
        "tmp_dir": tmp_path / "tmp", "max_bytes": 1_000_000, "total_timeout": 5.0, "connect_timeout": 2.0,
        "max_connections": 8, "max_per_host": 4, "max_redirects": 5, "max_url_length": 8192,
        "allow_networks": ["127.0.0.1/32"], "resolver": resolver,
    }
    options.update(limits)
    fetcher = Fetcher(**options)  # type: ignore[arg-type]
    await fetcher.start()
    return fetcher


async def failure(fetcher: Fetcher, url: str) -> DownloadFailed:
    with pytest.raises(DownloadFailed) as failed:
        await fetcher.fetch(url)
    return failed.value


def leftovers(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in (tmp_path / "tmp").iterdir())


# -- downloads ------------------------------------------------------------------------------------

@pytest.mark.gen_test
async def test_a_small_body_is_kept_in_memory_and_touches_no_disk(tmp_path, origin):
    fetcher = await started(tmp_path)
    try:
        got = await fetcher.fetch(origin.url("/img/7.png"))
        unsized = await fetcher.fetch(origin.url("/big?bytes=300000&chunked=1"))  # no Content-Length
    finally:
        await fetcher.close()
    expected = image_bytes(7, "png")
    assert (got.data, got.size, got.path) == (expected, len(expected), None)
    assert unsized.data is not None and len(unsized.data) == unsized.size == 300_000
    assert leftovers(tmp_path) == []


@pytest.mark.gen_test
@pytest.mark.parametrize("chunked", ["", "&chunked=1"])
async def test_a_large_body_streams_to_a_temp_file_hashed_whole(tmp_path, origin, chunked):
    fetcher = await started(tmp_path, max_bytes=3_000_000)
    try:
        got = await fetcher.fetch(origin.url("/big?bytes=2500000" + chunked))
    finally:
        await fetcher.close()
    assert got.data is None and got.path is not None
    data = got.path.read_bytes()
    assert len(data) == got.size == 2_500_000 and hashlib.sha256(data).hexdigest() == got.sha256
    assert got.path.parent == tmp_path / "tmp" and got.path.name.startswith("dl-")
    got.discard()
    assert leftovers(tmp_path) == []


@pytest.mark.gen_test
async def test_limits_and_origin_failures_have_clear_reasons_and_leave_no_temp_file(tmp_path, origin):
    fetcher = await started(tmp_path, max_bytes=200_000, total_timeout=1.0)
    cases = {
        "/big?bytes=300000": ("too large (300000 bytes", True),  # refused from Content-Length
        "/big?bytes=300000&chunked=1": ("too large (over 200000 bytes)", True),  # cut off while streaming
        "/slow": ("timeout", False),
        "/status/404": ("HTTP 404", True),
        "/status/410": ("HTTP 410", True),
        "/status/500": ("HTTP 500", False),
        "/status/503": ("HTTP 503", False),
        "/loop": ("too many redirects (over 5)", True),
        "/redirect/6": ("too many redirects", True),
    }
    try:
        for path, (reason, permanent) in cases.items():
            failed = await failure(fetcher, origin.url(path))
            assert failed.reason.startswith(reason), (path, failed.reason)
            assert failed.permanent is permanent, path
        kept = await fetcher.fetch(origin.url("/redirect/5"))
    finally:
        await fetcher.close()
    assert kept.data is not None
    # A body cut off after it began to stream to a temp file leaves nothing behind either.
    fetcher = await started(tmp_path, max_bytes=1_000_000)
    try:
        streamed = await failure(fetcher, origin.url("/big?bytes=1500000&chunked=1"))
    finally:
        await fetcher.close()
    assert streamed.reason == "too large (over 1000000 bytes)"
    assert leftovers(tmp_path) == []  # every failure cleaned up after itself


@pytest.mark.gen_test
async def test_retry_after_is_read_from_429_and_503(tmp_path, origin):
    fetcher = await started(tmp_path)
    try:
        limited = await failure(fetcher, origin.url("/status/429?retry_after=7"))
        assert (limited.reason, limited.permanent, limited.retry_after) == ("HTTP 429", False, 7.0)
        assert (await failure(fetcher, origin.url("/status/503"))).retry_after is None
    finally:
        await fetcher.close()


def test_retry_after_seconds_reads_both_forms():
    assert retry_after_seconds("120") == 120.0
    soon = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    assert 25 <= (retry_after_seconds(soon) or 0) <= 30
    assert retry_after_seconds(format_datetime(datetime(2000, 1, 1, tzinfo=UTC), usegmt=True)) == 0.0
    assert retry_after_seconds("soon") is None and retry_after_seconds(None) is None
    # What an origin writes is not trusted to convert: digits that are not ASCII, a number float() makes
    # infinite, a date far ahead.
    assert retry_after_seconds("\u00b2") is None and retry_after_seconds("\u0661\u0662") is None
    assert retry_after_seconds("9" * 400) == RETRY_AFTER_MAX
    assert retry_after_seconds(format_datetime(datetime(9999, 1, 1, tzinfo=UTC), usegmt=True)) == RETRY_AFTER_MAX


@pytest.mark.gen_test
async def test_urls_that_cannot_be_fetched_are_refused_before_any_connection(tmp_path):
    fetcher = await started(tmp_path, max_url_length=100)
    cases = {
        "ftp://127.0.0.1/a.jpg": "unsupported scheme 'ftp'",
        "file:///etc/passwd": "unsupported scheme 'file'",
        "javascript:alert(1)": "unsupported scheme 'javascript'",
        "not a url": "not an absolute http(s) URL",
        "/img/1.jpg": "not an absolute http(s) URL",
        "http:///nohost": "invalid URL",
        "http://127.0.0.1/" + "a" * 100: "URL too long (over 100 characters)",
    }
    try:
        for url, reason in cases.items():
            failed = await failure(fetcher, url)
            assert failed.reason.startswith(reason), (url, failed.reason)
            assert failed.permanent
    finally:
        await fetcher.close()


@pytest.mark.gen_test
async def test_urls_and_redirects_with_credentials_are_refused_without_sending_them(tmp_path, origin):
    fetcher = await started(tmp_path)
    target = f"http://user:secret@127.0.0.1:{origin.port}/flaky/credentials?fail=0"
    try:
        assert (await failure(fetcher, target)).reason == "credentials in URL"
        redirected = await failure(fetcher, origin.url("/redirect-to?url=" + quote(target, safe="")))
        assert redirected.reason == "credentials in URL" and redirected.permanent
    finally:
        await fetcher.close()
    assert origin.hits["flaky:credentials"] == 0


@pytest.mark.gen_test
async def test_closed_port_is_a_transient_connection_failure(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    fetcher = await started(tmp_path)
    try:
        failed = await failure(fetcher, f"http://127.0.0.1:{port}/a.jpg")
    finally:
        await fetcher.close()
    assert failed.reason.startswith("connection failed") and not failed.permanent


# -- the address guard end to end -----------------------------------------------------------------

@pytest.mark.gen_test
async def test_forbidden_hosts_in_every_spelling_are_refused_without_connecting(tmp_path, origin, forbidden,
                                                                               forbidden6):
    fetcher = await started(tmp_path)
    port, port6 = forbidden.port, forbidden6.port
    urls = [
        f"http://127.0.0.2:{port}/img/1.jpg",
        f"http://127.2:{port}/img/1.jpg",
        f"http://2130706434:{port}/img/1.jpg",
        f"http://0x7f000002:{port}/img/1.jpg",
        f"http://017700000002:{port}/img/1.jpg",
        f"http://[::ffff:127.0.0.2]:{port}/img/1.jpg",
        f"http://good@127.0.0.2:{port}/img/1.jpg",
        f"http://127.0.0.1:{origin.port}@127.0.0.2:{port}/img/1.jpg",
        f"http://0.0.0.0:{port}/img/1.jpg",
        f"http://[::]:{port6}/img/1.jpg",
        f"http://[::1]:{port6}/img/1.jpg",
        origin.url(f"/redirect-to?url=http://127.0.0.2:{port}/img/1.jpg"),
        origin.url(f"/redirect-to?url=http://[::1]:{port6}/img/1.jpg"),
    ]
    try:
        for url in urls:
            failed = await failure(fetcher, url)
            assert failed.reason.startswith("blocked address"), (url, failed.reason)
            assert failed.permanent, url
        # The allowed address is reachable, and only in its canonical spelling.
        assert (await fetcher.fetch(f"http://127.0.0.1:{origin.port}/img/1.jpg")).size > 0
        odd = await failure(fetcher, f"http://127.1:{origin.port}/img/1.jpg")
        assert odd.reason.startswith("invalid URL") and odd.permanent
    finally:
        await fetcher.close()
    assert sum(forbidden.hits.values()) == 0 and sum(forbidden6.hits.values()) == 0


IPV4_IN_IPV6 = ["::a9fe:a9fe", "::ffff:0:a9fe:a9fe", "64:ff9b:1::a9fe:a9fe"]


@pytest.mark.gen_test
async def test_ipv4_in_ipv6_forms_are_refused_before_connecting(tmp_path, origin):
    """IPv4-compatible, IPv4-translated and local-use NAT64 addresses, as literals, as DNS answers and as
    redirect targets. A "blocked address" reason comes only from the guard, which runs before a socket is
    made: nothing is sent to them."""
    fetcher = await started(tmp_path, resolver=ScriptedResolver({"v4in6.test": [IPV4_IN_IPV6]}))
    # Asserted first, so that a guard letting them through fails here, before any packet could be sent.
    assert all(fetcher.guard.refusal(host) for host in IPV4_IN_IPV6)
    urls = [f"http://[{host}]:80/latest/meta-data/" for host in IPV4_IN_IPV6]
    urls += [origin.url(f"/redirect-to?url=http://[{host}]:80/") for host in IPV4_IN_IPV6]
    try:
        for url in urls:
            failed = await failure(fetcher, url)
            assert failed.reason.startswith("blocked address ("), (url, failed.reason)
            assert failed.permanent, url
        by_name = await failure(fetcher, "http://v4in6.test/latest/meta-data/")
        assert by_name.reason == "blocked address (::a9fe:a9fe is IPv4-compatible)"
    finally:
        await fetcher.close()


@pytest.mark.gen_test
async def test_names_are_checked_on_the_addresses_they_resolve_to(tmp_path, origin, forbidden):
    resolver = ScriptedResolver({
        "private.test": [["127.0.0.2"]],
        "mixed.test": [["127.0.0.2", "127.0.0.1"]],
        "localhost6.test": [["::1"]],
    })
    fetcher = await started(tmp_path, resolver=resolver)
    try:
        failed = await failure(fetcher, f"http://private.test:{forbidden.port}/img/1.jpg")
        assert failed.reason == "blocked address (127.0.0.2 is loopback)"
        assert "loopback" in (await failure(fetcher, f"http://localhost6.test:{forbidden.port}/x")).reason
        # Of several answers, only the allowed ones are used.
        assert (await fetcher.fetch(f"http://mixed.test:{origin.port}/img/2.jpg")).size > 0
        unknown = await failure(fetcher, f"http://unknown.test:{origin.port}/img/2.jpg")
        assert unknown.reason == "host not found" and unknown.permanent
    finally:
        await fetcher.close()
    assert sum(forbidden.hits.values()) == 0


@pytest.mark.gen_test
async def test_dns_rebinding_gets_nowhere(tmp_path, origin, forbidden):
    """A name that answers an allowed address first and a forbidden one after: each connection is made to
    the address that was checked, so the second answer is refused, never connected to."""
    resolver = ScriptedResolver({"rebind.test": [["127.0.0.1"], ["127.0.0.2"]]})
    first = await started(tmp_path, resolver=resolver)
    try:
        assert (await first.fetch(f"http://rebind.test:{origin.port}/img/3.jpg")).size > 0
    finally:
        await first.close()
    second = await started(tmp_path, resolver=resolver)  # a fresh connector: no cached answer, no pooled socket
    try:
        failed = await failure(second, f"http://rebind.test:{forbidden.port}/img/3.jpg")
    finally:
        await second.close()
    assert resolver.lookups["rebind.test"] == 2
    assert failed.reason == "blocked address (127.0.0.2 is loopback)"
    assert sum(forbidden.hits.values()) == 0


# -- caps per address and per registrable domain ----------------------------------------------------

async def timed_batch(fetcher: Fetcher, urls: list[str]) -> tuple[float, int]:
    """Seconds to fetch `urls` at once, and the most downloads seen in flight to 127.0.0.1."""
    peak = 0
    done = asyncio.Event()

    async def watch() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, fetcher.caps.addresses.in_use("127.0.0.1"))
            await asyncio.sleep(0.01)

    watcher = asyncio.ensure_future(watch())
    started = time.monotonic()
    try:
        results = await asyncio.gather(*(fetcher.fetch(url) for url in urls))
    finally:
        done.set()
        await watcher
    assert all(result.size > 0 for result in results)
    return time.monotonic() - started, peak


@pytest.mark.gen_test(timeout=60)
async def test_the_per_host_cap_counts_the_address_whatever_the_port(tmp_path):
    """Three ports of one address are one origin: 6 one-second downloads at 2 at a time take 3 rounds."""
    with Origin() as a, Origin() as b, Origin() as c:
        fetcher = await started(tmp_path, max_per_host=2, max_connections=16, total_timeout=30.0)
        try:
            urls = [origin.url(f"/img/{914_000 + n}.jpg?delay=1") for n, origin in enumerate([a, b, c] * 2)]
            elapsed, peak = await timed_batch(fetcher, urls)
        finally:
            await fetcher.close()
    print(f"6 downloads over 3 ports, 2 per address: {elapsed:.2f} s, peak {peak}")
    assert peak <= 2
    assert elapsed >= 2.9  # by host:port (aiohttp's limit_per_host) all 6 ran at once: about 1 s


@pytest.mark.gen_test(timeout=60)
async def test_the_per_domain_cap_counts_every_name_of_a_registrable_domain(tmp_path):
    """a.example.com and b.example.com on two addresses are one domain: with 2 per domain, 4 one-second
    downloads take 2 rounds, though each address would allow 4."""
    with Origin("127.0.0.3") as a, Origin("127.0.0.4") as b:
        resolver = ScriptedResolver({"a.example.com": [["127.0.0.3"]], "b.example.com": [["127.0.0.4"]]})
        fetcher = await started(tmp_path, resolver=resolver, max_per_host=4, max_per_domain=2, max_connections=16,
                                total_timeout=30.0, allow_networks=["127.0.0.3/32", "127.0.0.4/32"])
        try:
            urls = [f"http://{name}.example.com:{origin.port}/img/{914_100 + n}.jpg?delay=1"
                    for n, (name, origin) in enumerate([("a", a), ("b", b)] * 2)]
            elapsed, _ = await timed_batch(fetcher, urls)
            assert fetcher.caps.domains.in_use("example.com") == 0
        finally:
            await fetcher.close()
    print(f"4 downloads over 2 names of one domain, 2 per domain: {elapsed:.2f} s")
    assert elapsed >= 1.9
    assert resolver.lookups == {"a.example.com": 1, "b.example.com": 1}  # one cache for the cap and the connector


@pytest.mark.gen_test(timeout=60)
async def test_a_wait_for_a_turn_at_the_origin_does_not_count_against_the_timeout(tmp_path, origin):
    """One download at a time to the address, 0.6 s each, a 1 s timeout: the third waits 1.2 s for its
    turn and still gets its whole second (it failed as "timeout", with no request sent). Once its turn
    comes, the clock runs again: a download slower than the timeout fails."""
    fetcher = await started(tmp_path, max_per_host=1, total_timeout=1.0)
    try:
        urls = [origin.url(f"/img/{914_200 + n}.jpg?delay=0.6") for n in range(3)]
        elapsed, peak = await timed_batch(fetcher, urls)
        assert peak == 1 and elapsed >= 1.8
        behind = asyncio.ensure_future(fetcher.fetch(origin.url("/img/914210.jpg?delay=1.5")))
        await asyncio.sleep(0.1)
        assert (await failure(fetcher, origin.url("/img/914211.jpg?delay=1.5"))).reason == "timeout"
        assert (await asyncio.gather(behind, return_exceptions=True))[0].reason == "timeout"
    finally:
        await fetcher.close()


@pytest.mark.gen_test(timeout=30)
async def test_a_robots_fetch_takes_no_turn_behind_the_origins_downloads(tmp_path, origin):
    """One download at a time to the address and a slow one in flight: robots.txt is still fetched
    within its own short time limit (its origin's downloads wait for it), not "unreachable: timeout",
    which would disallow the whole origin for minutes."""
    origin.robots_txt = "User-agent: *\nAllow: /\n"
    fetcher = await started(tmp_path, max_per_host=1, robots_timeout=1.0)
    try:
        slow = asyncio.ensure_future(fetcher.fetch(origin.url("/img/917600.jpg?delay=2")))
        await asyncio.sleep(0.2)
        assert fetcher.caps.addresses.in_use("127.0.0.1") == 1
        found = await fetcher.fetch_robots(origin.url("/robots.txt"))
        assert found.kind == "rules", found
        assert (await slow).size > 0
    finally:
        origin.robots_txt = None
        await fetcher.close()


def test_registrable_domains_come_from_the_shipped_public_suffix_list():
    assert registrable_domain("a.b.example.co.uk") == "example.co.uk"
    assert registrable_domain("x.github.io") == "x.github.io"  # a private suffix: each site its own
    assert registrable_domain("127.0.0.1") is None and registrable_domain("[::1]") is None
    assert registrable_domain("localhost") == "localhost"
    assert origin_address("2001:db8::1") == origin_address("2001:db8::2") == "2001:db8::/64"
    assert origin_address("::ffff:127.0.0.1") == "127.0.0.1"


@pytest.mark.skipif(shutil.which("unshare") is None, reason="unshare(1) is not installed")
def test_the_public_suffix_list_is_read_with_no_network_at_all():
    """In a network namespace of its own (no interface up), the list still loads: it ships in the package."""
    code = ("from casimg.scheduler import registrable_domain as d; "
            "assert d('a.b.example.co.uk') == 'example.co.uk', d('a.b.example.co.uk'); print('ok')")
    result = subprocess.run(["unshare", "-n", sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    if result.returncode != 0 and "Operation not permitted" in result.stderr:
        pytest.skip("no permission to make a network namespace")
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


# -- what the earlier checks hide ------------------------------------------------------------------

@pytest.mark.gen_test
async def test_the_socket_factory_refuses_blocked_addresses_itself(tmp_path):
    """The last check before connect(): every case the URL and resolver checks see is stopped earlier, so
    it is called here directly, with what aiohttp would hand it for a name that resolved to each address."""
    fetcher = await started(tmp_path)
    try:
        for address, family in (("127.0.0.2", socket.AF_INET), ("::1", socket.AF_INET6),
                                ("169.254.169.254", socket.AF_INET), ("::ffff:10.0.0.1", socket.AF_INET6)):
            with pytest.raises(BlockedAddress) as refused:
                fetcher._socket_factory((family, socket.SOCK_STREAM, 0, "", (address, 80)))
            assert refused.value.reason.startswith("blocked address"), address
        allowed = fetcher._socket_factory((socket.AF_INET, socket.SOCK_STREAM, 0, "", ("127.0.0.1", 80)))
        assert allowed.family == socket.AF_INET
        allowed.close()
    finally:
        await fetcher.close()


@pytest.mark.gen_test
async def test_proxy_settings_in_the_environment_are_ignored(tmp_path, origin, monkeypatch):
    """A proxy would make the connection for casimg, out of the address guard's reach."""
    with Origin() as proxy:
        for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "ALL_PROXY"):
            monkeypatch.setenv(name, f"http://127.0.0.1:{proxy.port}")
        monkeypatch.setenv("NO_PROXY", "")
        fetcher = await started(tmp_path)
        try:
            got = await fetcher.fetch(origin.url("/img/77.jpg"))
        finally:
            await fetcher.close()
        assert got.data == image_bytes(77) and sum(proxy.hits.values()) == 0


@pytest.mark.gen_test
async def test_every_redirect_hop_gets_the_scheme_check(tmp_path, origin):
    fetcher = await started(tmp_path)
    try:
        for target, reason in (("ftp://127.0.0.1/a.jpg", "unsupported scheme 'ftp'"),
                               ("file:///etc/passwd", "unsupported scheme 'file'"),
                               ("gopher://127.0.0.1:70/_x", "unsupported scheme 'gopher'")):
            failed = await failure(fetcher, origin.url(f"/redirect-to?url={target}"))
            assert (failed.reason, failed.permanent) == (reason, True), target
    finally:
        await fetcher.close()


@pytest.mark.gen_test(timeout=30)
async def test_one_timeout_covers_the_whole_redirect_chain(tmp_path, origin):
    """Each hop answers within the timeout, the chain does not: a per-request timeout would let an origin
    hold a download for max_redirects times as long."""
    fetcher = await started(tmp_path, total_timeout=2.0)
    try:
        assert (await fetcher.fetch(origin.url("/redirect/4?delay=0.1"))).size > 0
        failed = await failure(fetcher, origin.url("/redirect/4?delay=0.7"))  # 5 answers of 0.7 s each
        assert (failed.reason, failed.permanent) == ("timeout", False)
    finally:
        await fetcher.close()


# -- politeness -------------------------------------------------------------------------------------

@pytest.mark.gen_test
async def test_downloads_say_who_they_are_in_the_user_agent(tmp_path, origin):
    fetcher = await started(tmp_path)
    named = await started(tmp_path, user_agent="casimg/0.1.0 (+https://example.org/bot)")
    try:
        await fetcher.fetch(origin.url("/img/31.png"))
        assert origin.agents["/img/31.png"] == f"casimg/{__version__} (+set CASIMG_USER_AGENT to add a contact)"
        await named.fetch(origin.url("/img/32.png"))
        assert origin.agents["/img/32.png"] == "casimg/0.1.0 (+https://example.org/bot)"
    finally:
        await fetcher.close()
        await named.close()


@pytest.mark.gen_test
async def test_an_opt_out_in_x_robots_tag_fails_the_download_and_keeps_nothing(tmp_path, origin):
    fetcher = await started(tmp_path, opt_out_tags=("noimageindex", "noai", "noimageai"))
    try:
        for tags, refused in ((["noai"], "noai"), (["noindex, NoImageIndex"], "noimageindex"),
                              (["googlebot: noindex", "casimg: noimageai"], "noimageai")):
            query = "&".join(f"tag={quote(tag)}" for tag in tags)
            assert (await failure(fetcher, origin.url(f"/tagged/40.jpg?{query}"))).reason == \
                f"opted out (X-Robots-Tag: {refused})"
        # Another robot's opt-out, and directives that are not opt-outs, leave the download alone.
        for query in ("tag=otherbot%3A+noai", "tag=noindex%2C+nofollow", "tag=unavailable_after%3A+25+Jun+2030"):
            assert (await fetcher.fetch(origin.url(f"/tagged/41.jpg?{query}"))).size > 0
    finally:
        await fetcher.close()
    assert leftovers(tmp_path) == []


@pytest.mark.gen_test
async def test_with_no_opt_out_tags_the_header_is_not_looked_at(tmp_path, origin):
    fetcher = await started(tmp_path)
    try:
        assert (await fetcher.fetch(origin.url("/tagged/42.jpg?tag=noai"))).size > 0
    finally:
        await fetcher.close()
